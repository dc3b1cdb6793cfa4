"""What running the conditioning linears outside the blocks weight-only costs on images, and what it saves.

Every family adapter keeps the linears outside the transformer blocks 16-bit. The conditioning ones
(PixArt: the timestep embedder, adaLN-single's modulation linear and the caption projection; FLUX:
the timestep / guidance / pooled-text embedders, the context embedder and the final adaLN) read a
few tokens per image, so weight-only they cost no time, and at full size they are what stands between
a W4A4 checkpoint and the memory targets (PixArt-Σ with the cross-attention K/V as W4A16: 0.314× bf16,
0.302× with 8-bit conditioning weights, 0.295× with 4-bit; FLUX.1-dev 0.281× → 0.278× / 0.277×:
``benchmarks/bench_checkpoint_size.py``). Their outputs
feed every block (the modulation's shift, scale and gate; the caption tokens every cross-attention
reads), so their weight error could matter more than their size suggests: this study measures it.

Rows, per activation format, on the embedded model with the default method at ``--rank`` (RTN
weights): the family default (reference); the conditioning linears as W4A16 (RTN, then GPTQ on
their calibration inputs) and with 8-bit weights (W8A16); the conditioning split in two (timestep
and adaLN / caption projection) to show which part costs; PixArt's cross-attention K/V as W4A16,
alone and with the conditioning linears (the structures for the memory target).
Image PSNR against the float image of the same prompt and seed, the paired difference to the
reference row (bootstrap CI), and the bytes of the quantized transformer as a checkpoint stores it.

    python -m benchmarks.bench_conditioning --out benchmarks/results/conditioning_tiny_pixart
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench_cross_kv import (
    CROSS_KV,
    add_layer_study_args,
    finish_study,
    image_row,
    record_row,
    study_evaluator,
    study_result,
    study_row,
    study_table,
)
from dirotq.config import KINDS
from dirotq.eval.protocol import make_config
from dirotq.models import get_adapter
from dirotq.models.base import CONDITIONING, OUTSIDE_BLOCKS


def variants(adapter, model) -> dict[str, tuple[dict[str, str], dict | None]]:
    """Label -> (the adapter overrides of that row, the weight settings of its conditioning linears
    where the target kinds cannot say them (GPTQ under an RTN config), else None). The first row, no
    overrides: the family default."""
    conditioning = adapter.expand_conditioning(model, {CONDITIONING: "w4a16"})
    eight = adapter.expand_conditioning(model, {CONDITIONING: "w8a16"})
    timestep = {n: k for n, k in conditioning.items() if "caption" not in n and "context" not in n}
    text = {n: k for n, k in conditioning.items() if n not in timestep}
    cross_kv = {lt: "w4a16" for lt in CROSS_KV} if adapter.family == "pixart" else {}
    rows: dict[str, tuple[dict[str, str], dict | None]] = {
        "default": ({}, None),
        "conditioning W4A16": (conditioning, None),
        "conditioning W4A16, GPTQ": (conditioning, {"weights": "gptq"}),
        "conditioning W8A16": (eight, None),
    }
    if timestep and text:
        rows["timestep + adaLN W4A16"] = (timestep, None)
        rows["text projection W4A16"] = (text, None)
    if cross_kv:
        rows["cross-attn K/V W4A16"] = (cross_kv, None)
        rows["cross-attn K/V W4A16 + conditioning W8A16"] = ({**cross_kv, **eight}, None)
        rows["cross-attn K/V W4A16 + conditioning W4A16, GPTQ"] = ({**cross_kv, **conditioning}, {"weights": "gptq"})
    return rows


def conditioning_row(ev, label: str, cfg, conditioning: list[str], weights: dict, reference: dict, **fields) -> dict:
    """A row whose conditioning linears get their own weight settings (``weights``: W4A16Config
    fields over ``cfg``'s group size and scale format) while every other target follows ``cfg``: the
    conditioning layers are quantized one by one (``quantize_layer``), then ``quantize_`` does the rest.
    Images cached under a key of both configs."""
    from dirotq.eval.images import config_hash, ensure_images
    from dirotq.generate import quantized_copy
    from dirotq.methods import W4A16Config
    from dirotq.quantize import quantize_layer

    wcfg = W4A16Config(group_size=cfg.group_size, scale_format=cfg.scale_format, **weights)
    rest = [n for n in ev.targets if n not in conditioning]
    key = {**ev.base_key, "config": cfg.to_dict(), "conditioning": wcfg.to_dict(), "names": conditioning,
           "calibration": {"prompts": config_hash(ev.calib_prompts), "steps": ev.calib_steps}}

    def build():
        model = quantized_copy(ev.pipe.transformer, cfg, ev.stats, adapter=ev.adapter, targets=rest)
        for name in conditioning:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            stats = ev.stats.for_layer(name) if wcfg.weights == "gptq" else None
            setattr(parent, attr, quantize_layer(getattr(parent, attr), stats, wcfg, spec=ev.targets[name]))
        return model

    folder = ev.out / "images" / f"conditioning-{config_hash(key)}"
    built: dict = {}  # the model, built once: for missing images and for the checkpoint bytes
    imgs = ensure_images(ev.pipe, ev.items, folder, label,
                         transformer_fn=lambda: built.setdefault("model", build()), gen_kw=ev.gen_kw,
                         batch_size=ev.batch_size, counter=ev.generated)
    model = built.get("model") or build()
    return image_row(ev, imgs, model, reference, "vs_default", **fields, tag=cfg.tag(),
                     conditioning_config=wcfg.to_dict())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_layer_study_args(ap, "benchmarks/results/conditioning_tiny_pixart")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    out = Path(a.out)
    result = study_result("bench_conditioning", a, argv)
    pipe = None
    for fmt in [f for f in a.formats.split(",") if f]:
        reference_row = None
        ev = study_evaluator(a, pipe, None)  # the family default loads the pipeline the other rows reuse
        pipe = ev.pipe
        base = get_adapter(pipe.transformer)
        rows = variants(base, pipe.transformer)
        result["meta"]["variants"] = {k: {"overrides": o, "conditioning_weights": w} for k, (o, w) in rows.items()}
        for label, (overrides, weights) in rows.items():
            adapter = type(base)({**base.overrides, **overrides}) if overrides else None
            ev = study_evaluator(a, pipe, adapter)
            cfg = make_config(a.method, rank=a.rank, scale_format=fmt)
            targets = {k: sum(s.kind == k for s in ev.targets.values()) for k in KINDS}
            fields = {"format": fmt, "variant": label, "targets": targets}
            if weights is None:
                row = study_row(ev, f"{a.method}-{fmt}-{label.replace(' ', '_')}", cfg, reference_row, "vs_default",
                                **fields)
            else:
                conditioning = [n for n, s in ev.targets.items() if s.block == OUTSIDE_BLOCKS]
                row = conditioning_row(ev, label, cfg, conditioning, weights, reference_row, **fields)
            reference_row = reference_row or row
            record_row(result, row, ev, out, f"{label:36s}", "vs_default")
    return finish_study(result, out, t0, markdown)


def markdown(result: dict) -> str:
    m = result["meta"]
    return study_table(result, f"Conditioning linears outside the blocks, weight-only ({m['method']} r{m['rank']}, RTN "
                               "weights unless the row says GPTQ)", "layers changed", "variant", "default", "vs_default",
                       "W8A16: 8-bit weights (what `--layer-kind conditioning=w8a16` quantizes). ")


if __name__ == "__main__":
    raise SystemExit(main())
