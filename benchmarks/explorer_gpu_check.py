"""The explorer's generation path on a device, without its web page: what the Generate tab runs.

``analysis.session.ExplorerSession`` is the explorer's whole back end (the Gradio page only calls
it): on ``--device`` (``cuda`` on a GPU machine, which has no Gradio) it loads the embedded model,
calibrates as the Calibrate button does, takes the default plan with one rank changed as a user
would, and generates one prompt with the 16-bit and the W4A4 transformer (DiRotQ-LR, format C, q/k/v
fused as the tab runs them). It records which backend the quantized layers ran (the backend line
the tab shows; on a GPU it must say ``triton``), the two images' PSNR and SSIM, and the timings,
and writes the JSON after every stage.

    python -m benchmarks.explorer_gpu_check --device cuda --out $OUT/explorer_gpu.json
    python -m benchmarks.explorer_gpu_check --device cpu        # the same path on the reference backend
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a large red circle on the left and a small blue square on the right, on a white background"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="diffusers folder (default: the embedded tiny PixArt-Σ)")
    ap.add_argument("--method", default="dirotq-lr")
    ap.add_argument("--scale-format", default="int_ratio")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--calib-prompts", type=int, default=None, help="calibration prompts (default: the explorer's)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="then generate twice more with the explorer's --cuda-graphs (dirotq.cuda_graphs): capture, "
                         "replay; records their timings, graph counts and the PSNR against the eager images")
    ap.add_argument("--out", default="out/explorer_gpu_check.json")
    a = ap.parse_args(argv)
    from analysis.session import CalibSettings, ExplorerSession
    from dirotq.eval.report import device_description, versions
    from dirotq.modules import backend_description
    from dirotq.pipelines import DEFAULT_MODEL

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"check": "explorer_generate_path", "device": a.device, "method": a.method,
                 "scale_format": a.scale_format, "steps": a.steps, "prompt": a.prompt,
                 "host": device_description(), "versions": versions(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "command": " ".join(["python -m benchmarks.explorer_gpu_check", *(sys.argv[1:] if argv is None
                                                                                    else argv)])}

    def save(stage: str) -> None:
        res["last_stage"] = stage
        out.write_text(json.dumps(res, indent=1, default=str))

    calib = CalibSettings() if a.calib_prompts is None else CalibSettings(num_prompts=a.calib_prompts,
                                                                          holdout_prompts=1)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        s = ExplorerSession(a.model or DEFAULT_MODEL, device=a.device, cache_dir=cache, calib=calib)
        res["load_s"] = round(time.perf_counter() - t0, 2)
        save("loaded")
        t0 = time.perf_counter()
        s.calibrate()
        res["calibrate_s"] = round(time.perf_counter() - t0, 2)
        save("calibrated")
        plan = s.default_plan(32)
        changed = next(iter(plan))
        plan[changed] = 16  # a user's edit of one rank, as in the Rank plan table
        res["rank_change"] = {changed: 16}
        t0 = time.perf_counter()
        out_gen = s.generate(a.prompt, 0, a.steps, 4.5, a.method, plan, scale_format=a.scale_format)
        res["generate_s"] = round(time.perf_counter() - t0, 2)
        qmodel, _ = s.quantized(a.method, plan, scale_format=a.scale_format)
        res["backend"] = backend_description(qmodel)
        res["triton"] = res["backend"].startswith("triton")
        res["metrics"] = {k: v for k, v in out_gen["metrics"].items() if isinstance(v, (int, float, str))}
        res["timings"] = out_gen["timings"]
        res["warnings"] = out_gen["warnings"]
        out_gen["reference"].save(out.with_name(out.stem + "_reference.png"))
        out_gen["quantized"].save(out.with_name(out.stem + "_w4a4.png"))
        save("generated")
        if a.cuda_graphs:
            from dirotq.cuda_graphs import graph_stats
            from dirotq.eval.metrics import psnr

            s.cuda_graphs = True
            runs = []
            for _ in range(2):  # the first captures (its first step eager), the second replays every step
                t0 = time.perf_counter()
                g = s.generate(a.prompt, 0, a.steps, 4.5, a.method, plan, scale_format=a.scale_format)
                runs.append({"generate_s": round(time.perf_counter() - t0, 2), "timings": g["timings"]})
            res["cuda_graphs"] = {"runs": runs, "reference": graph_stats(s.transformer), "quantized": graph_stats(qmodel),
                                  "psnr_vs_eager_db": {side: psnr(out_gen[side], g[side])
                                                       for side in ("reference", "quantized")}}
            save("generated with CUDA graphs")
    print(json.dumps({k: res[k] for k in ("device", "backend", "metrics", "calibrate_s", "generate_s", "cuda_graphs")
                      if k in res}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
