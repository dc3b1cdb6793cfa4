"""PixArt-α / PixArt-Σ adapter (diffusers ``PixArtTransformer2DModel``), docs/DESIGN.md §5 and
the ``paper`` preset's 16-bit list.

Block ``transformer_blocks.i`` (BasicTransformerBlock, ``ada_norm_single``): attn1 (self-attention,
to_q/k/v share the normed hidden states), attn2 (cross-attention: to_q reads the hidden states,
to_k/to_v read the T5 caption tokens), ff.net.0.proj (GELU-tanh up-projection), ff.net.2 (down).
Full-size PixArt-Σ: 28 blocks, width 1152 (16 heads × 72), ff 4608, caption 4096 → 1152.

Defaults (paper): attn2.to_k / attn2.to_v stay 16-bit (they read text tokens that are the same at
every step, computed once per prompt); ff.net.2 runs W4A16 (its input has the heaviest outliers);
adaln_single, caption_projection, pos_embed, proj_out stay 16-bit (outside the blocks); the
conditioning ones can run weight-only (``conditioning_layers``).
"""

from __future__ import annotations

import torch

from .base import ModelAdapter

CROSS_KV_REASON = "cross-attention K/V read the text tokens, computed once per prompt (paper keeps them 16-bit)"


class PixArtAdapter(ModelAdapter):
    family = "pixart"
    model_classes = ("PixArtTransformer2DModel",)
    block_containers = (("transformer_blocks", ""),)
    # when overridden into targets, every block's cross-attention K/V read the same caption tokens
    model_wide_groups = (("attn2.to_k", "attn2.to_v"),)
    # the conditioning linears (timestep embedding and adaLN-single on one token per image, the caption
    # projection on the caption tokens): 15.6 M parameters at PixArt-Σ size, 2.6 % of its bf16 weights
    weight_only_outside = ("adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
                           "adaln_single.emb.resolution_embedder.linear_1", "adaln_single.emb.resolution_embedder.linear_2",
                           "adaln_single.emb.aspect_ratio_embedder.linear_1",
                           "adaln_single.emb.aspect_ratio_embedder.linear_2",
                           "adaln_single.linear", "caption_projection.linear_1", "caption_projection.linear_2")

    def _kind_of(self, layer_type: str) -> tuple[str | None, str]:
        if layer_type in ("attn2.to_k", "attn2.to_v"):
            return None, CROSS_KV_REASON
        if layer_type == "ff.net.2":
            return "w4a16", ""
        return "w4a4", ""

    def tiny_config(self) -> dict:
        return dict(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=64, caption_channels=32, sample_size=8, patch_size=2,
            norm_num_groups=32, use_additional_conditions=False,
        )

    def example_inputs(self, model, batch: int, generator: torch.Generator) -> dict:
        """hidden_states (B, C, S, S) latents, encoder_hidden_states (B, 8, caption_channels),
        timestep (B,) int64 in [0, 1000), encoder_attention_mask (B, 8) with 2 padded tokens."""
        cfg = model.config
        s, c, L = cfg.sample_size, cfg.in_channels, 8
        mask = torch.ones(batch, L)
        mask[:, -2:] = 0  # padded caption tokens, as T5 produces
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(model, "use_additional_conditions", False):
            added = {"resolution": torch.full((batch, 2), float(s * 8)), "aspect_ratio": torch.ones(batch, 1)}
        return dict(
            hidden_states=torch.randn(batch, c, s, s, generator=generator),
            encoder_hidden_states=torch.randn(batch, L, cfg.caption_channels, generator=generator),
            timestep=torch.randint(0, 1000, (batch,), generator=generator),
            encoder_attention_mask=mask,
            added_cond_kwargs=added,
        )
