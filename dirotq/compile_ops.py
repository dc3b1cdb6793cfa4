"""``torch.compile`` support: a ``QuantLinear`` is one opaque custom op in a compiled graph.

Eager calls run ``QuantLinear.forward`` as written (the Triton kernels on CUDA, the reference path
elsewhere). While ``torch.compile`` traces, the forward calls ``torch.ops.dirotq.quant_linear``
instead: the compiler sees one op with a known output shape (a fake implementation), so it neither
traces into the kernels' host code (plan caches, autotuners, launches), which would break the graph,
nor re-derives the reference arithmetic, and it fuses the elementwise work around the op (norms,
modulation, gates). The op's implementation runs the eager forward of the layer it names.

The layer is named by a handle (an int registered once per layer, held weakly): the op's tensor
arguments are only the activations, so the weights stay buffers of the module and a compiled graph
is as valid as the module is. Inference only: the op has no autograd formula (QuantLinear weights
are not trained; a LoRA on top runs outside it).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

_LAYERS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def handle(layer: Any) -> int:
    """The layer's op handle (assigned on first use, stable for the layer's lifetime; a deep copy gets
    its own). Called by the compiler at trace time: a constant of the graph."""
    h = layer.__dict__.get("_compile_handle")
    if h is None or _LAYERS.get(h) is not layer:
        h = next(_NEXT)
        _LAYERS[h] = layer
        layer.__dict__["_compile_handle"] = h
    return h


# what torch.compiler.assume_constant_result(handle) does (the compiler calls it at trace time and
# keeps the int), set by hand: that function imports torch._dynamo (and Triton), over a second at
# `import dirotq`. tests/test_compile.py fails if a PyTorch release changes the marker.
handle._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _layer(layer: int, op: str) -> Any:
    """The live layer registered under handle ``layer`` (a RuntimeError naming ``op`` if it is gone)."""
    module = _LAYERS.get(layer)
    if module is None:
        raise RuntimeError(f"dirotq.{op}: layer handle {layer} is gone (the compiled graph outlived its model)")
    return module


@torch.library.custom_op("dirotq::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    """y = QuantLinear(x) for the layer registered under ``layer``; x: (..., d) -> (..., out_features)."""
    return _layer(layer, "quant_linear").eager_forward(x)


@quant_linear.register_fake
def _(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("dirotq::quant_linear_member", mutates_args=())
def quant_linear_member(x: torch.Tensor, layer: int, member: int, start: int, stop: int) -> torch.Tensor:
    """Columns ``[start, stop)`` of the fused shared-input layer registered under ``layer`` for input
    x (dirotq/fusion.py): its members' calls on one input run the fused layer once. A copy, not a
    view: a compiled graph may reuse an op's output memory, which must not be another member's."""
    return _layer(layer, "quant_linear_member").shared_output(x, member)[..., start:stop].clone()


@quant_linear_member.register_fake
def _(x: torch.Tensor, layer: int, member: int, start: int, stop: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], stop - start))


__all__ = ["handle", "quant_linear", "quant_linear_member"]
