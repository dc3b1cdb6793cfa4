"""Activation outlier statistics of the embedded tiny PixArt-Σ (issue #3 closing report;
the model card: assets/tiny-pixart/README.md).

Runs the pipeline on calibration prompts (float32, CFG, a short DPM-Solver++ schedule) with forward
hooks on every nn.Linear inside the transformer blocks and on each block's output (the residual
stream), and reports per layer type:
- ratio: per-channel abs-max of the layer *input*, max over channels / median over channels
  (real DiTs show strong outlier channels: ratios of tens to hundreds);
- kurtosis: of all input values (Gaussian = 3).
Each is summarised over the blocks (median and max). The same numbers for a randomly initialised
transformer of the same config are printed as the reference point.

    python -m scripts.activation_report --model assets/tiny-pixart --prompts 16 --steps 10 \
        --out benchmarks/results/tiny_pipeline_activations.json
"""
from __future__ import annotations

import argparse
import os
import re
import time
from collections import defaultdict

import torch

from dirotq.eval.protocol import read_prompts  # noqa: E402
from dirotq.eval.report import emit_json  # noqa: E402

LAYER_TYPES = ["attn1.to_q", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj",
               "ff.net.2", "block_output(residual)"]


class Stats:
    def __init__(self):
        self.absmax = None
        self.n = 0
        self.s1 = self.s2 = self.s4 = 0.0
        self.vals = []

    def add(self, x: torch.Tensor):
        x = x.detach().float().reshape(-1, x.shape[-1])
        am = x.abs().amax(0)
        self.absmax = am if self.absmax is None else torch.maximum(self.absmax, am)
        xd = x.double()
        self.n += xd.numel()
        self.s1 += xd.sum().item()
        self.s2 += (xd ** 2).sum().item()
        self.vals.append(xd.flatten()[:: max(1, xd.numel() // 20000)])

    def summary(self):
        med = self.absmax.median().item()
        v = torch.cat(self.vals)
        v = v - v.mean()
        kurt = ((v ** 4).mean() / (v ** 2).mean() ** 2).item()
        top = torch.topk(self.absmax, 3).indices.tolist()
        return {"ratio": self.absmax.max().item() / max(med, 1e-12), "kurtosis": kurt, "top_channels": top,
                "absmax": self.absmax.max().item()}


def layer_type(name: str) -> str | None:
    m = re.match(r"transformer_blocks\.\d+\.(.+)$", name)
    if not m:
        return None
    return m.group(1)


def collect(pipe, prompts, steps):
    stats = defaultdict(Stats)
    hooks = []
    for name, mod in pipe.transformer.named_modules():
        t = layer_type(name)
        if isinstance(mod, torch.nn.Linear) and t is not None:
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: stats[n].add(i[0])))
        if re.fullmatch(r"transformer_blocks\.\d+", name):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: stats[n + ".block_output(residual)"].add(o)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(0, len(prompts), 8):
            pipe(prompts[i:i + 8], num_inference_steps=steps, generator=g,
                 use_resolution_binning=False, max_sequence_length=48, clean_caption=False, output_type="latent")
    for h in hooks:
        h.remove()
    by_type = defaultdict(list)
    for n, s in stats.items():
        t = n.split(".", 2)[2]
        by_type[t].append((n, s.summary()))
    out = {}
    for t in LAYER_TYPES:
        rows = by_type.get(t, [])
        if not rows:
            continue
        ratios = torch.tensor([r["ratio"] for _, r in rows])
        kurts = torch.tensor([r["kurtosis"] for _, r in rows])
        worst = max(rows, key=lambda r: r[1]["ratio"])
        out[t] = {"ratio_median": ratios.median().item(), "ratio_max": ratios.max().item(),
                  "kurtosis_median": kurts.median().item(), "kurtosis_max": kurts.max().item(),
                  "worst_layer": worst[0], "worst_top_channels": worst[1]["top_channels"], "n_layers": len(rows)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/tiny-pixart")
    ap.add_argument("--prompt-file", default="assets/prompts/calibration.txt")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-random-reference", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
    pipe = PixArtSigmaPipeline.from_pretrained(a.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = read_prompts(a.prompt_file, limit=a.prompts)
    t0 = time.time()
    res = {"trained": collect(pipe, prompts, a.steps)}
    if not a.no_random_reference:
        torch.manual_seed(0)
        pipe.transformer = PixArtTransformer2DModel.from_config(pipe.transformer.config)
        res["random_init"] = collect(pipe, prompts, a.steps)
    res.update({"model": a.model, "n_prompts": len(prompts), "steps": a.steps, "cfg": 4.5,
                "seconds": round(time.time() - t0, 1),
                "definition": "ratio = max_c absmax_c / median_c absmax_c of the layer input over all tokens, steps and "
                              "CFG branches; kurtosis of all input values (Gaussian 3); median/max over blocks"})
    emit_json(res, a.out)
    # markdown table for assets/tiny-pixart/README.md
    print("\n| layer input | ratio median | ratio max | kurtosis median | kurtosis max | random-init ratio max |")
    print("|---|---|---|---|---|---|")
    for t, r in res["trained"].items():
        ri = res.get("random_init", {}).get(t, {}).get("ratio_max", float("nan"))
        print(f"| {t} | {r['ratio_median']:.1f} | {r['ratio_max']:.1f} | {r['kurtosis_median']:.1f} | "
              f"{r['kurtosis_max']:.1f} | {ri:.1f} |")


if __name__ == "__main__":
    main()
