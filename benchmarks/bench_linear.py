"""W4A4 linear layer speed (issue #6 "Benchmarks"): Triton kernels vs torch BF16 and FP8.

Columns ``<F>_<structure>_r<rank>[_w8]``: F = A (exact) or C (int_ratio); ``_w8``: the GEMM reads a
cached unpacked int8 weight operand instead of unpacking INT4 in registers (what the unpack costs).

For each shape (PixArt-Σ and FLUX linears) and token count (16, 1024, 4096), bf16 activations:
- ``bf16``: torch ``x @ W.T`` (cuBLAS), ``fp8_gemm`` / ``fp8_total``: ``torch._scaled_mm`` FP8 e4m3
  per-row scales, GEMM alone / with the dynamic per-token activation quantization in torch;
- for formats A (exact) and C (int_ratio), two structures: ``rtn`` (rank 0: quantize + GEMM) and
  ``dirotq-lr`` rank 32 (c = xV, residual, block Hadamard, quantize + GEMM + fused rank-32 branch);
  time split ``act_quant`` / ``gemm`` / ``total`` (the module's ``kernel_forward``);
- ``C_gemm_gelu_epilogue`` / ``C_gemm_then_gelu``: the format C GEMM with GELU (tanh form) on all
  outputs in its epilogue, against the GEMM followed by torch's GELU (what activation fusion saves
  on an MLP's up-projection).
Medians of ``triton.testing.do_bench`` with the input rotated over 4 tensors (no L2 reuse across
calls); ``*_graph`` columns: the same work captured 8× in a CUDA graph (GPU time without Python
launch overhead, what a whole-model CUDA-graph run pays). Reported: TOPS = 2·n·d·o/t (vs the
measured ``torch._int_mm`` INT8 ceiling and the spec), logical GB/s, speedup vs bf16, and the max
relative error of the kernel output against the reference path on 64 tokens.

    python -m benchmarks.bench_linear [--out benchmarks/results/bench_linear_<gpu>.json] [--tokens 16 1024 4096]
    python -m benchmarks.bench_linear --dry-run     # CPU, TRITON_INTERPRET=1, tiny shapes: checks the code path only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

from benchmarks._bench_common import (ROOT, bench, bench_graph, environment, environment_variables,  # noqa: E402
                                      make_quant_linear, measure_ceilings, spec_int8_peak)

SHAPES = [  # (model, name, d_in, d_out)
    ("pixart-sigma", "attn qkv fused / ff-like", 1152, 3456),
    ("pixart-sigma", "attn to_q/k/v/out", 1152, 1152),
    ("pixart-sigma", "ff.net.0.proj", 1152, 4608),
    ("pixart-sigma", "ff.net.2", 4608, 1152),
    ("flux", "attn to_q/k/v/out", 3072, 3072),
    ("flux", "qkv fused", 3072, 9216),
    ("flux", "ff up", 3072, 12288),
    ("flux", "ff down", 12288, 3072),
    ("flux", "single proj_mlp+qkv fused", 3072, 21504),
    ("flux", "single proj_out", 15360, 3072),
]
DRY_SHAPES = [("dry", "tiny", 128, 96), ("dry", "tiny-odd", 192, 64)]
FORMATS = ("exact", "int_ratio")
STRUCTURES = (("rtn", 0), ("dirotq-lr", 32))
WEIGHT_MODES = ("packed", "int8")  # int8: the unpacked weight operand cached (8 more bits/weight)


GLUON_CONFIGS = {  # tag: (tile and warps, shared-memory buffers per operand)
    "128x128w4n2": (dict(BT=128, BO=128, num_warps=4), 2),
    "128x128w4n3": (dict(BT=128, BO=128, num_warps=4), 3),
    "256x128w8n2": (dict(BT=256, BO=128, num_warps=8), 2),
    "256x128w8n2p": (dict(BT=256, BO=128, num_warps=8, PREFETCH=True), 2),  # next group's loads issued early
}


TMA_CONFIGS = {  # the TMA-fed Gluon GEMM (gluon_gemm.gluon_tma_gemm_kernel): tile, warps, stages, unpack buffers
    "128x128w4s6u2": dict(BT=128, BO=128, num_warps=4, NS=6, NBU=2),
    "128x128w4s8u3": dict(BT=128, BO=128, num_warps=4, NS=8, NBU=3),
    "256x128w8s6u2": dict(BT=256, BO=128, num_warps=8, NS=6, NBU=2),
}


WS_CONFIGS = {  # its warp-specialized form (gluon_gemm.gluon_ws_gemm_kernel; packed weights)
    "128x128w4s4": dict(BT=128, BO=128, num_warps=4, NS=4, maxnreg=168),
    "256x128w8s4": dict(BT=256, BO=128, num_warps=8, NS=4, maxnreg=128),
}


def tma_rows(m, plan, act, flops: float, out_dtype, prefix: str, kind: str = "tma") -> dict:
    """A TMA-fed Gluon GEMM on the layer's codes (``kind`` "tma", or "ws" for its warp-specialized form,
    packed weights): its int32 sums against the Triton kernel's (exact), then the whole GEMM per tile
    config (``TMA_CONFIGS`` / ``WS_CONFIGS``), timed, with its error against the Triton GEMM's output.
    ``prefix`` names the weight mode (C, or C_w8 for cached int8 weights). Failures are recorded."""
    from dirotq.kernels.w4a4_gemm import w4a4_gemm

    out = {}
    key = f"{prefix}_core_int32_{kind}"
    try:
        from dirotq.kernels import gluon_gemm

        core = getattr(gluon_gemm, f"gluon_{kind}_core_int32")
        gemm = getattr(gluon_gemm, f"gluon_{kind}_w4a4_gemm")
        ref = w4a4_gemm(m, plan, act, torch.float32, debug_int=True, layout="swap")
        out[f"{key}_equal"] = bool(torch.equal(core(m, plan, act), ref))
        out[f"{key}_ms"] = t = bench(lambda: core(m, plan, act))
        out[f"{key}_tops"] = flops / t / 1e9
        y_ref = w4a4_gemm(m, plan, act, out_dtype, layout="swap").float()
        for tag, cfg in (TMA_CONFIGS if kind == "tma" else WS_CONFIGS).items():
            name = f"{prefix}_gemm_{kind}_{tag}"
            try:
                y = gemm(m, plan, act, out_dtype, config=cfg).float()
                out[f"{name}_rel_err_vs_triton"] = float((y - y_ref).abs().max() / y_ref.abs().max())
                out[f"{name}_ms"] = t_c = bench(lambda cfg=cfg: gemm(m, plan, act, out_dtype, config=cfg))
                out[f"{name}_tops"] = flops / t_c / 1e9
            except Exception as exc:
                out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    except Exception as exc:
        out[f"{key}_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    return out


def own_int8_ceiling(n: int = 8192) -> dict:
    """Our own best int8 GEMM at n³: the TMA-fed Gluon core on cached int8 weights (no unpack; symmetric
    format C codes, int32 out), next to ``torch._int_mm`` (cuBLASLt without heuristics or workspace)."""
    from dirotq.kernels.act_quant import quantize_activations
    from dirotq.kernels.gluon_gemm import gluon_tma_core_int32
    from dirotq.kernels.layout import get_plan

    gen = torch.Generator(device="cpu").manual_seed(8192)
    w = (torch.randn(n, n, generator=gen) / n**0.5).cuda()
    x = torch.randn(n, n, generator=gen).cuda().bfloat16()
    m = make_quant_linear(w, None, "rtn", "int_ratio", 0)
    m.kernel_weights = "int8"
    plan = get_plan(m, x)
    act = quantize_activations(m, plan, x)
    out = {}
    for tag, cfg in TMA_CONFIGS.items():
        try:
            t = bench(lambda cfg=cfg: gluon_tma_core_int32(m, plan, act, config=cfg))
            out[f"int8_own_tma_{tag}_{n}_tops"] = 2.0 * n**3 / t / 1e9
        except Exception as exc:
            out[f"int8_own_tma_{tag}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def gluon_core_row(m, plan, act, flops: float, out_dtype, first_gluon: bool = True) -> dict:
    """Format C's GEMM with asynchronous int8 wgmma (Gluon, ``dirotq/kernels/gluon_gemm.py``) against
    the Triton kernel on the same codes: the int32 core (``debug_int``: every Triton int8 MMA waited
    for) compared exactly, and the whole GEMM (scales, rank-32 branch, bias) per tile config with its
    error against the Triton GEMM's output. A Gluon failure is recorded, not raised.
    ``first_gluon=False``: the Triton core only (the first Gluon GEMM was timed on the H200)."""
    from dirotq.kernels.w4a4_gemm import w4a4_gemm

    out = {}
    out["C_core_int32_triton_ms"] = t_t = bench(lambda: w4a4_gemm(m, plan, act, torch.float32, debug_int=True))
    out["C_core_int32_triton_tops"] = flops / t_t / 1e9
    if not first_gluon:
        return out
    try:
        from dirotq.kernels.gluon_gemm import gluon_core_int32, gluon_w4a4_gemm

        ref = w4a4_gemm(m, plan, act, torch.float32, debug_int=True)
        out["C_core_int32_gluon_equal"] = bool(torch.equal(gluon_core_int32(m, plan, act), ref))
        out["C_core_int32_gluon_ms"] = t_g = bench(lambda: gluon_core_int32(m, plan, act))
        out["C_core_int32_gluon_tops"] = flops / t_g / 1e9
        y_ref = w4a4_gemm(m, plan, act, out_dtype, layout="swap").float()
        for tag, (cfg, nbuf) in GLUON_CONFIGS.items():
            try:
                y = gluon_w4a4_gemm(m, plan, act, out_dtype, nbuf=nbuf, config=cfg).float()
                out[f"C_gemm_gluon_{tag}_rel_err_vs_triton"] = float((y - y_ref).abs().max() / y_ref.abs().max())
                out[f"C_gemm_gluon_{tag}_ms"] = t_c = bench(
                    lambda: gluon_w4a4_gemm(m, plan, act, out_dtype, nbuf=nbuf, config=cfg))
                out[f"C_gemm_gluon_{tag}_tops"] = flops / t_c / 1e9
            except Exception as exc:
                out[f"C_gemm_gluon_{tag}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    except Exception as exc:
        out["C_core_int32_gluon_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    return out


def variant_tag(structure: str, rank: int, fmt: str, wmode: str, suffix: str) -> str:
    return f"{'A' if fmt == 'exact' else 'C'}_{structure}_r{rank}" + ("_w8" if wmode == "int8" else "") + suffix


def variant_list(extra_variants: bool = True) -> list[tuple]:
    """(structure, rank, format, weight mode, environment of the kernel choices, tag suffix) per column."""
    simd_on = {"DIROTQ_SIMD_UNPACK": "1"}
    variants = [(s, r, f, "packed", simd_on, "") for s, r in STRUCTURES for f in FORMATS]
    if extra_variants:
        variants += [("dirotq-lr", 32, "exact", "int8", simd_on, "")]
        # pure-tl unpack (what SIMD saves)
        variants += [("dirotq-lr", 32, "int_ratio", "packed", {"DIROTQ_SIMD_UNPACK": "0"}, "_tlunpack")]
    # never measured on a GPU yet, so in the core set: the Gluon GEMM (asynchronous int8 wgmma; alone and
    # with the one-launch activation path), format C with cached int8 weights (how much of
    # the GEMM's gap to int8 speed the in-register unpack costs), the token-major GEMM (the unpacked
    # weight as wgmma's shared-memory operand) and the one-launch activation path
    # (the Gluon ones last: a CUDA fault in the experimental dialect would end every later measurement)
    variants += [("dirotq-lr", 32, "int_ratio", "int8", simd_on, ""),
                 ("dirotq-lr", 32, "int_ratio", "packed", {**simd_on, "DIROTQ_GEMM_LAYOUT": "token"}, "_tm"),
                 ("dirotq-lr", 32, "int_ratio", "packed", {**simd_on, "DIROTQ_ACT_ONE_LAUNCH": "1"}, "_1launch"),
                 ("dirotq-lr", 32, "int_ratio", "packed", {**simd_on, "DIROTQ_GEMM_LAYOUT": "gluon"}, "_gluon"),
                 ("dirotq-lr", 32, "int_ratio", "packed",
                  {**simd_on, "DIROTQ_GEMM_LAYOUT": "gluon", "DIROTQ_ACT_ONE_LAUNCH": "1"}, "_gluon_1launch"),
                 # the TMA-fed Gluon GEMM, packed and with cached int8 weights (no unpack at all)
                 ("dirotq-lr", 32, "int_ratio", "packed", {**simd_on, "DIROTQ_GEMM_LAYOUT": "tma"}, "_tma"),
                 ("dirotq-lr", 32, "int_ratio", "int8", {**simd_on, "DIROTQ_GEMM_LAYOUT": "tma"}, "_tma"),
                 # and its warp-specialized form (packed weights)
                 ("dirotq-lr", 32, "int_ratio", "packed", {**simd_on, "DIROTQ_GEMM_LAYOUT": "ws"}, "_ws")]
    return variants


def run_shape(model: str, name: str, d: int, o: int, n: int, dry: bool, extra_variants: bool = True,
              only: set[str] | None = None, tma: bool = True, first_gluon: bool = True) -> dict:
    from dirotq import kernels
    from dirotq.kernels.act_quant import quantize_activations
    from dirotq.kernels.layout import get_plan
    from dirotq.kernels.w4a4_gemm import w4a4_gemm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(n * 7 + d + o)
    xs = [torch.randn(n, d, generator=gen).to(dev, dt) for _ in range(4)]
    w = (torch.randn(o, d, generator=gen) / d**0.5).to(dev)
    bias = torch.randn(o, generator=gen).to(dev) * 0.1
    wb = w.to(dt)
    flops = 2.0 * n * d * o
    it = {"i": 0}

    def nxt():
        it["i"] = (it["i"] + 1) % len(xs)
        return xs[it["i"]]

    row: dict = {"model": model, "layer": name, "d_in": d, "d_out": o, "tokens": n}
    ms = bench(lambda: torch.nn.functional.linear(nxt(), wb, bias.to(dt)))
    row["bf16_ms"] = ms
    row["bf16_graph_ms"] = bench_graph(lambda: torch.nn.functional.linear(nxt(), wb, bias.to(dt)))
    row["bf16_tflops"] = flops / ms / 1e9

    if dev == "cuda":  # FP8 per-row baseline
        try:
            w_amax = w.abs().amax(1, keepdim=True).clamp(min=1e-12)
            w_scale = (w_amax / 448.0).float()
            w8 = (w / w_scale).to(torch.float8_e4m3fn)
            w8t, ws_t = w8.T, w_scale.T.contiguous()  # (d, o) column-major, (1, o)

            def fp8_quant(x):
                s = (x.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / 448.0)
                return (x.float() / s).to(torch.float8_e4m3fn), s

            x8, s8 = fp8_quant(xs[0])
            row["fp8_gemm_ms"] = bench(lambda: torch._scaled_mm(x8, w8t, scale_a=s8, scale_b=ws_t, bias=bias.to(dt),
                                                               out_dtype=dt))

            def fp8_total():
                xq, s = fp8_quant(nxt())
                return torch._scaled_mm(xq, w8t, scale_a=s, scale_b=ws_t, bias=bias.to(dt), out_dtype=dt)

            row["fp8_total_ms"] = bench(fp8_total)
            row["fp8_total_graph_ms"] = bench_graph(fp8_total)
        except Exception as exc:
            row["fp8_error"] = f"{type(exc).__name__}: {exc}"

    variants = variant_list(extra_variants)
    if only:
        variants = [v for v in variants if variant_tag(v[0], v[1], v[2], v[3], v[5]) in only]
    for structure, rank, fmt, wmode, env, suffix in variants:
        tag = variant_tag(structure, rank, fmt, wmode, suffix)
        kernel_env = {"DIROTQ_SIMD_UNPACK": "1", "DIROTQ_GEMM_LAYOUT": "swap", "DIROTQ_ACT_ONE_LAUNCH": "0", **env}
        with environment_variables(kernel_env):
            try:
                m = make_quant_linear(w, bias, structure, fmt, rank)
                m.kernel_weights = wmode
                plan = get_plan(m, xs[0])
                act = quantize_activations(m, plan, xs[0])
                # compile/autotune + correctness on up to 256 tokens (≥ 128: the token-major GEMM runs too)
                check = xs[0][: max(64, min(n, 256))]
                y = kernels.kernel_forward(m, check)
                ref = m.reference_forward(check.float())
                row[f"{tag}_max_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
                row[f"{tag}_act_quant_ms"] = t_a = bench(lambda: quantize_activations(m, plan, nxt()))
                row[f"{tag}_gemm_ms"] = t_g = bench(lambda: w4a4_gemm(m, plan, act, dt))
                row[f"{tag}_total_ms"] = t = bench(lambda: kernels.kernel_forward(m, nxt()))
                row[f"{tag}_total_graph_ms"] = bench_graph(lambda: kernels.kernel_forward(m, nxt()))
                if tag == "C_dirotq-lr_r32":  # an MLP up-projection's GELU: in the epilogue, or a pass after
                    gelu = ("gelu_tanh", 0, o)
                    row["C_gemm_gelu_epilogue_ms"] = bench(lambda: w4a4_gemm(m, plan, act, dt, activation=gelu))
                    row["C_gemm_then_gelu_ms"] = bench(
                        lambda: torch.nn.functional.gelu(w4a4_gemm(m, plan, act, dt), approximate="tanh"))
                if tag == "C_dirotq-lr_r32" and dev == "cuda":
                    row.update(gluon_core_row(m, plan, act, flops, dt, first_gluon=first_gluon))
                    if tma:
                        row.update(tma_rows(m, plan, act, flops, dt, "C"))
                        row.update(tma_rows(m, plan, act, flops, dt, "C", kind="ws"))
                if tag == "C_dirotq-lr_r32_w8" and dev == "cuda" and tma:
                    row.update(tma_rows(m, plan, act, flops, dt, "C_w8"))
                row[f"{tag}_gemm_tops"] = flops / t_g / 1e9
                row[f"{tag}_total_tops"] = flops / t / 1e9
                w_bytes = m.weight_packed.numel() + m.weight_scale.numel() * 2 + (
                    m.weight_ratio.numel() if getattr(m, "weight_ratio", None) is not None else 0)
                a_bytes = n * d * xs[0].element_size()
                code_bytes = act["codes"].numel() + act["scale"].numel() * 4
                y_bytes = n * o * xs[0].element_size()
                lr_bytes = (rank * (d + o) * 2 + n * rank * 2 * 2) if rank else 0
                row[f"{tag}_act_quant_gbps"] = (a_bytes + code_bytes + (n * rank * 2)) / t_a / 1e6
                row[f"{tag}_gemm_gbps"] = (w_bytes + code_bytes + y_bytes + lr_bytes) / t_g / 1e6
                row[f"{tag}_speedup_vs_bf16"] = row["bf16_ms"] / t
                if row.get("bf16_graph_ms") and row.get(f"{tag}_total_graph_ms"):
                    row[f"{tag}_graph_speedup_vs_bf16"] = row["bf16_graph_ms"] / row[f"{tag}_total_graph_ms"]
                row[f"{tag}_split"] = {"act_quant": round(t_a / t, 3), "gemm": round(t_g / t, 3),
                                       "other(launch,alloc)": round(max(0.0, 1 - (t_a + t_g) / t), 3)}
                m = act = None  # the layer and its codes freed before the next variant
            except Exception as exc:
                row[f"{tag}_error"] = f"{type(exc).__name__}: {exc}"
                print(f"  {tag}: {row[f'{tag}_error']}")
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 1024, 4096])
    ap.add_argument("--models", nargs="+", default=["pixart-sigma", "flux"])
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes, no timing meaning")
    ap.add_argument("--core", action="store_true",
                    help="only the main variants (formats A/C × rtn, dirotq-lr r32) and three format C questions (cached "
                         "int8 weights, the token-major GEMM, the one-launch activation path): no format A _w8, "
                         "no _tlunpack")
    ap.add_argument("--variants", nargs="+", default=None, metavar="TAG",
                    help="only these variant columns, e.g. C_dirotq-lr_r32 (which also times the Gluon GEMM against "
                         "the Triton one) C_dirotq-lr_r32_gluon C_dirotq-lr_r32_tm")
    ap.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                    help="only these layer names of --models, in this order ('ff up' or ff_up: '_' for ' ')")
    ap.add_argument("--no-tma", action="store_true", help="leave the TMA-fed Gluon GEMMs' rows out")
    ap.add_argument("--no-first-gluon", action="store_true",
                    help="leave out the first Gluon GEMM's per-config rows (timed on the H200 on 2026-11-28)")
    ap.add_argument("--no-own-ceiling", action="store_true",
                    help="skip our own int8 ceiling (the TMA Gluon core on cached int8 weights at 8192³)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new shapes after this many seconds (the JSON says which rows ran)")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("bench_linear.py needs a CUDA GPU (or --dry-run to check the code path on CPU)")
    env = environment()
    res = {"benchmark": "bench_linear", "environment": env, "dry_run": dry,
           "notes": "bf16 activations; medians of triton.testing.do_bench over 4 rotated inputs; "
                    "*_graph: 8 calls in one CUDA graph; formats A=exact, C=int_ratio"}
    t0 = time.time()
    res["ceilings_measured"] = {} if dry else measure_ceilings()
    if not dry and not args.no_own_ceiling:
        try:
            res["ceilings_measured"].update(own_int8_ceiling())
            torch.cuda.empty_cache()
        except Exception as exc:  # the experimental dialect must not cost the rows
            res["ceilings_measured"]["int8_own_tma_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    res["int8_peak_spec_tops"] = spec_int8_peak(env.get("gpu"))
    shapes = DRY_SHAPES if dry else [s for s in SHAPES if s[0] in args.models]
    known = {variant_tag(v[0], v[1], v[2], v[3], v[5]) for v in variant_list(True)}
    if args.variants and set(args.variants) - known:
        sys.exit(f"--variants: no {sorted(set(args.variants) - known)} among {sorted(known)}")
    if args.layers and not dry:
        def names(shape) -> set[str]:
            return {shape[1], shape[1].replace(" ", "_")}

        unknown = [x for x in args.layers if not any(x in names(s) for s in shapes)]
        if unknown:
            sys.exit(f"--layers: no {unknown} among {sorted({s[1] for s in shapes})}")
        shapes = [s for x in args.layers for s in shapes if x in names(s)]
    tokens = [5, 16] if dry else args.tokens
    rows = []
    res["rows"] = rows
    gpu = (env.get("gpu") or "cpu-dry-run").replace(" ", "_")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_linear_{gpu}.json"
    if dry and not args.out:
        out = Path("/tmp") / "bench_linear_dry_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # token counts outermost: a run cut short by --budget-s still covers every shape at the first counts
    work = [(n, shape) for n in tokens for shape in shapes]
    res["stopped_early"] = False
    for n, (model, name, d, o) in work:
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            res["stopped_early"] = True
            print(f"--budget-s {args.budget_s} reached: stopping before {model} {name} n={n}", flush=True)
            break
        print(f"{model} {name} {d}->{o} n={n}", flush=True)
        row = run_shape(model, name, d, o, n, dry, extra_variants=not args.core,
                        only=set(args.variants) if args.variants else None, tma=not args.no_tma,
                        first_gluon=not args.no_first_gluon)
        ceiling = res["ceilings_measured"].get("int8_int_mm_8192_tops")
        bw = res["ceilings_measured"].get("copy_gbps")
        bf16_peak = res["ceilings_measured"].get("bf16_matmul_8192_tflops")
        flops = 2.0 * n * d * o
        min_bytes = n * d * 2 + o * d * 0.53 + n * o * 2  # bf16 x in, ~4.25-bit weights, bf16 y out
        if isinstance(ceiling, float):
            row["floor_int8_ms"] = flops / ceiling / 1e9
        if isinstance(bf16_peak, float):
            row["floor_bf16_ms"] = flops / bf16_peak / 1e9
        if isinstance(bw, float):
            row["floor_memory_w4_ms"] = min_bytes / bw / 1e6
            row["floor_memory_bf16_ms"] = (n * d * 2 + o * d * 2 + n * o * 2) / bw / 1e6
        for k in list(row):
            if k.endswith("_tops") and isinstance(ceiling, float):
                row[k.replace("_tops", "_pct_int8_ceiling")] = round(100 * row[k] / ceiling, 1)
        rows.append(row)
        brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k.endswith(("_ms", "speedup_vs_bf16", "_err")) or k.endswith("error")}
        print("  " + json.dumps(brief), flush=True)
        res["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1))  # after every row: a killed run keeps what it measured
    res["seconds"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
