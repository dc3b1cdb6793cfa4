"""SANA adapter (diffusers ``SanaTransformer2DModel``), docs/DESIGN.md §5.

Block ``transformer_blocks.i`` (SanaTransformerBlock): attn1 is ReLU *linear* attention
(SanaLinearAttnProcessor: to_q/k/v share the normed hidden states, to_out.0), attn2 is softmax
cross-attention (to_q on hidden states, to_k/to_v on the caption tokens, to_out.0), ff is
GLUMBConv: conv_inverted (1×1), conv_depth (3×3 depthwise), conv_point (1×1): convolutions, not
nn.Linear, so not targets here (the brief quantizes nn.Linear only). The adaLN modulation is a
per-block ``scale_shift_table`` parameter plus the shared time_embed.linear (outside the blocks).
Full-size SANA-1600M: 20 blocks, width 2240 (70 linear-attention heads × 32; cross-attention
20 heads × 112), caption 2304 (Gemma-2) → 2240, mlp ratio 2.5.

Targets: the 8 attention linears per block (W4A4), cross-attention K/V included (unlike PixArt,
no paper default says otherwise; override with ``SanaAdapter({"attn2.to_k": None, ...})``). They
read the same caption tokens in every block: one model-wide shared-input group.
Kept 16-bit: time_embed, caption_projection, patch_embed (conv), proj_out.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter


class SanaAdapter(ModelAdapter):
    family = "sana"
    model_classes = ("SanaTransformer2DModel",)
    # conditioning linears outside the blocks (timestep embedder, the shared adaLN linear, the caption
    # projection): 16-bit unless ``--layer-kind conditioning=…``
    weight_only_outside = ("time_embed.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_2",
                           "time_embed.linear", "caption_projection.linear_1", "caption_projection.linear_2")
    block_containers = (("transformer_blocks", ""),)
    # every block's cross-attention K/V read the same projected caption tokens: one group
    model_wide_groups = (("attn2.to_k", "attn2.to_v"),)

    def tiny_config(self) -> dict:
        return dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
            caption_channels=32, sample_size=8, patch_size=1,
        )

    def example_inputs(self, model, batch: int, generator: torch.Generator) -> dict:
        """hidden_states (B, C, S, S), encoder_hidden_states (B, 8, caption_channels),
        timestep (B,) int64, encoder_attention_mask (B, 8) with 2 padded tokens."""
        cfg = model.config
        s, L = cfg.sample_size, 8
        mask = torch.ones(batch, L)
        mask[:, -2:] = 0
        kw = dict(
            hidden_states=torch.randn(batch, cfg.in_channels, s, s, generator=generator),
            encoder_hidden_states=torch.randn(batch, L, cfg.caption_channels, generator=generator),
            timestep=torch.randint(0, 1000, (batch,), generator=generator),
            encoder_attention_mask=mask,
        )
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((batch,), 4.5)
        return kw
