"""Write the embedded model's reference image for tests/test_embedded_model.py (issue #3).

Generates the reference prompt with assets/tiny-pixart (float32, CPU, fixed seed, 20 steps) exactly as
the test does, stores the uint8 image (tests/data/tiny_pixart_ref.npz) and the settings plus the
judge's reading of it (tests/data/tiny_pixart_ref.json). Rerun after the shipped model changes.

    python scripts/make_test_reference.py --prompt "a large red circle in the center, on a white background"
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from tests.test_embedded_model import JUDGE, MODEL, REF, generate_reference_image  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", default="a large red circle in the center, on a white background")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from diffusers import PixArtSigmaPipeline

    from analysis.judge import describe, load_judge, predict, score_images
    torch.set_num_threads(2)
    settings = {"prompt": a.prompt, "seed": a.seed, "steps": 20, "guidance_scale": 4.5, "max_sequence_length": 48,
                "dtype": "float32", "device": "cpu"}
    json_path = os.path.join(os.path.dirname(REF), "tiny_pixart_ref.json")
    json.dump(settings, open(json_path, "w"), indent=1)  # generate_reference_image reads the settings from here
    pipe = PixArtSigmaPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    _, img = generate_reference_image(pipe)
    judge = load_judge(JUDGE)
    settings["judge_reading"] = describe(predict(judge, img[None]), 0)
    settings["judge_score"] = score_images(judge, img[None], [a.prompt])
    json.dump(settings, open(json_path, "w"), indent=1)
    np.savez_compressed(REF, image=img)
    print(json.dumps(settings, indent=1))


if __name__ == "__main__":
    main()
