"""``torch.compile`` for a (quantized or 16-bit) diffusers transformer, in place.

Two scopes:
- ``"blocks"`` (regional compilation, what diffusers' ``compile_repeated_blocks`` does): each element
  of the transformer's ``ModuleList`` children (PixArt's ``transformer_blocks``; FLUX's
  ``transformer_blocks`` and ``single_transformer_blocks``) is compiled in place. Identical blocks
  share one compiled graph, so compile time is that of one block per block type; the layers outside
  the blocks (embeddings, final norm) stay eager. Quantized blocks share a graph too, because every
  ``QuantLinear`` reaches its custom op as a buffer argument (``dirotq/compile_ops.py``); blocks whose
  layers differ in shape (a rank plan) cost a recompilation each until dynamo marks the sizes dynamic.
- ``"model"``: the whole transformer in place (``nn.Module.compile``), one graph.

Compiled outputs are not bit for bit the eager ones (inductor rounds the elementwise work around the
quantized layers differently, and a 4-bit quantizer turns a last-bit change of its input into a
flipped code now and then), so compare images by PSNR, not equality.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import nn

SCOPES = ("blocks", "model")
# torch.compile's modes; "reduce-overhead" adds CUDA graphs (on CUDA), removing the per-launch host cost
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer's repeated blocks: every element of a ``ModuleList`` child, in order."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def _check(scope: str, mode: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r}: expected one of {', '.join(SCOPES)}")
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(MODES)}")


def compile_transformer(model: nn.Module, scope: str = "blocks", mode: str = "default", *,
                        fullgraph: bool = False, backend: str | Callable = "inductor") -> list[nn.Module]:
    """Compile ``model`` in place (see the module docstring); the compilation itself happens at the
    first call. Returns the modules compiled (the blocks, or ``[model]``); :func:`uncompile` undoes it.
    ``fullgraph=True`` makes a graph break an error instead of a silent split."""
    _check(scope, mode)
    if scope == "model":
        targets = [model]
    else:
        targets = repeated_blocks(model)
        if not targets:
            raise ValueError(f"{type(model).__name__} has no repeated blocks (ModuleList children) to compile; "
                             "use scope='model'")
    # "default" is torch.compile's own default: passing mode=None keeps its choice of options
    kwargs: dict[str, Any] = {"fullgraph": fullgraph, "backend": backend,
                              "mode": None if mode == "default" or backend != "inductor" else mode}
    for module in targets:
        module.compile(**kwargs)
    return targets


def uncompile(modules: list[nn.Module]) -> None:
    """Run ``modules`` (what :func:`compile_transformer` returned) eagerly again."""
    for module in modules:
        module._compiled_call_impl = None


class CompileCounter:
    """Dynamo's graph and graph-break counts over a ``with`` block: what a compiled run cost.

    ``graphs``: graphs compiled (first compilations and recompilations); ``graph_breaks``: breaks, by
    reason; ``seconds``: the block's wall time."""

    def __enter__(self) -> CompileCounter:
        from torch._dynamo.utils import counters

        self._counters = counters
        self._graphs0 = int(counters["stats"]["unique_graphs"])
        self._breaks0 = dict(counters["graph_break"])
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.graphs = int(self._counters["stats"]["unique_graphs"]) - self._graphs0
        now = dict(self._counters["graph_break"])
        self.graph_breaks = {k: v - self._breaks0.get(k, 0) for k, v in now.items() if v - self._breaks0.get(k, 0)}

    def report(self) -> dict:
        return {"seconds": round(self.seconds, 2), "graphs": self.graphs,
                "graph_breaks": sum(self.graph_breaks.values()), "graph_break_reasons": sorted(self.graph_breaks)}


__all__ = ["SCOPES", "MODES", "repeated_blocks", "compile_transformer", "uncompile", "CompileCounter"]
