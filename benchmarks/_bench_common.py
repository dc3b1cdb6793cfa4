"""Shared helpers for the benchmarks: environment record, ceilings, timing, layer builders, and the
command-line options of the image studies on the embedded model."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

@contextlib.contextmanager
def environment_variables(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block, then restore what was there (kernel choices
    such as ``DIROTQ_GEMM_LAYOUT`` read per call)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def add_image_study_args(ap, work: str = "out/rank_plans") -> None:
    """The options every image study shares (bench_rank_plans, bench_cross_kv): model, evaluation
    items disjoint from the calibration prompts, steps, threads and the image/statistics cache."""
    ap.add_argument("--model", default=None, help="diffusers folder (default: the embedded tiny PixArt-Σ)")
    ap.add_argument("--limit", type=int, default=40, help="evaluation prompts")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per evaluation prompt")
    ap.add_argument("--seed", type=int, default=5000, help="base seed of the evaluation items")
    ap.add_argument("--calib-limit", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=work, help="image and statistics cache")


INT8_PEAK_SPEC_TOPS = {"H100": 1979.0, "H200": 1979.0, "A100": 624.0, "4090": 660.0}


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        env["triton"] = None
    env["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        q = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,driver_version,memory.total"
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            env["nvidia_smi"] = dict(zip(q.split(","), [s.strip() for s in out[0].split(",")])) if out else None
        except Exception as exc:  # pragma: no cover
            env["nvidia_smi"] = f"unavailable: {exc}"
    else:
        env["gpu"] = None
    return env


def spec_int8_peak(name: str | None) -> float | None:
    for k, v in INT8_PEAK_SPEC_TOPS.items():
        if name and k in name:
            return v
    return None


def bench(fn, rep_ms: int = 100, warmup_ms: int = 25) -> float:
    """Median milliseconds: ``triton.testing.do_bench`` on CUDA; one perf_counter run otherwise
    (the CPU dry run only checks the code path)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_graph(fn, calls: int = 8, replays: int = 10) -> float | None:
    """Median milliseconds per call with ``calls`` calls captured in one CUDA graph (no launch
    overhead: the GPU time of the work itself). None without CUDA or when capture fails."""
    if not torch.cuda.is_available():
        return None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        times = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / calls)
        times.sort()
        return float(times[len(times) // 2])
    except Exception as exc:  # pragma: no cover - recorded by the caller
        print(f"  (cuda graph timing failed: {type(exc).__name__}: {exc})")
        return None


def measure_ceilings() -> dict:
    """Measured INT8 (torch._int_mm), BF16 and FP8 GEMM rates at 8192³ and device copy bandwidth."""
    if not torch.cuda.is_available():
        return {}
    out: dict = {}
    n = 8192
    a8 = torch.randint(-100, 100, (n, n), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-100, 100, (n, n), dtype=torch.int8, device="cuda").T  # column-major second operand
    try:
        ms = bench(lambda: torch._int_mm(a8, b8), rep_ms=300)
        out["int8_int_mm_8192_tops"] = round(2 * n**3 / ms / 1e9, 1)
    except Exception as exc:
        out["int8_int_mm_8192_tops"] = f"failed: {exc}"
    ab = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    bb = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = bench(lambda: ab @ bb, rep_ms=300)
    out["bf16_matmul_8192_tflops"] = round(2 * n**3 / ms / 1e9, 1)
    try:
        af = ab.to(torch.float8_e4m3fn)
        bf = bb.to(torch.float8_e4m3fn).T
        one = torch.ones((), device="cuda")
        ms = bench(lambda: torch._scaled_mm(af, bf, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), rep_ms=300)
        out["fp8_scaled_mm_8192_tflops"] = round(2 * n**3 / ms / 1e9, 1)
    except Exception as exc:
        out["fp8_scaled_mm_8192_tflops"] = f"failed: {exc}"
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep_ms=200)
    out["copy_gbps"] = round(2 * src.numel() * 4 / ms / 1e6, 1)
    del a8, b8, ab, bb, src, dst
    torch.cuda.empty_cache()
    return out


def make_quant_linear(w: torch.Tensor, bias: torch.Tensor | None, structure: str, fmt: str, rank: int,
                      act_bits: int | None = 4, seed: int = 0, weight_bits: int = 4, dtype: torch.dtype | None = None):
    """A QuantLinear of ``structure`` from the float weight ``w (o, d)`` on its device, built with the
    same math as the methods (dirotq-lr: orthonormal V_r, W_res = W(I − V V ᵀ), block Hadamard;
    rtn: plain RTN) but with a random orthonormal basis: speed does not depend on the basis values,
    and random-weight models have no calibration statistics to take a PCA of. ``dtype``: of its
    16-bit tensors (default bf16 on a GPU, float32 on the CPU)."""
    from dirotq.bases import hadamard
    from dirotq.modules import QuantLinear
    from dirotq.quantizers import quantize

    o, d = w.shape
    dev = w.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    wf = w.float()
    fields: dict = {}
    if structure == "rtn" or act_bits is None:
        wq = wf
    elif structure == "dirotq-lr":
        if d % 64:
            raise ValueError("dirotq-lr needs d % 64 == 0")
        signs = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).float().to(dev)
        res = wf
        if rank:
            v, _ = torch.linalg.qr(torch.randn(d, rank, generator=g).to(dev))
            fields.update(down=v.contiguous(), up=wf @ v, project_out=True)
            res = wf - (wf @ v) @ v.T
        h = hadamard(64, torch.float32).to(dev)
        wq = ((res * signs).reshape(o, d // 64, 64) @ h).reshape(o, d)
        fields["hadamard_signs"] = signs
    else:
        raise ValueError(structure)
    q = quantize(wq, weight_bits, 64, True, fmt)
    m = QuantLinear(d, o, method=structure, weight=q, act_bits=act_bits, scale_format=fmt, bias=bias,
                    dtype=dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32), **fields)
    return m.to(dev)
