"""Host time of one quantized layer call with every Triton launch replaced by a no-op (issue #18).

The eager W4A4 PixArt-Σ step on the H200 took 171 ms for 48 ms of GPU kernels (2026-11-28, run 3):
host-bound. This measures the part of a layer call that is our own Python (plan lookup, buffers,
argument lists, grids, the c GEMM's dispatch) on the CPU, under ``TRITON_INTERPRET=1`` with the
interpreter's launch stubbed, at one token (so the c GEMM's CPU arithmetic is negligible).
Triton's own GPU launcher (argument binding, about 20-40 µs per launch on a GPU host) is not in it.

    python -m benchmarks.bench_host_overhead --out benchmarks/results/host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from benchmarks._bench_common import environment, make_quant_linear  # noqa: E402

# (name, d, o, act_bits): PixArt-Σ's and FLUX's widths, a W4A4 and a W4A16 layer
LAYERS = [("pixart attn (W4A4)", 1152, 3456, 4), ("pixart ff.net.2 (W4A16)", 4608, 1152, None),
          ("flux attn (W4A4)", 3072, 9216, 4)]


class _StubbedLaunches:
    """Every interpreted kernel launch a no-op that counts itself."""

    def __init__(self) -> None:
        self.count = 0
        self._saved = InterpretedFunction.__getitem__

    def __enter__(self) -> _StubbedLaunches:
        def getitem(fn, grid):
            def launch(*args, **kwargs):
                self.count += 1
            return launch

        InterpretedFunction.__getitem__ = getitem
        return self

    def __exit__(self, *exc) -> None:
        InterpretedFunction.__getitem__ = self._saved


def time_layer(name: str, d: int, o: int, act_bits: int | None, calls: int) -> dict:
    from dirotq.kernels import kernel_forward

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(o, d, generator=gen) / d**0.5
    m = make_quant_linear(w, torch.zeros(o), "dirotq-lr" if act_bits else "rtn", "int_ratio",
                          32 if act_bits else 0, act_bits=act_bits).to(torch.bfloat16)
    x = torch.randn(1, d).bfloat16()
    with _StubbedLaunches() as launches:
        for _ in range(5):  # plan built, caches warm
            kernel_forward(m, x)
        launches.count = 0
        t0 = time.perf_counter()
        for _ in range(calls):
            kernel_forward(m, x)
        us = (time.perf_counter() - t0) / calls * 1e6
        per_call = launches.count / calls
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            kernel_forward(m, x)
        prof.disable()
    stats = pstats.Stats(prof).stats
    top = sorted(((v[2] / 200 * 1e6, f"{k[0].split('/')[-1]}:{k[1]}({k[2]})") for k, v in stats.items()),
                 reverse=True)[:8]
    return {"layer": name, "d": d, "o": o, "act_bits": act_bits, "host_us_per_call": round(us, 1),
            "launches_per_call": per_call,
            "top_self_us_per_call_profiled": {k: round(v, 1) for v, k in top}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # fixed configs (the interpreter cannot autotune): the autotuner's dispatch is Triton's, like its launcher
    os.environ["DIROTQ_NO_AUTOTUNE"] = "1"
    res = {"benchmark": "bench_host_overhead", "environment": environment(), "tokens": 1,
           "rows": [time_layer(*spec, calls=args.calls) for spec in LAYERS]}
    for r in res["rows"]:
        print(f"{r['layer']}: {r['host_us_per_call']} µs per call, {r['launches_per_call']} launches")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
