"""SmoothQuant (docs/DESIGN.md §4, α = 0.5): per-channel factors s move activation outliers
into the weights, x / s and W·diag(s) (docs/ARCHITECTURE.md table: smooth = s, W_q = W·diag(s)).
GPTQ sees the smoothed inputs: H_s = diag(1/s) H diag(1/s)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import QuantConfig
from ..modules import QuantLinear
from ..registry import MethodCost, MethodSpec, register_method
from .common import (check_width, make_quant_linear, quantize_weight, require_stats, scale_hessian,
                     smooth_factors, stats_hessian, weight_and_bias)


logger = logging.getLogger(__name__)
_WARNED: set[str] = set()
FORMAT_C_WARNING = ("SmoothQuant with scale_format='int_ratio' (format C): the format's per-group multipliers are "
                    "chosen for the smoothed tensors' own squared error, while an outlier channel's error is "
                    "amplified by its scaled-up weight column (planted channel outliers: 5.9 dB below format A); "
                    "format A ('exact') suits SmoothQuant, format C the rotated methods")


@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant: per-channel s_j = max|x_j|^α / max|W_j|^(1−α) moved from activations to weights."""

    method: ClassVar[str] = "smoothquant"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.scale_format == "int_ratio" and "format C" not in _WARNED:
            _WARNED.add("format C")
            logger.warning(FORMAT_C_WARNING)


def quantize_smoothquant(linear: nn.Linear, stats: Any, config: SmoothQuantConfig, *, rank: int = 0, spec: Any = None,
                         cache: Any = None) -> QuantLinear:
    """y = Q_a(x / s) Q_w(W·diag(s))ᵀ + b with s from ``stats.abs_max`` (d,) and max|W_j|."""
    name = getattr(spec, "name", None)
    require_stats(stats, "smoothquant", name, "abs-max statistics")
    w, b = weight_and_bias(linear)
    check_width(stats, w.shape[1], name)
    alpha = getattr(config, "alpha", 0.5)
    s = smooth_factors(stats.abs_max, w, alpha)
    w_s = w * s.unsqueeze(0)
    h = scale_hessian(stats_hessian(stats, cache, w.device), s) if config.weights == "gptq" else None
    return make_quant_linear(linear, config, quantize_weight(w_s, h, config), method="smoothquant", bias=b,
                             smooth=s, extra_meta={"alpha": alpha})


def cost_smoothquant(d: int, o: int, rank: int, config: SmoothQuantConfig) -> MethodCost:
    """The factors s (d, 16-bit) and one division per input element."""
    return MethodCost({"smooth": 16.0 * d}, flops16=float(d))


SPEC = register_method(MethodSpec(config_cls=SmoothQuantConfig, handler=quantize_smoothquant, cost=cost_smoothquant,
                                   label="SmoothQuant", color="#2ca02c", ranked=False, needs_stats=True))
