"""Memory and compute cost of a rank plan, summed from each method's own cost function.

Per layer W: (o, d), rank r, group g, counted exactly as ``QuantLinear.storage_bits`` stores it:
4-bit codes over the padded quantized width, their scales (one 16-bit scale per group in format A; one
per row and a 4-bit ratio per group in format C), plus what the method adds
(``MethodSpec.cost`` in the method's file under dirotq/methods/: its extra 16-bit tensors, the
width of its 4-bit GEMM and its extra 16-bit FLOPs per token), bias at 16 bits. "Extra" is against
the plain W4A4 baseline (RTN: codes + scales + bias). Nothing here needs the model: only widths,
ranks and the method's config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from dirotq.config import WEIGHT_ONLY_KINDS, QuantConfig
from dirotq.methods import BRANCH_METHODS, weight_only_target_config
from dirotq.registry import get_method, make_config


def _pad(n: int, g: int) -> int:
    return int(math.ceil(n / g) * g) if n else 0


def _w4(o: int, k: int, g: int, bits: int = 4, scale_format: str = "exact") -> dict[str, float]:
    """Bits of a ``bits``-bit weight (o, k) (4 or 8): codes over the padded width + its scales, one
    fp16 per group (format A, "exact") or one fp16 per row and a 4-bit ratio per group (format C,
    "int_ratio"), as ``QuantLinear.storage_bits`` counts them; 16 bits: the weight itself."""
    if bits == 16:
        return {"weight": 16.0 * o * k}
    groups = math.ceil(k / g) if k else 0
    scales = (16.0 * o + 4.0 * o * groups) if scale_format == "int_ratio" else 16.0 * o * groups
    return {"weight": float(bits) * o * _pad(k, g), "scales": scales if k else 0.0}


def layer_cost(d: int, o: int, method: str, rank: int = 0, *, config: QuantConfig | None = None, bias: bool = True,
               kind: str = "w4a4") -> dict[str, Any]:
    """Storage (bits, by tensor, named as ``QuantLinear.storage_bits``) and FLOPs per token of one
    quantized layer under ``method`` (its default config unless ``config`` is given), plus the
    W4A4 (RTN) and BF16 references.

    ``kind="w4a16"`` / ``"w8a16"`` targets run weight-only whatever the method (W8A16 with 8-bit
    weights); a rank on one is its 16-bit branch under the PCA methods (DiRotQ-LR's form,
    ``weight_only_branch_config``) and is ignored under the others. Unranked methods ignore ``rank``.
    """
    spec = get_method(method)
    config = config if config is not None else make_config(method)
    g = config.group_size
    weight_only = kind in WEIGHT_ONLY_KINDS
    r = int(rank) if spec.ranked and (not weight_only or config.method in BRANCH_METHODS) else 0
    if not 0 <= r <= d:
        raise ValueError(f"rank {r} out of range [0, {d}]")
    if weight_only:
        config = weight_only_target_config(config, kind, r)
        method = config.method
        spec = get_method(method)
    extra = spec.cost(d, o, r, config)
    if weight_only:  # the branch adds no activation quantization: the GEMM's input stays 16-bit
        extra = dataclasses.replace(extra, activations_16bit=True)
    bits = dict(extra.extra_bits)
    k4 = d if extra.quantized_width is None else extra.quantized_width
    fmt = config.scale_format
    bits.update(_w4(o, k4, g, config.weight_bits, fmt))
    if bias:
        bits["bias"] = 16.0 * o
    base = _w4(o, d, g, 4, fmt)  # the plain W4A4 layer in the same scale format: "extra" is the method's own
    base_bits = base["weight"] + base["scales"] + (16.0 * o if bias else 0.0)
    total = sum(bits.values())
    extra16 = extra.params16
    return {
        "method": method, "rank": r, "d": d, "o": o, "bits": bits, "total_bits": total,
        "w4a4_bits": base_bits, "bf16_bits": 16.0 * o * d + (16.0 * o if bias else 0.0),
        "extra_params16": extra16, "extra_bits": total - base_bits,
        "flops_lowbit": 2.0 * o * k4, "flops16_extra": float(extra.flops16), "flops_w4a4": 2.0 * o * d,
        "activations_16bit": extra.activations_16bit,
    }


def plan_cost(targets: Mapping[str, Any], ranks: Mapping[str, int], method: str, *,
              config: QuantConfig | None = None, bias: bool = True) -> dict[str, Any]:
    """Costs of every target under ``ranks`` (layer -> rank; missing layers rank 0).

    ``targets``: name -> TargetSpec (``in_features``, ``out_features``, ``kind``, ``block``,
    ``layer_type``). Returns ``{"layers": [per-layer dict + name/block/layer_type], "total": {...}}``
    with totals in bytes and relative numbers: ``memory_vs_w4a4``, ``memory_vs_bf16``,
    ``flops_extra_vs_w4a4`` (extra 16-bit FLOPs / W4A4 GEMM FLOPs).
    """
    rows = []
    for name, s in targets.items():
        c = layer_cost(s.in_features, s.out_features, method, int(ranks.get(name, 0)), config=config, bias=bias,
                       kind=getattr(s, "kind", "w4a4"))
        c.update(name=name, block=s.block, layer_type=s.layer_type)
        rows.append(c)
    tb = sum(c["total_bits"] for c in rows)
    wb = sum(c["w4a4_bits"] for c in rows)
    bb = sum(c["bf16_bits"] for c in rows)
    f16 = sum(c["flops16_extra"] for c in rows)
    f4 = sum(c["flops_w4a4"] for c in rows)
    total = {
        "method": method, "layers": len(rows), "total_bytes": tb / 8, "w4a4_bytes": wb / 8, "bf16_bytes": bb / 8,
        "extra_params16": sum(c["extra_params16"] for c in rows), "extra_bytes": (tb - wb) / 8,
        "memory_vs_w4a4": tb / wb if wb else 1.0, "memory_vs_bf16": tb / bb if bb else 0.0,
        "flops16_extra": f16, "flops_w4a4": f4, "flops_extra_vs_w4a4": f16 / f4 if f4 else 0.0,
        "sum_rank": sum(c["rank"] for c in rows),
    }
    return {"layers": rows, "total": total}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cost_summary_text(total: Mapping[str, Any]) -> str:
    """One Markdown paragraph for the UI."""
    return (f"**{total['method']}**, {total['layers']} layers, Σ rank {total['sum_rank']}: "
            f"{human_bytes(total['total_bytes'])} of quantized layers "
            f"(**{total['memory_vs_w4a4']:.2f}×** the plain W4A4 baseline, "
            f"{total['memory_vs_bf16']:.2f}× BF16); extra 16-bit parameters "
            f"{total['extra_params16'] / 1e3:,.1f} k; extra 16-bit FLOPs per token "
            f"**{100 * total['flops_extra_vs_w4a4']:.1f} %** of the W4A4 GEMM FLOPs.")


__all__ = ["layer_cost", "plan_cost", "human_bytes", "cost_summary_text"]
