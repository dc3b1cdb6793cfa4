"""SVDQuant (DESIGN.md §1 "Baselines"): smoothing first, then a rank-r 16-bit branch from the SVD
of the smoothed weight W·diag(s) = U Σ Vᵀ, and a 4-bit residual (docs/ARCHITECTURE.md table:
smooth = s, down = V_r, up = U_rΣ_r, no project-out, W_q = W·diag(s) − U_rΣ_rV_rᵀ).
GPTQ sees the smoothed inputs: H_s = diag(1/s) H diag(1/s)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..bases import check_rank, weight_svd
from ..config import QuantConfig
from ..modules import QuantLinear
from . import register
from .common import (check_width, hessian, make_quant_linear, quantize_weight, require_stats, scale_hessian,
                     smooth_factors, weight_and_bias)


@register("svdquant", needs_stats=True)
def quantize_svdquant(linear: nn.Linear, stats: Any, config: QuantConfig, *, rank: int = 0, spec: Any = None,
                      cache: Any = None) -> QuantLinear:
    """y = (x/s) V_r (U_rΣ_r)ᵀ + Q_a(x/s) Q_w(W·diag(s) − U_rΣ_rV_rᵀ)ᵀ + b; rank r in [0, d]."""
    name = getattr(spec, "name", None)
    require_stats(stats, "svdquant", name, "abs-max statistics")
    w, b = weight_and_bias(linear)
    d = w.shape[1]
    check_width(stats, d, name)
    check_rank(rank, d)
    alpha = getattr(config, "alpha", 0.5)
    s = smooth_factors(stats.abs_max, w, alpha)
    w_s = w * s.unsqueeze(0)
    fields: dict[str, Any] = {"smooth": s}
    w_res = w_s
    if rank:
        down, up = weight_svd(w_s, rank)  # V_r (d, r), U_rΣ_r (o, r)
        w_res = w_s - up @ down.T
        fields.update(down=down, up=up)
    h = scale_hessian(hessian(stats), s) if config.weights == "gptq" else None
    return make_quant_linear(linear, config, quantize_weight(w_res, h, config), method="svdquant", rank=rank,
                             bias=b, extra_meta={"alpha": alpha}, **fields)
