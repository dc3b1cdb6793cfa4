"""Assemble assets/tiny-pixart from a training checkpoint (issue #3, step 5).

Copies the fp16 diffusers pipeline folder written by scripts/train_tiny_pixart.py, optionally swaps
in a fine-tuned VAE *decoder* (scripts/train_tiny_vae.py --decoder-only: the encoder, hence the latent
space and scaling_factor the DiT was trained on, is unchanged), re-saves every model in fp16
safetensors, checks the size budget (≤ 40 MB) and that it loads offline in float32, and writes the
model card (README.md) from the training logs and the evaluation JSON.

    python -m scripts.package_tiny_pixart --ckpt runs/tiny_pixart/pipeline --vae runs/tiny_vae_dec/vae \
        --out assets/tiny-pixart
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def folder_mb(path):
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="runs/tiny_pixart/pipeline")
    ap.add_argument("--vae", default="", help="AutoencoderKL folder whose decoder replaces the checkpoint's")
    ap.add_argument("--vae-full", default="", help="AutoencoderKL folder that replaces the whole VAE (its encoder "
                    "must be the one that encoded the DiT's training latents, scaling_factor as in training)")
    ap.add_argument("--out", default="assets/tiny-pixart")
    ap.add_argument("--card", default="assets/tiny-pixart/README.md", help="model card source (copied to README.md)")
    a = ap.parse_args()
    from diffusers import AutoencoderKL, PixArtSigmaPipeline
    pipe = PixArtSigmaPipeline.from_pretrained(a.ckpt, torch_dtype=torch.float32)
    if a.vae:
        ft = AutoencoderKL.from_pretrained(a.vae, torch_dtype=torch.float32)
        enc_same = all(torch.allclose(p.float(), q.float(), atol=1e-2) for p, q in
                       zip(pipe.vae.encoder.parameters(), ft.encoder.parameters()))
        assert enc_same, "the replacement VAE has a different encoder: the DiT's latent space would change"
        assert abs(ft.config.scaling_factor - pipe.vae.config.scaling_factor) < 1e-6
        pipe.vae.decoder.load_state_dict(ft.decoder.state_dict())
        pipe.vae.post_quant_conv.load_state_dict(ft.post_quant_conv.state_dict())
    if a.vae_full:
        pipe.vae = AutoencoderKL.from_pretrained(a.vae_full, torch_dtype=torch.float32)
    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    # portable tokenizer class name: transformers 5 writes "TokenizersBackend", 4.x only knows
    # PreTrainedTokenizerFast (an alias of the same class in 5.x)
    mi = json.load(open(os.path.join(tmp, "model_index.json")))
    mi["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    json.dump(mi, open(os.path.join(tmp, "model_index.json"), "w"), indent=2)
    tc_path = os.path.join(tmp, "tokenizer", "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("backend", None)
    json.dump(tc, open(tc_path, "w"), indent=2)
    state = os.path.join(a.ckpt, "train_state.json")
    if os.path.exists(state):
        shutil.copy(state, os.path.join(tmp, "train_state.json"))
    if os.path.exists(a.card):
        shutil.copy(a.card, os.path.join(tmp, "README.md"))
    mb = folder_mb(tmp)
    assert mb <= 40, f"{mb:.1f} MB > 40 MB"
    PixArtSigmaPipeline.from_pretrained(tmp, torch_dtype=torch.float32, local_files_only=True)  # loads offline
    shutil.rmtree(a.out, ignore_errors=True)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {mb:.2f} MB")


if __name__ == "__main__":
    main()
