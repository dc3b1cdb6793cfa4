"""DiT class-conditional adapter (diffusers ``DiTTransformer2DModel``), docs/DESIGN.md §5.

Block ``transformer_blocks.i`` (BasicTransformerBlock, ``ada_norm_zero``): norm1 is an adaLN-Zero
module holding its own timestep + class embedder (norm1.emb.*) and the modulation linear
(norm1.linear, width → 6·width); attn1 (self-attention, q/k/v shared input); ff.net.0.proj, ff.net.2.
Full-size DiT-XL/2: 28 blocks, width 1152 (16 heads × 72), 1000 classes.

Targets: attention and feed-forward linears (W4A4). Kept 16-bit: the adaLN-Zero modulation and the
conditioning embedders inside each block, pos_embed, proj_out_1 (final adaLN) and proj_out_2.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter


class DiTAdapter(ModelAdapter):
    family = "dit"
    model_classes = ("DiTTransformer2DModel",)
    block_containers = (("transformer_blocks", ""),)

    def _kind_of(self, layer_type: str) -> tuple[str | None, str]:
        if layer_type == "norm1.linear":
            return None, "adaLN-Zero modulation (16-bit by docs/DESIGN.md §5)"
        if layer_type.startswith("norm1.emb."):
            return None, "timestep/class embedder inside the block (adaLN-Zero conditioning)"
        return "w4a4", ""

    def tiny_config(self) -> dict:
        return dict(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10,
        )

    def example_inputs(self, model, batch: int, generator: torch.Generator) -> dict:
        """hidden_states (B, C, S, S), timestep (B,) int64, class_labels (B,) int64 in [0, classes)."""
        cfg = model.config
        s = cfg.sample_size
        return dict(
            hidden_states=torch.randn(batch, cfg.in_channels, s, s, generator=generator),
            timestep=torch.randint(0, 1000, (batch,), generator=generator),
            class_labels=torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=generator),
        )
