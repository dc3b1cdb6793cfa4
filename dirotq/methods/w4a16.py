"""W4A16, weight-only (docs/DESIGN.md §4: the reference point; PixArt-Σ's ff.net.2 in the
paper preset). ``W_q = W``, activations stay 16-bit (``act_bits=None``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from torch import nn

from ..config import QuantConfig, weight_only_bits
from ..modules import QuantLinear
from ..registry import MethodCost, MethodSpec, register_method
from .common import check_width, make_quant_linear, quantize_weight, stats_hessian, weight_and_bias


@dataclass(frozen=True)
class W4A16Config(QuantConfig):
    """Weight-only INT4 (activations stay 16-bit): the reference point."""

    method: ClassVar[str] = "w4a16"
    act_bits: int | None = None


def weight_only_config(config: QuantConfig, kind: str = "w4a16") -> W4A16Config:
    """The weight-only config with ``config``'s weight settings (group, scale format, RTN/GPTQ) and the
    weight bits of ``kind`` (``dirotq.config.weight_only_bits``): what a ``kind="w4a16"`` or
    ``"w8a16"`` target gets under any method."""
    bits = weight_only_bits(kind, config.weight_bits)
    if isinstance(config, W4A16Config):
        return config if config.weight_bits == bits else replace(config, weight_bits=bits)
    return W4A16Config(weight_bits=bits, **config.weight_settings())


def weight_only_target_config(config: QuantConfig, kind: str, rank: int = 0, name: str | None = None) -> QuantConfig:
    """The config a weight-only target of ``kind`` is quantized with under ``config``: weight-only
    (``weight_only_config``) at rank 0, DiRotQ-LR's 16-bit branch above (``weight_only_branch_config``,
    PCA methods only)."""
    if rank:
        from .dirotq_lr import weight_only_branch_config

        return weight_only_branch_config(config, kind, rank, name)
    return weight_only_config(config, kind)


def quantize_w4a16(linear: nn.Linear, stats: Any, config: QuantConfig, *, rank: int = 0, spec: Any = None,
                   cache: Any = None) -> QuantLinear:
    """y = x Q_w(W)ᵀ + b; GPTQ Hessian H = C/n (the float inputs are what the weight meets)."""
    config = weight_only_config(config)
    config = replace(config, act_bits=None) if config.act_bits is not None else config
    w, b = weight_and_bias(linear)
    check_width(stats, w.shape[1], getattr(spec, "name", None))
    h = stats_hessian(stats, cache, w.device) if (stats is not None and config.weights == "gptq") else None
    return make_quant_linear(linear, config, quantize_weight(w, h, config), method="w4a16", bias=b)


def cost_w4a16(d: int, o: int, rank: int, config: W4A16Config) -> MethodCost:
    """The same stored weight as W4A4; activations stay 16-bit."""
    return MethodCost(activations_16bit=True)


SPEC = register_method(MethodSpec(config_cls=W4A16Config, handler=quantize_w4a16, cost=cost_w4a16,
                                   label="W4A16 (weight-only)", color="#8c564b", ranked=False, needs_stats=False,
                                   rows_independent=lambda c: c.weights != "gptq"))
