"""Tiny diffusers pipelines built from configs, no downloads (docs/DESIGN.md §10: tiny random-init models).

``build_tiny_pixart_pipeline``: a PixArtSigmaPipeline from a tiny PixArtTransformer2DModel, a
tiny AutoencoderKL, a 1-layer T5EncoderModel and an in-memory WordLevel tokenizer. Call it with
``max_sequence_length`` ≤ 16 and ``use_resolution_binning=False`` (``calibrate`` sets the latter).
"""

from __future__ import annotations

import torch

WORDS = (
    "a red blue green yellow black white circle square triangle star on of the in with and big small "
    "background left right top bottom photo drawing two three many"
).split()


def build_tiny_tokenizer():
    """A T5-like fast tokenizer (whitespace WordLevel, ``</s>`` appended, ``<pad>`` id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=16)


def build_tiny_pixart_pipeline(seed: int = 0):
    """PixArtSigmaPipeline with a 2-block, width-64 transformer on an 8×8 latent (16 tokens)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    from dirotq.models import ADAPTERS

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    transformer = ADAPTERS["pixart"].build_tiny(seed)  # caption_channels 32 = d_model above
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=8,
    ).eval()
    scheduler = DPMSolverMultistepScheduler()
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
