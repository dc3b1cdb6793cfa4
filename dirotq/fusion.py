"""Shared-input fusion: quantized layers that read the same tensor run as one layer.

Attention q/k/v read the same normed hidden states (FLUX's single blocks also feed it to
``proj_mlp``; its joint attention feeds the context tokens to add_q/k/v). Quantized separately,
each layer rotates and quantizes that input again and runs its own GEMM. Their activation side is
identical by construction when they were calibrated as one shared-input group with one rank (same
smoothing, basis, rotation and signs), so the group can quantize the input once and run one GEMM
over the concatenated outputs: ``fuse_shared_inputs`` replaces the members by one ``QuantLinear``
holding the rows of all of them, registered on their common parent, and puts a
``SharedInputSlice`` where each member was; diffusers' attention processors keep calling
``attn.to_q(x)``, ``attn.to_k(x)``, … unchanged.

Eager: the first member called with a tensor runs the fused layer and keeps its output until every
member has taken its columns for that same tensor object; a member called with another tensor
(or twice) runs the fused layer again, so a slice always returns exactly the fused layer's output
for its own input. ``fusion_stats`` counts calls and fused runs (calls / runs = members when the
sharing works). Under ``torch.compile`` each member calls the fused layer's op and slices; the
compiler's common-subexpression elimination leaves one call per group (tests/test_fusion.py).

Checkpoints keep the unfused form (``save_quantized`` unfuses around the save and fuses back), so
either form loads from the same files; ``load_quantized(..., fuse_shared_inputs=True)`` fuses on
load. Members are fused only when their activation side is identical (same widths, formats, rank
and tensors): a rank plan that gives q, k and v different ranks fuses the members that agree.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import compile_ops
from .modules import QuantLinear
from .quantizers import QuantizedTensor

log = logging.getLogger(__name__)

# the activation side of a QuantLinear: what must be equal for two layers to share one quantized input
_SHARED_ATTRS = ("in_features", "quant_in_features", "act_bits", "group_size", "act_symmetric", "scale_format",
                 "project_out", "weights_in_original_basis", "weight_bits", "rank")
_SHARED_TENSORS = ("smooth", "down", "rotation", "hadamard_signs")


class SharedInputSlice(nn.Module):
    """Output columns ``[start, stop)`` of a fused shared-input layer: what one member layer was.

    Holds no tensors: the fused layer is registered on the members' common parent (a reference to
    it is kept here outside the module tree, so state dicts and ``.to()`` see it once)."""

    def __init__(self, fused: "FusedQuantLinear", index: int, start: int, stop: int) -> None:
        super().__init__()
        self._fused = (fused,)  # a tuple: not registered as a submodule
        self.index, self.start, self.stop = index, start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    @property
    def fused(self) -> "FusedQuantLinear":
        return self._fused[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        if torch.compiler.is_compiling():
            # one opaque op per member; at run time the op shares the fused output as eager does
            return compile_ops.quant_linear_member(x, compile_ops.handle(fused), self.index, self.start, self.stop)
        return fused.shared_output(x, self.index)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns [{self.start}, {self.stop}) of {self.fused.name}"


class FusedQuantLinear(QuantLinear):
    """One ``QuantLinear`` over the concatenated output rows of a shared-input group, plus the output
    cache that lets its members (``SharedInputSlice``) take their columns from one run."""

    name: str
    member_names: list[str]
    member_meta: list[dict]
    member_bias: list[bool]
    splits: list[int]

    def _init_fusion(self, name: str, members: list[tuple[str, QuantLinear]]) -> None:
        self.name = name
        self.member_names = [n for n, _ in members]
        self.member_meta = [dict(m.meta) for _, m in members]
        self.member_bias = [m.bias is not None for _, m in members]
        self.splits = [m.out_features for _, m in members]
        self.meta = {**members[0][1].meta, "fused_members": self.member_names}
        self._cache: tuple | None = None
        self.calls = 0
        self.runs = 0

    def shared_output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """The fused output for ``x`` (run once per input and group, see the module docstring)."""
        self.calls += 1
        key = _input_key(x)
        c = self._cache
        if c is None or c[0] != key or member in c[3]:
            self.runs += 1
            # x is held with its key: its memory cannot be reused by another tensor while cached
            c = (key, x, self(x), set())
            self._cache = c
        c[3].add(member)
        if len(c[3]) == len(self.splits):
            self._cache = None  # every member has its columns: hold nothing between forwards
        return c[2]


def _input_key(x: torch.Tensor) -> tuple:
    """Same memory, layout and contents version: the same input. Memory, not the Python object, is
    compared because a compiled graph may hand each op call its own view object of one buffer.
    Tensors made under ``torch.inference_mode`` have no version counter (nothing may change them
    in place outside it); for them memory and layout decide."""
    try:
        version = x._version
    except RuntimeError:
        version = None
    return (x.data_ptr(), x.device, x.dtype, tuple(x.shape), x.stride(), version)


def _activation_side_equal(a: QuantLinear, b: QuantLinear) -> bool:
    if type(a) is not QuantLinear or type(b) is not QuantLinear:
        return False
    if any(getattr(a, k) != getattr(b, k) for k in _SHARED_ATTRS):
        return False
    if (getattr(a, "weight_ratio", None) is None) != (getattr(b, "weight_ratio", None) is None):
        return False
    if (a.up is None) != (b.up is None):
        return False
    for k in _SHARED_TENSORS:
        ta, tb = getattr(a, k), getattr(b, k)
        if (ta is None) != (tb is None) or (ta is not None and (ta.dtype != tb.dtype or not torch.equal(ta, tb))):
            return False
    return True


# buffers indexed by output row (joined by _join_rows); the others are the activation side
_ROW_BUFFERS = ("weight", "weight_packed", "weight_codes", "weight_scale", "weight_ratio", "up")


def _join_rows(cls: type[QuantLinear], parts: list[QuantLinear], bias: torch.Tensor | None) -> QuantLinear:
    """A ``cls`` over the output rows of ``parts`` (one activation side, checked by the callers) in
    order, with ``bias`` (over all rows, or None): built from the first part, then every row-indexed
    buffer replaced by the parts' buffers joined as stored (packed codes stay packed)."""
    first = parts[0]
    out = cls(first.in_features, sum(p.out_features for p in parts), method=first.meta["method"],
              weight=first.weight if first.weight_bits == 16 else first.quantized_weight(), act_bits=first.act_bits,
              group_size=first.group_size, act_symmetric=first.act_symmetric, scale_format=first.scale_format,
              bias=None, smooth=first.smooth, down=first.down, up=first.up, project_out=first.project_out,
              rotation=first.rotation, hadamard_signs=first.hadamard_signs,
              weights_in_original_basis=first.weights_in_original_basis, dtype=first.float_dtype())
    for name in _ROW_BUFFERS:
        if isinstance(getattr(first, name, None), torch.Tensor):
            setattr(out, name, torch.cat([getattr(p, name) for p in parts]))
    out.bias = bias
    out.backend = first.backend
    return out


def concat_rows(parts: list[QuantLinear]) -> QuantLinear:
    """One ``QuantLinear`` whose output rows are ``parts``' rows in order: a layer quantized a block
    of rows at a time (``quantize_``) put back together. The parts must share their activation side
    and all have a bias or none; stored buffers are joined as stored, so the result is the layer the
    whole-weight handler would have built when its rows are independent."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if not all(_activation_side_equal(first, p) for p in parts[1:]):
        raise ValueError("concat_rows: the parts do not share one activation side")
    if any((p.bias is None) != (first.bias is None) for p in parts):
        raise ValueError("concat_rows: some parts have a bias and some do not")
    out = _join_rows(QuantLinear, parts, None if first.bias is None else torch.cat([p.bias for p in parts]))
    out.meta = dict(first.meta)
    return out


def fuse_layers(name: str, members: list[tuple[str, QuantLinear]]) -> FusedQuantLinear:
    """One fused layer from ``members`` ((name, QuantLinear) pairs with identical activation sides)."""
    first = members[0][1]
    layers = [m for _, m in members]
    if not all(_activation_side_equal(first, m) for m in layers[1:]):
        raise ValueError(f"fuse_layers: {[n for n, _ in members]} do not share one activation side")
    dtype = first.float_dtype()
    bias = None
    if any(m.bias is not None for m in layers):  # a member without a bias adds zeros to its columns
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dtype,
                                                                         device=m._device())
                          for m in layers])
    fused = _join_rows(FusedQuantLinear, layers, bias)
    fused._init_fusion(name, members)
    return fused


def split_layer(fused: FusedQuantLinear) -> list[QuantLinear]:
    """The member layers of ``fused`` as they were before fusion (same buffers, bit for bit)."""
    out = []
    dtype = fused.float_dtype()
    q = None if fused.weight_bits == 16 else fused.quantized_weight()
    start = 0
    for meta, has_bias, width in zip(fused.member_meta, fused.member_bias, fused.splits):
        rows = slice(start, start + width)
        if q is None:
            weight: Any = fused.weight[rows]
        else:
            weight = QuantizedTensor(q.q[rows], q.scale[rows], None, None if q.ratio is None else q.ratio[rows], q.bits,
                                     q.group_size, q.in_features, q.scale_format)
        m = QuantLinear(fused.in_features, width, method=meta["method"], weight=weight, act_bits=fused.act_bits,
                        group_size=fused.group_size, act_symmetric=fused.act_symmetric, scale_format=fused.scale_format,
                        bias=fused.bias[rows] if has_bias else None, smooth=fused.smooth, down=fused.down,
                        up=None if fused.up is None else fused.up[rows], project_out=fused.project_out,
                        rotation=fused.rotation, hadamard_signs=fused.hadamard_signs,
                        weights_in_original_basis=fused.weights_in_original_basis, dtype=dtype)
        m.meta = dict(meta)
        m.backend = fused.backend
        out.append(m)
        start += width
    return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return ".".join(common)


def _fused_name(prefix: str, names: list[str]) -> str:
    """Attribute name of the fused layer on the common parent: ``fused__to_q__to_k__to_v``."""
    cut = len(prefix) + 1 if prefix else 0
    return "fused__" + "__".join(n[cut:].replace(".", "_") for n in names)


def _candidate_groups(model: nn.Module, adapter: Any) -> list[list[str]]:
    from .models import get_adapter

    adapter = adapter or get_adapter(model)
    return adapter.block_shared_inputs(model, lambda m: type(m) is QuantLinear)


def _agreeing_subsets(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Split a shared-input set into runs of layers with identical activation sides (layer order)."""
    subsets: list[list[str]] = []
    for n in names:
        m = model.get_submodule(n)
        for s in subsets:
            if _activation_side_equal(model.get_submodule(s[0]), m):
                s.append(n)
                break
        else:
            subsets.append([n])
    return [s for s in subsets if len(s) > 1]


@torch.no_grad()
def fuse_shared_inputs(model: nn.Module, *, adapter: Any = None) -> dict:
    """Fuse every shared-input group of quantized layers of ``model`` (a pipeline: its transformer)
    in place. Returns ``{"fused": {fused layer name: [member names]}, "not_fused": {member: reason}}``.
    Idempotent: fused groups stay as they are."""
    if not isinstance(model, nn.Module) and hasattr(model, "transformer"):
        model = model.transformer
    fused_report: dict[str, list[str]] = {}
    not_fused: dict[str, str] = {}
    for names in _candidate_groups(model, adapter):
        subsets = _agreeing_subsets(model, names)
        in_subset = {n for s in subsets for n in s}
        for n in names:
            if n not in in_subset:
                not_fused[n] = "its activation side (rank, basis, format) differs from the other layers of its input"
        for members in subsets:
            prefix = _common_prefix(members)
            parent = model.get_submodule(prefix) if prefix else model
            attr = _fused_name(prefix, members)
            fused = fuse_layers(f"{prefix}.{attr}" if prefix else attr, [(n, model.get_submodule(n)) for n in members])
            parent.add_module(attr, fused)
            start = 0
            for i, n in enumerate(members):
                owner, child = _parent(model, n)
                setattr(owner, child, SharedInputSlice(fused, i, start, start + fused.splits[i]))
                start += fused.splits[i]
            fused_report[fused.name] = members
    if fused_report:
        log.info("fused %d shared-input groups (%d layers)", len(fused_report), sum(map(len, fused_report.values())))
    return {"fused": fused_report, "not_fused": not_fused}


@torch.no_grad()
def unfuse_shared_inputs(model: nn.Module) -> int:
    """Undo ``fuse_shared_inputs`` in place (the member layers come back bit for bit); returns the
    number of groups split."""
    if not isinstance(model, nn.Module) and hasattr(model, "transformer"):
        model = model.transformer
    fused = [(n, m) for n, m in model.named_modules() if isinstance(m, FusedQuantLinear)]
    for name, f in fused:
        for member, layer in zip(f.member_names, split_layer(f)):
            owner, child = _parent(model, member)
            setattr(owner, child, layer)
        owner, child = _parent(model, name)
        delattr(owner, child)
    return len(fused)


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in its per-layer form inside the block, fused again after it (if it was fused)."""
    if not unfuse_shared_inputs(model):
        yield model
        return
    try:
        yield model
    finally:
        fuse_shared_inputs(model)


def has_fused_layers(model: nn.Module) -> bool:
    return any(isinstance(m, FusedQuantLinear) for m in model.modules())


def fusion_stats(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per fused layer: member count, calls of its members and runs of the fused layer (eager)."""
    return {n: {"members": len(m.splits), "calls": m.calls, "runs": m.runs}
            for n, m in model.named_modules() if isinstance(m, FusedQuantLinear)}


__all__ = ["FusedQuantLinear", "SharedInputSlice", "concat_rows", "fuse_layers", "fuse_shared_inputs", "fusion_stats",
           "has_fused_layers", "split_layer", "unfuse_shared_inputs", "unfused"]
