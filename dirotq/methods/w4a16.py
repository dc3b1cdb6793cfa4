"""W4A16, weight-only (DESIGN.md §1 "Baselines": the reference point; PixArt-Σ's ff.net.2 in the
paper preset). ``W_q = W``, activations stay 16-bit (``act_bits=None``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ..config import QuantConfig, W4A16Config
from ..modules import QuantLinear
from . import register
from .common import check_width, hessian, make_quant_linear, quantize_weight, weight_and_bias


def weight_only_config(config: QuantConfig) -> W4A16Config:
    """The W4A16 config with ``config``'s weight settings (bits, group, scale format, RTN/GPTQ):
    what a ``kind="w4a16"`` target gets under any method."""
    if isinstance(config, W4A16Config):
        return config
    return W4A16Config(weight_bits=config.weight_bits, group_size=config.group_size,
                       scale_format=config.scale_format, weights=config.weights, gptq_damping=config.gptq_damping,
                       gptq_block=config.gptq_block, gptq_act_order=config.gptq_act_order)


@register("w4a16", needs_stats=False)
def quantize_w4a16(linear: nn.Linear, stats: Any, config: QuantConfig, *, rank: int = 0, spec: Any = None,
                   cache: Any = None) -> QuantLinear:
    """y = x Q_w(W)ᵀ + b; GPTQ Hessian H = C/n (the float inputs are what the weight meets)."""
    config = weight_only_config(config)
    config = replace(config, act_bits=None) if config.act_bits is not None else config
    w, b = weight_and_bias(linear)
    check_width(stats, w.shape[1], getattr(spec, "name", None))
    h = hessian(stats) if (stats is not None and config.weights == "gptq") else None
    return make_quant_linear(linear, config, quantize_weight(w, h, config), method="w4a16", bias=b)
