"""SVDQuant (docs/DESIGN.md §4): smoothing first, then a rank-r 16-bit branch from the SVD
of the smoothed weight W·diag(s) = U Σ Vᵀ, and a 4-bit residual (docs/ARCHITECTURE.md table:
smooth = s, down = V_r, up = U_rΣ_r, no project-out, W_q = W·diag(s) − U_rΣ_rV_rᵀ).
GPTQ sees the smoothed inputs: H_s = diag(1/s) H diag(1/s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..bases import weight_svd
from ..config import RankedConfig
from ..modules import QuantLinear
from ..registry import MethodCost, MethodSpec, register_method
from .common import (check_width, make_quant_linear, quantize_weight, require_stats, scale_hessian,
                     smooth_factors, stats_hessian, weight_and_bias)


@dataclass(frozen=True)
class SVDQuantConfig(RankedConfig):
    """SVDQuant: smoothing, then a rank-r 16-bit weight-SVD branch, 4-bit residual."""

    method: ClassVar[str] = "svdquant"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


BASES = ("pca", "wsvd", "hsvd")


def quantize_svdquant(linear: nn.Linear, stats: Any, config: SVDQuantConfig, *, rank: int = 0, spec: Any = None,
                      cache: Any = None) -> QuantLinear:
    """y = (x/s) V_r (U_rΣ_r)ᵀ + Q_a(x/s) Q_w(W·diag(s) − U_rΣ_rV_rᵀ)ᵀ + b; rank r in [0, d]."""
    name = getattr(spec, "name", None)
    require_stats(stats, "svdquant", name, "abs-max statistics")
    w, b = weight_and_bias(linear)
    d = w.shape[1]
    check_width(stats, d, name)
    alpha = getattr(config, "alpha", 0.5)
    s = smooth_factors(stats.abs_max, w, alpha)
    w_s = w * s.unsqueeze(0)
    fields: dict[str, Any] = {"smooth": s}
    w_res = w_s
    if rank:
        down, up = weight_svd(w_s, rank, dtype=w_s.dtype)  # V_r (d, r), U_rΣ_r (o, r)
        w_res = w_s - up @ down.T
        fields.update(down=down, up=up)
    h = scale_hessian(stats_hessian(stats, cache, w.device), s) if config.weights == "gptq" else None
    return make_quant_linear(linear, config, quantize_weight(w_res, h, config), method="svdquant", rank=rank,
                             bias=b, extra_meta={"alpha": alpha}, **fields)


def cost_svdquant(d: int, o: int, rank: int, config: SVDQuantConfig) -> MethodCost:
    """s (d), V_r (d × r) and U_rΣ_r (o × r) in 16-bit; x / s and the rank-r branch per token."""
    bits = {"smooth": 16.0 * d}
    if rank:
        bits.update(down=16.0 * d * rank, up=16.0 * o * rank)
    return MethodCost(bits, flops16=d + 2.0 * rank * (d + o))


SPEC = register_method(MethodSpec(config_cls=SVDQuantConfig, handler=quantize_svdquant, cost=cost_svdquant,
                                   label="SVDQuant (weight SVD)", color="#1f77b4", ranked=True, needs_stats=True))
