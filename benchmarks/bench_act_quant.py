"""Where the activation kernel's time goes (issue #18 item 2): format C's passes, tile configs, stages.

The W4A4 layer's activation side (c = x·V_r on cuBLAS, residual, block Hadamard, format C scales and
codes) measured on the H200 on 2026-11-28 at 4096 tokens took 0.19 ms for d = 3072 and 0.55 ms for
d = 12288: 10-20× its memory floor (read x twice, write the codes), as long as the W4A4 GEMM at
d = 12288. This script times, per FLUX width and 4096 tokens (bf16, DiRotQ-LR r32 unless said):

- ``production``: ``quantize_activations`` as the layer runs it (autotuned), and ``copy``: a
  ``torch.clone`` of x (the memory floor's unit: read + write of 2 bytes per element);
- per tile config (BT tokens × warps, and BT = 128 once more with a cap of 128 registers, which fits
  two programs per SM): format C's two launches, PASS 0 (transform, group abs-max) and PASS 1
  (transform again, row scale, two candidate multipliers, codes) apart;
- both passes with PREFETCH (group g + 1's x tile loaded before group g's work: the same codes)
  at the best config;
- stage ablations of PASS 1 at the best config (wrong codes, honest time): no Hadamard, no
  projection, neither; format C's multiplier rules: revision 4's comparison of the two candidates'
  fixed-point squared errors (what revision 5's choice from the spread saves; asymmetric codes keep
  it), revision 3's float64 one, and k₀ alone; format A's single pass (one division per element,
  no float64);
- the cuBLAS c GEMM alone.

Timing: ``triton.testing.do_bench`` medians, x rotated over 4 tensors (no L2 reuse between calls).
The H200 run of 2026-11-28 measured ``production`` 2-3× above ``bench_linear``'s time for the same
call (autotuned inside the timed function then); it now autotunes before timing and records the
configs the autotuner chose (``autotuned``).
JSON after every shape (``--out``), a Markdown table at the end.

    python -m benchmarks.bench_act_quant --out benchmarks/results/act_quant_<gpu>.json
    python -m benchmarks.bench_act_quant --dry-run     # CPU interpreter, tiny shape: code path only
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
import triton  # noqa: E402

from benchmarks._bench_common import bench, environment, make_quant_linear  # noqa: E402

WIDTHS = [("flux ff up / attn (d=3072)", 3072, 3072), ("flux ff down (d=12288)", 12288, 3072),
          ("flux single proj_out (d=15360)", 15360, 3072)]
# (BT, num_warps, register cap or None): the cap of 128 fits two 8-warp programs per SM
CONFIGS = [(16, 4, None), (32, 4, None), (64, 4, None), (64, 8, None), (128, 4, None), (128, 8, None), (128, 8, 128),
           (256, 8, None)]


def time_shape(name: str, d: int, o: int, n: int, dry: bool, configs: list[tuple[int, int, int | None]]) -> dict:
    from dirotq.kernels.act_quant import act_quant_kernel, activation_launch, quantize_activations
    from dirotq.kernels.layout import get_plan

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(d + n)
    xs = [torch.randn(n, d, generator=gen).to(dev, dt) for _ in range(1 if dry else 4)]
    w = (torch.randn(o, d, generator=gen) / d**0.5).to(dev)
    it = {"i": 0}

    def nxt():
        it["i"] = (it["i"] + 1) % len(xs)
        return xs[it["i"]]

    row: dict = {"layer": name, "d": d, "tokens": n}
    row["copy_ms"] = bench(lambda: nxt().clone())
    m = make_quant_linear(w, None, "dirotq-lr", "int_ratio", 32)
    plan = get_plan(m, xs[0])
    quantize_activations(m, plan, xs[0])  # autotune outside the timing, as bench_linear does
    row["production_ms"] = bench(lambda: quantize_activations(m, plan, nxt()))
    from dirotq.kernels.act_quant import _tuned_act_kernel

    # what the autotuner chose per key (token bucket, widths, pass...): the production column's tiles
    row["autotuned"] = {str(k): str(v) for k, v in getattr(_tuned_act_kernel(), "cache", {}).items()}
    down = m.down.to(dt)
    row["c_gemm_ms"] = bench(lambda: nxt() @ down)
    # one set of buffers per input, so the launches below only time the kernel
    launches = [activation_launch(m, plan, x) for x in xs]

    def run(bt: int, warps: int, maxnreg: int | None, passes, **overrides):
        la = launches[it["i"]]
        it["i"] = (it["i"] + 1) % len(launches)
        meta = {**la["meta"], **overrides}
        cap = {"maxnreg": maxnreg} if maxnreg else {}
        for p in passes:
            act_quant_kernel[(triton.cdiv(n, bt), la["g_blocks"])](*la["args"], BT=bt, PASS=p, **meta,
                                                                   num_warps=warps, enable_fp_fusion=False, **cap)

    for _ in launches:  # real group abs-maxes for PASS 1 to read (not uninitialised memory)
        run(*configs[0], (0,))
    best = None
    for bt, warps, cap in configs:
        tag = f"bt{bt}w{warps}" + (f"r{cap}" if cap else "")
        try:
            row[f"{tag}_pass0_ms"] = t0 = bench(lambda: run(bt, warps, cap, (0,)))
            row[f"{tag}_pass1_ms"] = t1 = bench(lambda: run(bt, warps, cap, (1,)))
            if best is None or t0 + t1 < best[0]:
                best = (t0 + t1, bt, warps, cap, tag)
        except Exception as exc:  # a config that does not fit (registers, shared memory) is a result
            row[f"{tag}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if best is None:
        return row
    _, bt, warps, cap, row["best_config"] = best
    ablations = {"no_hadamard": dict(HAS_HAD=False), "no_projection": dict(PROJ=False),
                 "no_hadamard_no_projection": dict(HAS_HAD=False, PROJ=False),
                 "sse_rule": dict(K_RULE=1), "float64_rule": dict(K_RULE=2), "one_candidate": dict(K_RULE=3)}
    for tag, ov in ablations.items():
        row[f"pass1_{tag}_ms"] = bench(lambda: run(bt, warps, cap, (1,), **ov))
    # the next group's x tile loaded before this group's work (same codes; an autotuning choice)
    row["pass0_prefetch_ms"] = bench(lambda: run(bt, warps, cap, (0,), PREFETCH=True))
    row["pass1_prefetch_ms"] = bench(lambda: run(bt, warps, cap, (1,), PREFETCH=True))
    row["format_a_pass_ms"] = bench(lambda: run(bt, warps, cap, (0,), FMT_C=False))
    row["format_a_pass_no_transform_ms"] = bench(lambda: run(bt, warps, cap, (0,), FMT_C=False, HAS_HAD=False,
                                                             PROJ=False))
    return row


def table(rows: list[dict]) -> str:
    head = ["layer", "copy", "production", "c GEMM", "best config", "pass 0", "pass 1", "pass 0 / 1 prefetch",
            "pass 1, rev. 4 rule", "pass 1, rev. 3 rule", "pass 1, k₀ only",
            "pass 1 −H", "pass 1 −P", "pass 1 −H−P", "format A", "format A −H−P"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r.get("best_config", "")

        def f(k):
            v = r.get(k)
            return f"{v * 1e3:.0f} µs" if isinstance(v, float) else "—"

        lines.append("| " + " | ".join([r["layer"], f("copy_ms"), f("production_ms"), f("c_gemm_ms"), b,
                                        f(f"{b}_pass0_ms"), f(f"{b}_pass1_ms"),
                                        f("pass0_prefetch_ms") + " / " + f("pass1_prefetch_ms"),
                                        f("pass1_sse_rule_ms"), f("pass1_float64_rule_ms"),
                                        f("pass1_one_candidate_ms"),
                                        f("pass1_no_hadamard_ms"),
                                        f("pass1_no_projection_ms"), f("pass1_no_hadamard_no_projection_ms"),
                                        f("format_a_pass_ms"), f("format_a_pass_no_transform_ms")]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    widths_known = [d for _, d, _ in WIDTHS]
    ap.add_argument("--widths", type=int, nargs="+", default=widths_known, choices=widths_known,
                    help="input widths d to time (each one a FLUX layer)")
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shape, no timing meaning")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("bench_act_quant.py needs a CUDA GPU (or --dry-run to check the code path on CPU)")
    res = {"benchmark": "bench_act_quant", "environment": environment(), "dry_run": dry, "rows": []}
    out = Path(args.out) if args.out else Path("/tmp") / "bench_act_quant.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    widths = [("dry", 128, 64)] if dry else [w for w in WIDTHS if w[1] in args.widths]
    configs = [(16, 4, None)] if dry else CONFIGS
    for name, d, o in widths:
        print(name, flush=True)
        res["rows"].append(time_shape(name, d, o, 32 if dry else args.tokens, dry, configs))
        res["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1))
        print("  " + json.dumps(res["rows"][-1]), flush=True)
    print(table(res["rows"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
