"""Host time of one quantized layer call (issue #18).

The eager W4A4 PixArt-Σ step on the H200 took 171 ms for 48 ms of GPU kernels (2026-11-28, run 3):
host-bound. Two modes:

- CPU (default): the part of a layer call that is our own Python (plan lookup, buffers, argument
  lists, grids, the c GEMM's dispatch), under ``TRITON_INTERPRET=1`` with the interpreter's launch
  stubbed, at one token (the c GEMM's CPU arithmetic negligible). Triton's GPU launcher is not in it.
- ``--device cuda``: the whole host path with the real kernels and launchers (autotuned as in
  production), at one token, where each kernel runs for a few µs: the wall time of a loop of calls,
  synchronized once at the end, is the host's time per call; and the same loop with the kernels'
  own Python stubbed is not possible there, so the table also gives the CPU split of one call from
  the profiler (torch ops vs the rest).

    python -m benchmarks.bench_host_overhead --out benchmarks/results/host_overhead_cpu.json
    python -m benchmarks.bench_host_overhead --device cuda --out $OUT/host_overhead_gpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time

if not any(a in ("cuda", "--device=cuda") for a in sys.argv[1:]):
    os.environ["TRITON_INTERPRET"] = "1"  # CPU mode; before triton is imported

import torch  # noqa: E402

from benchmarks._bench_common import environment, make_quant_linear  # noqa: E402

TRIALS = 5
# (name, d, o, act_bits): PixArt-Σ's and FLUX's widths, a W4A4 and a W4A16 layer
LAYERS = [("pixart attn (W4A4)", 1152, 3456, 4), ("pixart ff.net.2 (W4A16)", 4608, 1152, None),
          ("flux attn (W4A4)", 3072, 9216, 4)]


class _StubbedLaunches:
    """Every interpreted kernel launch a no-op that counts itself (CPU mode)."""

    def __init__(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self.count = 0
        self._cls = InterpretedFunction
        self._saved = InterpretedFunction.__getitem__

    def __enter__(self) -> _StubbedLaunches:
        def getitem(fn, grid):
            def launch(*args, **kwargs):
                self.count += 1
            return launch

        self._cls.__getitem__ = getitem
        return self

    def __exit__(self, *exc) -> None:
        self._cls.__getitem__ = self._saved


def _profile_top(call, reps: int) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        call()
    prof.disable()
    stats = pstats.Stats(prof).stats
    top = sorted(((v[2] / reps * 1e6, f"{k[0].split('/')[-1]}:{k[1]}({k[2]})") for k, v in stats.items()),
                 reverse=True)[:8]
    return {k: round(v, 1) for v, k in top}


def time_layer(name: str, d: int, o: int, act_bits: int | None, calls: int, device: str) -> dict:
    from dirotq.kernels import kernel_forward

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(o, d, generator=gen) / d**0.5
    m = make_quant_linear(w, torch.zeros(o), "dirotq-lr" if act_bits else "rtn", "int_ratio",
                          32 if act_bits else 0, act_bits=act_bits).to(device, torch.bfloat16)
    x = torch.randn(1, d).to(device, torch.bfloat16)
    row = {"layer": name, "d": d, "o": o, "act_bits": act_bits, "device": device}
    if device == "cpu":
        with _StubbedLaunches() as launches:
            for _ in range(5):  # plan built, caches warm
                kernel_forward(m, x)
            launches.count = 0
            trials = []
            for _ in range(TRIALS):  # a shared 2-core host: the median of five trials, and their spread
                t0 = time.perf_counter()
                for _ in range(calls // TRIALS):
                    kernel_forward(m, x)
                trials.append((time.perf_counter() - t0) / (calls // TRIALS) * 1e6)
            row["host_us_per_call"] = round(statistics.median(trials), 1)
            row["host_us_trials"] = [round(t, 1) for t in trials]
            row["launches_per_call"] = launches.count / (TRIALS * (calls // TRIALS))
            row["top_cum_us_per_call_profiled"] = _profile_top(lambda: kernel_forward(m, x), 200)
        return row
    for _ in range(5):  # compile, autotune, plan
        kernel_forward(m, x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        kernel_forward(m, x)
    enqueue = time.perf_counter() - t0
    torch.cuda.synchronize()
    row["host_us_per_call"] = round(enqueue / calls * 1e6, 1)  # time to enqueue: the host's share
    row["wall_us_per_call"] = round((time.perf_counter() - t0) / calls * 1e6, 1)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            kernel_forward(m, x)
        torch.cuda.synchronize()
    events = prof.key_averages()
    row["gpu_kernels_us_per_call"] = round(sum(e.self_device_time_total for e in events) / 20, 1)
    row["torch_ops_per_call"] = sum(e.count for e in events if e.key.startswith("aten::")) / 20
    row["top_cum_us_per_call_profiled"] = _profile_top(lambda: kernel_forward(m, x), 200)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU")
    if args.device == "cpu":
        torch.set_num_threads(1)
        # fixed configs (the interpreter cannot autotune): the autotuner's dispatch is Triton's, like its launcher
        os.environ["DIROTQ_NO_AUTOTUNE"] = "1"
    res = {"benchmark": "bench_host_overhead", "environment": environment(), "tokens": 1,
           "rows": [time_layer(*spec, calls=args.calls, device=args.device) for spec in LAYERS]}
    for r in res["rows"]:
        extra = f", wall {r['wall_us_per_call']} µs" if "wall_us_per_call" in r else ""
        print(f"{r['layer']}: host {r['host_us_per_call']} µs per call{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
