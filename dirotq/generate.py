"""Image generation with a 16-bit and a quantized transformer at the same seeds (the evaluation
protocol's sampling step, docs/EVALUATION.md; the app reuses these functions).

- :func:`generate`: a pipeline run over (prompt, seed) pairs, deterministic per seed (one CPU
  ``torch.Generator`` per image, so an image never depends on the batch it was drawn in), with an
  optional transformer swapped in for the call.
- :func:`quantized_copy`: a deep copy of a transformer, quantized in place with ``quantize_``.
- :func:`generate_pair`: the reference image and the quantized image of one prompt and seed, with
  timings and the backend that ran the quantized layers.
- :func:`compile_pair`: both transformers compiled in place (``dirotq/compiling.py``) and run once,
  so that a timed :func:`generate_pair` after it times compiled code.
- :func:`check_sampling`, :func:`unknown_words`, :func:`truncation_warning`: the checks the app and
  the CLI run on their inputs before any model runs (one rule for both).

Pipelines are diffusers text-to-image pipelines (PixArt-α/Σ, SD3, FLUX, SANA, …); ``**kw`` go to
``pipe(...)`` (``height``, ``width``, ``max_sequence_length``, ``negative_prompt``, …).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .modules import backend_description
from .pipelines import call_kwargs

Progress = Callable[[float, str], object]
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5  # PixArt-Σ's default
MAX_GUIDANCE = 30.0  # far past any useful CFG scale: larger values only saturate the image
MAX_SEED = 2**63 - 1  # int64-safe (JSON, numpy); torch maps a negative seed onto a large one: no aliases


# ------------------------------------------------------------------------------ input checks
def _whole(value: Any, what: str) -> int:
    if value is None:  # an emptied number box
        raise ValueError(f"{what} is empty: enter a whole number")
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(f)


def check_sampling(steps: Any, seed: Any, guidance: Any, *, max_steps: int | None = None) -> tuple[int, int, float]:
    """``(steps, seed, guidance)`` as ``(int, int, float)``, or ``ValueError`` naming the bad value.

    steps: 1 … ``max_steps`` (no upper bound when None); seed: 0 … 2⁶³ − 1; guidance: a finite
    number in [0, 30]. Whole-valued floats (a UI's number box) are accepted for steps and seed.
    """
    steps, seed = _whole(steps, "steps"), _whole(seed, "seed")
    if steps < 1 or (max_steps is not None and steps > max_steps):
        raise ValueError(f"steps must be in [1, {max_steps}], got {steps}" if max_steps is not None
                         else f"steps must be ≥ 1, got {steps}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63 − 1], got {seed}")
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be a number, got {guidance!r}") from None
    if not (math.isfinite(g) and 0 <= g <= MAX_GUIDANCE):
        raise ValueError(f"guidance must be in [0, {MAX_GUIDANCE:g}], got {guidance}")
    return steps, seed, g


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of ``prompt`` that ``tokenizer`` maps to its unknown token, each once, in order ([]
    for a tokenizer without one: byte-level tokenizers know every string)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if tokenizer is None or unk is None:
        return []
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        pieces = [prompt[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers: word by word
        pieces = [w for w in prompt.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
    return list(dict.fromkeys(w for w in pieces if w))


def text_length(pipe, pipe_kwargs: Mapping[str, Any] | None = None) -> int | None:
    """Text tokens per prompt that ``pipe`` reads with ``pipe_kwargs`` (``max_sequence_length``:
    48 on the embedded model), or None for a pipeline without that argument."""
    kw = call_kwargs(pipe, pipe_kwargs)
    if isinstance(kw.get("max_sequence_length"), int):
        return kw["max_sequence_length"]
    try:
        p = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    except (TypeError, ValueError):  # pragma: no cover - exotic callables
        return None
    return p.default if p is not None and isinstance(p.default, int) else None


def truncation_warning(pipe, prompt: str, pipe_kwargs: Mapping[str, Any] | None = None) -> str | None:
    """One line saying where ``prompt`` is cut when it has more text tokens (end token included)
    than ``pipe`` reads, else None. The pipeline truncates silently: the words past the cut never
    reach the model."""
    tok, limit = getattr(pipe, "tokenizer", None), text_length(pipe, pipe_kwargs)
    if tok is None or limit is None:
        return None
    n = len(tok(prompt)["input_ids"])
    if n <= limit:
        return None
    kept = ""
    try:
        spans = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        special = n - len(spans)  # the end token the pipeline appends inside the limit
        kept = prompt[: spans[max(limit - special, 1) - 1][1]]
    except (NotImplementedError, TypeError, ValueError, KeyError, IndexError):
        pass
    upto = f", up to “…{kept[-40:].lstrip()}”" if kept else ""
    return (f"prompt truncated: {len(prompt.split())} words are {n} text tokens and the model reads only the "
            f"first {limit}{upto}; the rest is ignored")


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


def compile_pair(pipe, qtransformer, prompt: str, seed: int, *, scope: str = "blocks", mode: str = "default",
                 warm_steps: int = 2, guidance_scale: float = DEFAULT_GUIDANCE, reference_transformer=None,
                 backend: str = "inductor", **kw) -> dict:
    """Compile the reference transformer (``pipe.transformer`` or ``reference_transformer``) and
    ``qtransformer`` in place and generate ``prompt`` once with each (``warm_steps`` steps: the
    compilation happens there, and a second step catches a recompilation), so that the images drawn
    after it run compiled code at their steady speed. ``backend``: torch.compile's (tests use
    ``"eager"``, which checks the tracing without inductor's code generation).

    Returns ``{"scope", "mode", "reference": …, "quantized": …}``, each side's warm-up seconds,
    graphs compiled and graph breaks (``compiling.CompileCounter``). Raises ``RuntimeError`` when
    dynamo hits its recompilation limit (it would otherwise run those blocks eagerly, silently).
    """
    import torch._dynamo

    from .compiling import CompileCounter, compile_transformer

    if warm_steps < 1:
        raise ValueError(f"warm_steps must be ≥ 1, got {warm_steps}")
    report: dict[str, Any] = {"scope": scope, "mode": mode}
    for side, transformer in (("reference", reference_transformer or pipe.transformer),
                              ("quantized", qtransformer)):
        compile_transformer(transformer, scope, mode, backend=backend)
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), CompileCounter() as counter:
                generate(pipe, [prompt], [seed], num_inference_steps=warm_steps, guidance_scale=guidance_scale,
                         transformer=transformer, **kw)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise RuntimeError(f"torch.compile ({scope}) recompiled the {side} transformer more often than "
                               f"torch._dynamo.config.recompile_limit allows: its blocks differ too much (a rank "
                               f"plan with many shapes); raise that limit or compile scope 'model'") from e
        report[side] = counter.report()
    return report


def graph_pair(pipe, qtransformer, prompt: str, seed: int, *, warm_steps: int = 2,
               guidance_scale: float = DEFAULT_GUIDANCE, reference_transformer=None, **kw) -> dict:
    """Wrap the reference transformer (``pipe.transformer`` or ``reference_transformer``) and
    ``qtransformer`` in place so that their calls replay CUDA graphs (``dirotq.cuda_graphs``), and
    generate ``prompt`` once with each (``warm_steps`` steps: the kernels compile and the graphs are
    captured there), so that the images drawn after it run at replay speed.

    Returns ``{"reference": …, "quantized": …}``: each side's warm-up seconds and its graph counts
    (``cuda_graphs.graph_stats``). ``ValueError`` when a transformer is not on a CUDA device."""
    from .cuda_graphs import graph_stats, graph_transformer

    if warm_steps < 1:
        raise ValueError(f"warm_steps must be ≥ 1, got {warm_steps}")
    report: dict[str, Any] = {}
    for side, transformer in (("reference", reference_transformer or pipe.transformer),
                              ("quantized", qtransformer)):
        first = next(itertools.chain(transformer.parameters(), transformer.buffers()), None)
        if first is None or not first.is_cuda:
            raise ValueError(f"CUDA graphs need the {side} transformer on a CUDA device")
        graph_transformer(transformer)
        t0 = time.perf_counter()
        generate(pipe, [prompt], [seed], num_inference_steps=warm_steps, guidance_scale=guidance_scale,
                 transformer=transformer, **kw)
        report[side] = {"seconds": time.perf_counter() - t0, **graph_stats(transformer)}
    return report


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


__all__ = ["generate", "quantized_copy", "generate_pair", "compile_pair", "graph_pair", "side_by_side", "swapped_transformer",
           "check_sampling", "unknown_words", "text_length", "truncation_warning",
           "DEFAULT_STEPS", "DEFAULT_GUIDANCE"]
