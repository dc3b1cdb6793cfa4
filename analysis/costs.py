"""Memory and compute cost of a rank plan (docs/ARCHITECTURE.md "One quantized layer").

Per layer W: (o, d), rank r, group g, counted exactly as ``QuantLinear.storage_bits`` stores it
(4-bit codes over the padded quantized width, one 16-bit scale per group, every other tensor at
16 bits, Hadamard signs at 1 bit) and in multiply-adds ×2 per token:

| method | extra 16-bit tensors | 4-bit GEMM width | extra 16-bit FLOPs / token |
|---|---|---|---|
| rtn | – | d | – |
| smoothquant | s (d) | d | d (x / s) |
| quarot dense | H (d × d) | d | 2d² (as stored; a fast Walsh–Hadamard would be d log d) |
| quarot block | signs (d, 1 bit) | d | 2dg |
| svdquant | s, V_r (d × r), U_rΣ_r (o × r) | d | d + 2r(d + o) |
| dirotq (full) | T (d × d), W T_h (o × r) | d − r | 2d² + 2ro |
| dirotq-lr | V_r (d × r), W V_r (o × r), signs | d | 4dr + 2ro + 2dg |
| w4a16 | – | d (16-bit activations) | – |

"Extra" is against the W4A4 baseline (RTN: codes + scales + bias). Nothing here needs the model:
only widths, ranks and the method.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

METHODS = ("rtn", "smoothquant", "quarot", "svdquant", "dirotq", "dirotq-lr", "w4a16")
RANKED = ("svdquant", "dirotq", "dirotq-lr")


def _pad(n: int, g: int) -> int:
    return int(math.ceil(n / g) * g) if n else 0


def _w4(o: int, k: int, g: int) -> dict[str, float]:
    """Bits of a 4-bit weight (o, k): packed codes over the padded width + one fp16 scale per group."""
    return {"weight": 4.0 * o * _pad(k, g), "scales": 16.0 * o * math.ceil(k / g) if k else 0.0}


def layer_cost(d: int, o: int, method: str, rank: int = 0, *, group_size: int = 64, bias: bool = True,
               hadamard: str = "dense", keep_head_weights: bool = True, kind: str = "w4a4") -> dict[str, Any]:
    """Storage (bits, by tensor, named as ``QuantLinear.storage_bits``) and FLOPs per token of one
    quantized layer, plus the W4A4 (RTN) and BF16 references.

    ``kind="w4a16"`` targets run weight-only whatever the method (their rank is ignored).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    g = group_size
    r = int(rank) if method in RANKED and kind == "w4a4" else 0
    if not 0 <= r <= d:
        raise ValueError(f"rank {r} out of range [0, {d}]")
    if kind == "w4a16":
        method = "w4a16"
    bits: dict[str, float] = {}
    flops16 = 0.0
    k4 = d
    if method == "smoothquant":
        bits["smooth"] = 16.0 * d
        flops16 = d
    elif method == "quarot":
        if hadamard == "block":
            bits["hadamard_signs"] = 1.0 * d
            flops16 = 2.0 * d * g
        else:
            bits["rotation"] = 16.0 * d * d
            flops16 = 2.0 * d * d
    elif method == "svdquant":
        bits["smooth"] = 16.0 * d
        if r:
            bits["down"], bits["up"] = 16.0 * d * r, 16.0 * o * r
        flops16 = d + 2.0 * r * (d + o)
    elif method == "dirotq":
        k4 = d - r
        if r:
            bits["down"], bits["up"] = 16.0 * d * r, 16.0 * o * r
        bits["rotation"] = 16.0 * d * (d - r)
        # keep_head_weights=False: the head columns hold 4-bit-representable values, but the
        # reference module still stores them in 16-bit ``up``, so the storage is the same
        flops16 = 2.0 * d * d + 2.0 * r * o
    elif method == "dirotq-lr":
        if r:
            bits["down"], bits["up"] = 16.0 * d * r, 16.0 * o * r
        bits["hadamard_signs"] = 1.0 * d
        flops16 = 4.0 * d * r + 2.0 * r * o + 2.0 * d * g
    bits.update(_w4(o, k4, g))
    if bias:
        bits["bias"] = 16.0 * o
    base = _w4(o, d, g)
    base_bits = base["weight"] + base["scales"] + (16.0 * o if bias else 0.0)
    total = sum(bits.values())
    extra16 = sum(v for k, v in bits.items() if k not in ("weight", "scales", "bias", "hadamard_signs")) / 16.0
    return {
        "method": method, "rank": r, "d": d, "o": o, "bits": bits, "total_bits": total,
        "w4a4_bits": base_bits, "bf16_bits": 16.0 * o * d + (16.0 * o if bias else 0.0),
        "extra_params16": extra16, "extra_bits": total - base_bits,
        "flops_lowbit": 2.0 * o * k4, "flops16_extra": flops16, "flops_w4a4": 2.0 * o * d,
        "activations_16bit": method == "w4a16",
    }


def plan_cost(targets: Mapping[str, Any], ranks: Mapping[str, int], method: str, **kw: Any) -> dict[str, Any]:
    """Costs of every target under ``ranks`` (layer -> rank; missing layers rank 0).

    ``targets``: name -> TargetSpec (``in_features``, ``out_features``, ``kind``, ``block``,
    ``layer_type``). Returns ``{"layers": [per-layer dict + name/block/layer_type], "total": {...}}``
    with totals in bytes and relative numbers: ``memory_vs_w4a4``, ``memory_vs_bf16``,
    ``flops_extra_vs_w4a4`` (extra 16-bit FLOPs / W4A4 GEMM FLOPs).
    """
    rows = []
    for name, s in targets.items():
        c = layer_cost(s.in_features, s.out_features, method, int(ranks.get(name, 0)),
                       kind=getattr(s, "kind", "w4a4"), **kw)
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


__all__ = ["layer_cost", "plan_cost", "human_bytes", "cost_summary_text", "METHODS", "RANKED"]
