"""What quantizing PixArt's cross-attention K/V costs on images, and what it saves in weights.

PixArt's adapter keeps ``attn2.to_k`` / ``attn2.to_v`` 16-bit (the paper's choice: they read the
caption tokens, the same at every step). At full PixArt-Σ size they are 74 M of the 611 M
parameters, so the weight-memory target of a W4A4 PixArt-Σ (≤ 0.30× bf16) needs them in 4 bits.
This study runs the embedded model with the default method at rank ``--rank`` in format A and
format C, with those two layer types kept 16-bit (the reference row), as W4A16 (INT4 weights,
16-bit caption activations) and as W4A4, and reports image PSNR against the float image of the
same prompt and seed, the paired difference to the 16-bit row (bootstrap CI), and the bytes of the
quantized transformer as a checkpoint stores it (INT4 codes, scales and 16-bit branches by
``QuantLinear.storage_bits``, every other tensor at 2 bytes).

Evaluation prompts and seeds are those of the rank-plan study (seeds from ``--seed``), disjoint from
the calibration prompts.

    python -m benchmarks.bench_cross_kv --out benchmarks/results/cross_kv_tiny_pixart
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks._bench_common import add_image_study_args
from dirotq.eval.metrics import paired_bootstrap_diff
from dirotq.eval.protocol import Evaluator, make_config
from dirotq.eval.report import device_description, versions
from dirotq.generate import quantized_copy
from dirotq.models import get_adapter
from dirotq.modules import QuantLinear
from dirotq.registry import DEFAULT_METHOD

CROSS_KV = ("attn2.to_k", "attn2.to_v")
KINDS = {"16-bit": None, "W4A16": "w4a16", "W4A4": "w4a4"}


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model`` as a checkpoint stores it: each QuantLinear by its ``storage_bits``, every
    other parameter and buffer at 2 bytes (bf16)."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    inside = {id(t) for m in quant for t in [*m.parameters(), *m.buffers()]}
    rest = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if id(t) not in inside)
    return int(sum(sum(m.storage_bits().values()) for m in quant) / 8 + 2 * rest)


def add_layer_study_args(ap: argparse.ArgumentParser, out: str, formats: str = "int_ratio,exact",
                         formats_help: str | None = None) -> None:
    """The options of a layer-kind image study (this one, ``bench_ff_down``, ``bench_conditioning``):
    the image protocol's, plus the method and rank of the other layers, the formats and the output prefix."""
    add_image_study_args(ap)
    ap.add_argument("--method", default=DEFAULT_METHOD)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--formats", default=formats, help=formats_help)
    ap.add_argument("--out", default=out)


def image_row(ev, imgs, model, reference: dict | None, vs: str, **fields) -> dict:
    """A study row from its images and quantized ``model``: ``fields``, image PSNR/SSIM against the
    float image, checkpoint bytes against bf16, and under ``vs`` the paired difference to the
    ``reference`` row of the same format (None: this row is the reference)."""
    fid = ev.fidelity(imgs)
    row = {**fields, "psnr": fid["psnr"], "ssim": fid["ssim"], "per_image_psnr": fid["per_image"]["psnr"],
           "checkpoint_bytes": checkpoint_bytes(model),
           "bf16_bytes": 2 * sum(p.numel() for p in ev.pipe.transformer.parameters())}
    row["checkpoint_vs_bf16"] = round(row["checkpoint_bytes"] / row["bf16_bytes"], 4)
    if reference is not None:
        row[vs] = paired_bootstrap_diff(row["per_image_psnr"], reference["per_image_psnr"], 2000)
    return row


def study_row(ev, label: str, cfg, reference: dict | None, vs: str, **fields) -> dict:
    """One configuration's row of a layer-kind image study (``image_row``; images cached under
    ``label``), with the config's tag."""
    imgs, _ = ev.method_images(label, cfg)
    q = quantized_copy(ev.pipe.transformer, cfg, ev.stats, adapter=ev.adapter)
    return image_row(ev, imgs, q, reference, vs, **fields, tag=cfg.tag())


def record_row(result: dict, row: dict, ev, out: Path, what: str, vs: str) -> None:
    """Append ``row`` to ``result``, write ``out``.json (after every row: an interrupted study keeps
    its rows) and print it, ``what`` naming the row."""
    result["rows"].append(row)
    result["meta"]["n_images"] = len(ev.items)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    d = row.get(vs)
    print(f"{row['format']:9s} {what} PSNR {row['psnr']['mean']:.2f}  bytes×{row['checkpoint_vs_bf16']:.3f}"
          + (f"  Δ {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d else ""), flush=True)


def delta_cells(d: dict | None) -> str:
    """The Markdown cells "Δ [CI] | wins" of a paired difference (the reference row: "reference | ")."""
    if not d:
        return "reference | "
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] | {d['win_rate']:.0%}"


def study_result(script: str, a: argparse.Namespace, argv, **meta) -> dict:
    """The result of a layer-kind image study before its rows: the method, rank and RTN weights of
    ``a``, the study's own ``meta``, the device, versions, date and the command that ran it."""
    return {"meta": {"method": a.method, "rank": a.rank, "weights": "rtn", **meta,
                     "device": device_description(), "versions": versions(),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "command": " ".join([f"python -m benchmarks.{script}", *(sys.argv[1:] if argv is None else argv)])},
            "rows": []}


def study_evaluator(a: argparse.Namespace, pipe, adapter) -> Evaluator:
    """The image protocol of a layer-kind study with ``adapter`` (None: the model's own), on ``pipe``
    once the first row has loaded it (before: the ``--model`` folder)."""
    return Evaluator(pipe if pipe is not None else a.model, limit=a.limit, seeds_per_prompt=a.seeds, seed=a.seed,
                     num_inference_steps=a.steps, calib_limit=a.calib_limit, out_dir=a.work, judge=False,
                     n_boot=2000, adapter=adapter)


def finish_study(result: dict, out: Path, t0: float, markdown) -> int:
    """Record the study's duration and write ``out``.json and ``out``.md (``markdown(result)``)."""
    result["seconds"] = round(time.time() - t0, 1)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    Path(f"{out}.md").write_text(markdown(result))
    return 0


def study_table(result: dict, title: str, column: str, label_key: str, reference: str, vs: str, note: str = "") -> str:
    """The Markdown report of a layer-kind study: one line per row (``label_key`` names the layer
    kind's setting, shown under ``column``) with its PSNR, the paired difference ``vs`` to the
    ``reference`` row of its format, and its checkpoint size against bf16."""
    m = result["meta"]
    lines = [f"# {title}", "",
             (f"{m.get('n_images', '?')} images, PSNR vs the float image; Δ paired vs the {reference} row of the "
              f"same format (95 % bootstrap CI, share of images that improve). {note}{m['device']}, {m['date']}."), "",
             f"| format | {column} | PSNR (dB) | Δ vs {reference} (dB) | wins | checkpoint / bf16 |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['format']} | {r[label_key]} | {r['psnr']['mean']:.2f} | "
                     f"{delta_cells(r.get(vs))} | {r['checkpoint_vs_bf16']:.3f} |")
    lines += ["", f"Command: `{m['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_layer_study_args(ap, "benchmarks/results/cross_kv_tiny_pixart")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    out = Path(a.out)
    result = study_result("bench_cross_kv", a, argv, layer_types=list(CROSS_KV))
    pipe = None
    for fmt in [f for f in a.formats.split(",") if f]:
        reference_row = None
        for label, kind in KINDS.items():
            # the 16-bit row comes first and loads the pipeline the other rows reuse
            adapter = None if kind is None else type(get_adapter(pipe.transformer))({lt: kind for lt in CROSS_KV})
            ev = study_evaluator(a, pipe, adapter)
            pipe = ev.pipe
            cfg = make_config(a.method, rank=a.rank, scale_format=fmt)
            targets = {k: sum(s.kind == k for s in ev.targets.values()) for k in ("w4a4", "w4a16")}
            row = study_row(ev, f"{a.method}-{fmt}-cross-kv-{label}", cfg, reference_row, "vs_16bit", format=fmt,
                            cross_kv=label, targets=targets)
            reference_row = reference_row or row
            record_row(result, row, ev, out, f"cross-KV {label:6s}", "vs_16bit")
    return finish_study(result, out, t0, markdown)


def markdown(result: dict) -> str:
    m = result["meta"]
    return study_table(result, f"Cross-attention K/V of PixArt: 16-bit, W4A16 or W4A4 ({m['method']} r{m['rank']}, RTN "
                               "weights)", "cross-attn K/V", "cross_kv", "16-bit", "vs_16bit")


if __name__ == "__main__":
    raise SystemExit(main())
