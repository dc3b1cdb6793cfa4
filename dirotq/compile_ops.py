"""``torch.compile`` support: a ``QuantLinear`` is one opaque custom op in a compiled graph.

Eager calls run ``QuantLinear.forward`` as written (the Triton kernels on CUDA, the reference path
elsewhere). While ``torch.compile`` traces, the forward calls ``torch.ops.dirotq.quant_linear``
instead: the compiler sees one op with a known output shape (a fake implementation), so it neither
traces into the kernels' host code (plan caches, autotuners, launches), which would break the graph,
nor re-derives the reference arithmetic, and it fuses the elementwise work around the op (norms,
modulation, gates). The op's implementation runs the eager forward of the layer it is given.

The layer reaches the op as its stored-weight buffer (``QuantLinear.stored_weight()``), a tensor
argument, not as a constant of the graph: the compiler lifts a module's buffers to graph inputs, so
one graph compiled for a transformer block serves every block of the same structure (regional
compilation, diffusers' ``compile_repeated_blocks``), each call with its own block's layers. The op
finds the layer that holds that buffer among the live layers (by device and address, rebuilt when a
layer moved). A constant per layer would be baked into the shared graph and make every block run
the first compiled block's weights. Inference only: the op has no autograd formula (QuantLinear
weights are not trained; a LoRA on top runs outside it).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # every QuantLinear alive (register())
_BY_KEY: dict[tuple[str, int], weakref.ref[Any]] = {}


def register(layer: Any) -> None:
    """Make ``layer`` findable by the ops (QuantLinear calls this when built, copied or unpickled)."""
    _LIVE.add(layer)


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.data_ptr()


def _indexed(k: tuple[str, int]) -> Any:
    """The layer indexed under ``k`` if it is alive and still holds that buffer, else None."""
    ref = _BY_KEY.get(k)
    layer = ref() if ref is not None else None
    return layer if layer is not None and _key(layer.stored_weight()) == k else None


def _layer(key: torch.Tensor, op: str) -> Any:
    """The live layer whose stored weight is ``key`` (a RuntimeError naming ``op`` if none is)."""
    k = _key(key)
    layer = _indexed(k)
    if layer is None:
        # a layer moved (.to(), load_state_dict) or is new since the last look: index them again
        _BY_KEY.clear()
        for live in list(_LIVE):
            w = live.stored_weight()
            if w.device.type != "meta":
                _BY_KEY[_key(w)] = weakref.ref(live)
        layer = _indexed(k)
    if layer is None:
        raise RuntimeError(f"dirotq.{op}: no live QuantLinear holds this weight buffer ({tuple(key.shape)} "
                           f"{key.dtype} on {key.device}): the compiled graph outlived its model, or the "
                           "compiler copied the buffer")
    return layer


@torch.library.custom_op("dirotq::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """y = QuantLinear(x) for the layer whose stored weight is ``weight``; x: (..., d) -> (..., out_features)."""
    return _layer(weight, "quant_linear").eager_forward(x)


@quant_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("dirotq::quant_linear_member", mutates_args=())
def quant_linear_member(x: torch.Tensor, weight: torch.Tensor, member: int, start: int, stop: int) -> torch.Tensor:
    """Columns ``[start, stop)`` of the fused shared-input layer whose stored weight is ``weight``, for
    input x (dirotq/fusion.py): its members' calls on one input run the fused layer once. A copy, not a
    view: a compiled graph may reuse an op's output memory, which must not be another member's."""
    return _layer(weight, "quant_linear_member").shared_output(x, member)[..., start:stop].clone()


@quant_linear_member.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, member: int, start: int, stop: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], stop - start))


__all__ = ["quant_linear", "quant_linear_member", "register"]
