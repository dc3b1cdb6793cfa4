"""Train the tiny AutoencoderKL of the embedded model on procedural shapes (issue #3, step 2).

Recipe v2 (trained 2026-11-25; not yet in assets/tiny-pixart, whose VAE is the older 4-channel f4): 128×128 RGB ↔ 32×32×8 latents (three DownEncoderBlock2D levels → f4, channels 16/16/32,
8 latent channels, GroupNorm with 8 groups, no mid-block attention: fully convolutional, so it trains on
random 64×64 crops). Why not the preferred f8: in 2.5-minute trials on the 2-core CPU, f8 variants
(16/32/64/64 with 16 latent channels; 32/32/64/64 with 8) were at 15–16 dB where this f4 one was at 23 dB,
and the earlier f4 with 4 latent channels stalled at 22 dB with object colours wrong (black → green): the
encoder ends in GroupNorm → SiLU → conv, which strips per-group means, and 4 channels left too little room
to carry the colour of small objects. 8 channels keep the compression at 6× and the DiT's tokens at
4×4×8 = 128 values (patch 4 → 64 tokens), below its hidden size 256.
Loss: L1 + MSE on pixels + 1e-5·KL/pixel (SD-style weak KL). The decoder is trained on the posterior
*mean* (a deterministic autoencoder with a KL regulariser), so use latent_dist.mode(). After training,
``scaling_factor`` is set to 1 / std of posterior means on 256 held-apart images, so the DiT sees
unit-variance latents.

    python -m scripts.train_tiny_vae --out runs/vae --max-steps 3607 --minutes 1e9 --seed 0 --threads 2 \
        --crop 64 --batch 16 --lr 2e-3 --channels 16,16,32 --latent-channels 8 --norm-groups 8
(scripts/build_tiny_pixart.sh runs exactly this.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

torch.set_flush_denormal(True)

from dirotq.eval.shapes_render import batch  # noqa: E402


def make_vae(channels=(16, 16, 32), latent_channels: int = 8, layers_per_block: int = 1, norm_groups: int = 8):
    """AutoencoderKL with len(channels) levels: downsampling factor 2^(len(channels) - 1)."""
    from diffusers import AutoencoderKL
    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels), layers_per_block=layers_per_block, latent_channels=latent_channels,
        norm_num_groups=norm_groups, sample_size=128, mid_block_add_attention=False, scaling_factor=1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/tiny_vae")
    ap.add_argument("--minutes", type=float, default=14.0)
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after N steps; the lr schedule then follows the step count (reproducible)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128, help="render the procedural images at this size")
    ap.add_argument("--crop", type=int, default=64)  # ≥ image size = full image
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", default="16,16,32", help="block_out_channels; 3 levels = f4, 4 = f8")
    ap.add_argument("--latent-channels", type=int, default=8)
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--norm-groups", type=int, default=8)
    ap.add_argument("--kl-weight", type=float, default=1e-5)
    ap.add_argument("--init", default="", help="start from this AutoencoderKL folder")
    ap.add_argument("--decoder-only", action="store_true",
                    help="freeze encoder + quant_conv (latent space and scaling_factor unchanged), train the decoder")
    ap.add_argument("--sample-latents", action="store_true",
                    help="decode posterior samples (standard VAE); default decodes the posterior mean")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(a.out, exist_ok=True)
    if a.init:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.init).to(dev)
    else:
        vae = make_vae(tuple(int(c) for c in a.channels.split(",")), a.latent_channels,
                       a.layers_per_block, a.norm_groups).to(dev)
    if a.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    rng = np.random.default_rng(a.seed)
    log = open(os.path.join(a.out, "log.jsonl"), "w")
    t0 = time.time()
    budget = a.minutes * 60
    step = 0
    seed_base = 10_000_000  # VAE training seeds; DiT and judge use other ranges
    while (a.max_steps is None or step < a.max_steps) and time.time() - t0 < budget:
        frac = min(1.0, step / a.max_steps if a.max_steps else (time.time() - t0) / budget)
        lr = a.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        seeds = seed_base + step * a.batch + np.arange(a.batch)
        x, _, _ = batch(seeds, "any", a.image_size)
        if a.crop < x.shape[-1]:
            ox, oy = rng.integers(0, x.shape[-1] - a.crop + 1, size=2) // 8 * 8
            x = x[:, :, oy:oy + a.crop, ox:ox + a.crop]
        x = torch.from_numpy(np.ascontiguousarray(x)).to(dev) * 2 - 1
        with torch.set_grad_enabled(not a.decoder_only):
            post = vae.encode(x).latent_dist
        y = vae.decode(post.sample() if a.sample_latents else post.mean).sample
        l1 = (y - x).abs().mean()
        mse = ((y - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + mse + a.kl_weight * kl  # LDM-style weak KL (KL sum / pixel count)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in vae.parameters() if p.requires_grad], 1.0)
        opt.step()
        if step % 20 == 0:
            rec = {"step": step, "t": round(time.time() - t0, 1), "lr": lr, "l1": l1.item(), "mse": mse.item(),
                   "kl_per_dim": kl.item(), "psnr": (10 * math.log10(4 / max(mse.item(), 1e-10)))}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        step += 1
    train_time = time.time() - t0
    # scaling factor from latent statistics on full images
    vae.eval()
    zs, mses = [], []
    with torch.no_grad():
        for i in range(0, 256, 16):
            x, _, _ = batch(range(20_000_000 + i, 20_000_000 + i + 16), "any", a.image_size)
            x = torch.from_numpy(x).to(dev) * 2 - 1
            post = vae.encode(x).latent_dist
            z = post.mean  # the DiT is trained on posterior means
            zs.append(z.cpu())
            mses.append(((vae.decode(post.mean).sample.clamp(-1, 1) - x) ** 2).mean().item())
    z = torch.cat(zs)
    std = z.std().item()
    vae.register_to_config(sample_size=a.image_size)  # the pipeline's default output size
    if not a.decoder_only:
        vae.register_to_config(scaling_factor=float(1.0 / std))
    stats = {"steps": step, "train_seconds": round(train_time, 1), "device": dev, "threads": a.threads,
             "latent_mean": z.mean().item(), "latent_std": std, "latent_channel_mean": z.mean((0, 2, 3)).tolist(),
             "latent_channel_std": z.std((0, 2, 3)).tolist(), "scaling_factor": vae.config.scaling_factor, "decoder_only": a.decoder_only, "init": a.init,
             "image_size": a.image_size, "val_psnr": 10 * math.log10(4 / float(np.mean(mses))),
             "params": sum(p.numel() for p in vae.parameters())}
    print(json.dumps(stats), flush=True)
    vae.save_pretrained(os.path.join(a.out, "vae"))
    json.dump(stats, open(os.path.join(a.out, "vae_stats.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
