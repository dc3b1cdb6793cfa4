"""Model adapters: which linear layers DiRotQ quantizes (docs/DESIGN.md §5).

The algorithm code never knows a model family. An adapter answers, for one diffusers transformer
class, the model plumbing questions:

- which ``nn.Linear`` layers are targets and in which format (``"w4a4"``, or weight-only ``"w4a16"`` /
  ``"w8a16"``),
- which linears stay 16-bit and why (embedders, adaLN modulation, final projection, …),
- which targets read the *same* input tensor (q/k/v of one attention, …): they share one
  calibration and one rotation T (docs/DESIGN.md §5: "Layers whose input is shared … share one
  calibration and one T"),
- the block order (for grouping in the UI), and how to build a tiny random-init instance and random
  inputs for it (tests, no downloads).

The base class implements the walk over the transformer blocks once; a family adapter only lists
its block containers and its per-layer rules (``_kind_of``), and may add extra shared-input groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import KINDS  # W4A4, and weight-only W4A16 / W8A16 (also imported from here)

CONDITIONING = "conditioning"  # overrides alias: the family's weight_only_outside linears (expand_conditioning)
OUTSIDE_BLOCKS = -1  # TargetSpec.block of a target outside the transformer blocks (an overridden embedder)


@dataclass(frozen=True)
class TargetSpec:
    """One quantization target (an ``nn.Linear`` inside a transformer block).

    - ``name``: ``named_modules()`` name, e.g. ``"transformer_blocks.3.attn1.to_q"``.
    - ``kind``: ``"w4a4"`` (weights and activations INT4), ``"w4a16"`` (weight-only, the config's
      weight bits) or ``"w8a16"`` (weight-only, 8-bit weights).
    - ``group``: shared-input key; all targets reading the same tensor carry the name of the group's
      first member (in layer order); a layer with its own input carries its own name.
    - ``block``: block index in execution order (FLUX: double blocks first, then single blocks);
      ``OUTSIDE_BLOCKS`` (−1) for a linear outside the blocks made a target by an override.
    - ``layer_type``: name with the block prefix stripped (``"attn1.to_q"``, ``"ff.net.2"``,
      ``"single:proj_mlp"`` for FLUX single-stream blocks).
    - ``in_features`` / ``out_features``: W is ``(out_features, in_features)``.
    - ``head_dim``: for attention output projections (input = concatenated heads), the head size, so
      the per-head rotation variant can build a block-diagonal basis; else ``None``.
    """

    name: str
    kind: str
    group: str
    block: int
    layer_type: str
    in_features: int
    out_features: int
    head_dim: int | None = None

    @property
    def padded(self) -> bool:
        """True when ``in_features`` is not a multiple of the quantizer group (64): it gets padded."""
        return self.in_features % 64 != 0


@dataclass(frozen=True)
class _Block:
    """A transformer block as the walk sees it: execution index, module prefix, layer-type prefix."""

    index: int
    prefix: str  # e.g. "transformer_blocks.3"
    type_prefix: str  # "" or "single:"
    module: nn.Module


def _linear_like(m: object) -> bool:
    """An ``nn.Linear`` or a layer standing in for one (a quantized layer: integer widths), so the
    attention structure of a quantized model is recognised as that of its float original."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Module) and isinstance(getattr(m, "in_features", None), int)
                                        and isinstance(getattr(m, "out_features", None), int))


def _attention_modules(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Attention-like submodules of a block: anything with ``to_q``/``to_k``/``to_v`` linears."""
    for name, mod in block.named_modules():
        if all(_linear_like(getattr(mod, a, None)) for a in ("to_q", "to_k", "to_v")):
            yield name, mod


def _merge_groups(sets: list[tuple[str, ...]], order: list[str]) -> dict[str, str]:
    """Union overlapping shared-input sets; map each member to the group's first member in ``order``.

    Overlap happens legitimately: FLUX single blocks feed one normed tensor to attn.to_q/k/v *and*
    proj_mlp, so the auto-detected q/k/v set and the adapter's extra set must become one group.
    Only layers in ``order`` (the targets) take part: a 16-bit member does not name a group.
    """
    parent = {lt: lt for lt in order}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for members in sets:
        present = [lt for lt in members if lt in parent]
        for other in present[1:]:
            parent[find(other)] = find(present[0])
    first: dict[str, str] = {}
    for lt in order:  # layer order: the first member seen names the group
        first.setdefault(find(lt), lt)
    return {lt: first[find(lt)] for lt in order}


def _attn_heads(attn: nn.Module) -> int | None:
    heads = getattr(attn, "heads", None)
    return int(heads) if isinstance(heads, int) and heads > 0 else None


class ModelAdapter:
    """Base adapter. Subclasses set ``family``, ``model_classes``, ``block_containers`` and rules.

    ``block_containers``: ``(attribute, layer-type prefix)`` pairs of ``nn.ModuleList`` s on the
    transformer, in execution order. Every ``nn.Linear`` inside a block is a candidate; ``_kind_of``
    maps its layer type to a kind, or to ``None`` plus a reason (kept 16-bit).
    """

    family: str = "base"
    model_classes: tuple[str, ...] = ()
    block_containers: tuple[tuple[str, str], ...] = (("transformer_blocks", ""),)
    # extra shared-input groups (layer types inside one block) beyond the auto-detected attention
    # q/k/v sets; every tuple lists layers that read the identical tensor.
    extra_groups: tuple[tuple[str, ...], ...] = ()
    # layer types whose input is one tensor shared by *every* block (FLUX's adaLN linears all read
    # silu(temb)): one model-wide group, calibrated once instead of once per block.
    model_wide_groups: tuple[tuple[str, ...], ...] = ()
    # (projection layer type, activation module) pairs inside one block where the activation module
    # is applied to that projection's output and nothing else reads it, beyond diffusers' ``GELU``
    # modules (which hold their projection as ``proj`` and are found without being listed)
    epilogue_activations: tuple[tuple[str, str], ...] = ()
    # the conditioning linears outside the blocks, which may run weight-only (W8A16 / W4A16) at no time
    # cost: they read a few conditioning tokens per image (``conditioning_layers``, the alias
    # ``CONDITIONING``); 16-bit unless overridden
    weight_only_outside: tuple[str, ...] = ()

    def __init__(self, overrides: dict[str, str | None] | None = None):
        """``overrides``: layer type -> kind, or ``None`` to keep it 16-bit, replacing the family
        default, e.g. ``PixArtAdapter({"ff.net.2": "w4a4", "attn2.to_k": "w4a4"})``; a linear outside
        the blocks by its full name (``{"adaln_single.linear": "w4a16"}``, see ``outside_layers``)."""
        self.overrides = dict(overrides or {})
        for lt, k in self.overrides.items():
            if k is not None and k not in KINDS:
                raise ValueError(f"overrides[{lt!r}] = {k!r}: kind must be one of {KINDS} or None")

    # ----------------------------------------------------------------------------- family rules
    def _kind_of(self, layer_type: str) -> tuple[str | None, str]:
        """``(kind, "")`` for a target, ``(None, reason)`` for a linear kept 16-bit."""
        return "w4a4", ""

    def tiny_config(self) -> dict:
        """A small random-init config (hidden a multiple of 64, 2 blocks, few tokens)."""
        raise NotImplementedError

    def model_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.model_classes[0])

    def build_tiny(self, seed: int = 0) -> nn.Module:
        """The family's transformer built from ``tiny_config``, random init, eval mode, float32."""
        torch.manual_seed(seed)  # diffusers inits from the global RNG; seed it for reproducibility
        model = self.model_class()(**self.tiny_config())  # float32 by default
        return model.eval()

    def example_inputs(self, model: nn.Module, batch: int, generator: torch.Generator) -> dict:
        """Keyword arguments for ``model(**kw)``: random latents/text/timesteps of the right shapes."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------- matching
    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    # ------------------------------------------------------------------------------------ walk
    def blocks(self, model: nn.Module) -> list[_Block]:
        out: list[_Block] = []
        for attr, type_prefix in self.block_containers:
            container = getattr(model, attr, None)
            if container is None:
                continue
            for i, blk in enumerate(container):
                out.append(_Block(len(out), f"{attr}.{i}", type_prefix, blk))
        return out

    def _group_sets(self, block: _Block) -> list[tuple[str, ...]]:
        """Shared-input sets of layer types in one block (auto q/k/v detection + ``extra_groups``).

        Self-attention: to_q, to_k, to_v read the normed hidden states. Cross-attention
        (``is_cross_attention``): only to_k, to_v share (they read the text tokens). Joint attention
        (SD3/FLUX): add_q/k/v_proj read the normed context tokens.
        """
        sets: list[tuple[str, ...]] = []
        tp = block.type_prefix
        for aname, attn in _attention_modules(block.module):
            p = f"{tp}{aname}."
            if getattr(attn, "is_cross_attention", False):
                sets.append((p + "to_k", p + "to_v"))
            else:
                sets.append((p + "to_q", p + "to_k", p + "to_v"))
            if all(_linear_like(getattr(attn, a, None)) for a in ("add_q_proj", "add_k_proj", "add_v_proj")):
                sets.append((p + "add_q_proj", p + "add_k_proj", p + "add_v_proj"))
        sets.extend(self.extra_groups)
        return sets

    def _head_dims(self, block: _Block) -> dict[str, int]:
        """Attention output projections -> head size (their input is the concatenated heads)."""
        out: dict[str, int] = {}
        for aname, attn in _attention_modules(block.module):
            heads = _attn_heads(attn)
            if heads is None:
                continue
            inner = attn.to_q.out_features
            if inner % heads:
                continue
            p = f"{block.type_prefix}{aname}."
            to_out = getattr(attn, "to_out", None)
            if isinstance(to_out, nn.ModuleList) and len(to_out) and isinstance(to_out[0], nn.Linear):
                out[p + "to_out.0"] = inner // heads
            elif isinstance(to_out, nn.Linear):
                out[p + "to_out"] = inner // heads
            if isinstance(getattr(attn, "to_add_out", None), nn.Linear):
                out[p + "to_add_out"] = inner // heads
        return out

    def _walk(self, model: nn.Module) -> tuple[dict[str, TargetSpec], dict[str, str]]:
        targets: dict[str, TargetSpec] = {}
        kept: dict[str, str] = {}
        for block in self.blocks(model):
            linears = [
                (f"{block.prefix}.{n}", f"{block.type_prefix}{n}", m)
                for n, m in block.module.named_modules()
                if isinstance(m, nn.Linear)
            ]
            kinds = {}
            for full, ltype, m in linears:
                if ltype in self.overrides:
                    kind = self.overrides[ltype]
                    reason = "kept 16-bit by adapter override"
                else:
                    kind, reason = self._kind_of(ltype)
                if kind is None:
                    kept[full] = reason
                else:
                    if kind not in KINDS:
                        raise ValueError(f"{type(self).__name__}: kind {kind!r} for {full} not in {KINDS}")
                    kinds[ltype] = kind
            group_of = _merge_groups(self._group_sets(block), [lt for _, lt, _ in linears if lt in kinds])
            heads = self._head_dims(block)
            for full, ltype, m in linears:
                if ltype not in kinds:
                    continue
                key = group_of[ltype]
                targets[full] = TargetSpec(
                    name=full,
                    kind=kinds[ltype],
                    group=f"{block.prefix}.{key[len(block.type_prefix):]}",
                    block=block.index,
                    layer_type=ltype,
                    in_features=m.in_features,
                    out_features=m.out_features,
                    head_dim=heads.get(ltype),
                )
        for members in self.model_wide_groups:
            names = [n for n, spec in targets.items() if spec.layer_type in members]
            for n in names:
                targets[n] = dataclasses.replace(targets[n], group=names[0])
        for name in self.outside_layers(model):
            # a linear outside the blocks is overridden by its full name; its "layer type" is that name
            m = model.get_submodule(name)
            kind = self.overrides.get(name)
            if kind is None:
                kept[name] = "kept 16-bit by adapter override" if name in self.overrides else self._outside_reason(name)
                continue
            targets[name] = TargetSpec(name=name, kind=kind, group=name, block=OUTSIDE_BLOCKS, layer_type=name,
                                       in_features=m.in_features, out_features=m.out_features)
        return targets, kept

    def outside_layers(self, model: nn.Module) -> list[str]:
        """The linears outside the transformer blocks (embedders, adaLN, final projection), by full name:
        the names an override can turn into targets (16-bit by default)."""
        in_blocks = {f"{b.prefix}.{n}" for b in self.blocks(model) for n, m in b.module.named_modules()
                     if isinstance(m, nn.Linear)}
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in in_blocks]

    def conditioning_layers(self, model: nn.Module) -> list[str]:
        """The family's conditioning linears (``weight_only_outside``) that ``model`` has: the layers
        outside the blocks that run on a few tokens per image (timestep, pooled text, caption
        projection), whose 16-bit weights are a few percent of a W4A4 checkpoint."""
        present = set(self.outside_layers(model))
        return [n for n in self.weight_only_outside if n in present]

    def expand_conditioning(self, model: nn.Module, overrides: dict[str, str | None]) -> dict[str, str | None]:
        """``overrides`` with the alias ``CONDITIONING`` replaced by the family's conditioning linears
        present in ``model`` (``weight_only_outside``), each with the alias's kind; names given
        explicitly win. ``ValueError`` when the family lists none."""
        if CONDITIONING not in overrides:
            return dict(overrides)
        rest = {k: v for k, v in overrides.items() if k != CONDITIONING}
        names = self.conditioning_layers(model)
        if not names:
            raise ValueError(f"the {self.family} adapter lists no conditioning linears outside the blocks of this "
                             "model; name them one by one")
        return {**{n: overrides[CONDITIONING] for n in names}, **rest}

    def _outside_reason(self, name: str) -> str:
        """Why a linear outside the blocks stays 16-bit (embedders, adaLN-single, final proj)."""
        low = name.lower()
        if low.endswith("linear") and any(k in low for k in ("adaln", "norm", "time_embed")):
            return "adaLN modulation (16-bit by docs/DESIGN.md §5)"
        if any(k in low for k in ("embed", "caption", "time_text")):
            return "embedder (conditioning, few tokens per step; 16-bit by docs/DESIGN.md §5)"
        if "proj_out" in low or "final" in low:
            return "final projection (16-bit by docs/DESIGN.md §5)"
        return "outside the transformer blocks (only block linears are quantized)"

    # ------------------------------------------------------------------------------- public API
    def targets(self, model: nn.Module) -> dict[str, TargetSpec]:
        """Quantization targets, ordered by block, then layer (registration) order."""
        return self._walk(model)[0]

    def kept_16bit(self, model: nn.Module) -> dict[str, str]:
        """Every other ``nn.Linear`` of the model -> the reason it stays 16-bit."""
        return self._walk(model)[1]

    def block_shared_inputs(self, model: nn.Module, members: Callable[[nn.Module], bool]) -> list[list[str]]:
        """Within each block, the sets of layers (full names, layer order) that read one tensor, among
        the modules ``members`` accepts (e.g. the quantized layers of a quantized model, which
        ``targets`` no longer lists); sets of one are left out. Model-wide groups are not included:
        their members run at different points of the forward."""
        out: list[list[str]] = []
        for block in self.blocks(model):
            layers = [(f"{block.prefix}.{n}", f"{block.type_prefix}{n}") for n, m in block.module.named_modules()
                      if n and members(m)]
            group_of = _merge_groups(self._group_sets(block), [lt for _, lt in layers])
            grouped: dict[str, list[str]] = {}
            for full, lt in layers:
                grouped.setdefault(group_of[lt], []).append(full)
            out.extend(g for g in grouped.values() if len(g) > 1)
        return out

    def activation_sites(self, model: nn.Module) -> list[tuple[str, str]]:
        """(projection, activation module) full names, block by block, where the projection's GEMM
        epilogue can apply the activation (``dirotq.fusion.fuse_activations``): every diffusers
        ``GELU`` module (the activation module holds its projection as ``proj``), then the
        ``epilogue_activations`` pairs. Whether the activation is one the kernels have is checked there."""
        out: list[tuple[str, str]] = []
        for block in self.blocks(model):
            for n, m in block.module.named_modules():
                if n and type(m).__name__ == "GELU" and isinstance(getattr(m, "proj", None), nn.Module):
                    out.append((f"{block.prefix}.{n}.proj", f"{block.prefix}.{n}"))
            tp = block.type_prefix
            for proj_type, act_name in self.epilogue_activations:
                if not (proj_type.startswith(tp) and act_name.startswith(tp)):
                    continue
                proj, act = proj_type[len(tp):], act_name[len(tp):]
                try:  # (a pair of another block container names no submodule of this one)
                    block.module.get_submodule(proj), block.module.get_submodule(act)
                except AttributeError:
                    continue
                out.append((f"{block.prefix}.{proj}", f"{block.prefix}.{act}"))
        return out

    def groups(self, model: nn.Module) -> dict[str, list[str]]:
        """Shared-input group key -> member target names (layer order)."""
        out: dict[str, list[str]] = {}
        for spec in self.targets(model).values():
            out.setdefault(spec.group, []).append(spec.name)
        return out

    def __repr__(self) -> str:
        extra = f", overrides={self.overrides!r}" if self.overrides else ""
        return f"{type(self).__name__}(family={self.family!r}{extra})"
