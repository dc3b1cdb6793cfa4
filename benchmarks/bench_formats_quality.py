"""Format C ("int_ratio") against format A ("exact") in fake quantization (issue #6, step 1).

Runs on CPU with the reference path (``QuantLinear.reference_forward`` is the fake-quant layer the
kernels reproduce). Two parts:

1. planted-outlier layers (PixArt-Σ width 1152): synthetic activations with a decaying spectrum plus
   (a) nothing, (b) a few outlier channels ×20–80, (c) massive tokens; every method (RTN,
   SmoothQuant, QuaRot block Hadamard, SVDQuant r32, DiRotQ-LR r32, full DiRotQ r = d/8) with RTN
   weights, and DiRotQ-LR/QuaRot with GPTQ weights, in both formats; output SQNR on held-out tokens;
   also the bare quantizer SQNR of both formats on Gaussian / Laplace / outlier tensors.
2. the embedded model (``assets/tiny-pixart``) when present: calibration activations of every
   target layer (a few prompts × steps), layer output SQNR per method and format; and where format
   C's loss went: DiRotQ-LR r32's rotated tail (activations, then weights, the other side 16-bit)
   under each encoding: format A, format C's first rule (the covering multiplier, codes ±7), the
   better of two multipliers by squared error (codes [−8, 7]; the weights' rule), its offline
   row-scale search, the rule of symmetric activations (revision 5: k from the group's spread, no
   work per value), and asymmetric codes in both formats.

    python -m benchmarks.bench_formats_quality [--out benchmarks/results/formats_quality.json] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent

from dirotq.methods import DiRotQConfig, DiRotQLRConfig, QuaRotConfig, RTNConfig, SmoothQuantConfig, SVDQuantConfig
from dirotq.quantize import layer_error, quantize_layer
from dirotq.quantizers import fake_quantize, quantization_error  # noqa: E402

FORMATS = ("exact", "int_ratio")


def method_configs(d: int, fmt: str, gptq: bool = True) -> dict[str, object]:
    common = dict(scale_format=fmt, group_size=64)
    cfgs = {
        "rtn": RTNConfig(**common),
        "smoothquant": SmoothQuantConfig(**common),
        "quarot-block": QuaRotConfig(hadamard="block", **common),
        "svdquant-r32": SVDQuantConfig(rank=32, **common),
        "dirotq-lr-r32": DiRotQLRConfig(rank=32, **common),
        f"dirotq-full-r{d // 8}": DiRotQConfig(rank=d // 8, **common),
    }
    if gptq:
        cfgs["quarot-block+gptq"] = QuaRotConfig(hadamard="block", weights="gptq", **common)
        cfgs["dirotq-lr-r32+gptq"] = DiRotQLRConfig(rank=32, weights="gptq", **common)
    return cfgs


def stats_of(x: torch.Tensor) -> SimpleNamespace:
    x64 = x.double()
    return SimpleNamespace(second_moment=x64.T @ x64, count=x.shape[0], abs_max=x64.abs().amax(0),
                           sum=x64.sum(0), sum_sq=x64.pow(2).sum(0), sum_4th=x64.pow(4).sum(0), sample=x.float())


def planted_layer(kind: str, d: int = 1152, o: int = 1152, n_cal: int = 2048, n_test: int = 1024, seed: int = 0):
    """(linear, x_cal, x_test): activations with a decaying spectrum (so PCA has something to find)
    plus the planted outliers of ``kind``."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -1.5, d).sqrt()
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mix = (basis * spectrum.double()).T.float()

    def draw(n):
        x = torch.randn(n, d, generator=g) @ mix * 4.0
        if kind in ("channels", "both"):
            ch = torch.arange(8) * 131 % d
            x[:, ch] *= torch.linspace(20, 80, 8)
        if kind in ("tokens", "both"):
            t = torch.randperm(n, generator=g)[: max(1, n // 100)]
            x[t] *= 30.0
        return x

    lin = torch.nn.Linear(d, o)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, d, generator=g) / math.sqrt(d))
        lin.weight[:, torch.arange(4) * 97 % d] *= 5.0  # a few salient weight columns
        lin.bias.copy_(torch.randn(o, generator=g) * 0.1)
    return lin, draw(n_cal), draw(n_test)


def bare_quantizer() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "gaussian": torch.randn(1024, 1152, generator=g),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((1024, 1152)),
        "student-t3": torch.distributions.StudentT(3.0).sample((1024, 1152)),
        "gaussian+channel-outliers": torch.randn(1024, 1152, generator=g) * torch.where(
            torch.arange(1152) % 131 == 0, 40.0, 1.0),
    }
    rows = []
    for name, t in tensors.items():
        row = {"tensor": name}
        for fmt in FORMATS:
            row[f"sqnr_db_{fmt}"] = round(quantization_error(t, fake_quantize(t, 4, 64, True, fmt))["sqnr_db"], 3)
        row["delta_db_C_minus_A"] = round(row["sqnr_db_int_ratio"] - row["sqnr_db_exact"], 3)
        rows.append(row)
    return rows


def planted(quick: bool) -> list[dict]:
    rows = []
    kinds = ("none", "channels", "tokens", "both") if not quick else ("channels",)
    for kind in kinds:
        lin, x_cal, x_test = planted_layer(kind, d=512 if quick else 1152, o=512 if quick else 1152)
        st = stats_of(x_cal)
        d = lin.in_features
        for fmt in FORMATS:
            for name, cfg in method_configs(d, fmt, gptq=not quick).items():
                t0 = time.time()
                q = quantize_layer(lin, st, cfg)
                err = layer_error(lin, q, x_test)
                bits = sum(q.storage_bits().values()) / (lin.in_features * lin.out_features)
                rows.append({"layer": f"planted-{kind}", "method": name, "format": fmt,
                             "sqnr_db": round(err["sqnr_db"], 3), "bits_per_weight": round(bits, 3),
                             "seconds": round(time.time() - t0, 2)})
                print(f"  planted-{kind:9s} {name:22s} {fmt:9s} {err['sqnr_db']:7.2f} dB  {bits:.2f} b/w", flush=True)
    return rows


def embedded(model_dir: Path, quick: bool) -> dict:
    """Layer SQNR per target of the embedded model on its calibration sample."""
    from dirotq.calibration import calibrate
    from dirotq.models import get_adapter
    from dirotq.pipelines import load_pipeline

    pipe = load_pipeline(str(model_dir))
    prompts = ["a red circle on a blue background", "two small green triangles", "a big yellow star",
               "three white squares on black"][: 2 if quick else 4]
    stats = calibrate(pipe, prompts, num_inference_steps=4 if quick else 8, sample_tokens=512)
    model = pipe.transformer
    specs = get_adapter(model).targets(model)
    modules = dict(model.named_modules())
    rows = []
    for name, spec in specs.items():
        if spec.kind != "w4a4":
            continue
        st = stats.for_layer(name)
        lin = modules[name]
        x = st.sample
        for fmt in FORMATS:
            for mname, cfg in method_configs(lin.in_features, fmt, gptq=False).items():
                if lin.in_features % 64 and ("block" in mname or "lr" in mname):
                    continue  # the block Hadamard needs a width that is a multiple of the group
                try:
                    q = quantize_layer(lin, st, cfg, spec=spec)
                    e = layer_error(lin, q, x)["sqnr_db"]
                except Exception as exc:  # a method that does not apply to this layer
                    print(f"  skip {name} {mname}: {exc}")
                    continue
                rows.append({"layer": name, "method": mname, "format": fmt, "sqnr_db": round(e, 3)})
    summary = {}
    for mname in sorted({r["method"] for r in rows}):
        for fmt in FORMATS:
            vals = [r["sqnr_db"] for r in rows if r["method"] == mname and r["format"] == fmt]
            if vals:
                summary.setdefault(mname, {})[f"mean_sqnr_db_{fmt}"] = round(sum(vals) / len(vals), 3)
        s = summary.get(mname, {})
        if len(s) == 2:
            s["delta_db_C_minus_A"] = round(s["mean_sqnr_db_int_ratio"] - s["mean_sqnr_db_exact"], 3)
    enc = encodings(pipe, stats, specs)
    for k, v in enc.items():
        print(f"  {k:48s} activations {v['activations']:6.2f} dB  weights {v['weights']:6.2f} dB")
    return {"model": str(model_dir), "prompts": prompts, "layers": rows, "summary_by_method": summary,
            "encodings_dirotq_lr_r32_tail_sqnr_db": enc}


def _int_ratio_first_rule(x: torch.Tensor) -> torch.Tensor:
    """Format C as first shipped (revision 1), for the decomposition only: the smallest multiplier
    whose step covers the group's abs-max, codes clipped to ±7."""
    from dirotq.quantizers import pad_to_groups

    g = pad_to_groups(x.float(), 64)
    g = g.reshape(*g.shape[:-1], -1, 64)
    amax = g.abs().amax(-1)
    s = (amax.amax(-1, keepdim=True) / 105).clamp(min=1e-12)
    k = torch.ceil(amax / (7 * s) - 1e-6).clamp(1, 15)
    step = (k * s).unsqueeze(-1)
    return (torch.clamp(torch.round(g / step), -7, 7) * step).reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]


ENCODINGS = {
    "A: one scale per group": lambda t, w: fake_quantize(t, 4, 64, True, "exact"),
    "C, first rule: covering multiplier, codes ±7": lambda t, w: _int_ratio_first_rule(t),
    "C: better of two multipliers by squared error, codes [-8, 7] (weights' rule)":
        lambda t, w: fake_quantize(t, 4, 64, True, "int_ratio"),
    "C + row-scale search (weights, offline)": lambda t, w: fake_quantize(t, 4, 64, True, "int_ratio", row_search=True),
    "C: k₀ − 1 unless the spread overshoots by 1/4 (symmetric activations' rule, revision 5)":
        lambda t, w: fake_quantize(t, 4, 64, True, "int_ratio", k_rule="spread"),
    "A, asymmetric": lambda t, w: fake_quantize(t, 4, 64, False, "exact"),
    "C, asymmetric": lambda t, w: fake_quantize(t, 4, 64, False, "int_ratio"),
    "C, asymmetric, spread rule (not used)": lambda t, w: fake_quantize(t, 4, 64, False, "int_ratio", k_rule="spread"),
}


def encodings(pipe, stats, specs) -> dict:
    """Where format C's loss goes: the tail output a·Wᵀ of DiRotQ-LR r32 (a: rotated residual
    activations, W: the weight in the same basis), one side quantized by each encoding, the other in
    float; mean SQNR (dB) over the W4A4 targets."""
    from dirotq.quantize import quantize_layer
    from dirotq.modules import QuantLinear

    cfg = DiRotQLRConfig(rank=32, weight_bits=16)
    modules = dict(pipe.transformer.named_modules())
    acc = {k: {"activations": [], "weights": []} for k in ENCODINGS}
    for name, spec in specs.items():
        if spec.kind != "w4a4" or modules[name].in_features % 64:
            continue
        st = stats.for_layer(name)
        q = quantize_layer(modules[name], st, cfg, spec=spec)
        assert isinstance(q, QuantLinear)
        _, a = q.transform_input(st.sample.float())
        w = q.dequantized_weight()
        y = a @ w.T
        for enc, fn in ENCODINGS.items():
            acc[enc]["activations"].append(quantization_error(y, fn(a, False) @ w.T)["sqnr_db"])
            acc[enc]["weights"].append(quantization_error(y, a @ fn(w, True).T)["sqnr_db"])
    return {enc: {side: round(sum(v) / len(v), 3) for side, v in sides.items()} for enc, sides in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "formats_quality.json"))
    ap.add_argument("--model", default=str(ROOT / "assets" / "tiny-pixart"))
    ap.add_argument("--quick", action="store_true", help="one layer kind, width 512 (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    res: dict = {
        "benchmark": "format C (int_ratio) vs format A (exact), fake quantization, reference path",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.platform(), "torch": torch.__version__, "device": "cpu",
        "metric": "layer output SQNR (dB) on held-out tokens, higher is better; delta = C - A",
    }
    print("bare quantizer:")
    res["bare_quantizer"] = bare_quantizer()
    for r in res["bare_quantizer"]:
        print(f"  {r}")
    print("planted-outlier layers:")
    rows = planted(args.quick)
    res["planted"] = rows
    deltas = {}
    for r in rows:
        if r["format"] == "int_ratio":
            a = next(x for x in rows if x["layer"] == r["layer"] and x["method"] == r["method"] and x["format"] == "exact")
            deltas.setdefault(r["method"], []).append(r["sqnr_db"] - a["sqnr_db"])
    res["planted_delta_db_C_minus_A"] = {k: {"mean": round(sum(v) / len(v), 3), "min": round(min(v), 3),
                                             "max": round(max(v), 3)} for k, v in deltas.items()}
    model_dir = Path(args.model)
    if (model_dir / "model_index.json").is_file():
        print("embedded model:")
        try:
            res["embedded"] = embedded(model_dir, args.quick)
        except Exception as exc:  # record, do not lose the planted results
            res["embedded"] = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        res["embedded"] = {"skipped": f"{model_dir} not present when this ran"}
    res["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["planted_delta_db_C_minus_A"], indent=1))
    print(f"wrote {args.out} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
