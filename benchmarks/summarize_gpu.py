"""Markdown tables from bench_linear / bench_e2e JSON files (what benchmarks/README.md quotes).

    python -m benchmarks.summarize_gpu [--table=full|speed|both] benchmarks/results/gpu_h100_2026-11-26/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TAGS = ("A_rtn_r0", "C_rtn_r0", "A_dirotq-lr_r32", "C_dirotq-lr_r32")


def _f(v, digits: int = 3) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v:.{digits}f}"


def linear_table(res: dict) -> str:
    """One row per (shape, tokens): BF16 and FP8 CUDA-graph ms, then per variant the CUDA-graph total
    (ms), its speed-up over BF16 (graph), and the eager GEMM's share of the int8 ceiling."""
    head = ["layer", "d→o", "tokens", "bf16 ms", "fp8+quant ms"]
    for tag in TAGS:
        head += [f"{tag} ms", "× bf16", "GEMM % int8"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in res["rows"]:
        cells = [f"{row['model']} {row['layer']}", f"{row['d_in']}→{row['d_out']}", str(row["tokens"]),
                 _f(row.get("bf16_graph_ms"), 4), _f(row.get("fp8_total_graph_ms"), 4)]
        for tag in TAGS:
            t = row.get(f"{tag}_total_graph_ms")
            sp = row.get(f"{tag}_graph_speedup_vs_bf16")
            cells += [_f(t, 4), _f(sp, 2), _f(row.get(f"{tag}_gemm_pct_int8_ceiling"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPEED_TAGS = ("C_dirotq-lr_r32", "C_dirotq-lr_r32_gluon", "C_dirotq-lr_r32_gluon_1launch", "C_dirotq-lr_r32_tm",
              "C_dirotq-lr_r32_1launch", "C_dirotq-lr_r32_tma", "C_dirotq-lr_r32_ws", "C_dirotq-lr_r32_w8",
              "C_dirotq-lr_r32_w8_tma")
GLUON_CONFIG_TAGS = ("128x128w4n2", "128x128w4n3", "256x128w8n2", "256x128w8n2p")
TMA_CONFIG_TAGS = ("128x128w4s6u2", "128x128w4s8u3", "256x128w8s6u2")
WS_CONFIG_TAGS = ("128x128w4s4", "256x128w8s4")


def speed_table(res: dict) -> str:
    """The format C speed paths side by side: per (shape, tokens) the CUDA-graph × BF16 of FP8 and of each
    format C variant, then the GEMM alone in TOPS: Triton's int32 core, the Gluon core, the whole Gluon
    GEMM per tile config, the TMA-fed Gluon core and GEMM per config on packed and on cached int8
    weights (and the bf16 matmul's TFLOPS for scale), and the GEMM with GELU in its epilogue against the
    GEMM followed by torch's GELU."""
    short = {t: t.replace("C_dirotq-lr_r32", "C") or "C" for t in SPEED_TAGS}
    head = (["layer", "tokens", "bf16 TFLOPS", "fp8 ×"] + [f"{short[t] or 'C'} ×" for t in SPEED_TAGS]
            + ["core triton TOPS", "core gluon TOPS"] + [f"gluon {c} TOPS" for c in GLUON_CONFIG_TAGS]
            + ["core tma TOPS"] + [f"tma {c} TOPS" for c in TMA_CONFIG_TAGS]
            + ["core tma w8 TOPS"] + [f"tma w8 {c} TOPS" for c in TMA_CONFIG_TAGS]
            + ["core ws TOPS"] + [f"ws {c} TOPS" for c in WS_CONFIG_TAGS]
            + ["C GEMM, GELU in epilogue ms", "C GEMM then GELU ms"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in res["rows"]:
        bf = row.get("bf16_graph_ms")
        fp8 = bf / row["fp8_total_graph_ms"] if bf and row.get("fp8_total_graph_ms") else None
        cells = [f"{row['layer']} {row['d_in']}→{row['d_out']}", str(row["tokens"]), _f(row.get("bf16_tflops"), 0),
                 _f(fp8, 2)]
        cells += [_f(row.get(f"{t}_graph_speedup_vs_bf16"), 2) if f"{t}_error" not in row else "err"
                  for t in SPEED_TAGS]
        cells.append(_f(row.get("C_core_int32_triton_tops"), 0))
        # the Gluon GEMMs: core TOPS (≠: its int32 sums differ from Triton's), then the whole GEMM per config;
        # the TMA-fed one on packed and on cached int8 weights
        for prefix, kind, tags in (("C", "gluon", GLUON_CONFIG_TAGS), ("C", "tma", TMA_CONFIG_TAGS),
                                   ("C_w8", "tma", TMA_CONFIG_TAGS), ("C", "ws", WS_CONFIG_TAGS)):
            unequal = "" if row.get(f"{prefix}_core_int32_{kind}_equal", True) else " ≠"
            cells.append(_f(row.get(f"{prefix}_core_int32_{kind}_tops"), 0) + unequal)
            cells += [_f(row.get(f"{prefix}_gemm_{kind}_{c}_tops"), 0)
                      if f"{prefix}_gemm_{kind}_{c}_error" not in row else "err" for c in tags]
        cells += [_f(row.get("C_gemm_gelu_epilogue_ms"), 4), _f(row.get("C_gemm_then_gelu_ms"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def e2e_table(res: dict) -> str:
    lines = ["| variant | eager ms | CUDA-graph ms | graph_transformer ms | × bf16 (graph) | compiled ms | "
             "× bf16 compiled | weight GB | × bf16 memory | attention % | act. quant. % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in res["variants"].items():
        if "skipped" in e or "failed" in e:  # e.g. FP8 without torchao or an FP8 GPU: the reason, not a number
            lines.append(f"| {name} | {e.get('skipped') or e.get('failed')} |  |  |  |  |  |  |  |  |  |")
            continue
        c = e.get("compiled") or {}
        mem = e.get("memory", {}).get("bytes")
        share = (e.get("breakdown") or {}).get("share", {})  # of the eager step's GPU kernel time
        pct = {k: _f(100 * v, 1) if k in share else "–" for k, v in
               (("attention", share.get("attention", 0)), ("activation quantization", share.get("activation quantization", 0)))}
        lines.append(f"| {name} | {_f(e.get('eager_ms'), 1)} | {_f(e.get('cuda_graph_ms'), 1)} | "
                     f"{_f(e.get('graph_wrapper_ms'), 1) if 'graph_wrapper_ms' in e else '–'} | "
                     f"{_f(e.get('graph_speedup_vs_bf16'), 3)} | {_f(c.get('eager_ms'), 1) if 'eager_ms' in c else c.get('failed', '–')} | "
                     f"{_f(e.get('compiled_speedup_vs_bf16_compiled'), 3)} | {_f(mem / 1e9 if mem else None, 2)} | "
                     f"{_f(e.get('memory_ratio_vs_bf16'), 3)} | {pct['attention']} | {pct['activation quantization']} |")
    return "\n".join(lines)


def main(paths: list[str], table: str = "both") -> None:
    """``table``: which bench_linear tables to print: full (every main variant), speed (format C's speed
    paths and the GEMM cores), both."""
    for p in paths:
        res = json.loads(Path(p).read_text())
        env = res.get("environment", {})
        print(f"### {Path(p).name}\n")
        print(f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date')}"
              + (f"; ceilings {res['ceilings_measured']}" if res.get("ceilings_measured") else "")
              + (f"; setup {res['setup']}" if res.get("setup") else "") + "\n")
        if res.get("benchmark") == "bench_linear":
            if table in ("full", "both"):
                print(linear_table(res) + "\n")
            if table in ("speed", "both"):
                print(speed_table(res))
        elif res.get("benchmark") == "bench_e2e":
            base = res["variants"].get("bf16")
            for e in res["variants"].values():  # a run killed before its end has no ratios yet
                if base and e is not base and "memory" in e and "memory" in base:
                    if e.get("cuda_graph_ms") and base.get("cuda_graph_ms"):
                        e.setdefault("graph_speedup_vs_bf16", base["cuda_graph_ms"] / e["cuda_graph_ms"])
                    e.setdefault("memory_ratio_vs_bf16", e["memory"]["bytes"] / base["memory"]["bytes"])
            print(e2e_table(res))
        print()


if __name__ == "__main__":
    args = sys.argv[1:]
    which = "both"
    if args[:1] and args[0].startswith("--table="):
        which = args.pop(0).split("=", 1)[1]
        if which not in ("full", "speed", "both"):
            sys.exit("--table= must be full, speed or both")
    main(args, which)
