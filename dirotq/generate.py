"""Image generation with a 16-bit and a quantized transformer at the same seeds (the evaluation
protocol's sampling step, docs/EVALUATION.md; the app reuses these functions).

- :func:`generate`: a pipeline run over (prompt, seed) pairs, deterministic per seed (one CPU
  ``torch.Generator`` per image, so an image never depends on the batch it was drawn in), with an
  optional transformer swapped in for the call.
- :func:`quantized_copy`: a deep copy of a transformer, quantized in place with ``quantize_``.
- :func:`generate_pair`: the reference image and the quantized image of one prompt and seed, with
  timings and the backend that ran the quantized layers.

Pipelines are diffusers text-to-image pipelines (PixArt-α/Σ, SD3, FLUX, SANA, …); ``**kw`` go to
``pipe(...)`` (``height``, ``width``, ``max_sequence_length``, ``negative_prompt``, …).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable, Iterator, Sequence

import torch

from .modules import backend_description
from .pipelines import call_kwargs

Progress = Callable[[float, str], object]
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5  # PixArt-Σ's default


@contextlib.contextmanager
def swapped_transformer(pipe, transformer=None) -> Iterator[None]:
    """Temporarily replace ``pipe.transformer`` (nothing happens for ``None``)."""
    if transformer is None:
        yield
        return
    old = pipe.transformer
    pipe.transformer = transformer
    try:
        yield
    finally:
        pipe.transformer = old


@torch.no_grad()
def generate(pipe, prompts: Sequence[str] | str, seeds: Sequence[int] | int, *,
             num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
             transformer=None, batch_size: int = 8, progress: Progress | None = None, **kw) -> list:
    """Images (PIL, RGB) of ``prompts[i]`` drawn with seed ``seeds[i]``.

    ``prompts`` / ``seeds``: equal-length sequences, or a single prompt / seed broadcast to the other's
    length. ``transformer``: denoiser used for this call instead of ``pipe.transformer`` (restored
    afterwards). Each image has its own ``torch.Generator("cpu").manual_seed(seed)``: the same
    (prompt, seed) gives the same image whatever the batch size. ``progress(fraction, message)`` is
    called after every batch.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(seeds, int):
        seeds = [seeds] * len(prompts)
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) == 1 and len(seeds) > 1:
        prompts = prompts * len(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    kw = call_kwargs(pipe, kw)
    images: list = []
    n_batches = math.ceil(len(prompts) / batch_size) if prompts else 0
    with swapped_transformer(pipe, transformer):
        for b in range(n_batches):
            ps = prompts[b * batch_size:(b + 1) * batch_size]
            ss = seeds[b * batch_size:(b + 1) * batch_size]
            gens = [torch.Generator(device="cpu").manual_seed(s) for s in ss]
            out = pipe(prompt=ps, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       generator=gens, output_type="pil", **kw)
            images.extend(im.convert("RGB") for im in out.images)
            if progress is not None:
                progress((b + 1) / n_batches, f"generating: batch {b + 1}/{n_batches}")
    return images


def quantized_copy(transformer, config, stats=None, *, adapter=None, targets=None, progress: Progress | None = None,
                   return_report: bool = False):
    """A deep copy of ``transformer`` quantized with ``config`` (the original is untouched).

    ``stats``: ``CalibrationStats`` (needed by every method but RTN / W4A16 with RTN weights).
    Returns the quantized copy, or ``(copy, report)`` with ``return_report=True`` (``quantize_``'s
    report: per-layer errors, counts).
    """
    from .quantize import quantize_

    model = copy.deepcopy(transformer)
    report = quantize_(model, config, stats, adapter=adapter, targets=targets, progress=progress)
    model.eval()
    return (model, report) if return_report else model


def generate_pair(pipe, qtransformer, prompt: str, seed: int, *, num_inference_steps: int = DEFAULT_STEPS,
                  guidance_scale: float = DEFAULT_GUIDANCE, reference_transformer=None, **kw):
    """``(reference_image, quantized_image, timings)`` of one prompt and seed.

    The reference is ``pipe.transformer`` (or ``reference_transformer``) in its own dtype — "BF16" in
    the paper's wording; on CPU we run float32. ``timings``: seconds for each image (whole pipeline,
    text encoder and VAE included), and the backend that ran the quantized layers.
    """
    t0 = time.perf_counter()
    (ref,) = generate(pipe, [prompt], [seed], num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, transformer=reference_transformer, **kw)
    t1 = time.perf_counter()
    (quant,) = generate(pipe, [prompt], [seed], num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, transformer=qtransformer, **kw)
    t2 = time.perf_counter()
    timings = {"reference_s": t1 - t0, "quantized_s": t2 - t1, "backend": backend_description(qtransformer),
               "reference_dtype": str(next((reference_transformer or pipe.transformer).parameters()).dtype)}
    return ref, quant, timings


def side_by_side(images: Sequence, labels: Sequence[str] | None = None, pad: int = 4):
    """One PIL image: ``images`` left to right (same height), with optional captions underneath."""
    from PIL import Image, ImageDraw

    ims = [im.convert("RGB") for im in images]
    h = max(im.height for im in ims)
    text_h = 14 if labels else 0
    w = sum(im.width for im in ims) + pad * (len(ims) + 1)
    canvas = Image.new("RGB", (w, h + 2 * pad + text_h), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for i, im in enumerate(ims):
        canvas.paste(im, (x, pad))
        if labels:
            draw.text((x, h + pad + 1), str(labels[i])[: max(4, im.width // 6)], fill="black")
        x += im.width + pad
    return canvas


__all__ = ["generate", "quantized_copy", "generate_pair", "side_by_side",
           "swapped_transformer", "DEFAULT_STEPS", "DEFAULT_GUIDANCE"]
