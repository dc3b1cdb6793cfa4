"""The evaluation's written results: Markdown tables, JSON files, run metadata.

Pure writers over the result dictionaries of ``dirotq.eval.protocol``; figures of these results
(the rank-sweep plot) are drawn by the explorer layer (``analysis.figures.sweep_figure``,
``python -m analysis sweep-html PREFIX.json``), which the library never imports.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..registry import is_ranked

FID_NOTE = "FID / Fréchet distances from fewer than 1000 images are noise: compare only at equal sample counts."


def emit_json(result: dict, path: str = "") -> None:
    """Print ``result`` as indented JSON and, if ``path`` is given, write the same JSON there
    (parents created): how the scripts and benchmarks report a result."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def device_description() -> str:
    """CPU model name, visible cores and torch threads, for result files (e.g. "AMD EPYC, 2 cores visible, torch threads 2")."""
    name = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                name = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"


def versions() -> dict:
    import diffusers

    from .._version import __version__ as dv

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "dirotq": dv,
            "python": platform.python_version()}


def _layer_type(name: str) -> str:
    """``transformer_blocks.3.attn1.to_q`` -> ``attn1.to_q`` (the part after the block index)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1:]) or name
    return name


def layer_summary(report: Mapping | None) -> dict:
    """Per-layer error summary of a ``quantize_`` report (SQNR over the W4A4 / W4A16 targets)."""
    if not report or not report.get("layers"):
        return {"note": "no per-layer report"}
    layers = report["layers"]
    rows = [(n, v) for n, v in layers.items() if "sqnr_db" in v]
    if not rows:
        return {"layers": len(layers), "note": "no held-out tokens: errors not measured"}
    s = np.array([v["sqnr_db"] for _, v in rows])
    r = np.array([v["rel_mse"] for _, v in rows])
    worst = min(rows, key=lambda kv: kv[1]["sqnr_db"])
    by_type: dict[str, list[float]] = {}
    for n, v in rows:
        by_type.setdefault(_layer_type(n), []).append(v["sqnr_db"])
    return {"layers": len(layers), "measured": len(rows), "mean_sqnr_db": float(s.mean()),
            "median_sqnr_db": float(np.median(s)), "min_sqnr_db": float(s.min()), "worst_layer": worst[0],
            "mean_rel_mse": float(r.mean()),
            "by_layer_type_sqnr_db": {k: float(np.mean(v)) for k, v in sorted(by_type.items())}}


def fmt_ci(d: Any, digits: int = 2) -> str:
    if isinstance(d, Mapping) and "mean" in d:
        f = f"%.{digits}f"
        return f"{f % d['mean']} [{f % d['lo']}, {f % d['hi']}]"
    if isinstance(d, float):
        return f"{d:.{digits}f}"
    return str(d)


def format_layer_table(rows: Sequence[dict], fmt: str = "md") -> str:
    """``rows`` of ``layer_error_table`` as Markdown (one column per method@rank) or long CSV."""
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["method", "rank", "layer", "kind", "in_features", "out_features",
                                            "rel_mse", "sqnr_db"])
        w.writeheader()
        for r in rows:
            w.writerow(r)
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"format must be 'md' or 'csv', got {fmt!r}")
    cols = list(dict.fromkeys(f"{r['method']}@r{r['rank']}" if is_ranked(r["method"]) else r["method"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cell = {}
    for r in rows:
        c = f"{r['method']}@r{r['rank']}" if is_ranked(r["method"]) else r["method"]
        cell[(r["layer"], c)] = r["sqnr_db"]
    kinds = {r["layer"]: r["kind"] for r in rows}
    lines = ["Per-layer output SQNR in dB (higher is better) on the calibration token sample "
             "(the same tokens the bases and GPTQ saw: in-sample).", "",
             "| layer | kind | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for n in layers:
        vals = [cell.get((n, c)) for c in cols]
        best = max((v for v in vals if v is not None), default=None)
        txt = [("**%.2f**" % v if v == best and len(cols) > 1 else "%.2f" % v) if v is not None else "–" for v in vals]
        lines.append(f"| {n} | {kinds[n]} | " + " | ".join(txt) + " |")
    means = []
    for c in cols:
        v = [cell[(n, c)] for n in layers if (n, c) in cell]
        means.append("%.2f" % float(np.mean(v)) if v else "–")
    lines.append("| **mean** | | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: Mapping) -> str:
    """The Markdown report of ``evaluate``'s results."""
    meta = results["meta"]
    ms = results["methods"]
    lines = [f"# Quality: {meta['model']} — W4A4 methods vs the {meta['reference_dtype'].replace('torch.', '')} reference",
             "",
             f"{meta['n_images']} images ({meta['n_prompts']} prompts × {meta['seeds_per_prompt']} seeds), "
             f"{meta['num_inference_steps']} steps, guidance {meta['guidance_scale']}; shared 16-bit rank "
             f"{meta['rank']} for svdquant / dirotq / dirotq-lr; weights: {meta['weights']}; calibration "
             f"{meta['calibration']['n_prompts']} prompts × {meta['calibration']['num_inference_steps']} steps.",
             f"Device: {meta['device']}. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
             + f". Date: {meta['date']}.", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    lines += ["Mean and 95 % bootstrap CI over images. PSNR / SSIM against the reference image of the same "
              "prompt and seed. Judge: fraction of images with every named attribute right (image acc.) and of "
              "named objects fully right (object acc.). FD: Fréchet distance in judge-feature space to the "
              "procedural renders of the prompts (real) and to the reference images (ref). " + FID_NOTE, "",
              "| method | PSNR (dB) | SSIM | judge image acc. | judge object acc. | FD real | FD ref | LPIPS | FID | CLIP |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    ref = results["reference"]
    rows = [("reference", ref, "–", "–")]
    if "real_renders" in results:
        rows.insert(0, ("procedural renders (judge ceiling)", results["real_renders"], "–", "–"))
    for name, r, p, s in rows:
        lines.append(f"| {name} | {p} | {s} | {fmt_ci(r.get('judge_image_acc', r.get('judge')), 3)} | "
                     f"{fmt_ci(r.get('judge_object_acc', '–'), 3)} | {fmt_ci(r.get('judge_fd_real', '–'), 1)} | "
                     f"{fmt_ci(r.get('judge_fd_ref', '–'), 1)} | – | – | – |")
    for m, e in ms.items():
        lines.append(f"| {m} (`{e['tag']}`) | {fmt_ci(e['psnr'])} | {fmt_ci(e['ssim'], 3)} | "
                     f"{fmt_ci(e.get('judge_image_acc', e.get('judge')), 3)} | {fmt_ci(e.get('judge_object_acc', '–'), 3)} | "
                     f"{fmt_ci(e.get('judge_fd_real'), 1)} | {fmt_ci(e.get('judge_fd_ref'), 1)} | "
                     f"{fmt_ci(e.get('lpips'), 3)} | {fmt_ci(e.get('fid_vs_ref'), 1)} | {fmt_ci(e.get('clip'), 1)} |")
    if results.get("paired"):
        lines += ["", "## Paired differences (same prompts and seeds)", "",
                  "| comparison | ΔPSNR (dB) | wins (PSNR) | ΔSSIM |", "|---|---|---|---|"]
        for k, v in results["paired"].items():
            lines.append(f"| {k} | {fmt_ci(v['psnr'])} | {v['psnr']['win_rate']:.0%} | {fmt_ci(v['ssim'], 3)} |")
    attrs = ("shape", "color", "size", "position", "count", "background")
    judged = [(m, e["judge"]) for m, e in ms.items() if isinstance(e.get("judge"), Mapping)]
    if judged:
        lines += ["", "## Judge per-attribute accuracy", "", "| variant | " + " | ".join(attrs) + " |",
                  "|---|" + "---:|" * len(attrs)]
        extra = [("reference", ref["judge"])] if isinstance(ref.get("judge"), Mapping) else []
        if isinstance(results.get("real_renders", {}).get("judge"), Mapping):
            extra.insert(0, ("procedural renders", results["real_renders"]["judge"]))
        for m, j in extra + judged:
            lines.append(f"| {m} | " + " | ".join(f"{j.get(a, float('nan')):.3f}" for a in attrs) + " |")
    lines += ["", "## Per-layer error (quantize_ report, on the calibration token sample: in-sample for bases and GPTQ)", "",
              "| method | layers | mean SQNR (dB) | median | worst (dB) | worst layer | quantize (s) | generate (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for m, e in ms.items():
        L = e["layers"]
        if "mean_sqnr_db" in L:
            q = e.get("quantize_s")
            lines.append(f"| {m} | {L['layers']} | {L['mean_sqnr_db']:.2f} | {L['median_sqnr_db']:.2f} | "
                         f"{L['min_sqnr_db']:.2f} | {L['worst_layer']} | {'%.1f' % q if q else 'cached'} | "
                         f"{e['generate_s']:.1f} |")
        else:
            lines.append(f"| {m} | {L.get('layers', '–')} | {L.get('note', '–')} | | | | | |")
    types = sorted({t for e in ms.values() for t in e["layers"].get("by_layer_type_sqnr_db", {})})
    if types:
        lines += ["", "Mean SQNR (dB) by layer type:", "", "| method | " + " | ".join(types) + " |",
                  "|---|" + "---:|" * len(types)]
        for m, e in ms.items():
            bt = e["layers"].get("by_layer_type_sqnr_db", {})
            lines.append(f"| {m} | " + " | ".join(f"{bt[t]:.2f}" if t in bt else "–" for t in types) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(results: Mapping) -> dict:
    def conv(o):
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, Mapping):
            return {str(k): conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, (np.floating, np.integer)):
            return conv(o.item())
        return o

    return conv(results)


def write_results(results: Mapping, prefix: str | os.PathLike) -> None:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(_jsonable(results), indent=1, default=str))
    Path(f"{prefix}.md").write_text(results_markdown(results))


def sweep_markdown(results: Mapping) -> str:
    meta = results["meta"]
    ranks = results["ranks"]
    lines = [f"# Rank sweep: {meta['model']} — quality vs the 16-bit rank budget", "",
             f"{meta['n_images']} images ({meta['n_prompts']} prompts × {meta['seeds_per_prompt']} seeds), "
             f"{meta['num_inference_steps']} steps, weights {meta['weights']}. PSNR (dB) vs the "
             f"{meta['reference_dtype'].replace('torch.', '')} reference, mean [95 % bootstrap CI].",
             f"Device: {meta['device']}. Date: {meta['date']}.", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    lines += ["| method | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
    for m, c in results["curves"].items():
        lines.append(f"| {m} | " + " | ".join(fmt_ci(c[str(r)]["psnr"]) for r in ranks) + " |")
    lines += ["", "SSIM:", "", "| method | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
    for m, c in results["curves"].items():
        lines.append(f"| {m} | " + " | ".join(fmt_ci(c[str(r)]["ssim"], 3) for r in ranks) + " |")
    lines += ["", "Mean per-layer SQNR (dB):", "", "| method | " + " | ".join(f"r={r}" for r in ranks) + " |",
              "|---|" + "---|" * len(ranks)]
    for m, c in results["curves"].items():
        lines.append(f"| {m} | " + " | ".join(
            "%.2f" % c[str(r)]["layers"]["mean_sqnr_db"] if "mean_sqnr_db" in c[str(r)]["layers"] else "–"
            for r in ranks) + " |")
    if results.get("baselines"):
        lines += ["", "Rank-free baselines: " + "; ".join(
            f"{m} PSNR {fmt_ci(b['psnr'])}, SSIM {fmt_ci(b['ssim'], 3)}" for m, b in results["baselines"].items())]
    for k, v in results.get("paired_psnr", {}).items():
        lines += ["", f"Paired ΔPSNR {k} (dB): " + "; ".join(f"r={r}: {fmt_ci(d)} (wins {d['win_rate']:.0%})"
                                                           for r, d in v.items())]
    return "\n".join(lines) + "\n"


def write_sweep(results: Mapping, prefix: str | os.PathLike) -> None:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(_jsonable(results), indent=1, default=str))
    Path(f"{prefix}.md").write_text(sweep_markdown(results))


__all__ = ["emit_json", "device_description", "versions", "layer_summary", "format_layer_table", "results_markdown",
           "write_results", "sweep_markdown", "write_sweep", "FID_NOTE"]
