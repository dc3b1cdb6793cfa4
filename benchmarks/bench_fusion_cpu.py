"""Fusion on the CPU reference path: one W4A4 image of the embedded model with q/k/v run as
separate quantized layers ("apart"), as one fused layer per attention ("fused",
``fuse_shared_inputs``), and in the deployment form the explorer and ``generate`` run ("deployment",
``fuse_for_inference``: also each MLP's GELU applied by its up-projection).

The embedded tiny PixArt-Σ, calibrated as the evaluation does (cached), quantized with ``--method``
at rank ``--rank`` in ``--scale-format``; then ``--runs`` 20-step generations of one prompt for each
form, interleaved (so load on the shared cores hits all alike), after one warm-up each. Reports
medians and minima, the number of quantized layers each form runs per transformer forward, and
whether the images are identical (they must be: the fused forms compute the same numbers).

    python -m benchmarks.bench_fusion_cpu --out benchmarks/results/fusion_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import torch

from dirotq.eval.protocol import Evaluator, make_config
from dirotq.eval.report import device_description, emit_json, versions
from dirotq.fusion import fuse_for_inference, fuse_shared_inputs, fusion_stats
from dirotq.generate import quantized_copy, swapped_transformer
from dirotq.modules import QuantLinear

PROMPT = "a large red circle on the left and a small blue square on the right, on a white background"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="dirotq-lr")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--scale-format", default="int_ratio")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="out/rank_plans", help="calibration cache (shared with the image studies)")
    ap.add_argument("--model", default=None, help="diffusers folder (default: the embedded tiny PixArt-Σ)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ev = Evaluator(a.model, limit=1, out_dir=a.work, judge=False)
    config = make_config(a.method, rank=a.rank, scale_format=a.scale_format)
    apart = quantized_copy(ev.pipe.transformer, config, ev.stats)
    fused = copy.deepcopy(apart)
    groups = fuse_shared_inputs(fused)["fused"]
    deployment = copy.deepcopy(apart)
    activations = fuse_for_inference(deployment)["activations"]["fused"]
    forms = {"apart": apart, "fused": fused, "deployment": deployment}
    pipe = ev.pipe
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=a.steps, guidance_scale=4.5, **ev.pipe_kwargs)

    def run(transformer):
        with swapped_transformer(pipe, transformer):
            t0 = time.perf_counter()
            image = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images[0]
            return time.perf_counter() - t0, np.asarray(image)

    images = {name: run(model)[1] for name, model in forms.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(a.runs):
        for name, model in forms.items():
            t, img = run(model)
            times[name].append(t)
            if not np.array_equal(img, images[name]):
                raise RuntimeError(f"{name}: the image changed between runs")
    try:
        load_avg = os.getloadavg()
    except OSError:
        load_avg = None
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"benchmark": "shared_input_fusion_cpu", "method": a.method, "rank": a.rank, "scale_format": a.scale_format,
           "steps": a.steps, "guidance_scale": 4.5, "pipe_kwargs": {k: v for k, v in ev.pipe_kwargs.items()
                                                                     if isinstance(v, (int, float, str, bool))},
           "model": ev.model_name, "backend": "reference (PyTorch, CPU)",
           "quantized_layers_per_forward": {name: sum(isinstance(m, QuantLinear) for m in model.modules())
                                            for name, model in forms.items()},
           "fused_groups": len(groups), "fused_members": sum(map(len, groups.values())),
           "activations_in_epilogue": len(activations),
           "seconds_per_image": {k: {"median": round(med[k], 4), "min": round(min(v), 4),
                                     "runs": [round(x, 4) for x in v]} for k, v in times.items()},
           "speedup_median": round(med["apart"] / med["fused"], 3),
           "deployment_speedup_median": round(med["apart"] / med["deployment"], 3),
           "images_identical": all(np.array_equal(images["apart"], img) for img in images.values()),
           "runs_per_model_after_warmup": {k: v["runs"] for k, v in fusion_stats(fused).items()},
           "device": device_description(), "versions": versions(), "threads": a.threads,
           "load_average_at_end": load_avg, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python -m benchmarks.bench_fusion_cpu", *(sys.argv[1:] if argv is None else argv)])}
    emit_json(out, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
