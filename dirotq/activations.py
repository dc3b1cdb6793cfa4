"""Output activations a quantized layer can apply in its GEMM epilogue (``dirotq.fusion``,
"Activation fusion").

A transformer's MLP applies GELU to the up-projection's output: as its own op, that is one more pass
over an (n, 4·d) tensor, written and read back in 16 bits. A ``QuantLinear`` whose
``epilogue_activation`` is set applies the activation to a range of its output columns before the
output is rounded to the activation dtype, inside the GEMM's epilogue on the GPU. This module is the
reference both paths follow: the reference forward calls :func:`apply_activation` on the float32
output, the kernels compute the same function in float32 (tested within float32 rounding).

An activation spec is ``(kind, start, stop)``: ``kind`` in :data:`ACTIVATIONS`, applied to output
columns ``[start, stop)`` (a fused shared-input layer applies it to one member's columns only).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# kind -> the ``approximate`` argument of torch's GELU that defines it
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}

ActivationSpec = Optional[Tuple[str, int, int]]

# kind -> the ``ACT`` constexpr of the GEMM kernels' epilogues (0: none)
KERNEL_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2}


def activation_kind(module: torch.nn.Module) -> str | None:
    """The fusable kind of an activation module (``nn.GELU`` or diffusers' ``GELU`` projection
    wrapper, by its ``approximate`` setting), or None if it is anything else."""
    approximate = getattr(module, "approximate", None)
    if not isinstance(module, torch.nn.GELU) and type(module).__name__ != "GELU":
        return None
    for kind, value in ACTIVATIONS.items():
        if approximate == value:
            return kind
    return None


def check_spec(spec: ActivationSpec, out_features: int) -> None:
    """ValueError unless ``spec`` is None or a known kind over a column range inside the layer."""
    if spec is None:
        return
    kind, start, stop = spec
    if kind not in ACTIVATIONS:
        raise ValueError(f"epilogue activation must be one of {sorted(ACTIVATIONS)}, got {kind!r}")
    if not 0 <= start < stop <= out_features:
        raise ValueError(f"epilogue activation columns [{start}, {stop}) are not inside the layer's "
                         f"{out_features} outputs")


def apply_activation(y: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """y: (n, o) float -> y with ``spec``'s activation on its columns (a new tensor; y unchanged)."""
    if spec is None:
        return y
    kind, start, stop = spec
    act = F.gelu(y[:, start:stop], approximate=ACTIVATIONS[kind])
    if start == 0 and stop == y.shape[1]:
        return act
    out = y.clone()
    out[:, start:stop] = act
    return out


__all__ = ["ACTIVATIONS", "KERNEL_CODES", "ActivationSpec", "activation_kind", "apply_activation", "check_spec"]
