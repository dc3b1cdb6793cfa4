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
from dirotq.models import get_adapter
from dirotq.registry import DEFAULT_METHOD, method_names

OUT = Path(__file__).resolve().parent / "results" / "checkpoint_size.json"

# Published configs (the transformer/config.json of each model id), widths and depths only matter here.
MODELS = {
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "PixArt-Sigma-XL-2-1024-MS": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, norm_type="ada_norm_single", caption_channels=4096, sample_size=128,
        patch_size=2, interpolation_scale=2, use_additional_conditions=False)),
}
RANK = 32


def meta_model(class_name: str, config: dict) -> torch.nn.Module:
    """The diffusers model of ``class_name`` with ``config``, every tensor on the meta device."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        return getattr(diffusers, class_name).from_config(config)


def checkpoint_bytes(model: torch.nn.Module, method: str, rank: int) -> dict:
    """Bytes of a checkpoint of ``model`` quantized with ``method`` at one shared ``rank``:
    quantized targets (cost model) + every other parameter at 2 bytes (bf16)."""
    targets = get_adapter(model).targets(model)
    cost = plan_cost(targets, {n: rank for n in targets}, method)["total"]
    target_params = {f"{n}.{p}" for n in targets for p in ("weight", "bias")}
    rest = sum(p.numel() for n, p in model.named_parameters() if n not in target_params)
    total = cost["total_bytes"] + 2 * rest
    return {"method": method, "rank": rank, "quantized_layers_bytes": cost["total_bytes"],
            "kept_16bit_params": rest, "total_bytes": total, "total_gib": total / 2**30,
            "extra_vs_w4a4_bytes": cost["extra_bytes"], "layers": cost["layers"]}


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
        result["models"][name] = {"class": cls, "config": cfg, "params": params, "bf16_bytes": 2 * params,
                                  "bf16_gib": 2 * params / 2**30, "methods": rows}
        print(f"{name}: {params / 1e9:.2f} B params, bf16 {2 * params / 2**30:.1f} GiB")
        for r in rows:
            print(f"  {r['method']:<12} r{r['rank']:<3} {r['total_gib']:7.2f} GiB")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
