"""The VAE's ceiling for the judge: reconstruct real procedural images and score them (issue #3).

No DiT can draw better than its VAE decodes, so before training a DiT on a VAE's latents check what the
judge reads on that VAE's reconstructions (posterior mean → decode) against the real renders.

    python -m scripts.eval_vae_judge --vae runs/vae/vae --size 128 --n 300 --out runs/vae/judge_ceiling.json
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from dirotq.eval.judge import load_judge, score_images  # noqa: E402
from dirotq.eval.metrics import psnr  # noqa: E402
from dirotq.eval.report import emit_json  # noqa: E402
from dirotq.eval.shapes_render import batch  # noqa: E402


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, chunk: int = 50) -> torch.Tensor:
    """images: (N, 3, H, W) in [0, 1] → the VAE's reconstructions (posterior mean → decode), float32 in [0, 1]."""
    dtype = next(vae.parameters()).dtype
    rec = torch.cat([vae.decode(vae.encode((images[i:i + chunk] * 2 - 1).to(dtype)).latent_dist.mean).sample
                     for i in range(0, len(images), chunk)]).float()
    return ((rec + 1) / 2).clamp(0, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", required=True, help="AutoencoderKL folder")
    ap.add_argument("--judge", default="assets/judge")
    ap.add_argument("--size", type=int, default=128, help="render size of the procedural images")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed-base", type=int, default=900_000, help="images example(seed_base + i, 'train')")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(a.vae, torch_dtype=torch.float32).eval()
    judge = load_judge(a.judge)
    x, caps, _ = batch(range(a.seed_base, a.seed_base + a.n), "train", a.size)
    x = torch.from_numpy(x)
    rec = reconstruct(vae, x)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    res = {"vae": a.vae, "image_size": a.size, "n_images": a.n, "psnr_db": round(psnr(rec, x), 2),
           "judge_on_real": score_images(judge, x, caps), "judge_on_reconstructions": score_images(judge, rec, caps),
           "latent_shape": [vae.config.latent_channels, a.size // factor, a.size // factor],
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    emit_json(res, a.out)


if __name__ == "__main__":
    main()
