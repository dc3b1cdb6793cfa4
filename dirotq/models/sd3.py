"""Stable Diffusion 3 / 3.5 adapter (diffusers ``SD3Transformer2DModel``), docs/DESIGN.md §5.

Joint block ``transformer_blocks.i`` (JointTransformerBlock): norm1 / norm1_context (adaLN-Zero
modulation linears), attn (joint attention: to_q/k/v on image tokens, add_q/k/v_proj on context
tokens, to_out.0 and to_add_out), ff (image MLP), ff_context (context MLP). SD3.5 "dual attention"
blocks add attn2 (a second self-attention on the image tokens, its own q/k/v group). The last block
is ``context_pre_only``: no to_add_out, no ff_context, norm1_context is AdaLayerNormContinuous.
Full-size SD3-medium: 24 blocks × 1536 (24 heads × 64); SD3.5-large 38 × 2432.

Targets: every attention and MLP linear of both streams (W4A4). Kept 16-bit: norm1/norm1_context
modulation, pos_embed, context_embedder, time_text_embed, norm_out.linear, proj_out.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter


class SD3Adapter(ModelAdapter):
    family = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    # conditioning linears outside the blocks (timestep and pooled-text embedders, the context embedder
    # on the text tokens, the final adaLN): 16-bit unless ``--layer-kind conditioning=…``
    weight_only_outside = ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                           "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
                           "context_embedder", "norm_out.linear")
    block_containers = (("transformer_blocks", ""),)

    def _kind_of(self, layer_type: str) -> tuple[str | None, str]:
        if layer_type in ("norm1.linear", "norm1_context.linear"):
            return None, "adaLN modulation (16-bit by docs/DESIGN.md §5)"
        return "w4a4", ""

    def tiny_config(self) -> dict:
        # dual_attention_layers=(0,) and qk_norm exercise the SD3.5 code paths (attn2, RMSNorm q/k)
        return dict(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
            pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8,
            dual_attention_layers=(0,), qk_norm="rms_norm",
        )

    def example_inputs(self, model, batch: int, generator: torch.Generator) -> dict:
        """hidden_states (B, C, S, S), encoder_hidden_states (B, 8, joint_attention_dim),
        pooled_projections (B, pooled_projection_dim), timestep (B,) float in [0, 1000)."""
        cfg = model.config
        s = cfg.sample_size
        return dict(
            hidden_states=torch.randn(batch, cfg.in_channels, s, s, generator=generator),
            encoder_hidden_states=torch.randn(batch, 8, cfg.joint_attention_dim, generator=generator),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=generator),
            timestep=torch.rand(batch, generator=generator) * 1000,
        )
