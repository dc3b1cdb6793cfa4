"""Model adapters per family (docs/DESIGN.md §5, §2 ``models/``): targets, 16-bit layers,
shared-input groups and tiny test models for PixArt-α/Σ, DiT, SD3, FLUX and SANA, plus a generic
fallback for unknown architectures."""

from __future__ import annotations

from torch import nn

from .base import KINDS, ModelAdapter, TargetSpec, _warn_generic, target_report
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


__all__ = [
    "ADAPTERS", "KINDS", "DiTAdapter", "FluxAdapter", "GenericAdapter", "ModelAdapter", "PixArtAdapter",
    "SD3Adapter", "SanaAdapter", "TargetSpec", "get_adapter", "target_report",
]
