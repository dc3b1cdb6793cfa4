"""What the MLP's down-projection (``ff.net.2``) costs on images as W4A16 or as W4A4 at several ranks,
and whether its input could be quantized inside the up-projection's GEMM epilogue.

The up-projection's GEMM produces the down-projection's input a tile of output columns at a time.
Quantizing that input in the epilogue (after the GELU) would save writing and re-reading the (n, 4·d)
hidden states and the activation kernel at d = 4·hidden, the widest and slowest one. That needs an
activation transform local to the tile: no 16-bit low-rank branch (its c = x·V_r reads the whole row)
and per-group scales (format A; format C's row scale is a row maximum), i.e. rank 0 with the block
Hadamard. This study measures what that costs: the embedded model with the default method at rank
``--rank`` everywhere else, and ``ff.net.2`` kept W4A16 (the PixArt adapter's default: its input has
the heaviest outliers), or W4A4 at rank 0 (the tile-local form), at ``--rank`` and at 2·``--rank``.
Image PSNR against the float image of the same prompt and seed, paired difference to the W4A16 row
(bootstrap CI), checkpoint bytes against bf16.

Evaluation prompts and seeds are those of the rank-plan study (seeds from ``--seed``), disjoint from
the calibration prompts.

    python -m benchmarks.bench_ff_down --out benchmarks/results/ff_down_tiny_pixart
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench_cross_kv import (
    add_layer_study_args,
    finish_study,
    record_row,
    study_evaluator,
    study_result,
    study_row,
    study_table,
)
from dirotq.eval.protocol import make_config
from dirotq.models import get_adapter

LAYER_TYPE = "ff.net.2"


def variants(rank: int, fmt: str) -> list[tuple[str, str, int | None]]:
    """(label, kind of ff.net.2, its rank; None: the model-wide rank). Rank 0 is tile-local in format A
    only (format C's row scale is a maximum over the whole row)."""
    r0 = "W4A4 r0 (tile-local)" if fmt == "exact" else "W4A4 r0"
    return [("W4A16", "w4a16", None), (r0, "w4a4", 0), (f"W4A4 r{rank}", "w4a4", rank),
            (f"W4A4 r{2 * rank}", "w4a4", 2 * rank)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_layer_study_args(ap, "benchmarks/results/ff_down_tiny_pixart", "exact",
                         "format A is the one a tile-local epilogue can produce")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    out = Path(a.out)
    result = study_result("bench_ff_down", a, argv, layer_type=LAYER_TYPE)
    pipe = None
    for fmt in [f for f in a.formats.split(",") if f]:
        reference_row = None
        for label, kind, ff_rank in variants(a.rank, fmt):
            # the W4A16 row comes first and loads the pipeline the other rows reuse
            adapter = None if pipe is None else type(get_adapter(pipe.transformer))({LAYER_TYPE: kind})
            ev = study_evaluator(a, pipe, adapter)
            pipe = ev.pipe
            if ev.targets and all(s.kind != kind for n, s in ev.targets.items() if n.endswith(LAYER_TYPE)):
                raise SystemExit(f"bench_ff_down: this model's {LAYER_TYPE} layers are not {kind} by default; "
                                 "the W4A16 reference row needs the PixArt adapter's default")
            ranks = {"_default": a.rank}
            if ff_rank is not None:
                ranks.update({n: ff_rank for n in ev.targets if n.endswith(LAYER_TYPE)})
            cfg = make_config(a.method, rank=ranks, scale_format=fmt)
            row = study_row(ev, f"{a.method}-{fmt}-ff-down-{label}", cfg, reference_row, "vs_w4a16", format=fmt,
                            ff_down=label, kind=kind, ff_down_rank=ff_rank)
            reference_row = reference_row or row
            record_row(result, row, ev, out, f"ff.net.2 {label:22s}", "vs_w4a16")
    return finish_study(result, out, t0, markdown)


def markdown(result: dict) -> str:
    m = result["meta"]
    return study_table(result, f"The MLP down-projection ({m['layer_type']}): W4A16 or W4A4 at ranks 0 / {m['rank']} / "
                               f"{2 * m['rank']} ({m['method']} r{m['rank']} elsewhere, RTN weights)", "ff.net.2",
                       "ff_down", "W4A16", "vs_w4a16",
                       note="Rank 0 is the form the up-projection's GEMM epilogue could quantize tile by tile. ")


if __name__ == "__main__":
    raise SystemExit(main())
