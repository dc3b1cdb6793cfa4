"""End-to-end denoising step and transformer weight memory (issue #6 "Benchmarks").

Full-size transformers from the published configs, random weights (speed does not depend on the
values), bf16, 1024×1024:
- PixArt-Σ XL-2-1024 (28 blocks, width 1152): 4096 image tokens, 300 caption tokens, batch 2 (CFG);
- FLUX.1-dev (19 double + 38 single blocks, width 3072): 4096 image + 512 text tokens, batch 1,
  guidance-distilled (``--flux-single-blocks`` / ``--flux-double-blocks`` reduce the depth if memory
  requires; the JSON says so).
Variants: ``bf16`` (the model as built) and, on one shared target set (the adapter's W4A4 and W4A16
targets; ``--pixart-cross-kv w4a16``, the default, adds PixArt's cross-attention K/V as W4A16):
- ``exact`` / ``int_ratio``: W4A4 format A / C: every W4A4 target a ``QuantLinear`` of the DiRotQ-LR
  structure at rank ``--rank`` (c = xV_r, residual, block Hadamard, INT4 weights of the actual random W,
  fused 16-bit branch), the W4A16 targets (PixArt ff.net.2, FLUX adaLN modulation) weight-only INT4;
- ``int_ratio-fused`` / ``int_ratio-fused-1launch-tm``: format C with the layers that read one input
  (q/k/v, FLUX's proj_mlp + q/k/v) fused into one and the MLPs' GELU in their up-projection's GEMM
  epilogue (``dirotq.fusion.fuse_for_inference``), and with the kernels not yet
  timed on a GPU as well: the one-launch activation path (``DIROTQ_ACT_ONE_LAUNCH``) and the
  token-major GEMM (``DIROTQ_GEMM_LAYOUT=token``); ``int_ratio-fused-gluon`` / ``-1launch-gluon``: the
  fused model on the Gluon GEMM (``DIROTQ_GEMM_LAYOUT=gluon``: asynchronous int8 wgmma; ``-tma``: the
  TMA-fed one, ``DIROTQ_GEMM_LAYOUT=tma``; ``-ws``: its warp-specialized form), alone and with
  the one-launch activation path;
- ``w4a16-int_ratio``: every target weight-only INT4 in format C (RTN, activations stay 16-bit): no
  more weight memory than W4A4 and no activation error, so the speed W4A4 has to beat to be worth it;
- ``fp8-torchao``: torchao's rowwise FP8 (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``:
  FP8 weights, FP8 activations quantized per token at run time, ``torch._scaled_mm``), the baseline a
  user reaches for first; layers torchao cannot take (in/out features not multiples of 16) stay bf16
  and are counted. Skipped, with the reason in its JSON entry, without torchao or an FP8 GPU (sm ≥ 8.9).
What the adapter keeps 16-bit stays bf16 in every variant. The basis is a random orthonormal V_r (no
calibration statistics exist for random weights); structure, sizes and kernels are those of a
calibrated model.
Timing: one transformer forward (= one denoising step), eager (``do_bench`` median) and inside a
CUDA graph (the deployment mode: no Python launch overhead). Memory: bytes of every parameter and
buffer the transformer holds (packed weights, scales, multipliers, 16-bit branches, bases, signs,
bias, the unquantized layers; a tensor subclass such as torchao's FP8 weight counted by its inner
tensors), and the ``storage_bits`` accounting of the QuantLinear layers. Breakdown: one eager step
under the profiler, its GPU kernel time summed by part (attention, GEMMs, activation quantization,
the rest), so the attention share says how much of the step an 8-bit attention could at most touch.

    python -m benchmarks.bench_e2e --model pixart [--formats exact int_ratio w4a16-int_ratio fp8-torchao] [--rank 32]
    python -m benchmarks.bench_e2e --model flux
    python -m benchmarks.bench_e2e --dry-run      # CPU, TRITON_INTERPRET=1, tiny configs: code path only
    python -m benchmarks.bench_e2e --model flux --compile default   # also each variant under torch.compile

``--compile MODE`` adds, for every variant (torchao FP8 included), the step of
``torch.compile(model, mode=MODE)`` (what a user compares against: BF16 + compile, torchao FP8 +
compile): compile seconds, graph count and graph breaks (a quantized linear is one custom op,
``dirotq/compile_ops.py``), and the compiled step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DIROTQ_BACKEND", "triton")  # exercise the kernels on CPU tensors

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._bench_common import (ROOT, bench, bench_graph, environment, environment_variables,  # noqa: E402
                                      make_quant_linear)
from dirotq.compiling import CompileCounter, compile_transformer, uncompile  # noqa: E402

PIXART_SIGMA_1024 = dict(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, attention_type="default",
    caption_channels=4096, cross_attention_dim=1152, double_self_attention=False, dropout=0.0, in_channels=4,
    interpolation_scale=2, norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32,
    norm_type="ada_norm_single", num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28,
    only_cross_attention=False, out_channels=8, patch_size=2, sample_size=128, upcast_attention=False,
    use_additional_conditions=False, use_linear_projection=False,
)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
    num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)

# QuantLinear variants: name -> (structure of the W4A4 targets, scale format, activation bits of the
# W4A4 targets; None: weight-only). The adapter's W4A16 targets are weight-only RTN in every variant.
QUANT_VARIANTS: dict[str, tuple[str, str, int | None]] = {
    "exact": ("dirotq-lr", "exact", 4),  # W4A4 format A
    "int_ratio": ("dirotq-lr", "int_ratio", 4),  # W4A4 format C
    "w4a16-int_ratio": ("rtn", "int_ratio", None),  # weight-only INT4 format C
    "int_ratio-fused": ("dirotq-lr", "int_ratio", 4),  # format C, shared-input layers fused (dirotq/fusion.py)
    "int_ratio-fused-1launch-tm": ("dirotq-lr", "int_ratio", 4),  # … one-launch activations, token-major GEMM
    "int_ratio-fused-gluon": ("dirotq-lr", "int_ratio", 4),  # … with the Gluon GEMM (async int8 wgmma)
    "int_ratio-fused-1launch-gluon": ("dirotq-lr", "int_ratio", 4),  # … and the one-launch activation path
    "int_ratio-fused-tma": ("dirotq-lr", "int_ratio", 4),  # … with the TMA-fed Gluon GEMM
    "int_ratio-fused-ws": ("dirotq-lr", "int_ratio", 4),  # … with its warp-specialized form
}
# variants whose layers that read one input (q/k/v, FLUX's proj_mlp + q/k/v) run as one layer
FUSED_VARIANTS = ("int_ratio-fused", "int_ratio-fused-1launch-tm", "int_ratio-fused-gluon",
                  "int_ratio-fused-1launch-gluon", "int_ratio-fused-tma", "int_ratio-fused-ws")
# the kernel choices of a variant (docs/KERNELS.md); every other variant runs the defaults
KERNEL_DEFAULTS = {"DIROTQ_ACT_ONE_LAUNCH": "0", "DIROTQ_GEMM_LAYOUT": "swap"}
VARIANT_KERNELS = {"int_ratio-fused-1launch-tm": {"DIROTQ_ACT_ONE_LAUNCH": "1", "DIROTQ_GEMM_LAYOUT": "token"},
                   "int_ratio-fused-gluon": {"DIROTQ_GEMM_LAYOUT": "gluon"},
                   "int_ratio-fused-1launch-gluon": {"DIROTQ_ACT_ONE_LAUNCH": "1", "DIROTQ_GEMM_LAYOUT": "gluon"},
                   "int_ratio-fused-tma": {"DIROTQ_GEMM_LAYOUT": "tma"},
                   "int_ratio-fused-ws": {"DIROTQ_GEMM_LAYOUT": "ws"}}
FP8_TORCHAO = "fp8-torchao"
VARIANTS = [*QUANT_VARIANTS, FP8_TORCHAO]
DEFAULT_FORMATS = ["exact", "int_ratio", "int_ratio-fused", "int_ratio-fused-tma", "int_ratio-fused-1launch-tm",
                   "int_ratio-fused-gluon", "int_ratio-fused-1launch-gluon", "w4a16-int_ratio", FP8_TORCHAO]
# PixArt's cross-attention K/V: 16-bit as the adapter (and the paper) keeps them, W4A16 or W4A4, one of
# which the weight-memory target (≤ 0.30× bf16 for PixArt-Σ) needs (their image cost on the
# embedded model: benchmarks/results/cross_kv_tiny_pixart.md)
PIXART_CROSS_KV = ("16bit", "w4a16", "w4a4")
PIXART_CROSS_KV_DEFAULT = "w4a16"
CONDITIONING_KINDS = ("16bit", "w8a16", "w4a16")  # the conditioning linears outside the blocks (--conditioning)


def published_config(cls, config: dict) -> tuple[dict, list[str]]:
    """The published config minus keys the installed diffusers no longer accepts (e.g. PixArt's
    ``double_self_attention``, dropped from ``PixArtTransformer2DModel``): (kwargs, dropped keys)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    kept = {k: v for k, v in config.items() if k in accepted}
    return kept, sorted(set(config) - set(kept))


def bench_device(dry: bool) -> str:
    return "cuda" if torch.cuda.is_available() and not dry else "cpu"


def build(model: str, args, dry: bool, seed: int = 0, dtype: torch.dtype | None = None):
    """(transformer, inputs dict, description) on the benchmark device, bf16 (fp32 in the dry run
    unless ``dtype`` says otherwise: torchao's rowwise FP8 takes bf16 weights only)."""
    from dirotq.models import ADAPTERS

    dev = bench_device(dry)
    dt = dtype or (torch.bfloat16 if dev == "cuda" else torch.float32)
    adapter = ADAPTERS["pixart" if model == "pixart" else "flux"]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if dry:
        m = adapter.build_tiny(seed).to(dev, dt)
        kw = adapter.example_inputs(m, 2 if model == "pixart" else 1, gen)
        return m, _to(kw, dev, dt), {"config": "tiny (dry run)"}
    import diffusers

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # initialise directly in bf16 on the GPU (FLUX: 24 GB, not 48)
    try:
        with torch.device(dev):
            if model == "pixart":
                cls = diffusers.PixArtTransformer2DModel
                cfg, dropped = published_config(cls, PIXART_SIGMA_1024)
            else:
                cls = diffusers.FluxTransformer2DModel
                cfg, dropped = published_config(cls, FLUX_DEV)
                if args.flux_double_blocks is not None:
                    cfg["num_layers"] = args.flux_double_blocks
                if args.flux_single_blocks is not None:
                    cfg["num_single_layers"] = args.flux_single_blocks
            m = cls(**cfg)
    finally:
        torch.set_default_dtype(prev)
    m = m.eval().to(dev, dt)
    if model == "pixart":
        b, s, L = 2, 128, 300
        kw = dict(hidden_states=torch.randn(b, 4, s, s, generator=gen),
                  encoder_hidden_states=torch.randn(b, L, 4096, generator=gen),
                  timestep=torch.full((b,), 500, dtype=torch.long), encoder_attention_mask=torch.ones(b, L),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        desc = {"config": "PixArt-Sigma-XL-2-1024-MS", "batch": b, "image_tokens": (s // 2) ** 2, "text_tokens": L,
                "config_keys_dropped": dropped}
    else:
        h = w = 64
        L = 512
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        kw = dict(hidden_states=torch.randn(1, h * w, 64, generator=gen),
                  encoder_hidden_states=torch.randn(1, L, 4096, generator=gen),
                  pooled_projections=torch.randn(1, 768, generator=gen), timestep=torch.full((1,), 0.5),
                  img_ids=ids.reshape(h * w, 3), txt_ids=torch.zeros(L, 3), guidance=torch.full((1,), 3.5))
        desc = {"config": "FLUX.1-dev", "batch": 1, "image_tokens": h * w, "text_tokens": L,
                "double_blocks": cfg["num_layers"], "single_blocks": cfg["num_single_layers"],
                "reduced_depth": cfg["num_layers"] != 19 or cfg["num_single_layers"] != 38,
                "config_keys_dropped": dropped}
    return m, _to(kw, dev, dt), desc


def _to(kw, dev, dt):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(dev, dt if v.is_floating_point() else v.dtype)
        elif isinstance(v, dict):
            out[k] = _to(v, dev, dt)
        else:
            out[k] = v
    return out


def bench_targets(model, pixart_cross_kv: str = PIXART_CROSS_KV_DEFAULT, conditioning: str = "16bit") -> dict:
    """The adapter's targets (name -> TargetSpec), PixArt's cross-attention K/V added as W4A16 when
    ``pixart_cross_kv == "w4a16"`` (the adapter keeps them 16-bit unless overridden), the conditioning
    linears outside the blocks with ``conditioning`` = "w8a16" / "w4a16". Every variant quantizes this
    one set, so BF16, FP8 and INT4 differ only in how the same layers are stored."""
    from dirotq.models import get_adapter
    from dirotq.models.base import CONDITIONING

    if pixart_cross_kv not in PIXART_CROSS_KV:
        raise ValueError(f"pixart_cross_kv {pixart_cross_kv!r} not in {PIXART_CROSS_KV}")
    if conditioning not in CONDITIONING_KINDS:
        raise ValueError(f"conditioning {conditioning!r} not in {CONDITIONING_KINDS}")
    adapter = get_adapter(model)
    overrides = dict(adapter.overrides)
    if adapter.family == "pixart" and pixart_cross_kv != "16bit":
        overrides.update({"attn2.to_k": pixart_cross_kv, "attn2.to_v": pixart_cross_kv})
    if conditioning != "16bit":
        overrides.update(adapter.expand_conditioning(model, {CONDITIONING: conditioning}))
    return type(adapter)(overrides).targets(model)


@torch.no_grad()
def quantize_model(model, variant: str, rank: int, pixart_cross_kv: str = PIXART_CROSS_KV_DEFAULT,
                   conditioning: str = "16bit", dtype: torch.dtype | None = None) -> dict:
    """Replace every bench target by a QuantLinear of ``variant`` (``QUANT_VARIANTS``) in place;
    returns counts by what the layers became (``w4a4``: 4-bit activations, ``w4a16`` / ``w8a16``:
    weight-only with 4- / 8-bit weights). ``dtype``: of the layers' 16-bit tensors (default
    ``make_quant_linear``'s: bf16 on a GPU, float32 on the CPU)."""
    structure_a4, fmt, act_bits = QUANT_VARIANTS[variant]
    counts = {"w4a4": 0, "w4a16": 0, "w8a16": 0}
    for name, spec in bench_targets(model, pixart_cross_kv, conditioning).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        act = act_bits if spec.kind == "w4a4" else None
        # the DiRotQ-LR structure needs whole 64-wide Hadamard blocks; other widths (and weight-only
        # layers, which have no activation outliers to spread) are plain RTN
        structure = structure_a4 if act is not None and lin.in_features % 64 == 0 else "rtn"
        q = make_quant_linear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), structure, fmt,
                              0 if structure == "rtn" else min(rank, lin.in_features), act_bits=act,
                              weight_bits=8 if spec.kind == "w8a16" else 4, dtype=dtype)
        # float buffers (branch, bias, signs) are already in the model dtype; no .to(dtype) here, which
        # would also cast the fp16 weight scales to bf16
        setattr(parent, child, q)
        counts["w4a4" if act is not None else "w8a16" if spec.kind == "w8a16" else "w4a16"] += 1
        del lin
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {k: n for k, n in counts.items() if k != "w8a16" or n}  # W8A16 listed only where chosen


def _fp8_config():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def fp8_unavailable_reason(device: str) -> str | None:
    """Why the torchao FP8 variant cannot run on ``device``, or None when it can. Probed on one small
    bf16 linear (quantize and forward), so a missing torchao, a GPU without FP8 tensor cores or
    torchao refusing the device is written into the result instead of ending the run."""
    try:
        import torchao
        from torchao.quantization import quantize_

        _fp8_config()
    except Exception as exc:  # ImportError, or an API that moved
        return (f"torchao FP8 API not importable ({type(exc).__name__}: {exc}); pip install torchao "
                "(device_checks.sh installs it from .whl/)")
    if device == "cuda":
        cap = torch.cuda.get_device_capability()
        if cap < (8, 9):
            return (f"FP8 needs CUDA compute capability >= 8.9 (Ada/Hopper); {torch.cuda.get_device_name()} "
                    f"has {cap[0]}.{cap[1]}")
    probe = nn.Linear(64, 32, device=device, dtype=torch.bfloat16)
    try:
        quantize_(probe, _fp8_config())
        with torch.no_grad():
            y = probe(torch.randn(4, 64, device=device, dtype=torch.bfloat16))
    except Exception as exc:
        return f"torchao {torchao.__version__} rowwise FP8 does not run on {device}: {type(exc).__name__}: {exc}"
    if not bool(torch.isfinite(y).all()):
        return f"torchao {torchao.__version__} rowwise FP8 gave non-finite output on {device}"
    return None


@torch.no_grad()
def quantize_fp8_torchao(model, targets: dict) -> dict:
    """torchao rowwise FP8 (dynamic per-token FP8 activations, per-row FP8 weights) on exactly the
    ``targets`` (names), in place. torchao silently leaves a linear it cannot take (in/out features not
    multiples of 16) in bf16: those are counted and named, so the memory and speed read right."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from torchao.quantization import quantize_

    names = set(targets)
    quantize_(model, _fp8_config(), filter_fn=lambda module, fqn: fqn in names and isinstance(module, nn.Linear))
    kept = [n for n in targets if not is_traceable_wrapper_subclass(model.get_submodule(n).weight)]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"fp8": len(names) - len(kept), "kept_bf16": len(kept), "kept_bf16_layers": kept}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds. A wrapper tensor subclass (torchao's FP8 weight) reports the shape and dtype
    of the tensor it stands for (bf16), not its storage: count its inner tensors (``qdata``, ``scale``
    or whatever its ``__tensor_flatten__`` names), recursively."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(inner) for inner in (getattr(t, n) for n in names) if inner is not None)
    return t.numel() * t.element_size()


def weight_bytes(model) -> dict:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    from dirotq.modules import QuantLinear

    total = sum(tensor_bytes(p) for p in model.parameters())
    total += sum(tensor_bytes(b) for b in model.buffers())
    sub = [p for p in model.parameters() if is_traceable_wrapper_subclass(p)]
    q_bits = sum(sum(m.storage_bits().values()) for m in model.modules() if isinstance(m, QuantLinear))
    q_params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return {"bytes": int(total), "quant_layers_storage_bytes": int(q_bits / 8), "quant_layers_weights": int(q_params),
            "tensor_subclass_bytes": int(sum(tensor_bytes(p) for p in sub)),
            "tensor_subclass_weights": int(sum(p.numel() for p in sub))}


def time_step(model, kw, graphs: bool) -> dict:
    def step():
        return model(**kw, return_dict=False)[0]

    out = {}
    with torch.no_grad():
        for _ in range(2):  # compile / autotune / plan caches before timing or capture
            y = step()
        out["output_finite"] = bool(torch.isfinite(y).all())  # a broken variant must not pass as fast
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out["eager_ms"] = bench(step, rep_ms=1000, warmup_ms=100)
        if graphs:
            out["cuda_graph_ms"] = bench_graph(step, calls=1, replays=10)
            out.update(graph_wrapper_step(model, step))
    return out


def graph_wrapper_step(model, step) -> dict:
    """The step through ``dirotq.cuda_graphs.graph_transformer`` (what ``generate --cuda-graphs`` and
    the explorer's ``--cuda-graphs`` run): replays timed with their host work (the layout check,
    the input copies, the output copy), next to ``cuda_graph_ms``'s bare replay."""
    from dirotq.cuda_graphs import graph_stats, graph_transformer, ungraph_transformer

    graph_transformer(model)
    try:
        step()  # eager: the key's first call
        step()  # captured
        ms = bench(step, rep_ms=1000, warmup_ms=100)
        return {"graph_wrapper_ms": ms, "graph_wrapper": graph_stats(model)}
    except Exception as exc:  # recorded: the other numbers of this variant stand
        return {"graph_wrapper_failed": f"{type(exc).__name__}: {str(exc)[:500]}"}
    finally:
        ungraph_transformer(model)


# kernel name -> part of the step (first match); "other": norms, modulation, RoPE, gates, copies …
KERNEL_PARTS = (("attention", re.compile(r"flash|fmha|attention|sdpa|mha", re.I)),
                ("activation quantization", re.compile(r"act_quant", re.I)),
                ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|w4a16|gluon|_mm|matmul|addmm|linear", re.I)))


def kernel_part(name: str) -> str:
    return next((part for part, pattern in KERNEL_PARTS if pattern.search(name)), "other")


def step_breakdown(model, kw) -> dict:
    """Where one eager step's time goes, from one profiled step: per part (``KERNEL_PARTS``) the
    summed GPU kernel time (ms) and its share of all kernel time; ``attention_share`` is what a
    faster attention could at most remove. Without CUDA (``--dry-run``) the parts sum the profiled
    CPU ops' self time instead (the code path, not a measurement)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]
                                  + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        model(**kw, return_dict=False)
        if cuda:
            torch.cuda.synchronize()
    parts = {part: 0.0 for part, _ in KERNEL_PARTS} | {"other": 0.0}
    for e in prof.events():
        if cuda and e.device_type == DeviceType.CUDA:
            parts[kernel_part(e.name)] += e.device_time / 1e3
        elif not cuda and e.device_type == DeviceType.CPU:
            parts[kernel_part(e.name)] += e.self_cpu_time_total / 1e3
    total = sum(parts.values())
    return {"clock": "gpu kernels" if cuda else "cpu ops (dry run)", "total_ms": round(total, 3),
            "ms": {k: round(v, 3) for k, v in parts.items()},
            "share": {k: round(v / total, 4) if total else 0.0 for k, v in parts.items()},
            "attention_share": round(parts["attention"] / total, 4) if total else 0.0}


def compiled_step(model, kw, mode: str, scope: str = "model") -> dict:
    """The step under torch.compile with ``mode``, compiled in place by ``dirotq.compiling``:
    ``scope="model"`` the whole transformer, ``"blocks"`` each repeated block (regional compilation:
    identical blocks share one compiled graph, so compile time is that of one block per block type;
    the layers outside the blocks stay eager). Reports the
    compile (first call) seconds, graphs and graph breaks as dynamo counts them, and the compiled
    step's median time."""
    with torch.no_grad():
        eager = model(**kw, return_dict=False)[0].float()
    torch._dynamo.reset()
    compiled_modules = compile_transformer(model, scope, mode)
    # past its recompile limit dynamo would run the code eagerly, silently: fail instead, so an
    # eager step is never reported as a compiled one
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), \
            CompileCounter() as counted:
        y = model(**kw, return_dict=False)[0].float()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    out = {"mode": mode, "scope": scope, "compile_s": round(counted.seconds, 1),
           # the compiled step computes the eager one's output (up to fused elementwise rounding)
           "rel_err_vs_eager": round(float((y - eager).norm() / eager.norm().clamp_min(1e-30)), 6),
           "graphs": counted.graphs, "graph_breaks": sum(counted.graph_breaks.values())}
    out.update({k: v for k, v in time_step(model, kw, graphs=False).items()})
    uncompile(compiled_modules)  # the eager forward again
    torch._dynamo.reset()
    return out


def _phase(phases: dict, name: str, t0: float) -> None:
    """Record a phase's wall seconds and print them at once: a run stopped by its time box still
    shows in its log which phase it was in."""
    phases[name] = round(time.time() - t0, 1)
    print(f"  {name}: {phases[name]} s", flush=True)


def run_variant(variant: str, args, dry: bool, res: dict) -> dict:
    """Build the model, turn it into ``variant``, and measure memory and step time (plus the
    compiled step with ``--compile``): the variant's JSON entry."""
    from dirotq.modules import backend_description

    dev = bench_device(dry)
    fp8 = variant == FP8_TORCHAO
    if fp8:
        reason = fp8_unavailable_reason(dev)
        if reason:
            return {"skipped": reason}
    # torchao's rowwise FP8 takes bf16 weights only: the fp32 dry run builds this variant in bf16
    t0 = time.time()
    model, kw, desc = build(args.model, args, dry, dtype=torch.bfloat16 if fp8 else None)
    res["setup"] = desc
    # wall seconds per phase (what a time box has to hold: kernel compiles and autotuning happen in the
    # first eager calls, inside "eager")
    phases: dict = {}
    _phase(phases, "build", t0)
    entry: dict = {"phase_s": phases}
    t0 = time.time()
    try:
        if variant != "bf16":
            targets = bench_targets(model, args.pixart_cross_kv, args.conditioning)
            if fp8:
                import torchao

                entry["layers"] = quantize_fp8_torchao(model, targets)
                entry["backend"] = (f"torchao {torchao.__version__} Float8DynamicActivationFloat8WeightConfig(PerRow): "
                                    f"{entry['layers']['fp8']}× FP8 rowwise, {entry['layers']['kept_bf16']} kept bf16")
            else:
                structure, fmt, act_bits = QUANT_VARIANTS[variant]
                entry["quant"] = {"structure_w4a4_targets": structure, "scale_format": fmt,
                                  "act_bits_w4a4_targets": act_bits}
                entry["layers"] = quantize_model(model, variant, args.rank, args.pixart_cross_kv, args.conditioning)
                if variant in FUSED_VARIANTS:
                    from dirotq.fusion import fuse_for_inference

                    report = fuse_for_inference(model)
                    fused = report["shared_inputs"]["fused"]
                    entry["fused"] = {"groups": len(fused), "layers": sum(map(len, fused.values())),
                                      "activations_in_epilogue": len(report["activations"]["fused"])}
                entry["backend"] = backend_description(model)
        else:
            entry["backend"] = "torch bf16"
            kinds = [spec.kind for spec in bench_targets(model, args.pixart_cross_kv, args.conditioning).values()]
            # the adapter's kinds, every variant
            res["targets"] = {k: kinds.count(k) for k in ("w4a4", "w4a16", "w8a16") if k != "w8a16" or k in kinds}
        entry["memory"] = weight_bytes(model)
        _phase(phases, "quantize", t0)
        t0 = time.time()
        entry.update(time_step(model, kw, graphs=not args.no_graphs and not dry))
        _phase(phases, "eager", t0)
        t0 = time.time()
        entry["breakdown"] = step_breakdown(model, kw)
        _phase(phases, "breakdown", t0)
    except Exception as exc:
        if not fp8:
            raise
        # an outside library's failure must not cost the run the variants after it
        return {"failed": f"{type(exc).__name__}: {str(exc)[:1000]}", **entry}
    if args.compile != "none":
        t0 = time.time()
        try:
            entry["compiled"] = compiled_step(model, kw, args.compile, args.compile_scope)
        except Exception as exc:  # recorded: the eager numbers of this variant still stand
            torch._dynamo.reset()
            entry["compiled"] = {"mode": args.compile, "failed": f"{type(exc).__name__}: {str(exc)[:1000]}"}
        _phase(phases, "compile_and_time", t0)
    if torch.cuda.is_available() and not dry:
        entry["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    del model, kw
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["pixart", "flux"], default="pixart")
    ap.add_argument("--formats", nargs="+", choices=VARIANTS, default=DEFAULT_FORMATS,
                    help=f"variants after bf16, in this order (default {' '.join(DEFAULT_FORMATS)})")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--pixart-cross-kv", choices=PIXART_CROSS_KV, default=PIXART_CROSS_KV_DEFAULT,
                    help="PixArt attn2.to_k / to_v: kept 16-bit (the adapter's default) or W4A16 in every "
                         f"variant (default {PIXART_CROSS_KV_DEFAULT}: the weight-memory target needs it)")
    ap.add_argument("--conditioning", choices=CONDITIONING_KINDS, default="16bit",
                    help="the conditioning linears outside the blocks (timestep/text embedders, adaLN, caption "
                         "projection): kept 16-bit (default, the adapters' choice) or weight-only in every variant "
                         "(w8a16: at most 0.2 dB on the embedded model, docs/EVALUATION.md)")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--flux-double-blocks", type=int, default=None)
    ap.add_argument("--flux-single-blocks", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--compile", default="none",
                    choices=["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    help="also time each variant under torch.compile with this mode (default none)")
    ap.add_argument("--compile-scope", choices=["model", "blocks"], default="model",
                    help="what --compile compiles: the whole transformer, or each repeated block (regional "
                         "compilation: one compile per block type, the layers outside the blocks eager)")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("bench_e2e.py needs a CUDA GPU (or --dry-run to check the code path on CPU)")

    env = environment()
    res: dict = {"benchmark": "bench_e2e", "model": args.model, "environment": env, "dry_run": dry,
                 "rank": args.rank, "pixart_cross_kv": args.pixart_cross_kv if args.model == "pixart" else None,
                 "conditioning": args.conditioning,
                 "variants": {}}
    t0 = time.time()
    gpu = (env.get("gpu") or "cpu-dry-run").replace(" ", "_")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_e2e_{args.model}_{gpu}.json"
    if dry and not args.out:
        out = Path("/tmp") / f"bench_e2e_{args.model}_dry_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for variant in ["bf16", *dict.fromkeys(args.formats)]:
        print(f"{args.model} {variant}", flush=True)
        with environment_variables({**KERNEL_DEFAULTS, **VARIANT_KERNELS.get(variant, {})}):
            entry = run_variant(variant, args, dry, res)
        if variant in VARIANT_KERNELS:
            entry["kernel_env"] = VARIANT_KERNELS[variant]
        res["variants"][variant] = entry
        print("  " + json.dumps(entry), flush=True)
        out.write_text(json.dumps(res, indent=1))  # after every variant: a killed run keeps what it measured
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = res["variants"]["bf16"]
    for v, e in res["variants"].items():
        if v == "bf16" or "memory" not in e or "eager_ms" not in e:  # skipped or failed
            continue
        e["memory_ratio_vs_bf16"] = round(e["memory"]["bytes"] / base["memory"]["bytes"], 4)
        e["eager_speedup_vs_bf16"] = round(base["eager_ms"] / e["eager_ms"], 3)
        if e.get("cuda_graph_ms") and base.get("cuda_graph_ms"):
            e["graph_speedup_vs_bf16"] = round(base["cuda_graph_ms"] / e["cuda_graph_ms"], 3)
        if e.get("compiled", {}).get("eager_ms") and base.get("compiled", {}).get("eager_ms"):
            e["compiled_speedup_vs_bf16_compiled"] = round(base["compiled"]["eager_ms"] / e["compiled"]["eager_ms"], 3)
    res["seconds"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
