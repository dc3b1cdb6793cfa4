"""Model adapters per family (docs/DESIGN.md §5): targets, 16-bit layers,
shared-input groups and tiny test models for PixArt-α/Σ, DiT, SD3, FLUX and SANA, plus a generic
fallback for unknown architectures."""

from __future__ import annotations

import warnings

from torch import nn

from .base import KINDS, ModelAdapter, TargetSpec
from .dit import DiTAdapter
from .flux import FluxAdapter
from .generic import GenericAdapter
from .pixart import PixArtAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter

ADAPTERS: dict[str, ModelAdapter] = {
    a.family: a for a in (PixArtAdapter(), DiTAdapter(), SD3Adapter(), FluxAdapter(), SanaAdapter())
}


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model`` (a diffusers transformer, or a pipeline: its ``.transformer``).

    Unknown architectures fall back to ``GenericAdapter`` with a ``UserWarning`` naming the class.
    """
    if not isinstance(model, nn.Module) and hasattr(model, "transformer"):
        model = model.transformer
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    _warn_generic(model)
    return GenericAdapter()


def target_report(model: nn.Module, adapter: ModelAdapter | None = None) -> str:
    """One-line summary: ``"112 W4A4 targets, 28 W4A16, 9 kept 16-bit, no unknown names"``.

    "Unknown names" are linears the adapter could not explain: with a family adapter, linears
    outside the blocks that match no embedder/adaLN/final pattern; with the generic fallback, every
    target (its rules are a guess). Input widths that are not a multiple of 64 are listed (padded).
    """
    adapter = adapter or get_adapter(model)
    targets, kept = adapter._walk(model)
    n44 = sum(s.kind == "w4a4" for s in targets.values())
    n416 = sum(s.kind == "w4a16" for s in targets.values())
    n816 = sum(s.kind == "w8a16" for s in targets.values())
    unknown = [n for n, r in kept.items() if r.startswith("outside the transformer blocks")]
    if adapter.family == "generic":
        unknown = list(targets) + unknown
    parts = [f"{n44} W4A4 targets", f"{n416} W4A16", *([f"{n816} W8A16"] if n816 else []), f"{len(kept)} kept 16-bit"]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        parts.append(f"{len(unknown)} unknown names ({shown})")
    else:
        parts.append("no unknown names")
    padded = sorted({s.in_features for s in targets.values() if s.padded})
    if padded:
        parts.append(f"input widths padded to a multiple of 64: {padded}")
    return ", ".join(parts)


def _warn_generic(model: nn.Module) -> None:
    warnings.warn(
        f"dirotq: no adapter for {type(model).__name__}; falling back to GenericAdapter "
        "(every nn.Linear inside the block lists is a W4A4 target, everything else kept 16-bit). "
        "Check the target report before trusting the result.",
        UserWarning,
        stacklevel=3,
    )


__all__ = [
    "ADAPTERS", "KINDS", "DiTAdapter", "FluxAdapter", "GenericAdapter", "ModelAdapter", "PixArtAdapter",
    "SD3Adapter", "SanaAdapter", "TargetSpec", "get_adapter", "target_report",
]
