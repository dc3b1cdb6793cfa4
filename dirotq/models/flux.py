"""FLUX.1 adapter (diffusers ``FluxTransformer2DModel``), docs/DESIGN.md §5 and docs/KERNELS.md
(memory budget: the adaLN modulation runs W4A16).

Double-stream block ``transformer_blocks.i`` (FluxTransformerBlock): norm1.linear /
norm1_context.linear (adaLN-Zero modulation), attn
(to_q/k/v image, add_q/k/v_proj context, to_out.0, to_add_out), ff, ff_context.
Single-stream block ``single_transformer_blocks.j`` (FluxSingleTransformerBlock, layer types
prefixed ``single:``): norm.linear (modulation), proj_mlp and attn.to_q/k/v (all four read the
same normed tokens: one group), proj_out (reads concat(attention output, GELU(mlp)), width
d + 4d, so no per-head structure). Blocks run double first, then single (block index order).
All modulation linears of all blocks read the same silu(temb): one model-wide shared-input group
(one 3072² statistic instead of 57 pairs). Full-size FLUX.1-dev: 19 double + 38 single blocks, width 3072 (24 heads × 128), mlp 12288.

Targets: all block linears; the modulation linears are W4A16 (they are 6·d×d / 3·d×d each, a large
share of the weights, but act on one token per sample). Kept 16-bit: x_embedder, context_embedder,
time_text_embed, norm_out.linear, proj_out; all but x_embedder and proj_out can run W4A16
(``conditioning_layers``).
"""

from __future__ import annotations

import torch

from .base import ModelAdapter


class FluxAdapter(ModelAdapter):
    family = "flux"
    model_classes = ("FluxTransformer2DModel",)
    block_containers = (("transformer_blocks", ""), ("single_transformer_blocks", "single:"))
    extra_groups = (("single:proj_mlp", "single:attn.to_q", "single:attn.to_k", "single:attn.to_v"),)
    model_wide_groups = (("norm1.linear", "norm1_context.linear", "single:norm.linear"),)
    # the conditioning linears (timestep / guidance / pooled-text embedders and the final adaLN on one
    # token per image, the context embedder on the 512 text tokens): 63.7 M parameters at FLUX.1-dev
    # size; x_embedder and proj_out (image tokens, 0.4 M) stay 16-bit
    weight_only_outside = tuple(f"time_text_embed.{e}_embedder.linear_{i}" for e in ("timestep", "guidance", "text")
                                for i in (1, 2)) + ("context_embedder", "norm_out.linear")
    # single blocks: act_mlp(proj_mlp(x)) is only concatenated with the attention output afterwards
    epilogue_activations = (("single:proj_mlp", "single:act_mlp"),)

    def _kind_of(self, layer_type: str) -> tuple[str | None, str]:
        if layer_type in ("norm1.linear", "norm1_context.linear", "single:norm.linear"):
            return "w4a16", ""
        return "w4a4", ""

    def tiny_config(self) -> dict:
        return dict(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(8, 12, 12),
        )

    def example_inputs(self, model, batch: int, generator: torch.Generator) -> dict:
        """Packed latents hidden_states (B, 16, in_channels) for a 4×4 token grid, text
        encoder_hidden_states (B, 8, joint_attention_dim), pooled_projections (B, pooled),
        timestep (B,) in [0, 1], img_ids (16, 3), txt_ids (8, 3), guidance (B,) when embedded."""
        cfg = model.config
        h = w = 4
        L = 8
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        kw = dict(
            hidden_states=torch.randn(batch, h * w, cfg.in_channels, generator=generator),
            encoder_hidden_states=torch.randn(batch, L, cfg.joint_attention_dim, generator=generator),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=generator),
            timestep=torch.rand(batch, generator=generator),
            img_ids=ids.reshape(h * w, 3),
            txt_ids=torch.zeros(L, 3),
        )
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((batch,), 3.5)
        return kw
