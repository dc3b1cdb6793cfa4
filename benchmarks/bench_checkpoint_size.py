"""Checkpoint size of every W4A4 method at the published sizes of PixArt-Σ and FLUX.1-dev.

The models are built on the meta device from their published configs (no weights, nothing
downloaded), the family adapter lists the targets, and each method's own cost function
(``analysis.costs.plan_cost``, the same numbers the explorer's Rank plan tab shows, checked against
``QuantLinear.storage_bits`` by tests/test_registry.py) gives the bytes of the quantized layers;
the parameters that stay 16-bit (embedders, final layer, norms) are added at 2 bytes each.

    python -m benchmarks.bench_checkpoint_size            # writes benchmarks/results/checkpoint_size.json

The 16-bit tensors of a checkpoint are stored in the model's dtype: bf16 for these models.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from analysis.costs import plan_cost
from benchmarks.bench_e2e import FLUX_DEV, PIXART_SIGMA_1024, published_config
from dirotq.models import get_adapter
from dirotq.registry import DEFAULT_METHOD, make_config, method_names

OUT = Path(__file__).resolve().parent / "results" / "checkpoint_size.json"

# the published configs (their transformer/config.json), shared with the GPU benchmarks
MODELS = {"FLUX.1-dev": ("FluxTransformer2DModel", FLUX_DEV),
          "PixArt-Sigma-XL-2-1024-MS": ("PixArtTransformer2DModel", PIXART_SIGMA_1024)}
RANK = 32
# extra rows per model: the default method with adapter overrides. PixArt keeps its cross-attention K/V
# 16-bit by default (they read the caption tokens, computed once per prompt); as W4A16 they move the
# checkpoint towards the issue's ≤ 0.30× bf16 (bench_e2e's --pixart-cross-kv w4a16, its default); the
# conditioning linears outside the blocks (timestep/caption embedders, adaLN) as W4A16 too
# ("conditioning": the adapter's weight_only_outside list) bring PixArt-Σ and FLUX.1-dev to their targets
CROSS_KV_W4A16 = {"attn2.to_k": "w4a16", "attn2.to_v": "w4a16"}
OVERRIDE_ROWS = {"PixArt-Sigma-XL-2-1024-MS": [CROSS_KV_W4A16, {**CROSS_KV_W4A16, "conditioning": "w8a16"},
                                               {**CROSS_KV_W4A16, "conditioning": "w4a16"}],
                 "FLUX.1-dev": [{"conditioning": "w8a16"}, {"conditioning": "w4a16"}]}


def meta_model(class_name: str, config: dict) -> torch.nn.Module:
    """The diffusers model of ``class_name`` with ``config``, every tensor on the meta device."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, class_name)
    with init_empty_weights():
        return cls(**published_config(cls, config)[0])


def checkpoint_bytes(model: torch.nn.Module, method: str, rank: int,
                     overrides: dict[str, str | None] | None = None, scale_format: str = "exact") -> dict:
    """Bytes of a checkpoint of ``model`` quantized with ``method`` at one shared ``rank``:
    quantized targets (cost model) + every other parameter at 2 bytes (bf16). ``overrides``: the
    adapter's layer-type overrides (e.g. PixArt's cross-attention K/V as ``"w4a16"``: weight-only
    INT4 codes + scales + bias, as the cost model counts every weight-only target; ``"conditioning"``:
    the family's conditioning linears outside the blocks, e.g. as ``"w8a16"``, 8-bit weights).
    ``scale_format``: "exact" (format A: a 16-bit scale per group) or "int_ratio" (format C, what the
    GPU kernels run: a 16-bit scale per row and a ratio per group, counted at 4 bits as
    ``QuantLinear.storage_bits`` does; today's checkpoints and GPU buffers hold it as int8, 4 bits more
    per group of 64)."""
    adapter = get_adapter(model)
    if overrides:
        adapter = type(adapter)({**adapter.overrides, **adapter.expand_conditioning(model, overrides)})
    targets = adapter.targets(model)
    config = make_config(method, scale_format=scale_format)
    # the uniform rank of `quantize --rank`: W4A4 targets only (a weight-only target has a branch only when named)
    cost = plan_cost(targets, {n: rank for n, s in targets.items() if s.kind == "w4a4"}, method, config=config)["total"]
    target_params = {f"{n}.{p}" for n in targets for p in ("weight", "bias")}
    params = list(model.named_parameters())
    rest = sum(p.numel() for n, p in params if n not in target_params)
    total = cost["total_bytes"] + 2 * rest
    row = {"method": method, "rank": rank, "quantized_layers_bytes": cost["total_bytes"],
           "kept_16bit_params": rest, "total_bytes": total, "total_gib": total / 2**30,
           "ratio_vs_bf16": total / (2 * sum(p.numel() for _, p in params)),
           "extra_vs_w4a4_bytes": cost["extra_bytes"], "layers": cost["layers"]}
    if overrides:
        row["overrides"] = dict(overrides)
    if scale_format != "exact":
        row["scale_format"] = scale_format
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=RANK, help=f"shared 16-bit rank of the ranked methods (default {RANK})")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    import diffusers

    result = {"what": "checkpoint bytes per method at published model sizes (cost model, bf16 16-bit tensors)",
              "command": "python -m benchmarks.bench_checkpoint_size", "date": datetime.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
              "default_method": DEFAULT_METHOD, "models": {}}
    for name, (cls, cfg) in MODELS.items():
        model = meta_model(cls, cfg)
        params = sum(p.numel() for p in model.parameters())
        rows = [checkpoint_bytes(model, m, a.rank) for m in method_names() if m != "w4a16"]
        rows.append(checkpoint_bytes(model, "w4a16", 0))
        rows += [checkpoint_bytes(model, DEFAULT_METHOD, a.rank, o) for o in OVERRIDE_ROWS.get(name, [])]
        # the same in format C, the GPU kernels' format
        rows += [checkpoint_bytes(model, DEFAULT_METHOD, a.rank, o, "int_ratio")
                 for o in [None, *OVERRIDE_ROWS.get(name, [])]]
        result["models"][name] = {"class": cls, "config": cfg, "params": params, "bf16_bytes": 2 * params,
                                  "bf16_gib": 2 * params / 2**30, "methods": rows}
        print(f"{name}: {params / 1e9:.2f} B params, bf16 {2 * params / 2**30:.1f} GiB")
        for r in rows:
            tag = " + " + ", ".join(f"{k} {v}" for k, v in r["overrides"].items()) if "overrides" in r else ""
            tag += ", format C" if r.get("scale_format") == "int_ratio" else ""
            print(f"  {r['method']:<12} r{r['rank']:<3} {r['total_gib']:7.3f} GiB  {r['ratio_vs_bf16']:.3f}× bf16{tag}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
