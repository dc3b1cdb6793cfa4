"""Transformer weight memory of the GPU benchmark's variants at the published sizes, counted on the
real buffers (CPU; no GPU needed).

``bench_e2e`` measures weight memory on a GPU, where FLUX.1-dev has so far run at reduced depth. Here
each model is built from its published config with random bf16 weights on the CPU and converted by
``bench_e2e.quantize_model``: the same code and the same layers as on the GPU, so the same buffers
(INT4 or INT8 codes, fp16 scales, int8 format C multipliers, the 16-bit branch, Hadamard signs,
bias). Then every parameter and buffer is counted, by part: each block, and everything outside the
blocks. A GPU holds the same bytes plus its allocator's rounding (blocks of 512 bytes).

FLUX.1-dev (22 GiB in bf16) does not fit this machine next to its converted copy, so it is built
with ``--depth`` double and single blocks (default 1 + 1): its blocks of one kind are identical in
structure, so the published depth's bytes are the bytes outside the blocks plus 19 double and 38
single blocks. ``--check-depth 2`` builds 2 + 2 blocks as well and checks that the same sum
predicts them to the byte. PixArt-Σ is built whole. Each row also gives the cost model's figure
(``bench_checkpoint_size``, ``analysis.costs``), which counts format C's multipliers at the 4 bits
they need where the buffers hold int8.

    python -m benchmarks.bench_weight_memory            # writes benchmarks/results/weight_memory.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.bench_e2e import (
    FLUX_DEV,
    FUSED_VARIANTS,
    PIXART_CROSS_KV_DEFAULT,
    PIXART_SIGMA_1024,
    build,
    quantize_model,
    tensor_bytes,
)

OUT = Path(__file__).resolve().parent / "results" / "weight_memory.json"
RANK = 32
# variant -> what it is (bench_e2e's QUANT_VARIANTS names; "bf16" the model as built)
VARIANTS = {"bf16": "the bf16 model", "int_ratio": "W4A4 format C, DiRotQ-LR r32",
            "int_ratio-fused": "the same with the layers that read one input fused (what a deployment runs)",
            "w4a16-int_ratio": "every target weight-only INT4, format C"}
CONDITIONING = ("16bit", "w8a16")
PUBLISHED_DEPTH = {"pixart": {"transformer_blocks": PIXART_SIGMA_1024["num_layers"]},
                   "flux": {"transformer_blocks": FLUX_DEV["num_layers"],
                            "single_transformer_blocks": FLUX_DEV["num_single_layers"]}}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def bytes_by_part(model: torch.nn.Module) -> dict:
    """``{"outside": bytes, "blocks": {kind: [bytes of block 0, 1, …]}}`` over every parameter and
    buffer of ``model`` (a tensor shared by two names counted once)."""
    seen: set[int] = set()
    outside = 0
    blocks: dict[str, dict[int, int]] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        m = _BLOCK.match(name)
        if m is None:
            outside += tensor_bytes(t)
        else:
            per = blocks.setdefault(m.group(1), {})
            per[int(m.group(2))] = per.get(int(m.group(2)), 0) + tensor_bytes(t)
    return {"outside": outside, "blocks": {k: [v[i] for i in sorted(v)] for k, v in blocks.items()}}


def full_depth_bytes(parts: dict, depth: dict[str, int]) -> int:
    """Bytes at ``depth`` (blocks per kind) from ``bytes_by_part`` of a shallower build of the same
    model. Every block of a kind must hold the same bytes (else the sum would not be exact)."""
    total = parts["outside"]
    for kind, sizes in parts["blocks"].items():
        if len(set(sizes)) != 1:
            raise ValueError(f"the {kind} differ in bytes ({sizes}): their sum cannot be extrapolated")
        total += depth[kind] * sizes[0]
    return total


def measure(model_name: str, variant: str, conditioning: str, depth: dict[str, int] | None) -> dict:
    """Build ``model_name`` (``depth`` blocks per kind; None: the published depth) in bf16 on the CPU,
    convert it to ``variant`` and count its bytes by part."""
    args = SimpleNamespace(flux_double_blocks=None, flux_single_blocks=None)
    if depth is not None:
        if model_name != "flux":
            raise ValueError("only FLUX.1-dev is built at reduced depth")
        args.flux_double_blocks = depth["transformer_blocks"]
        args.flux_single_blocks = depth["single_transformer_blocks"]
    t0 = time.time()
    with torch.no_grad():
        model, _, _ = build(model_name, args, dry=False, dtype=torch.bfloat16)
        layers = None
        if variant != "bf16":
            layers = quantize_model(model, variant, RANK, PIXART_CROSS_KV_DEFAULT, conditioning, dtype=torch.bfloat16)
        if variant in FUSED_VARIANTS:
            from dirotq.fusion import fuse_for_inference

            fuse_for_inference(model)  # one activation side (basis, signs) per group of layers that share an input
    parts = bytes_by_part(model)
    del model
    gc.collect()
    return {"parts": parts, "layers": layers, "seconds": round(time.time() - t0, 1)}


@functools.cache  # one meta-device build per (model, conditioning), not per variant
def cost_model_ratio(model_name: str, conditioning: str) -> float:
    """The format C ratio ``bench_checkpoint_size`` computes for the same target set (cost model)."""
    from benchmarks.bench_checkpoint_size import CROSS_KV_W4A16, checkpoint_bytes, meta_model

    cls, cfg = (("PixArtTransformer2DModel", PIXART_SIGMA_1024) if model_name == "pixart"
                else ("FluxTransformer2DModel", FLUX_DEV))
    overrides = dict(CROSS_KV_W4A16) if model_name == "pixart" and PIXART_CROSS_KV_DEFAULT == "w4a16" else {}
    if conditioning != "16bit":
        overrides["conditioning"] = conditioning
    return checkpoint_bytes(meta_model(cls, cfg), "dirotq-lr", RANK, overrides or None, "int_ratio")["ratio_vs_bf16"]


def compare_with_e2e(result: dict, e2e_json: Path) -> list[dict]:
    """For each variant a ``bench_e2e`` run measured on a GPU (``e2e_json``, its own depth), the bytes
    this run predicts for that depth next to the bytes the GPU run counted."""
    e2e = json.loads(e2e_json.read_text())
    name = e2e["model"]
    if name not in result["models"]:
        return []
    setup = e2e.get("setup", {})
    depth = ({"transformer_blocks": setup["double_blocks"], "single_transformer_blocks": setup["single_blocks"]}
             if name == "flux" else PUBLISHED_DEPTH[name])
    cond = e2e.get("conditioning") or "16bit"  # runs before the option existed kept them 16-bit
    out = []
    for variant, entry in e2e["variants"].items():
        row = result["models"][name]["rows"].get(f"{variant}/{cond if variant != 'bf16' else '16bit'}")
        if row is None or "memory" not in entry:
            continue
        predicted = row["outside_bytes"] + sum(depth[k] * v for k, v in row["block_bytes"].items())
        out.append({"file": e2e_json.name, "model": name, "variant": variant, "conditioning": cond, "depth": depth,
                    "gpu_bytes": entry["memory"]["bytes"], "predicted_bytes": predicted,
                    "equal": entry["memory"]["bytes"] == predicted})
    return out


def run(models: list[str], flux_depth: int, check_depth: int | None, out: Path) -> dict:
    import diffusers

    result = {"what": "transformer weight bytes (every parameter and buffer) of bench_e2e's variants at the published "
                      "depth, random bf16 weights, converted on the CPU",
              "command": "python -m benchmarks.bench_weight_memory", "date": datetime.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
              "rank": RANK, "pixart_cross_kv": PIXART_CROSS_KV_DEFAULT, "models": {}}
    for name in models:
        published = PUBLISHED_DEPTH[name]
        built = None if name == "pixart" else {k: flux_depth for k in published}
        rows: dict = {}
        for variant in VARIANTS:
            for cond in CONDITIONING if variant != "bf16" else ("16bit",):
                m = measure(name, variant, cond, built)
                row = {"variant": variant, "conditioning": cond, "layers": m["layers"], "built_depth": built,
                       "bytes": full_depth_bytes(m["parts"], published), "outside_bytes": m["parts"]["outside"],
                       "block_bytes": {k: v[0] for k, v in m["parts"]["blocks"].items()}, "seconds": m["seconds"]}
                if check_depth and built is not None:
                    deeper = {k: check_depth for k in published}
                    m2 = measure(name, variant, cond, deeper)
                    row["check"] = {"built_depth": deeper, "measured_bytes": full_depth_bytes(m2["parts"], deeper),
                                    "predicted_bytes": full_depth_bytes(m["parts"], deeper)}
                    if row["check"]["measured_bytes"] != row["check"]["predicted_bytes"]:
                        raise AssertionError(f"{name} {variant}: depth extrapolation off: {row['check']}")
                rows[f"{variant}/{cond}"] = row
                bf16 = rows["bf16/16bit"]["bytes"]
                row["ratio_vs_bf16"] = round(row["bytes"] / bf16, 4)
                if variant.startswith("int_ratio"):
                    row["cost_model_ratio_vs_bf16"] = round(cost_model_ratio(name, cond), 4)
                print(f"{name:<6} {variant:<16} conditioning {cond:<6} {row['bytes'] / 2**30:7.3f} GiB  "
                      f"{row['ratio_vs_bf16']:.4f}× bf16"
                      + (f"  (cost model {row['cost_model_ratio_vs_bf16']:.4f}×)" if "cost_model_ratio_vs_bf16" in row
                         else "") + f"  [{row['seconds']} s]", flush=True)
                result["models"][name] = {"published_depth": published, "rows": rows}
                out.write_text(json.dumps(result, indent=1) + "\n")  # after every row
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(PUBLISHED_DEPTH), default=list(PUBLISHED_DEPTH))
    ap.add_argument("--depth", type=int, default=1, help="FLUX.1-dev blocks of each kind to build (default 1)")
    ap.add_argument("--check-depth", type=int, default=2,
                    help="also build FLUX.1-dev at this depth and check the extrapolation to the byte (0: skip)")
    ap.add_argument("--compare", type=Path, nargs="*", default=[],
                    help="bench_e2e JSONs from a GPU: predict their variants' bytes at their depth and compare")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    if a.depth < 1 or (a.check_depth and a.check_depth == a.depth):
        ap.error("--depth must be ≥ 1 and --check-depth another depth (or 0)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    result = run(a.models, a.depth, a.check_depth or None, a.out)
    checks = [c for path in a.compare for c in compare_with_e2e(result, path)]
    for c in checks:
        print(f"{c['file']}: {c['variant']:<16} GPU {c['gpu_bytes']} bytes, predicted {c['predicted_bytes']}"
              f" {'(equal)' if c['equal'] else '(DIFFERENT)'}")
    if checks:
        result["gpu_comparison"] = checks
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
