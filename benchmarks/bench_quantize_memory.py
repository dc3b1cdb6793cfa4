"""Peak host memory of ``quantize_`` at FLUX widths on the CPU, and per-layer eigh / GPTQ times at
PixArt-Σ and FLUX widths (issue #19, items 2–4; docs/DESIGN.md "Memory and devices").

1. prepare (once, reused from ``--work``): a FLUX.1-dev transformer with the published widths
   (24 heads × 128, joint_attention_dim 4096, pooled 768, in_channels 64, mlp 12288, single-block
   proj_out input 15360) and reduced depth (``--double`` / ``--single`` blocks), random bf16
   weights, ``save_pretrained``; calibration statistics of the real widths from
   ``calibrate_transformer`` over 2 random forwards of 16 image + 8 text tokens per sample (tiny
   token counts: memory does not depend on them), recorded one part per block with
   ``stats.save(part_folder(...))`` and indexed by ``combine_calibration_parts`` (the distributed
   calibration's layout).
2. memory rows, each in a fresh subprocess so the peak is its own: load the model, load the
   statistics (``CalibrationStats.load``: lazy), ``quantize_`` with DiRotQ-LR rank 32 and RTN or
   GPTQ weights; peak RSS = the process's VmHWM during ``quantize_`` (reset once the model is
   loaded; interpreter, imports and model included), against the model's bf16 bytes.
3. timing rows: for one layer of each shape, full eigh, the top-32 subspace solver
   (``bases.pca_top_basis``) and ``gptq_quantize``, in float64 and float32; a row whose time,
   extrapolated from the previous width (d³), exceeds ``--limit-s`` is skipped and says so.

The JSON is rewritten after every row: ``benchmarks/results/quantize_memory_cpu.json``.

    python -m benchmarks.bench_quantize_memory                    # ~35 min on 2 cores (20 of them GPTQ)
    python -m benchmarks.bench_quantize_memory --skip-timing --double 1 --single 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quantize_memory_cpu.json"
FLUX_WIDTHS = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   in_channels=64, patch_size=1, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# (name, d_in, d_out): one layer per input width; GPTQ time grows with d_out, eigh does not see it
LAYER_SHAPES = [("pixart-sigma attn.to_q", 1152, 1152), ("pixart-sigma ff.net.2", 4608, 1152),
                ("flux attn.to_q", 3072, 3072), ("flux ff.net.2", 12288, 3072),
                ("flux single proj_out", 15360, 3072)]


# ------------------------------------------------------------------------------------------ helpers
def _status(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM, …) in GiB."""
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) / 2**20 if m else float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def environment() -> dict:
    import diffusers
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    from dirotq._version import __version__

    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": f"CPU: {cpu}",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
            "load_average": list(os.getloadavg()), "host": platform.platform(), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "dirotq": __version__}}


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)


# ------------------------------------------------------------------------------------------ prepare
def prepare(work: Path, n_double: int, n_single: int) -> dict:
    """Build (or reuse) the bf16 model and its combined statistics under ``work``; returns their facts."""
    import torch
    from diffusers import FluxTransformer2DModel

    from dirotq.calibration import calibrate_transformer, combine_calibration_parts, part_folder
    from dirotq.models import ADAPTERS

    facts_p = work / "facts.json"
    want = {"double": n_double, "single": n_single, **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in FLUX_WIDTHS.items()}}
    if facts_p.is_file():
        facts = json.loads(facts_p.read_text())
        if facts.get("config") == want:
            return facts
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cpu"):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # random init directly in bf16: no float32 copy of the model
        try:
            model = FluxTransformer2DModel(num_layers=n_double, num_single_layers=n_single, **FLUX_WIDTHS)
        finally:
            torch.set_default_dtype(default)
    model.eval()
    model.save_pretrained(work / "model")
    adapter = ADAPTERS["flux"]
    targets = adapter.targets(model)
    keys = list(dict.fromkeys(s.group for s in targets.values()))
    by_block: dict[int, list[str]] = {}
    for key in keys:
        by_block.setdefault(targets[key].block, []).append(key)
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(2):
        kw = adapter.example_inputs(model, 1, gen)
        inputs.append({k: v.to(torch.bfloat16) if v.is_floating_point() and v.ndim >= 2 and k != "img_ids"
                       and k != "txt_ids" else v for k, v in kw.items()})
    stats_dir = work / "stats"
    for part, (block, group_keys) in enumerate(sorted(by_block.items())):
        st = calibrate_transformer(model, inputs, adapter=adapter, layers=group_keys, sample_tokens=64, seed=part)
        st.save(part_folder(stats_dir, part))
        del st
    combine_calibration_parts(stats_dir)
    widths = sorted({targets[k].in_features for k in keys})
    facts = {"config": want, "params": sum(p.numel() for p in model.parameters()),
             "bf16_model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())
             + sum(b.numel() * b.element_size() for b in model.buffers()),
             "targets": len(targets), "groups": len(keys), "group_widths": widths,
             "stats_bytes_on_disk": sum(f.stat().st_size for f in stats_dir.rglob("*.safetensors")),
             "stats_parts": len(by_block), "calibration": "calibrate_transformer, 2 forwards × (16 image + 8 text) "
             "tokens, batch 1, one part per block, combined with combine_calibration_parts",
             "prepare_s": round(time.perf_counter() - t0, 1)}
    facts_p.write_text(json.dumps(facts, indent=1))
    return facts


# --------------------------------------------------------------------------------------- child run
def child_quantize(work: Path, weights: str, eigensolver: str, rank: int) -> dict:
    """Load model + statistics and quantize, in this (fresh) process; returns the measurements."""
    import torch
    from diffusers import FluxTransformer2DModel

    from dirotq import DiRotQLRConfig, quantize_
    from dirotq.calibration import CalibrationStats
    from dirotq.quantize import LinalgSettings

    row = {"rss_after_imports_gib": _status("VmRSS")}
    t0 = time.perf_counter()
    model = FluxTransformer2DModel.from_pretrained(work / "model", torch_dtype=torch.bfloat16)
    model.eval()
    with torch.no_grad():  # from_pretrained memory-maps the file: make every weight resident, as a loaded model is
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    row["load_model_s"] = round(time.perf_counter() - t0, 1)
    row["rss_after_model_gib"] = _status("VmRSS")
    row["peak_rss_model_load_gib"] = _status("VmHWM")
    row["peak_reset_after_load"] = _reset_peak()
    events: list[dict] = []
    last = {"t": time.perf_counter(), "hwm": _status("VmHWM"), "msg": "start"}

    def progress(frac: float, msg: str) -> None:
        now, hwm = time.perf_counter(), _status("VmHWM")
        events.append({"during": last["msg"], "s": round(now - last["t"], 2), "peak_rss_gib": round(hwm, 3)})
        last.update(t=now, hwm=hwm, msg=msg.replace("quantizing ", ""))

    t1 = time.perf_counter()
    stats = CalibrationStats.load(work / "stats")
    row["load_stats_s"] = round(time.perf_counter() - t1, 2)
    config = DiRotQLRConfig(rank=rank, weights=weights)
    report = quantize_(model, config, stats, progress=progress, linalg=LinalgSettings(eigensolver=eigensolver))
    row["quantize_s"] = round(time.perf_counter() - t1, 1)
    # quantize_'s own peak: VmHWM was reset to the loaded model's RSS (the load itself peaks higher,
    # because this script copies the memory-mapped weights; that peak is the row's own field)
    row["peak_rss_quantize_gib"] = _status("VmHWM")
    row["peak_rss_gib"] = (row["peak_rss_quantize_gib"] if row["peak_reset_after_load"]
                           else max(row["peak_rss_quantize_gib"], row["peak_rss_model_load_gib"]))
    row["rss_end_gib"] = _status("VmRSS")
    row["quantized_model_bytes"] = (sum(p.numel() * p.element_size() for p in model.parameters())
                                    + sum(b.numel() * b.element_size() for b in model.buffers()))
    row["groups_loaded_at_end"] = sum(stats.is_loaded(k) for k in stats.layers)
    row["rollback"] = report["rollback"]
    row["linalg"] = report["linalg"]
    row["mean_rel_mse"] = report["summary"].get("mean_rel_mse")
    # where the peak grew: the layer being quantized when VmHWM rose, and the slowest layers
    grew = [e for i, e in enumerate(events) if i and e["peak_rss_gib"] > events[i - 1]["peak_rss_gib"] + 0.05]
    row["peak_growth"] = grew[-8:]
    row["slowest_layers"] = sorted(events, key=lambda e: -e["s"])[:8]
    return row


def run_child(work: Path, weights: str, eigensolver: str, rank: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_quantize_memory", "--child", "--work", str(work),
           "--weights", weights, "--eigensolver", eigensolver, "--rank", str(rank)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------------------------ timing
SPECTRUM = ("S (I + 0.1 W / sqrt(2d)) S + B Bᵀ: W a symmetric Gaussian (dense, no structure for LAPACK to "
            "deflate), S² = diag(1/(j+1)) a power-law channel energy, B (d, 16) 16 outlier directions of eigenvalue "
            "~50: a decaying spectrum like an activation second moment's")


def _spd(d: int, dtype, seed: int = 0):
    """A dense symmetric positive definite (d, d) test Hessian with the spectrum ``SPECTRUM`` says,
    built in O(d²) (an exact eigendecomposition would cost what is being timed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(d, d, generator=g, dtype=torch.float64)
    h.add_(h.T.clone()).mul_(0.5 * 0.1 / (2 * d) ** 0.5)
    h.diagonal().add_(1.0)
    s = (1.0 / torch.arange(1, d + 1, dtype=torch.float64)).sqrt()
    h.mul_(s.unsqueeze(0)).mul_(s.unsqueeze(1))
    b = torch.randn(d, 16, generator=g, dtype=torch.float64) * (50.0 / d) ** 0.5
    h.addmm_(b, b.T)
    return h.to(dtype)


def timing_rows(limit_s: float, result: dict, out: Path) -> None:
    import torch

    from dirotq.bases import pca_top_basis
    from dirotq.gptq import gptq_quantize

    rows = result.setdefault("timing", [])
    result["timing_matrix"] = SPECTRUM
    for dtype in (torch.float64, torch.float32):
        prev: dict[str, tuple[int, int, float]] = {}
        for name, d, o in LAYER_SHAPES:
            row = {"layer": name, "d_in": d, "d_out": o, "dtype": str(dtype).replace("torch.", "")}
            h = _spd(d, dtype)
            w = torch.randn(o, d, generator=torch.Generator().manual_seed(1), dtype=dtype)
            # predicted growth: eigh d³; one subspace iteration d²; GPTQ's error propagation o·d² (its d³
            # Cholesky is a smaller share at these widths)
            for what, fn, power in (("eigh_full_s", lambda: torch.linalg.eigh(h), 3),
                                    ("eigh_top32_s", lambda: pca_top_basis(h, 32, dtype=dtype), 2),
                                    ("gptq_s", lambda: gptq_quantize(w, h, dtype=dtype), 2)):
                if what in prev:
                    d0, o0, t0 = prev[what]
                    scale = f"(d/d0)^{power}" + (" × o/o0" if what == "gptq_s" else "")
                    predicted = t0 * (d / d0) ** power * (o / o0 if what == "gptq_s" else 1.0)
                    if predicted > limit_s:
                        row[what] = None
                        row[what.replace("_s", "_skipped")] = (f"predicted {predicted:.0f} s = {t0:.1f} s at d={d0} × "
                                                                f"{scale} > {limit_s:.0f} s")
                        continue
                t = time.perf_counter()
                fn()
                row[what] = round(time.perf_counter() - t, 2)
                prev[what] = (d, o, row[what])
            h = w = None  # free before the next width is built
            rows.append(row)
            _write(out, result)
            print(json.dumps(row), flush=True)


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dirotq-quantize-memory",
                    help="model and statistics (reused when the depth matches)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1-dev: 19)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1-dev: 38)")
    ap.add_argument("--weights", default="rtn,gptq", help="comma list of rtn / gptq")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--eigensolver", default="top", choices=("eigh", "top"),
                    help="top (default): full eigh at 12288/15360 takes ~30-60 min per layer on 2 CPU cores")
    ap.add_argument("--limit-s", type=float, default=120.0, help="skip a timing row predicted to take longer")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child_quantize(args.work, args.weights, args.eigensolver, args.rank)), flush=True)
        return 0

    given = argv if argv is not None else sys.argv[1:]
    result = {"benchmark": "bench_quantize_memory", "environment": environment(),
              "command": " ".join(["python -m benchmarks.bench_quantize_memory", *given]), "rows": [], "timing": []}
    if not args.skip_memory:
        facts = prepare(args.work, args.double, args.single)
        result["model"] = {"what": f"FluxTransformer2DModel, FLUX.1-dev widths, {args.double} double + {args.single} "
                                   "single blocks, random bf16 weights", **facts}
        _write(args.out, result)
        for weights in [w for w in args.weights.split(",") if w]:
            row = {"method": f"dirotq-lr rank {args.rank}", "weights": weights, "eigensolver": args.eigensolver,
                   **run_child(args.work, weights, args.eigensolver, args.rank, args.threads)}
            if "peak_rss_gib" in row:
                row["peak_over_bf16_model"] = round(row["peak_rss_gib"] * 2**30 / facts["bf16_model_bytes"], 3)
                row["peak_minus_model_gib"] = round(row["peak_rss_gib"] - facts["bf16_model_bytes"] / 2**30, 3)
            result["rows"].append(row)
            result["environment"]["load_average_end"] = list(os.getloadavg())
            _write(args.out, result)
            print(json.dumps({k: v for k, v in row.items() if k not in ("peak_growth", "slowest_layers")}), flush=True)
    if not args.skip_timing:
        timing_rows(args.limit_s, result, args.out)
    result["environment"]["load_average_end"] = list(os.getloadavg())
    result["environment"]["date_end"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _write(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
