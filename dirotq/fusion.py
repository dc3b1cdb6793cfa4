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

Activation fusion (``fuse_activations``): where a GELU is applied to a quantized projection's output
and to nothing else (diffusers' ``GELU`` module around ``ff.net.0.proj``; FLUX's single blocks'
``act_mlp`` after ``proj_mlp``, listed by the model adapter), the projection applies it in its GEMM
epilogue (``QuantLinear.epilogue_activation``, ``dirotq.activations``) and the activation module is
replaced by a pass-through that keeps it for ``unfuse_activations``: one pass over the (n, 4·d) MLP
hidden states less. A fused shared-input layer applies it to its member's columns. State-dict keys
do not change; checkpoints hold the unfused form as for shared inputs. A LoRA on such a projection
(``dirotq.lora``) releases the activation (``release_activation``): its term belongs before it, so
the module where the activation was applies it again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import compile_ops
from .activations import ACTIVATIONS, activation_kind
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
            return compile_ops.quant_linear_member(x, fused.stored_weight(), self.index, self.start, self.stop)
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
    with _activations_unfused(model, adapter):  # a member's epilogue activation moves to its columns
        return _fuse_shared_inputs(model, adapter)


def _fuse_shared_inputs(model: nn.Module, adapter: Any) -> dict:
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
    if not fused:
        return 0
    with _activations_unfused(model, None):  # the columns' epilogue activation goes back to its member
        _split_fused(model, fused)
    return len(fused)


def _split_fused(model: nn.Module, fused: list[tuple[str, FusedQuantLinear]]) -> None:
    for name, f in fused:
        for member, layer in zip(f.member_names, split_layer(f)):
            owner, child = _parent(model, member)
            setattr(owner, child, layer)
        owner, child = _parent(model, name)
        delattr(owner, child)


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in its per-layer form inside the block (no fused shared inputs, no epilogue
    activations), fused again after it as it was."""
    activations = unfuse_activations(model)
    groups = unfuse_shared_inputs(model)
    try:
        yield model
    finally:
        if groups:
            fuse_shared_inputs(model)
        if activations:
            fuse_activations(model)


def has_fused_layers(model: nn.Module) -> bool:
    """Whether ``model`` has fused shared-input layers or epilogue activations."""
    return any(isinstance(m, (FusedQuantLinear, _InEpilogue)) for m in model.modules())


# ------------------------------------------------------------------------------------ activations
class _InEpilogue(nn.Module):
    """Where an activation module was whose activation a projection now applies in its epilogue.
    The replaced module is kept outside the module tree, for ``unfuse_activations``. If the
    projection stops applying it (``release_activation``: a LoRA on it, whose term must come before
    the activation), this module applies it again."""

    def __init__(self, original: nn.Module, projection: str, layer: nn.Module, kind: str) -> None:
        super().__init__()
        self._original = (original,)  # tuples: not registered as submodules
        self._layer = (layer,)
        self.projection = projection  # the projection's full name in the model
        self.kind = kind

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def in_epilogue(self) -> bool:
        """Whether the projection still applies the activation in its epilogue."""
        return output_activation(self._layer[0]) is not None

    def extra_repr(self) -> str:
        where = "in the epilogue of" if self.in_epilogue() else "here, after"
        return f"{type(self.original).__name__} applied {where} {self.projection}"


class ProjectionWithActivation(_InEpilogue):
    """Where diffusers' ``GELU`` (``proj`` then the activation) was: ``proj``, whose epilogue applies
    the activation, under the same name, so state-dict keys do not change."""

    def __init__(self, original: nn.Module, projection: str, layer: nn.Module, kind: str) -> None:
        super().__init__(original, projection, layer, kind)
        self.proj = original.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y if self.in_epilogue() else F.gelu(y, approximate=ACTIVATIONS[self.kind])


class ActivationInEpilogue(_InEpilogue):
    """Where a stand-alone activation module was (FLUX's ``act_mlp``): its input already is the
    activated output of the projection, so it passes it through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.in_epilogue() else self.original(x)


def output_activation(layer: nn.Module) -> str | None:
    """The activation ``layer`` (a ``QuantLinear`` or a member of a fused layer) applies to its own
    output in the epilogue, or None."""
    if isinstance(layer, SharedInputSlice):
        spec = layer.fused.epilogue_activation
        return spec[0] if spec is not None and spec[1] < layer.stop and layer.start < spec[2] else None
    spec = getattr(layer, "epilogue_activation", None)
    return spec[0] if spec is not None else None


def _set_activation(layer: nn.Module, kind: str | None) -> str | None:
    """Set (kind) or clear (None) the epilogue activation of a projection; returns why it cannot be
    set, or None. A fused layer's member gets it on its columns; one range per fused layer."""
    if isinstance(layer, SharedInputSlice):
        fused = layer.fused
        if kind is None:
            fused.epilogue_activation = None
            return None
        if fused.epilogue_activation is not None:
            return f"{fused.name} already applies an activation to other columns"
        fused.epilogue_activation = (kind, layer.start, layer.stop)
        return None
    if type(layer) is not QuantLinear:
        return f"the projection is a {type(layer).__name__}, not a quantized layer"
    layer.epilogue_activation = None if kind is None else (kind, 0, layer.out_features)
    return None


def release_activation(layer: nn.Module) -> bool:
    """Make ``layer`` (a projection fused by ``fuse_activations``) stop applying its activation; the
    module that stands where the activation was applies it again. For a LoRA on the layer, whose
    term belongs before the activation. Returns whether there was one to release."""
    if output_activation(layer) is None:
        return False
    _set_activation(layer, None)
    return True


@torch.no_grad()
def fuse_activations(model: nn.Module, *, adapter: Any = None) -> dict:
    """Let quantized projections apply the activation that follows them in their GEMM epilogue (the
    module docstring), in place. Returns ``{"fused": {activation module: projection},
    "not_fused": {activation module: reason}}``. Idempotent."""
    from .models import get_adapter

    if not isinstance(model, nn.Module) and hasattr(model, "transformer"):
        model = model.transformer
    adapter = adapter or get_adapter(model)
    fused: dict[str, str] = {}
    not_fused: dict[str, str] = {}
    for proj_name, act_name in adapter.activation_sites(model):
        act = model.get_submodule(act_name)
        if isinstance(act, _InEpilogue):
            continue
        kind = activation_kind(act)
        if kind is None:
            not_fused[act_name] = (f"{type(act).__name__}(approximate={getattr(act, 'approximate', None)!r}) is not "
                                   "an activation the GEMM epilogue has (GELU, erf or tanh form)")
            continue
        why = _set_activation(model.get_submodule(proj_name), kind)
        if why is not None:
            not_fused[act_name] = why
            continue
        inside = proj_name.startswith(act_name + ".")
        owner, child = _parent(model, act_name)
        site = ProjectionWithActivation if inside else ActivationInEpilogue
        setattr(owner, child, site(act, proj_name, model.get_submodule(proj_name), kind))
        fused[act_name] = proj_name
    if fused:
        log.info("fused %d activations into their projections' epilogues", len(fused))
    return {"fused": fused, "not_fused": not_fused}


@torch.no_grad()
def unfuse_activations(model: nn.Module) -> int:
    """Undo ``fuse_activations`` in place; returns the number of activation modules put back."""
    if not isinstance(model, nn.Module) and hasattr(model, "transformer"):
        model = model.transformer
    sites = [(n, m) for n, m in model.named_modules() if isinstance(m, _InEpilogue)]
    for name, site in sites:
        original = site.original
        if isinstance(site, ProjectionWithActivation):
            original.proj = site.proj  # whatever sits there now (the same layer, unless replaced)
        owner, child = _parent(model, name)
        setattr(owner, child, original)
        _set_activation(model.get_submodule(site.projection), None)
    return len(sites)


@contextlib.contextmanager
def _activations_unfused(model: nn.Module, adapter: Any) -> Iterator[None]:
    had = unfuse_activations(model)
    try:
        yield
    finally:
        if had:
            fuse_activations(model, adapter=adapter)


def fuse_for_inference(model: nn.Module, *, adapter: Any = None) -> dict:
    """The deployment form: shared-input groups fused (``fuse_shared_inputs``), then activations in
    their projections' epilogues (``fuse_activations``); the same images, fewer passes. Returns
    ``{"shared_inputs": …, "activations": …}``, the two reports."""
    return {"shared_inputs": fuse_shared_inputs(model, adapter=adapter),
            "activations": fuse_activations(model, adapter=adapter)}


def fusion_stats(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per fused layer: member count, calls of its members and runs of the fused layer (eager)."""
    return {n: {"members": len(m.splits), "calls": m.calls, "runs": m.runs}
            for n, m in model.named_modules() if isinstance(m, FusedQuantLinear)}


__all__ = ["ActivationInEpilogue", "FusedQuantLinear", "ProjectionWithActivation", "SharedInputSlice", "concat_rows",
           "fuse_activations", "fuse_for_inference", "fuse_layers", "fuse_shared_inputs", "fusion_stats",
           "has_fused_layers", "output_activation", "release_activation", "split_layer", "unfuse_activations",
           "unfuse_shared_inputs", "unfused"]
