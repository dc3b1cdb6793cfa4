"""Generic fallback adapter (docs/DESIGN.md §5: quantize every nn.Linear inside the blocks).

For an architecture no family adapter knows: every ``nn.ModuleList`` attribute of the model whose
elements contain an ``nn.Linear`` is taken as a list of blocks (in attribute order, which is
usually execution order); every linear inside is a W4A4 target, every linear outside stays 16-bit.
Shared-input groups are detected from diffusers attention modules (to_q/to_k/to_v, add_*_proj).
``get_adapter`` warns when it falls back here: the target report must be read before trusting it.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelAdapter, _Block


class GenericAdapter(ModelAdapter):
    family = "generic"
    model_classes = ()

    def matches(self, model: nn.Module) -> bool:
        return True

    def blocks(self, model: nn.Module) -> list[_Block]:
        out: list[_Block] = []
        first = True
        for attr, child in model.named_children():
            if not isinstance(child, nn.ModuleList):
                continue
            if not any(isinstance(m, nn.Linear) for m in child.modules()):
                continue
            # later block lists get a prefix so layer types of different block kinds stay distinct
            prefix = "" if first else f"{attr}:"
            first = False
            for i, blk in enumerate(child):
                out.append(_Block(len(out), f"{attr}.{i}", prefix, blk))
        return out

    def tiny_config(self) -> dict:
        raise NotImplementedError("GenericAdapter has no tiny model: it adapts unknown architectures")

    def example_inputs(self, model, batch: int, generator: torch.Generator) -> dict:
        raise NotImplementedError("GenericAdapter cannot guess the inputs of an unknown architecture")
