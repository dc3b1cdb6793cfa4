"""RTN W4A4 (docs/DESIGN.md §4): no transform, W quantized as is, activations quantized
dynamically per token. The floor every method must beat; ``W_q = W`` (docs/ARCHITECTURE.md table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import QuantConfig
from ..modules import QuantLinear
from ..registry import MethodCost, MethodSpec, register_method
from .common import check_width, make_quant_linear, quantize_weight, stats_hessian, weight_and_bias


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest W4A4, no transform: the floor every method must beat."""

    method: ClassVar[str] = "rtn"


def quantize_rtn(linear: nn.Linear, stats: Any, config: RTNConfig, *, rank: int = 0, spec: Any = None,
                 cache: Any = None) -> QuantLinear:
    """y = Q_a(x) Q_w(W)ᵀ + b. ``stats`` only feeds GPTQ's Hessian H = C/n (d, d)."""
    w, b = weight_and_bias(linear)
    check_width(stats, w.shape[1], getattr(spec, "name", None))
    h = stats_hessian(stats, cache, w.device) if (stats is not None and config.weights == "gptq") else None
    return make_quant_linear(linear, config, quantize_weight(w, h, config), method="rtn", bias=b)


def cost_rtn(d: int, o: int, rank: int, config: RTNConfig) -> MethodCost:
    """Nothing beyond plain W4A4: this is the baseline every cost is measured against."""
    return MethodCost()


SPEC = register_method(MethodSpec(config_cls=RTNConfig, handler=quantize_rtn, cost=cost_rtn,
                                   label="RTN", color="#7f7f7f", ranked=False, needs_stats=False,
                                   rows_independent=lambda c: c.weights != "gptq"))
