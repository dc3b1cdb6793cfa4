"""SmoothQuant (DESIGN.md §1 "Baselines", α = 0.5): per-channel factors s move activation outliers
into the weights, x / s and W·diag(s) (docs/ARCHITECTURE.md table: smooth = s, W_q = W·diag(s)).
GPTQ sees the smoothed inputs: H_s = diag(1/s) H diag(1/s)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import QuantConfig
from ..modules import QuantLinear
from . import register
from .common import (check_width, hessian, make_quant_linear, quantize_weight, require_stats, scale_hessian,
                     smooth_factors, weight_and_bias)


@register("smoothquant", needs_stats=True)
def quantize_smoothquant(linear: nn.Linear, stats: Any, config: QuantConfig, *, rank: int = 0, spec: Any = None,
                         cache: Any = None) -> QuantLinear:
    """y = Q_a(x / s) Q_w(W·diag(s))ᵀ + b with s from ``stats.abs_max`` (d,) and max|W_j|."""
    name = getattr(spec, "name", None)
    require_stats(stats, "smoothquant", name, "abs-max statistics")
    w, b = weight_and_bias(linear)
    check_width(stats, w.shape[1], name)
    alpha = getattr(config, "alpha", 0.5)
    s = smooth_factors(stats.abs_max, w, alpha)
    w_s = w * s.unsqueeze(0)
    h = scale_hessian(hessian(stats), s) if config.weights == "gptq" else None
    return make_quant_linear(linear, config, quantize_weight(w_s, h, config), method="smoothquant", bias=b,
                             smooth=s, extra_meta={"alpha": alpha})
