"""Replay a transformer's forward from CUDA graphs: the eager step without its host time.

On a GPU an eager W4A4 step is bound by the host: each quantized layer call costs more Python and
Triton launch time than its kernels take (PixArt-Σ at 1024² on an H200: 171 ms eager for 48 ms of
kernels, 55 ms inside a CUDA graph; ``docs/KERNELS.md``). A CUDA graph records the kernels of one
call and replays them with no host work in between. ``torch.compile(mode="reduce-overhead")`` does
the same after compiling; this module does it without compiling (seconds instead of minutes, and
the eager kernels, so the images are the eager ones bit for bit).

``graph_transformer(model)`` wraps ``model.forward`` in place (``ungraph_transformer`` undoes it).
The tensors among a call's arguments (nested in tuples, lists and dicts) and its other arguments
form a key: their shapes, dtypes and devices, and the other values. The first call with a new key
runs eagerly (the kernels build their plans, compile and autotune there); the second runs
``warmup`` times on a side stream, then captures one call into a graph that reads static copies of
the inputs. Later calls with the key copy their tensors into those copies, replay, and return a
copy of the graph's outputs (a replay overwrites them). Graphs of all keys share one memory pool.
So a 20-step image runs its first step eagerly and replays from the second.

Limits: CUDA only (elsewhere the forward runs eagerly, as without the wrapper) and inference only
(a call with gradients enabled runs eagerly). A replay runs no Python, so forward hooks would not
see it: while any module of the model has a forward hook or pre-hook (calibration records
activations that way), or a global one is registered, calls run eagerly. A deep copy of a wrapped
model is wrapped too, with no graphs (the copy's tensors are new). A forward whose Python control flow reads tensor
values (``.item()``, a data-dependent shape) cannot be captured: capture then fails, and that key
runs eagerly from then on, after a one-time warning. The graphs read the weights where they were at
capture, so each call first checks the model's layout: its modules and the storage of every
parameter and buffer. When that changed since the capture (``.to()``, a layer swapped, a LoRA
added), the graphs are dropped and captured again; weights overwritten in place (``load_state_dict``)
need nothing, the graphs read them where they are. ``reset_graphs(model)`` drops them by hand.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

_ATTR = "_dirotq_cuda_graphs"


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[torch.Tensor]  # the call's tensor leaves, in flattening order
    static_output: Any


@dataclass
class GraphStats:
    """What the wrapper did: ``captures`` (graphs recorded), ``replays``, ``eager`` calls (warm-ups,
    non-CUDA or gradient-enabled calls, keys that failed to capture) and ``failed`` keys' reasons."""

    captures: int = 0
    replays: int = 0
    eager: int = 0
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def call_key(args: tuple, kwargs: dict) -> tuple:
    """The graph key of a call: the argument structure, each tensor's shape, dtype and device, and
    every other argument's value (its ``repr`` when it is not hashable)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts: list = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device)))
        else:
            try:
                hash(leaf)
                parts.append(("value", type(leaf).__name__, leaf))
            except TypeError:
                parts.append(("repr", type(leaf).__name__, repr(leaf)))
    return tuple(parts)


def _tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


def _replace_tensors(args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with their tensor leaves replaced, in order, by ``tensors``."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    it = iter(tensors)
    new = [next(it) if isinstance(x, torch.Tensor) else x for x in leaves]
    return pytree.tree_unflatten(new, spec)


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _clone_output(out: Any) -> Any:
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out)


class GraphedForward:
    """The replacement of a module's ``forward`` (see the module docstring)."""

    def __init__(self, module: nn.Module, warmup: int = 1) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be ≥ 1 (a call on the capture's side stream first), got {warmup}")
        self.forward = module.forward  # the bound eager forward
        self.warmup = warmup
        self.graphs: dict[tuple, _Captured | None] = {}  # None: capture failed, run eagerly
        self.seen: set[tuple] = set()  # keys called once (eagerly) under the current layout
        self.stats = GraphStats()
        self.pool = None
        self.layout: list | None = None  # model_layout() when the graphs were captured

    def model_layout(self) -> list:
        """What the graphs depend on besides the inputs: every module (with the kernel plan a
        quantized layer keeps, whose tensors its kernels read), and every parameter and buffer with
        the address of its storage. One walk over the modules' own dicts: 1.4 ms per call for
        FLUX.1-dev's 1,279 modules and 1,390 tensors on one Xeon core (``modules()`` and
        ``parameters()`` took 7.6), about 2 % of its step in a graph."""
        return self._walk()[0]

    def _walk(self) -> tuple[list, bool]:
        """(``model_layout``, whether a module has a forward hook or pre-hook)."""
        layout: list = []
        add = layout.append
        hooked = False
        stack = [self.forward.__self__]
        while stack:
            m = stack.pop()
            d = m.__dict__
            add(id(m))
            plan = d.get("_kernel_plan")
            if plan is not None:
                add(id(plan))
            for t in (*d["_parameters"].values(), *d["_buffers"].values()):
                if t is not None:
                    add(id(t))
                    add(t.data_ptr())
            hooked = hooked or bool(d["_forward_hooks"] or d["_forward_pre_hooks"])
            stack.extend(d["_modules"].values())
        return layout, hooked

    def __deepcopy__(self, memo: dict) -> GraphedForward:
        module = copy.deepcopy(self.forward.__self__, memo)  # the model's copy (already being made)
        return GraphedForward(module, self.warmup)

    def observed(self) -> bool:
        """Whether a hook watches the forward (a replay would skip it)."""
        return _global_hooks() or self._walk()[1]

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        self.stats.eager += 1
        return self.forward(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = _tensor_leaves(args, kwargs)
        if torch.is_grad_enabled() or not tensors or not all(t.is_cuda for t in tensors) or _global_hooks():
            return self._eager(args, kwargs)
        layout, hooked = self._walk()
        if hooked:
            return self._eager(args, kwargs)
        if layout != self.layout:
            if self.graphs:
                log.info("the model's modules or tensors moved since the CUDA graphs were captured: capturing again")
            self.graphs.clear()
            self.seen.clear()
            self.pool = None
            self.layout = layout
        key = call_key(args, kwargs)
        if key not in self.graphs:
            if key not in self.seen:  # a key's first call: eager (the kernels compile and autotune in it),
                self.seen.add(key)  # so a model changed between every call never pays for a capture
                return self._eager(args, kwargs)
            return self._capture(key, args, kwargs, tensors)
        captured = self.graphs[key]
        if captured is None:
            return self._eager(args, kwargs)
        for static, t in zip(captured.static_inputs, tensors):
            static.copy_(t)
        captured.graph.replay()
        self.stats.replays += 1
        return _clone_output(captured.static_output)

    def _capture(self, key: tuple, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> Any:
        static_inputs = [t.clone() for t in tensors]
        s_args, s_kwargs = _replace_tensors(args, kwargs, static_inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the allocator's and libraries' lazy setup for this stream, not captured
            for _ in range(self.warmup):
                out = self.forward(*s_args, **s_kwargs)
                self.stats.eager += 1
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: another thread's CUDA calls (the explorer serves requests on several) neither
            # break this capture nor are refused during it
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_output = self.forward(*s_args, **s_kwargs)
        except Exception as exc:  # noqa: BLE001 - any capture failure (a sync, a tensor read on the host) means eager
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.graphs[key] = None
            self.stats.failed.append(reason)
            warnings.warn(f"dirotq.cuda_graphs: this call could not be captured in a CUDA graph ({reason}); calls "
                          "like it run eagerly", RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            return _clone_output(out)
        self.graphs[key] = _Captured(graph, static_inputs, static_output)
        self.stats.captures += 1
        log.info("captured a CUDA graph (%d so far)", self.stats.captures)
        graph.replay()  # the call's own result, from the graph it will replay from now on
        self.stats.replays += 1
        return _clone_output(static_output)


def graph_transformer(model: nn.Module, warmup: int = 1) -> nn.Module:
    """Wrap ``model.forward`` so that its calls on CUDA replay CUDA graphs (module docstring); in
    place, returns ``model``. Calling it again on a wrapped model changes nothing."""
    if isinstance(getattr(model, _ATTR, None), GraphedForward):
        return model
    graphed = GraphedForward(model, warmup)
    setattr(model, _ATTR, graphed)
    model.forward = graphed  # an instance attribute: nn.Module.__call__ finds it first
    return model


def ungraph_transformer(model: nn.Module) -> nn.Module:
    """Undo ``graph_transformer`` (the graphs and their memory are released)."""
    graphed = getattr(model, _ATTR, None)
    if isinstance(graphed, GraphedForward):
        del model.forward  # the class's forward again
        delattr(model, _ATTR)
    return model


def reset_graphs(model: nn.Module) -> None:
    """Drop the recorded graphs of a wrapped ``model`` (after its tensors moved or changed); the
    next call of each key captures again."""
    graphed = _graphed(model)
    graphed.graphs.clear()
    graphed.seen.clear()
    graphed.pool = None
    graphed.layout = None


def _graphed(model: nn.Module) -> GraphedForward:
    graphed = getattr(model, _ATTR, None)
    if not isinstance(graphed, GraphedForward):
        raise ValueError("this model is not wrapped by graph_transformer")  # noqa: TRY004 - a state, not a type error
    return graphed


def graph_stats(model: nn.Module) -> dict:
    """``GraphStats.as_dict()`` of a wrapped ``model``."""
    return _graphed(model).stats.as_dict()


__all__ = ["GraphStats", "GraphedForward", "call_key", "graph_stats", "graph_transformer", "reset_graphs",
           "ungraph_transformer"]
