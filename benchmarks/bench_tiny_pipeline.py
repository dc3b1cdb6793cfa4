"""Speed of the embedded tiny PixArt-Σ: one 20-step image at the native size on CPU (issue #3 acceptance: < 3 s).

Loads with the stock code path, PixArtSigmaPipeline.from_pretrained("assets/tiny-pixart") (offline),
float32, guidance 4.5 (so every step runs the batch-2 CFG forward), and reports the median wall time
of `--runs` generations after one warm-up, for the default max_sequence_length (300, padded text) and
for 48 (our captions are < 40 tokens; padding is masked, so images are identical).

    python -m benchmarks.bench_tiny_pipeline --threads 2 --out benchmarks/results/tiny_pipeline_cpu.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from dirotq.eval.protocol import device_description  # noqa: E402
from dirotq.eval.report import emit_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "assets", "tiny-pixart"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import PixArtSigmaPipeline
    t = time.time()
    pipe = PixArtSigmaPipeline.from_pretrained(a.model, torch_dtype=torch.float32)
    load_s = time.time() - t
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large red circle on the left and a small blue square on the right, on a white background"
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor  # the pipeline's default
    res = {}
    for msl in (300, 48):
        times = []
        for i in range(a.runs + 1):
            g = torch.Generator().manual_seed(0)
            t = time.perf_counter()
            pipe(prompt, num_inference_steps=a.steps, generator=g,
                 use_resolution_binning=False, max_sequence_length=msl, clean_caption=False, output_type="pil")
            if i:
                times.append(time.perf_counter() - t)
        res[f"max_sequence_length_{msl}"] = {"median_s": round(statistics.median(times), 3),
                                              "min_s": round(min(times), 3), "runs_s": [round(x, 3) for x in times]}
    try:
        load_avg = os.getloadavg()
    except OSError:
        load_avg = None
    out = {"benchmark": "tiny_pixart_20_steps_cpu", "steps": a.steps, "guidance_scale": 4.5, "resolution": size,
           "model": os.path.relpath(a.model, ROOT),
           "dtype": "float32", "threads": a.threads, "cpu_count": os.cpu_count(), "cpu": device_description(),
           "torch": torch.__version__, "load_seconds": round(load_s, 2), "load_average_at_end": load_avg,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **res,
           "note": "shared 2-core machine: the load average shows how busy it was; the minimum is the best "
                   "estimate of the uncontended time",
           "command": " ".join(["python -m benchmarks.bench_tiny_pipeline"] + sys.argv[1:])}
    emit_json(out, a.out)


if __name__ == "__main__":
    main()
