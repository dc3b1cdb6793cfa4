"""QuaRot-style randomized Hadamard on the layer input (docs/DESIGN.md §4): x H spreads
channel outliers over all channels before INT4; H is orthogonal, so W H folds the inverse into the
weight (docs/ARCHITECTURE.md table: input rotation = H, W_q = W H).

- ``hadamard="dense"``: H = diag(signs)·Sylvester (largest power-of-two block when d is not one),
  stored as the dense ``rotation``.
- ``hadamard="block"``: the kernel form, one group-size Hadamard per group, stored as
  ``hadamard_signs`` (d,).
GPTQ sees the rotated inputs: H̃ = Hᵀ C H (block form: without forming the d×d matrix), once per
input group (it depends on nothing else), so the group's layers share one GPTQ batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..bases import random_hadamard, random_signs
from ..config import QuantConfig
from ..modules import QuantLinear
from ..registry import MethodCost, MethodSpec, register_method
from .common import (block_hadamard_hessian, block_hadamard_matrix, cached, check_block_hadamard, check_width,
                     device_key, make_quant_linear, quantize_weight, stats_hessian, transform_hessian,
                     weight_and_bias)


@dataclass(frozen=True)
class QuaRotConfig(QuantConfig):
    """QuaRot-style randomized Hadamard on the layer input (folded into the weight)."""

    method: ClassVar[str] = "quarot"
    hadamard: str = "dense"  # "dense": full (or largest power-of-two block) Hadamard; "block": group-size blocks
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hadamard not in ("dense", "block"):
            raise ValueError(f"hadamard must be 'dense' or 'block', got {self.hadamard!r}")


def quantize_quarot(linear: nn.Linear, stats: Any, config: QuaRotConfig, *, rank: int = 0, spec: Any = None,
                    cache: Any = None) -> QuantLinear:
    """y = Q_a(x H) Q_w(W H)ᵀ + b, H (d, d) a randomized Hadamard (dense or group-size blocks)."""
    name = getattr(spec, "name", None)
    w, b = weight_and_bias(linear)
    d = w.shape[1]
    check_width(stats, d, name)
    kind = getattr(config, "hadamard", "dense")
    seed = getattr(config, "seed", 0)
    dev, dt = w.device, w.dtype
    g = config.group_size
    if kind == "block":
        check_block_hadamard(d, g, name)
        signs = random_signs(d, seed).to(device=dev, dtype=dt)
        rot = block_hadamard_matrix(signs, g)
        fields = {"hadamard_signs": signs}
    else:
        rot = random_hadamard(d, seed).to(device=dev, dtype=dt)
        fields = {"rotation": rot}
    h = None
    if stats is not None and config.weights == "gptq":
        def rotated() -> torch.Tensor:
            base = stats_hessian(stats, cache, dev)
            return (block_hadamard_hessian(base, signs, g) if kind == "block"
                    else transform_hessian(base, rot.to(base.dtype)))

        h = cached(stats, ("quarot", kind, seed, g, device_key(dev)), rotated, cache)
    return make_quant_linear(linear, config, quantize_weight(w @ rot, h, config), method="quarot", bias=b,
                             extra_meta={"hadamard": kind, "seed": seed}, **fields)


def cost_quarot(d: int, o: int, rank: int, config: QuaRotConfig) -> MethodCost:
    """Dense: H (d × d, 16-bit) and a d × d product per token as stored (a fast Walsh–Hadamard
    would be d log d); block: 1-bit signs and one g × g product per group."""
    if config.hadamard == "block":
        return MethodCost({"hadamard_signs": 1.0 * d}, flops16=2.0 * d * config.group_size)
    return MethodCost({"rotation": 16.0 * d * d}, flops16=2.0 * d * d)


SPEC = register_method(MethodSpec(config_cls=QuaRotConfig, handler=quantize_quarot, cost=cost_quarot,
                                   label="QuaRot (Hadamard)", color="#9467bd", ranked=False, needs_stats=False,
                                   rows_independent=lambda c: c.weights != "gptq"))
