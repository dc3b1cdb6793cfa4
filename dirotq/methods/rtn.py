"""RTN W4A4 (DESIGN.md §1 "Baselines"): no transform, W quantized as is, activations quantized
dynamically per token. The floor every method must beat; ``W_q = W`` (docs/ARCHITECTURE.md table).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import QuantConfig
from ..modules import QuantLinear
from . import register
from .common import check_width, hessian, make_quant_linear, quantize_weight, weight_and_bias


@register("rtn", needs_stats=False)
def quantize_rtn(linear: nn.Linear, stats: Any, config: QuantConfig, *, rank: int = 0, spec: Any = None,
                 cache: Any = None) -> QuantLinear:
    """y = Q_a(x) Q_w(W)ᵀ + b. ``stats`` only feeds GPTQ's Hessian H = C/n (d, d)."""
    w, b = weight_and_bias(linear)
    check_width(stats, w.shape[1], getattr(spec, "name", None))
    h = hessian(stats) if (stats is not None and config.weights == "gptq") else None
    return make_quant_linear(linear, config, quantize_weight(w, h, config), method="rtn", bias=b)
