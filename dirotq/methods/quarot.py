"""QuaRot-style randomized Hadamard on the layer input (DESIGN.md §1 "Baselines"): x H spreads
channel outliers over all channels before INT4; H is orthogonal, so W H folds the inverse into the
weight (docs/ARCHITECTURE.md table: input rotation = H, W_q = W H).

- ``hadamard="dense"``: H = diag(signs)·Sylvester (largest power-of-two block when d is not one),
  stored as the dense ``rotation``.
- ``hadamard="block"``: the kernel form, one group-size Hadamard per group, stored as
  ``hadamard_signs`` (d,).
GPTQ sees the rotated inputs: H̃ = Hᵀ C H.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..bases import random_hadamard, random_signs
from ..config import QuantConfig
from ..modules import QuantLinear
from . import register
from .common import (block_hadamard_matrix, check_block_hadamard, check_width, hessian, make_quant_linear,
                     quantize_weight, transform_hessian, weight_and_bias)


@register("quarot", needs_stats=False)
def quantize_quarot(linear: nn.Linear, stats: Any, config: QuantConfig, *, rank: int = 0, spec: Any = None,
                    cache: Any = None) -> QuantLinear:
    """y = Q_a(x H) Q_w(W H)ᵀ + b, H (d, d) a randomized Hadamard (dense or group-size blocks)."""
    name = getattr(spec, "name", None)
    w, b = weight_and_bias(linear)
    d = w.shape[1]
    check_width(stats, d, name)
    kind = getattr(config, "hadamard", "dense")
    seed = getattr(config, "seed", 0)
    if kind == "block":
        check_block_hadamard(d, config.group_size, name)
        signs = random_signs(d, seed)
        rot = block_hadamard_matrix(signs, config.group_size)
        fields = {"hadamard_signs": signs}
    else:
        rot = random_hadamard(d, seed)
        fields = {"rotation": rot}
    h = transform_hessian(hessian(stats), rot) if (stats is not None and config.weights == "gptq") else None
    return make_quant_linear(linear, config, quantize_weight(w @ rot, h, config), method="quarot", bias=b,
                             extra_meta={"hadamard": kind, "seed": seed}, **fields)
