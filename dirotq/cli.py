"""Command line: ``python -m dirotq calibrate|quantize|generate|evaluate|report`` (docs/DESIGN.md §8).

Each verb parses its flags and calls one library function:

    calibrate  -> dirotq.calibration.calibrate     (statistics cached under --out)
    quantize   -> dirotq.quantize.quantize_ + dirotq.checkpoint.save_quantized (--dry-run: target report)
    generate   -> dirotq.generate.generate_pair    (reference and W4A4 PNGs side by side + backend)
    evaluate   -> dirotq.eval.evaluate             (--sweep-ranks: dirotq.eval.rank_sweep)
    report     -> dirotq.eval.layer_error_table    (per-layer error, Markdown or CSV)

Method choices come from the registry (``dirotq.registry``), so a newly registered method is a
choice here with no edit to this file.

``--model`` is a local diffusers folder or a hub id already in the local Hugging Face cache
(nothing is downloaded); the default is the embedded tiny PixArt-Σ in assets/tiny-pixart.
Bad input (missing model or file, a truncated or corrupt weight file, rank larger than a layer,
malformed rank plan) prints one line ``dirotq <verb>: error: …`` and exits with status 2; Ctrl-C
prints one line and exits with status 130. Long verbs show tqdm bars with a total, so an ETA;
``--quick`` calibrates on 8 prompts × a 4-step schedule for a first try.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from .compiling import MODES as COMPILE_MODES
from .compiling import SCOPES as COMPILE_SCOPES
from .config import KINDS
from .registry import DEFAULT_METHOD

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command
# --quick: 8 prompts × a 4-step schedule instead of 96 × 20, for a first try (measured times: README, CLI)
QUICK = {"calib_limit": 8, "calib_steps": 4}


class BadInput(Exception):
    """User error detected by the CLI itself (printed as one line, exit 2)."""


# ------------------------------------------------------------------------------------ parsing
def _rank(text: str):
    if text == "paper":
        return "paper"
    try:
        r = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an integer ≥ 0 or 'paper', got {text!r}") from None
    if r < 0:
        raise argparse.ArgumentTypeError(f"rank must be ≥ 0, got {r}")
    return r


def _size(text: str) -> int:
    from .checkpoint import parse_size

    try:
        n = parse_size(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return n


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {v}")
    return v


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers ≥ 0, got {text!r}")
    return vals


def _rank_list(text: str) -> list:
    return [_rank(t) for t in text.replace(" ", "").split(",") if t]


def _methods(text: str) -> list[str]:
    from .eval.protocol import method_choices

    ms = [t for t in text.replace(" ", "").split(",") if t]
    bad = [m for m in ms if m not in method_choices()]
    if bad or not ms:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; choose from {', '.join(method_choices())}")
    return ms


def _method(text: str) -> str:
    ms = _methods(text)
    if len(ms) != 1:
        raise argparse.ArgumentTypeError(f"give one method, got {text!r}")
    return ms[0]


def _rank_arg(args):
    """The rank plan file (if given) wins over --rank."""
    from .config import RankPlan

    plan = getattr(args, "rank_plan", None)
    if plan:
        return RankPlan.load(plan)
    return args.rank


LAYER_KINDS = {"w4a4": "w4a4", "w4a16": "w4a16", "w8a16": "w8a16", "16bit": None}


def _layer_kind(text: str) -> tuple[str, str | None]:
    """``--layer-kind TYPE=KIND`` -> (layer type, adapter kind or None for 16-bit)."""
    layer_type, sep, kind = text.partition("=")
    if not sep or not layer_type or kind not in LAYER_KINDS:
        raise argparse.ArgumentTypeError(f"expected LAYER_TYPE=KIND with KIND one of {', '.join(LAYER_KINDS)} "
                                         f"(e.g. attn2.to_k=w4a4), got {text!r}")
    return layer_type, LAYER_KINDS[kind]


def _add_model(p: argparse.ArgumentParser) -> None:
    from .pipelines import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local diffusers folder or a hub id already in the local HF cache (offline only); "
                        "default: the embedded tiny PixArt-Σ (assets/tiny-pixart)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                   help="dtype of the 16-bit model (default auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text tokens per prompt (default: the pipeline's, capped at the tokenizer's maximum)")
    p.add_argument("--layer-kind", type=_layer_kind, action="append", default=None, metavar="TYPE=KIND",
                   help="quantize a layer type otherwise than the model family's default: KIND is w4a4, w4a16, "
                        "w8a16 (8-bit weights) or 16bit (repeatable; e.g. PixArt's cross-attention K/V, 16-bit by default: "
                        "--layer-kind attn2.to_k=w4a4 --layer-kind attn2.to_v=w4a4); a linear outside the blocks by "
                        "its full name (adaln_single.linear=w8a16), or all the family's conditioning linears as "
                        "conditioning=w8a16. Give the same to calibrate, quantize, generate and evaluate")


def _add_sampling(p: argparse.ArgumentParser, steps_help: str = "denoising steps (default 20)") -> None:
    p.add_argument("--steps", type=_positive, default=20, help=steps_help)
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")


def _add_quant(p: argparse.ArgumentParser, *, method_default: str | None = DEFAULT_METHOD) -> None:
    from .eval.protocol import method_choices
    from .registry import method_names

    if method_default is not None:
        p.add_argument("--method", type=_method, default=method_default,
                       help=f"{' | '.join(method_choices())} (default {method_default})")
    p.add_argument("--rank", type=_rank, default=32,
                   help=f"shared 16-bit rank of {'/'.join(method_names(ranked=True))}: an integer or 'paper' "
                        "(d/8) (default 32)")
    p.add_argument("--rank-plan", metavar="PLAN.json", default=None,
                   help='per-layer ranks as JSON {"layer name": rank, "_default": r} (the app exports it); '
                        "overrides --rank")
    p.add_argument("--weights", choices=("rtn", "gptq"), default="rtn", help="weight quantizer (default rtn)")
    p.add_argument("--scale-format", choices=("exact", "int_ratio"), default="exact",
                   help="INT4 scale format: exact (format A, one 16-bit scale per group: the reference) or "
                        "int_ratio (format C, a row scale × a 4-bit multiplier per group: what the fast GPU "
                        "kernel runs at full speed) (default exact)")


def _scale_overrides(args, methods) -> dict | None:
    """evaluate()'s config_overrides for a non-default --scale-format (None: the default)."""
    fmt = getattr(args, "scale_format", "exact")
    return None if fmt == "exact" else {m: {"scale_format": fmt} for m in methods}


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-prompts", default=None,
                   help="calibration prompt file (default assets/prompts/calibration.txt)")
    p.add_argument("--calib-limit", type=_positive, default=None, help="use only the first N calibration prompts")
    p.add_argument("--calib-steps", type=_positive, default=None,
                   help="denoising steps while calibrating (default --steps)")
    p.add_argument("--quick", action="store_true",
                   help=f"a first try: calibrate on {QUICK['calib_limit']} prompts × a {QUICK['calib_steps']}-step "
                        f"schedule (--calib-limit {QUICK['calib_limit']} --calib-steps {QUICK['calib_steps']}; flags "
                        "given explicitly win); the default calibration is 96 prompts × 20 steps")


def _add_scale(p: argparse.ArgumentParser) -> None:
    """Flags for models too large for one pass or one process (docs/REAL_MODELS.md)."""
    p.add_argument("--layers", default=None,
                   help="only these targets (and their input groups): comma-separated names, layer types "
                        "(attn1.to_q) or globs (transformer_blocks.1*.ff.*); default all")
    p.add_argument("--max-stats-memory", type=_size, default=None, metavar="SIZE",
                   help="calibrate in passes whose float64 statistics fit SIZE (e.g. 40GiB) each, one pipeline run "
                        "per pass; needed when the statistics of every group exceed the device's memory "
                        "(FLUX.1: 120 GiB). Default: one pass")


def build_parser() -> argparse.ArgumentParser:
    from .eval.protocol import default_methods, sweep_methods
    from .registry import method_names, preset_names

    ap = argparse.ArgumentParser(
        prog="python -m dirotq",
        description="DiRotQ: W4A4 post-training quantization of diffusion transformers (PCA rotation, top-r "
                    "coefficients in 16-bit). Offline; the default model is the embedded tiny PixArt-Σ.",
        epilog="examples:\n"
               "  python -m dirotq quantize --dry-run\n"
               "  python -m dirotq quantize --rank 64 --quick   # a first try: 8 prompts × 4 steps\n"
               "  python -m dirotq quantize --rank 64             # dirotq-lr, the deployable form (default)\n"
               "  python -m dirotq quantize --method dirotq --rank 64   # the paper's full rotation\n"
               "  python -m dirotq generate --prompt 'a large red circle in the center, on a white background'\n"
               "  python -m dirotq evaluate --methods svdquant,dirotq --limit 4\n"
               "  python -m dirotq evaluate --sweep-ranks 0,16,32,64\n"
               "  python -m dirotq report --methods quarot,svdquant,dirotq --ranks 16,64",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="library log messages: -v info (passes, ranks, cache hits, timings), -vv debug")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("calibrate", help="collect activation statistics (cached on disk)",
                       description="Run the 16-bit pipeline on calibration prompts and store the per-layer "
                                   "input statistics (second moment, abs-max, token sample) under --out.")
    _add_model(p)
    p.add_argument("--prompts", default=None, help="prompt file (default assets/prompts/calibration.txt)")
    p.add_argument("--limit", type=_positive, default=None, help="use only the first N prompts")
    _add_sampling(p, "denoising steps recorded (default 20: every step of a 20-step schedule)")
    p.add_argument("--quick", action="store_true",
                   help=f"a first try: --limit {QUICK['calib_limit']} --steps {QUICK['calib_steps']} "
                        "(flags given explicitly win)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample-tokens", type=int, default=512, help="calibration tokens kept per layer for error measurements (default 512)")
    _add_scale(p)
    p.add_argument("--data-parallel", action="store_true",
                   help="under torchrun: split the prompts over the processes and all-reduce the moments (every "
                        "process records every group; equal to one process up to float64 summation order) instead "
                        "of splitting the groups")
    p.add_argument("--out", default="out/eval/calibration",
                   help="cache folder (default out/eval/calibration: where quantize, generate, evaluate and report "
                        "look, so they reuse these statistics when prompts and steps match)")

    p = sub.add_parser("quantize", help="quantize the transformer and save a checkpoint",
                       description="Quantize the transformer's targets with one method and save a checkpoint "
                                   "named by the recipe (e.g. out/dirotq-w4a4-g64-r32-tiny-pixart).")
    _add_model(p)
    _add_quant(p)
    _add_calib(p)
    _add_sampling(p)
    p.add_argument("--stats", default=None, help="calibration statistics folder (default: calibrate, cached)")
    p.add_argument("--out", default="out", help="parent folder of the checkpoint (default out)")
    p.add_argument("--name", default=None, help="checkpoint folder name (default: the recipe name)")
    p.add_argument("--dry-run", action="store_true", help="print the target report and the ranks, then stop")
    _add_scale(p)
    p.add_argument("--max-shard-size", default="10GB",
                   help="largest checkpoint file, bytes or e.g. 5GB (default 10GB); bigger checkpoints are sharded "
                        "with an index, as diffusers writes them")
    p.add_argument("--allocate", choices=("output-tied", "output", "fixed"), default="output-tied",
                   help="ranked methods: 'output-tied' (default) spends the 16-bit budget of --rank where the model "
                        "output gains most (each layer's measured sensitivity, on 4 calibration prompts the "
                        "statistics do not use), one rank per shared-input group (q/k/v …), so every group can "
                        "run fused (one quantized input, one GEMM); 'output' the same per layer; 'fixed' gives "
                        "every layer --rank. A --rank-plan is used as is")
    p.add_argument("--weight-only-ranks", action=argparse.BooleanOptionalAction, default=None,
                   help="with --allocate output / output-tied and a PCA method (dirotq, dirotq-lr; on by default "
                        "there): the weight-only layers (PixArt's ff.net.2, FLUX's modulation …) compete for the "
                        "same 16-bit budget with a low-rank 16-bit branch each (their activations stay 16-bit; "
                        "(d + o) parameters per rank); the fixed plan gives them none. --no-weight-only-ranks "
                        "plans the W4A4 layers only")
    p.add_argument("--eigensolver", choices=("eigh", "top"), default="eigh",
                   help="PCA bases: 'eigh' (default) decomposes every second moment fully; 'top' finds only the "
                        "top-r directions by subspace iteration (what dirotq-lr's PCA basis needs: O(d²·r) instead "
                        "of O(d³), reading C from the statistics files a block of rows at a time), for FLUX-size "
                        "models; the basis agrees with eigh's to 1e-6")

    p = sub.add_parser("generate", help="reference and W4A4 images of one prompt, side by side",
                       description="Generate one prompt with the 16-bit transformer and with a quantized one "
                                   "(a --checkpoint, or --method/--rank quantized on the fly) at the same seed.")
    _add_model(p)
    p.add_argument("--prompt", default=None, help="prompt (default: the first evaluation prompt)")
    p.add_argument("--seed", type=int, default=0, help="seed of both images, 0 … 2^63 − 1 (default 0)")
    p.add_argument("--checkpoint", default=None, help="quantized checkpoint folder (from `quantize`)")
    _add_quant(p)
    _add_calib(p)
    _add_sampling(p)
    p.add_argument("--compile", choices=COMPILE_SCOPES, default=None, metavar="SCOPE",
                   help="torch.compile both transformers first: 'blocks' (each repeated block, compile time of one "
                        "block per type) or 'model' (the whole transformer); the images are then timed compiled "
                        "(default: eager)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile ('reduce-overhead' adds CUDA graphs on a GPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay both transformers' steps from CUDA graphs (GPU only; no compilation, the eager "
                        "kernels without their host time); the images are then timed replaying")
    p.add_argument("--out", default="out/generate",
                   help="output folder (default out/generate); a rerun writes new files (-2, -3, … suffix), "
                        "never over an earlier run's")

    p = sub.add_parser("evaluate", help="the paper's image-quality protocol over methods (or a rank sweep)",
                       description="Reference images once, then every method's W4A4 images at the same seeds; "
                                   "PSNR/SSIM (95%% bootstrap CI), judge accuracy and Fréchet distance, per-layer "
                                   "errors; Markdown + JSON + contact sheet. Resumable: images are cached under "
                                   "--out. With --sweep-ranks: quality vs rank of dirotq/dirotq-lr vs svdquant.")
    _add_model(p)
    p.add_argument("--prompts", default=None, help="evaluation prompt file (default assets/prompts/eval.txt)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N evaluation prompts")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    p.add_argument("--seed", type=int, default=0, help="base seed (prompt i, replicate j: seed + 1000 j + i)")
    p.add_argument("--methods", type=_methods, default=None,
                   help=f"comma-separated (default {','.join(default_methods())}; also {','.join(preset_names())})")
    _add_quant(p, method_default=None)
    _add_calib(p)
    _add_sampling(p)
    p.add_argument("--out", default="out/eval", help="working folder: images, calibration (default out/eval)")
    p.add_argument("--report", default=None, help="output prefix of .json/.md/_contact.png (default OUT/quality)")
    p.add_argument("--sweep-ranks", type=_int_list, default=None, metavar="R1,R2,…",
                   help="rank-sweep mode: these ranks for --sweep-methods, plus rank-free baselines")
    p.add_argument("--sweep-methods", type=_methods, default=None,
                   help=f"methods of the sweep (default {','.join(sweep_methods())})")
    p.add_argument("--sweep-report", default=None, help="output prefix of the sweep .json/.md (default OUT/rank_sweep;"
                                                        " `python -m analysis sweep-html PREFIX.json` plots it)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--judge", default="auto", metavar="PATH",
                   help="shapes judge weights folder (default assets/judge; embedded shapes model only)")
    p.add_argument("--no-judge", action="store_true", help="skip the shapes judge")
    p.add_argument("--contact-rows", type=int, default=16, help="prompts in the contact sheet (default 16)")
    p.add_argument("--fid-weights", default=None, help="local InceptionV3 weights for FID (torch-fidelity format)")
    p.add_argument("--lpips-weights", default=None, help="local AlexNet weights (torchvision) for LPIPS")
    p.add_argument("--clip-model", default=None, help="local CLIP model folder for CLIP score")

    p = sub.add_parser("report", help="per-layer error table of methods and ranks (Markdown or CSV)",
                       description="Quantize every target layer alone with each method and rank and measure its "
                                   "output error on the calibration token sample (no images).")
    _add_model(p)
    p.add_argument("--methods", type=_methods, default=list(method_names(activations=True)),
                   help=f"comma-separated (default {','.join(method_names(activations=True))})")
    p.add_argument("--ranks", type=_rank_list, default=[32], help="comma-separated ranks (default 32)")
    p.add_argument("--rank-plan", metavar="PLAN.json", default=None, help="per-layer ranks (JSON); replaces --ranks")
    p.add_argument("--weights", choices=("rtn", "gptq"), default="rtn")
    p.add_argument("--scale-format", choices=("exact", "int_ratio"), default="exact",
                   help="INT4 scale format: exact (format A) or int_ratio (format C) (default exact)")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default all targets)")
    p.add_argument("--format", choices=("md", "csv"), default="md")
    p.add_argument("--stats", default=None, help="calibration statistics folder (default: calibrate, cached)")
    _add_calib(p)
    _add_sampling(p)
    p.add_argument("--out", default=None, help="output file (default: print)")
    p.add_argument("--cache", default="out/eval", help="folder of the calibration cache (default out/eval)")
    return ap


# ------------------------------------------------------------------------------------ helpers
def _pipe_kwargs(args) -> dict:
    return {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}


DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _dtype(args):
    """The torch dtype of ``--dtype``: auto is bfloat16 on a CUDA device (what real models ship in,
    half the memory of float32), float32 on the CPU (bf16 matmuls are slow there)."""
    import torch

    name = DTYPES[getattr(args, "dtype", "auto")]
    if name is None:
        name = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    return getattr(torch, name)


def _load_pipe(args):
    from .pipelines import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=_dtype(args))


def _model_name(model: str) -> str:
    return Path(str(model).rstrip("/")).name or "model"


def _adapter(args, transformer):
    """The model family's adapter with the ``--layer-kind`` overrides (checked against the model's
    layer types)."""
    from torch import nn

    from .models import get_adapter
    from .models.base import CONDITIONING

    base = get_adapter(transformer)
    overrides = dict(getattr(args, "layer_kind", None) or [])
    if not overrides:
        return base
    outside = base.outside_layers(transformer)
    try:
        overrides = base.expand_conditioning(transformer, overrides)
    except ValueError as e:
        raise BadInput(f"--layer-kind {CONDITIONING}=…: {e}") from None
    known = {f"{b.type_prefix}{n}" for b in base.blocks(transformer) for n, m in b.module.named_modules()
             if isinstance(m, nn.Linear)}
    unknown = sorted(set(overrides) - known - set(outside))
    if unknown:
        raise BadInput(f"--layer-kind: {', '.join(unknown)} is not a layer type of this model; its layer types: "
                       f"{', '.join(sorted(known))}; outside the blocks: {', '.join(outside)} "
                       f"(or {CONDITIONING} for the conditioning ones)")
    return type(base)({**base.overrides, **overrides})


def _kinds_suffix(args) -> str:
    """Checkpoint-name suffix of the ``--layer-kind`` overrides ("" without any)."""
    pairs = getattr(args, "layer_kind", None) or []
    inverse = {v: k for k, v in LAYER_KINDS.items()}
    return "".join(f"-{lt}={inverse[kind]}" for lt, kind in sorted(dict(pairs).items()))


def _evaluator(args, pipe=None, out=None):
    from .eval.protocol import Evaluator

    pipe = pipe if pipe is not None else _load_pipe(args)
    return Evaluator(pipe, prompts=[],
                     num_inference_steps=args.steps, guidance_scale=args.guidance,
                     calib_prompts=args.calib_prompts, calib_limit=args.calib_limit, calib_steps=args.calib_steps,
                     out_dir=out or getattr(args, "out", None) or "out/eval", pipe_kwargs=_pipe_kwargs(args),
                     judge=False, adapter=_adapter(args, pipe.transformer))


def _stats(args, ev):
    from .calibration import CalibrationStats

    if getattr(args, "stats", None):
        return CalibrationStats.load(args.stats)
    return ev.stats


# ------------------------------------------------------------------------------------ verbs
def _dist(args):
    """This process's place under torchrun (``DistInfo()`` when run alone); ``--device cuda``
    becomes ``cuda:LOCAL_RANK`` so each process drives its own GPU."""
    from .distributed import DistInfo, init_distributed, launched_by_torchrun

    if not launched_by_torchrun():
        return DistInfo(device=str(args.device))
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if str(args.device).startswith("cuda") else str(args.device)
    info = init_distributed(device=device)
    args.device = info.device
    return info


def _selected_layers(args, transformer, adapter=None) -> list[str] | None:
    """The targets --layers names (None: all), resolved once per command."""
    from .distributed import select_layers

    adapter = adapter or _adapter(args, transformer)
    return select_layers(adapter.targets(transformer), getattr(args, "layers", None))


def _scale_kwargs(args, layers: list[str] | None, info) -> dict:
    """calibrate()'s keywords for --layers (resolved: ``_selected_layers``) / --max-stats-memory /
    --data-parallel / torchrun."""
    return {"layers": layers, "max_stats_bytes": getattr(args, "max_stats_memory", None), "dist": info,
            "data_parallel": bool(getattr(args, "data_parallel", False))}


def cmd_calibrate(args) -> int:
    from .calibration import calibrate
    from .eval.protocol import DEFAULT_CALIB_PROMPTS, read_prompts

    info = _dist(args)
    prompts = read_prompts(args.prompts or DEFAULT_CALIB_PROMPTS, args.limit)
    pipe = _load_pipe(args)
    adapter = _adapter(args, pipe.transformer)
    stats = calibrate(pipe, prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      batch_size=args.batch_size, sample_tokens=args.sample_tokens, cache_dir=args.out,
                      pipe_kwargs=_pipe_kwargs(args), adapter=adapter,
                      **_scale_kwargs(args, _selected_layers(args, pipe.transformer, adapter), info))
    if info.is_main:
        key = stats.meta.get("cache_key", "")
        layers = stats.layers  # loaded statistics read tensors lazily: count tokens from the metadata
        tokens = sum(layers.count(k) if hasattr(layers, "count") else layers[k].count for k in layers)
        print(f"calibrated {len(stats.groups)} layers ({len(stats.layers)} input groups) on {len(prompts)} prompts × "
              f"{args.steps} steps, {tokens:,} tokens in all"
              + (f", {info.world_size} processes" if info.distributed else ""))
        print(f"statistics: {Path(args.out) / key}")
    return 0


def cmd_quantize(args) -> int:
    import dataclasses

    from .checkpoint import recipe_name, save_quantized
    from .eval.protocol import DEFAULT_CALIB_PROMPTS, make_config, read_prompts
    from .models import target_report
    from .registry import get_method
    from .pipelines import load_transformer
    from .quantize import LinalgSettings, check_weight_only_ranks, quantize_

    rank = _rank_arg(args)
    config = make_config(args.method, rank=rank, weights=args.weights, scale_format=args.scale_format)
    name = args.name or recipe_name(config, _model_name(args.model)) + _kinds_suffix(args)
    if args.dry_run:
        transformer = load_transformer(args.model, device=args.device, dtype=_dtype(args))
        adapter = _adapter(args, transformer)
        targets = adapter.targets(transformer)
        resolved = config.rank_plan().resolve(targets)
        check_weight_only_ranks(config, targets, resolved)
        print(target_report(transformer, adapter))
        ranks = sorted({resolved[n] for n, s in targets.items() if s.kind == "w4a4"})
        print(f"recipe: {config.tag()} -> {Path(args.out) / name}")
        print(f"16-bit ranks of the W4A4 targets: {ranks}")
        branches = {n: resolved[n] for n, s in targets.items() if s.kind != "w4a4" and resolved[n]}
        if branches:
            print(f"16-bit branches of weight-only targets: {branches}")
        return 0
    info = _dist(args)
    output_allocation = (args.allocate in ("output", "output-tied") and get_method(config.method).ranked
                         and isinstance(rank, int) and rank > 0)
    from .methods import BRANCH_METHODS

    weight_only_ranks = args.weight_only_ranks
    if weight_only_ranks is None:  # the default: branches wherever the allocation can give them
        weight_only_ranks = output_allocation and config.method in BRANCH_METHODS
    elif weight_only_ranks:
        if not output_allocation:
            raise BadInput("--weight-only-ranks needs --allocate output or output-tied with a ranked method and "
                           "--rank > 0")
        if config.method not in BRANCH_METHODS:
            raise BadInput(f"--weight-only-ranks needs a PCA method ({', '.join(BRANCH_METHODS)}): {config.method} "
                           "gives weight-only layers no 16-bit branch")
    ev = None
    if args.stats:
        from .calibration import CalibrationStats

        stats = CalibrationStats.load(args.stats)
        transformer = load_transformer(args.model, device=args.device, dtype=_dtype(args))
        adapter = _adapter(args, transformer)
        layers = _selected_layers(args, transformer, adapter)
    else:
        ev = _evaluator(args, out="out/eval")
        ev.check_rank(rank)
        transformer, adapter = ev.pipe.transformer, ev.adapter
        layers = _selected_layers(args, transformer, adapter)
        ev.calibrate_kwargs.update(_scale_kwargs(args, layers, info))
        stats = ev.stats  # also for RTN: the report's per-layer errors use its held-out tokens
    allocation = None
    if output_allocation:
        if ev is None:
            raise BadInput(f"--allocate {args.allocate} needs the pipeline to measure sensitivities: drop --stats, "
                           "or pass --allocate fixed")
        from .allocate import output_error_plan

        sens_prompts = read_prompts(args.calib_prompts or DEFAULT_CALIB_PROMPTS)[len(ev.calib_prompts):][:4]
        if not sens_prompts:  # every calibration prompt feeds the statistics: reuse the last four
            sens_prompts = ev.calib_prompts[-4:]
        # under torchrun each process measures the layers it owns; the plan is the same on all of them
        plan, allocation = output_error_plan(ev.pipe, stats, config, rank, sens_prompts, seed=1,
                                             pipe_kwargs=ev.pipe_kwargs, layers=layers, dist=info, adapter=adapter,
                                             tie_shared_inputs=args.allocate == "output-tied",
                                             weight_only_ranks=weight_only_ranks,
                                             progress=_bar_progress("allocate ranks"))
        config = dataclasses.replace(config, rank=plan)
    path = Path(args.out) / name
    linalg = LinalgSettings(eigensolver=args.eigensolver)
    if info.distributed:
        from .distributed import quantize_sharded

        if adapter.overrides:  # the sharding assigns the family's default targets to the processes
            raise BadInput("--layer-kind is not supported under torchrun yet: quantize in one process")
        report = quantize_sharded(transformer, config, stats, path, info, layers=layers,
                                  max_shard_size=args.max_shard_size, linalg=linalg)
        reports = _gather_reports(report, info)
        if not info.is_main:
            return 0
        report = {"summary": {k: sum(r["summary"].get(k, 0) for r in reports) for k in ("layers", *KINDS)}}
    else:
        report = quantize_(transformer, config, stats, adapter=adapter, targets=layers, linalg=linalg)
        save_quantized(transformer, path, max_shard_size=args.max_shard_size)
    if allocation is not None:
        print(f"ranks by model-output sensitivity{' (one per shared-input group)' if args.allocate == 'output-tied' else ''}"
              f" at the 16-bit budget of rank {rank}: "
              f"{allocation['spent_params16'] / 1e3:,.1f} k of {allocation['budget_params16'] / 1e3:,.1f} k extra "
              f"16-bit parameters; ranks {min(allocation['ranks'].values())}–{max(allocation['ranks'].values())}"
              + (f"; sensitivities measured by {allocation['processes']} processes"
                 if allocation.get("processes", 1) > 1 else "")
              + (f"; {len(allocation['weight_only_branches'])} weight-only layers given a 16-bit branch"
                 if allocation.get("weight_only_ranks") else "")
              + f"; error measured on {allocation['sensitivity_on']}")
    s = report["summary"]
    err = f", mean layer rel. MSE {s['mean_rel_mse']:.4g}" if "mean_rel_mse" in s else ""
    kinds = ", ".join(f"{s.get(k, 0)} {k.upper()}" for k in KINDS if k != "w8a16" or s.get(k))
    print(f"quantized {s['layers']} layers ({kinds}) with {config.tag()}{err}")
    print(f"checkpoint: {path}")
    return 0


def _gather_reports(report: dict, info) -> list[dict]:
    from .distributed import gather_objects

    return gather_objects({"summary": report.get("summary", {})}, info)


def _bar_progress(desc: str):
    """A ``progress(fraction, message)`` callback drawing a tqdm bar (percent, so it has an ETA)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}] {postfix}")

    def progress(fraction: float, message: str) -> None:
        bar.n = min(100.0, 100.0 * fraction)
        bar.set_postfix_str(message[-60:], refresh=False)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    return progress


def _warn(verb: str, message: str) -> None:
    print(f"dirotq {verb}: warning: {message}", file=sys.stderr)


def _free_stem(folder: Path, stem: str, suffixes: Sequence[str]) -> str:
    """``stem``, else ``stem-2``, ``stem-3``, …: the first with none of its files in ``folder`` yet,
    so a rerun never overwrites an earlier run's images."""
    k, cand = 1, stem
    while any((folder / f"{cand}{suf}").exists() for suf in suffixes):
        k += 1
        cand = f"{stem}-{k}"
    return cand


def cmd_generate(args) -> int:
    from .eval.protocol import DEFAULT_EVAL_PROMPTS, make_config, read_prompts
    from .fusion import fuse_for_inference
    from .generate import (check_sampling, compile_pair, generate_pair, graph_pair, quantized_copy, side_by_side,
                           truncation_warning, unknown_words)

    check_sampling(args.steps, args.seed, args.guidance)  # before minutes of loading and calibrating
    if getattr(args, "cuda_graphs", False):
        import torch

        if args.compile:
            raise BadInput("--cuda-graphs and --compile: choose one (--compile-mode reduce-overhead captures CUDA "
                           "graphs of the compiled code)")
        if not str(args.device).startswith("cuda") or not torch.cuda.is_available():
            raise BadInput(f"--cuda-graphs needs a CUDA GPU (--device cuda); this run uses {args.device!r}"
                           + ("" if torch.cuda.is_available() else " and no CUDA device is available"))
    ev = _evaluator(args, out="out/eval")
    prompt = args.prompt or read_prompts(DEFAULT_EVAL_PROMPTS, 1)[0]
    bad = unknown_words(getattr(ev.pipe, "tokenizer", None), prompt)
    if bad:
        _warn("generate", f"the tokenizer does not know the words {bad}: they reach the model as its unknown "
                          "token, so the images cannot follow them")
    cut = truncation_warning(ev.pipe, prompt, ev.pipe_kwargs)
    if cut:
        _warn("generate", cut)
    if args.checkpoint:
        from .checkpoint import load_quantized

        qt = load_quantized(args.checkpoint, device=args.device, fuse_shared_inputs=True, fuse_activations=True)
        label = Path(args.checkpoint).name
    else:
        rank = _rank_arg(args)
        config = make_config(args.method, rank=rank, weights=args.weights, scale_format=args.scale_format)
        ev.check_rank(rank)
        qt = quantized_copy(ev.pipe.transformer, config, ev.stats, adapter=ev.adapter)
        fuse_for_inference(qt)  # one GEMM per shared input, GELU in the epilogue: the same image, fewer passes
        label = config.tag()
    compiled = None
    if args.compile:
        print(f"compiling both transformers ({args.compile}, mode {args.compile_mode}) …", flush=True)
        compiled = compile_pair(ev.pipe, qt, prompt, args.seed, scope=args.compile, mode=args.compile_mode,
                                guidance_scale=args.guidance, **ev.pipe_kwargs)
    graphed = None
    if getattr(args, "cuda_graphs", False):
        print("capturing both transformers' steps in CUDA graphs …", flush=True)
        graphed = graph_pair(ev.pipe, qt, prompt, args.seed, guidance_scale=args.guidance, **ev.pipe_kwargs)
    ref, quant, t = generate_pair(ev.pipe, qt, prompt, args.seed, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance, **ev.pipe_kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(out, f"{label}-s{args.seed}", ("_reference.png", "_w4a4.png", "_side_by_side.png", ".json"))
    ref.save(out / f"{stem}_reference.png")
    quant.save(out / f"{stem}_w4a4.png")
    side_by_side([ref, quant], ["reference", label]).save(out / f"{stem}_side_by_side.png")
    from .eval.metrics import psnr, ssim

    p_db, s_val = psnr(ref, quant), ssim(ref, quant)
    import json

    (out / f"{stem}.json").write_text(json.dumps({"prompt": prompt, "seed": args.seed, "quantized": label,
                                                  "psnr_db": p_db, "ssim": s_val, **t, "compile": compiled,
                                                  "cuda_graphs": graphed,
                                                  "warnings": [*([f"unknown words {bad}"] if bad else []),
                                                               *([cut] if cut else [])]}, indent=1))
    print(f"prompt: {prompt!r}, seed {args.seed}")
    print(f"reference ({t['reference_dtype']}): {t['reference_s']:.2f} s; W4A4 ({label}): {t['quantized_s']:.2f} s")
    print(f"backend: {t['backend']}")
    if compiled:
        for side in ("reference", "quantized"):
            c = compiled[side]
            print(f"compiled {side}: {c['graphs']} graphs, {c['graph_breaks']} graph breaks, warm-up {c['seconds']:.1f} s")
    if graphed:
        from .cuda_graphs import graph_stats

        for side, transformer in (("reference", ev.pipe.transformer), ("quantized", qt)):
            g = graph_stats(transformer)
            print(f"CUDA graphs {side}: {g['captures']} captured, {g['replays']} replays, warm-up "
                  f"{graphed[side]['seconds']:.1f} s" + (f", {len(g['failed'])} not capturable (eager)" if g["failed"] else ""))
    print(f"PSNR {p_db:.2f} dB, SSIM {s_val:.3f} vs the reference")
    print(f"images: {out / (stem + '_side_by_side.png')}")
    return 0


def cmd_evaluate(args) -> int:
    from .eval.protocol import Evaluator, evaluate, rank_sweep

    pipe = _load_pipe(args)
    ev = Evaluator(pipe, prompts=args.prompts, limit=args.limit, seeds_per_prompt=args.seeds,
                   seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   calib_prompts=args.calib_prompts, calib_limit=args.calib_limit, calib_steps=args.calib_steps,
                   out_dir=args.out, batch_size=args.batch_size, pipe_kwargs=_pipe_kwargs(args),
                   judge=False if args.no_judge else args.judge, n_boot=args.n_boot,
                   adapter=_adapter(args, pipe.transformer))
    command = "python -m dirotq " + " ".join(shlex.quote(a) for a in (args._argv or []))
    if args.sweep_ranks:
        from .eval.protocol import sweep_methods
        from .registry import method_names

        res = rank_sweep(evaluator=ev, ranks=args.sweep_ranks, methods=args.sweep_methods,
                         weights=args.weights, report=args.sweep_report, command=command,
                         config_overrides=_scale_overrides(args, [*(args.sweep_methods or sweep_methods()),
                                                                  *method_names(activations=True)]))
        print(_sweep_summary(res))
    else:
        from .eval.protocol import default_methods

        res = evaluate(evaluator=ev, methods=args.methods, rank=_rank_arg(args), weights=args.weights,
                       config_overrides=_scale_overrides(args, args.methods or default_methods()),
                       fid_weights=args.fid_weights, lpips_weights=args.lpips_weights,
                       clip_model=args.clip_model, contact_rows=args.contact_rows, report=args.report,
                       command=command)
        print(_eval_summary(res))
    print("wrote " + ", ".join(res["files"]))
    return 0


def _eval_summary(res) -> str:
    from .eval.report import FID_NOTE, fmt_ci

    lines = [f"{res['meta']['n_images']} images, {res['meta']['images_generated']} generated now"]
    for m, e in res["methods"].items():
        ja = e.get("judge_image_acc")
        lines.append(f"  {m:12s} PSNR {fmt_ci(e['psnr'])} dB  SSIM {fmt_ci(e['ssim'], 3)}"
                     + (f"  judge {fmt_ci(ja, 3)}" if isinstance(ja, dict) else ""))
    lines.append(FID_NOTE)
    return "\n".join(lines)


def _sweep_summary(res) -> str:
    from .eval.report import fmt_ci

    lines = []
    for m, c in res["curves"].items():
        lines.append(f"  {m:12s} " + "  ".join(f"r={r}: {fmt_ci(v['psnr'])}" for r, v in c.items()))
    return "\n".join(lines)


def cmd_report(args) -> int:
    from .eval.protocol import layer_error_table
    from .eval.report import format_layer_table

    ev = _evaluator(args, out=args.cache)
    plan = None
    if args.rank_plan:
        from .config import RankPlan

        plan = RankPlan.load(args.rank_plan)
    layers = [t for t in args.layers.split(",") if t] if args.layers else None
    rows = layer_error_table(evaluator=ev, methods=args.methods, ranks=args.ranks, rank_plan=plan,
                             weights=args.weights, stats=_stats(args, ev), layers=layers,
                             scale_format=args.scale_format)
    text = format_layer_table(rows, args.format)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out} ({len(rows)} rows)")
    else:
        print(text, end="")
    return 0


VERBS = {"calibrate": cmd_calibrate, "quantize": cmd_quantize, "generate": cmd_generate,
         "evaluate": cmd_evaluate, "report": cmd_report}


def _one_line(err: BaseException) -> str:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    msg = " ".join(str(msg).split()) or type(err).__name__
    return msg


def _apply_quick(args, argv: Sequence[str]) -> None:
    """``--quick``: the calibration flags of ``QUICK`` that the command line does not give itself."""
    if not getattr(args, "quick", False):
        return
    flags = ({"--limit": "calib_limit", "--steps": "calib_steps"} if args.verb == "calibrate" else
             {"--calib-limit": "calib_limit", "--calib-steps": "calib_steps"})
    for flag, key in flags.items():
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            setattr(args, flag.lstrip("-").replace("-", "_"), QUICK[key])


_INTERRUPTED = {"by_user": False}


def _on_sigint(signum, frame):  # noqa: ARG001
    # remembered: a Ctrl-C inside a library's import machinery can surface as another exception
    # (diffusers wraps failed lazy imports in RuntimeError), and it must still read as a Ctrl-C
    _INTERRUPTED["by_user"] = True
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted by Ctrl-C)."""
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    _INTERRUPTED["by_user"] = False
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_sigint)  # replaces dirotq's start-up handler
    try:
        return _run(argv)
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt) or _INTERRUPTED["by_user"] and not isinstance(e, SystemExit)):
            raise
        # one line, not a 40-frame traceback through torch; statistics and checkpoints written
        # before the interrupt stay valid (the calibration cache is renamed into place only when complete)
        verb = next((a for a in argv if a in VERBS), "")
        fresh_line = "\n" if sys.stderr.isatty() else ""  # below a progress bar cut mid-line
        print(f"{fresh_line}dirotq{' ' + verb if verb else ''}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _configure_logging(verbose: int) -> None:
    """The library logs through ``logging`` (``dirotq.*`` loggers); the CLI shows warnings, and
    info / debug with -v / -vv. Under torchrun every line names its rank."""
    import logging

    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    fmt = f"[rank {rank}] %(name)s: %(message)s" if rank is not None else "%(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    logger = logging.getLogger("dirotq")
    logger.handlers[:] = [h for h in logger.handlers if isinstance(h, logging.NullHandler)] + [handler]
    logger.setLevel(level)
    logger.propagate = False


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on malformed flags
    args._argv = argv
    _configure_logging(args.verbose)
    _apply_quick(args, argv)
    status = None
    try:
        status = VERBS[args.verb](args)
        return status
    except (OSError, ValueError, KeyError, TypeError, BadInput) as e:
        # OSError: FileNotFoundError / NotADirectoryError, and a disk or permission problem
        if os.environ.get("DIROTQ_DEBUG") or _INTERRUPTED["by_user"]:
            raise
        print(f"dirotq {args.verb}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if "torch.distributed" in sys.modules:  # under torchrun: every rank leaves the group together
            from .distributed import exit_worker, shutdown_distributed

            if shutdown_distributed(clean=status == 0) and isinstance(status, int):
                exit_worker(status)  # (an exception on its way out keeps the normal exit and its traceback)


__all__ = ["main", "build_parser", "VERBS", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "QUICK"]
