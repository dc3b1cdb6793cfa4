"""Method registry (CONVENTIONS.md "Python API"): ``config.method`` -> handler.

A handler is a pure function

    handler(linear: nn.Linear, stats: LayerStats | None, config: QuantConfig, *, rank: int,
            spec: TargetSpec | None = None, cache: BasisCache | None = None) -> QuantLinear

filling exactly the QuantLinear fields of its row in docs/ARCHITECTURE.md. A new baseline is one
config class (config.py), one file here and one ``@register`` line.
"""

from __future__ import annotations

from typing import Callable

HANDLERS_NEED_STATS: dict[str, bool] = {}
METHODS: dict[str, Callable] = {}


def register(name: str, *, needs_stats: bool) -> Callable[[Callable], Callable]:
    """Register ``handler`` for method ``name``. ``needs_stats``: whether it needs calibration
    statistics even with RTN weights (GPTQ always needs them)."""

    def deco(fn: Callable) -> Callable:
        METHODS[name] = fn
        HANDLERS_NEED_STATS[name] = needs_stats
        return fn

    return deco


def needs_stats(config) -> bool:
    """True if ``config`` cannot run without calibration statistics."""
    if config.weights == "gptq":
        return True
    return HANDLERS_NEED_STATS.get(config.method, True)


def get_handler(method: str) -> Callable:
    if method not in METHODS:
        raise ValueError(f"no handler for quantization method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]


# importing the method modules registers them
from . import dirotq, dirotq_lr, quarot, rtn, smoothquant, svdquant, w4a16  # noqa: E402,F401

__all__ = ["METHODS", "register", "get_handler", "needs_stats"]
