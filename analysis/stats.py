"""Per-layer quantities the explorer plots, computed from calibration statistics (docs/DESIGN.md).

Pure functions over ``LayerStats`` (dirotq/calibration.py) and tensors; no UI code. Everything a
plot needs after calibration comes from the stats and the layer weights, never from running the
model again:

- ``spectrum``: eigenvalues of the layer input's second moment C/n (the PCA basis DiRotQ uses) and
  the cumulative explained energy;
- ``outlier_views``: per-channel abs-max and kurtosis of the layer input on the stored token
  sample, in the original basis and after each method's transform (DiRotQ's T = V·diag(I_r, R),
  SmoothQuant's x/s, QuaRot's randomized Hadamard), plus the INT4 activation error of the part
  that is quantized;
- ``token_group``: the 64 values of one quantization group of one held-out token (optionally with
  a planted outlier) before any transform and after SmoothQuant, Hadamard and DiRotQ, each against
  its 16 INT4 levels, with the rounding error per value;
- ``error_curves``: the layer's output error (relative MSE, SQNR in dB, ``dirotq.quantize.layer_error``)
  on the stored token sample as a function of rank for every ranked method of the registry, with the
  unranked W4A4 methods as references; ``cost_axis`` puts a curve on the extra 16-bit parameters or
  FLOPs each rank costs (``analysis.costs``), so methods compare at equal cost;
- ``image_report``: PSNR / SSIM / the judge's reading of a generated pair.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from dirotq.allocate import candidate_ranks
from dirotq.bases import explained_variance, paper_rank, random_hadamard
from dirotq.config import QuantConfig
from dirotq.quantize import layer_error, quantize_layer, reference_output
from dirotq.quantizers import fake_quantize
from dirotq.registry import make_config, method_names

VIEWS = ("original", "dirotq", "smoothquant", "hadamard")
VIEW_LABELS = {"original": "original x (RTN)", "dirotq": "DiRotQ x·T", "smoothquant": "SmoothQuant x/s",
               "hadamard": "QuaRot x·H (Hadamard)"}


# ---------------------------------------------------------------------------------- spectrum
def spectrum(stats: Any) -> dict[str, np.ndarray]:
    """Eigen-spectrum of C/n (d, d) of one layer input.

    Returns ``{"eigenvalues": (d,) descending, "explained": (d + 1,) cumulative energy fraction
    for r = 0..d}`` as float64 numpy arrays. Uses the same (cached) decomposition as the DiRotQ
    method, so the plotted basis is the one the quantizer uses.
    """
    from dirotq.methods.common import stats_basis

    evals, _ = stats_basis(stats)
    evals = evals.double().clamp(min=0)
    return {"eigenvalues": evals.numpy(), "explained": explained_variance(evals).numpy()}


def energy_at(explained: np.ndarray, rank: int) -> float:
    """Fraction of the input energy carried by the top ``rank`` PCA directions."""
    rank = int(min(max(rank, 0), len(explained) - 1))
    return float(explained[rank])


# ---------------------------------------------------------------------------- channel views
def channel_profile(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-channel ``abs_max`` and kurtosis about zero E[x⁴]/E[x²]² of ``x: (m, d)`` tokens."""
    x = x.detach().double()
    if x.shape[1] == 0:
        z = np.zeros(0)
        return {"abs_max": z, "kurtosis": z}
    m2 = (x * x).mean(0)
    m4 = (x ** 4).mean(0)
    kurt = torch.where(m2 > 0, m4 / m2.clamp_min(1e-300) ** 2, torch.zeros_like(m2))
    return {"abs_max": x.abs().amax(0).numpy(), "kurtosis": kurt.numpy()}


def act_quant_error(a: torch.Tensor, total_energy: float, group_size: int = 64, symmetric: bool = True) -> float:
    """‖Q₄(a) − a‖² / total_energy: the INT4 per-token group quantization error of the quantized
    operand ``a: (m, k)``, relative to the energy of the whole (untransformed) input. 0 when k = 0."""
    if a.shape[1] == 0 or total_energy <= 0:
        return 0.0
    a = a.float()
    err = (fake_quantize(a, 4, group_size, symmetric, "exact") - a).double().pow(2).sum()
    return float(err / total_energy)


def dirotq_transform(stats: Any, rank: int, *, tail: str = "haar", seed: int = 42) -> torch.Tensor:
    """T = V·diag(I_r, R) (d, d) float64 from the statistics: the rotation DiRotQ applies online."""
    from dirotq.methods.common import cached_tail_rotation, stats_basis

    _, v = stats_basis(stats)
    d = v.shape[0]
    rank = int(min(max(rank, 0), d))
    r = cached_tail_rotation(d - rank, tail, seed)
    return torch.cat([v[:, :rank], v[:, rank:] @ r], dim=1)


def dirotq_rotate(x: torch.Tensor, stats: Any, rank: int, *, tail: str = "haar", seed: int = 42) -> torch.Tensor:
    """x·T (x: (d,) or (tokens, d)) without forming T = V·diag(I_r, R): (x·V)[:r] as is, (x·V)[r:]·R.
    Two products the size of x instead of a d×d×d one: on a 1024-wide layer that was 60–120 ms of each
    redraw of the One group and Outliers tabs (the QR that makes R is cached per width)."""
    from dirotq.methods.common import cached_tail_rotation, stats_basis

    _, v = stats_basis(stats)
    d = v.shape[0]
    rank = int(min(max(rank, 0), d))
    z = x @ v
    return torch.cat([z[..., :rank], z[..., rank:] @ cached_tail_rotation(d - rank, tail, seed)], dim=-1)


def view_input(view: str, x: torch.Tensor, stats: Any, rank: int, weight: torch.Tensor | None, *,
               tail: str = "haar", seed: int = 42, alpha: float = 0.5) -> tuple[torch.Tensor, int] | None:
    """``x`` (tokens, d) or one token (d,) as ``view`` quantizes it, and how many leading channels
    stay 16-bit: "original" x; "dirotq" x·T (the first ``rank`` 16-bit); "smoothquant" x/s (None
    without ``weight``: its factors use max|W_j|); "hadamard" x·H (QuaRot)."""
    if view == "original":
        return x, 0
    if view == "dirotq":
        return dirotq_rotate(x, stats, rank, tail=tail, seed=seed), rank
    if view == "smoothquant":
        if weight is None:
            return None
        from dirotq.methods.common import smooth_factors

        return x / smooth_factors(stats.abs_max, weight.detach().double(), alpha), 0
    if view == "hadamard":
        return x @ random_hadamard(x.shape[-1], 0), 0
    raise ValueError(f"unknown view {view!r}; known: {VIEWS}")


def outlier_views(stats: Any, rank: int, weight: torch.Tensor | None = None, *,
                  views: Iterable[str] = VIEWS, tail: str = "haar", seed: int = 42, alpha: float = 0.5,
                  group_size: int = 64) -> dict[str, dict[str, Any]]:
    """Per-channel abs-max and kurtosis of the stored input sample in each basis.

    For every view: ``{"abs_max": (d,), "kurtosis": (d,), "n16": number of leading channels kept
    16-bit (r for DiRotQ, else 0), "act_err": INT4 error of the quantized channels relative to
    the input energy}``. ``weight (o, d)`` is needed for the SmoothQuant view (its factors use
    max|W_j|); without it that view is skipped.
    """
    x = stats.sample.double()
    if x.shape[0] == 0:
        raise ValueError("these statistics hold no token sample (calibrated with sample_tokens=0)")
    energy = float((x * x).sum())
    d = x.shape[1]
    rank = int(min(max(rank, 0), d))
    out: dict[str, dict[str, Any]] = {}
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; known: {VIEWS}")
        viewed = view_input(view, x, stats, rank, weight, tail=tail, seed=seed, alpha=alpha)
        if viewed is None:
            continue
        a, n16 = viewed
        prof = channel_profile(a)
        # SmoothQuant moves magnitude into the weights: its error is measured in its own units
        e = float((a * a).sum()) if view == "smoothquant" else energy
        prof.update(n16=n16, act_err=act_quant_error(a[:, n16:], e, group_size))
        out[view] = prof
    return out


# --------------------------------------------------------------------------- one token group
GROUP_VIEWS = ("original", "smoothquant", "hadamard", "dirotq")


def outlier_token(sample: torch.Tensor) -> int:
    """Row of ``sample: (m, d)`` whose largest |value| is the most times its own RMS: the token with
    the largest outlier relative to the rest of it (a token that is large everywhere is not one)."""
    x = sample.detach().double()
    if x.shape[0] == 0:
        raise ValueError("these statistics hold no token sample (calibrated with sample_tokens=0)")
    rms = x.pow(2).mean(1).sqrt().clamp_min(1e-30)
    return int((x.abs().amax(1) / rms).argmax())


def _group_of(a: torch.Tensor, group: int, group_size: int, bits: int, total_energy: float) -> dict[str, Any]:
    """INT4 symmetric per-group quantization of the quantized operand ``a: (k,)`` of one token
    (dirotq.quantizers.quantize, format A), reported for group ``group`` (clamped to the last one).

    Values are float32 (what the quantizer sees), reported as float64 numpy arrays of length ≤ group_size.
    """
    k = a.shape[0]
    if k == 0:
        z = np.zeros(0)
        return {"group": 0, "n_groups": 0, "offset": 0, "values": z, "dequant": z, "codes": z.astype(np.int64),
                "error": z, "scale": 0.0, "levels": z, "zeroed": 0, "group_err": 0.0, "token_err": 0.0,
                "absmax_over_median": float("nan")}
    from dirotq.quantizers import qrange, quantize

    a32 = a.float().unsqueeze(0)
    qt = quantize(a32, bits, group_size, True, "exact")
    deq = qt.dequantize(torch.float32)[0].double()
    a64 = a32[0].double()
    n_groups = qt.scale.shape[-1]
    gi = int(min(max(group, 0), n_groups - 1))
    lo, hi = gi * group_size, min((gi + 1) * group_size, k)
    vals, dq = a64[lo:hi], deq[lo:hi]
    codes = qt.q[0, lo:hi].long()
    err = dq - vals
    scale = float(qt.scale[0, gi])
    qmin, qmax = qrange(bits, True)
    mags = vals.abs()
    med = float(mags.median()) if len(mags) else 0.0
    return {
        "group": gi, "n_groups": n_groups, "offset": lo,
        "values": vals.numpy(), "dequant": dq.numpy(), "codes": codes.numpy(), "error": err.numpy(),
        "scale": scale, "levels": (scale * torch.arange(qmin, qmax + 1, dtype=torch.float64)).numpy(),
        "zeroed": int(((codes == 0) & (mags > 0)).sum()),
        "group_err": float(err.pow(2).sum() / vals.pow(2).sum().clamp_min(1e-30)),
        "token_err": float((deq - a64).pow(2).sum() / max(total_energy, 1e-30)),
        "absmax_over_median": float(mags.max() / med) if med > 0 else float("inf"),
    }


def token_group(stats: Any, rank: int, weight: torch.Tensor | None = None, *, token: int | None = None,
                group: int | None = None, plant: float = 0.0, plant_channel: int | None = None,
                views: Iterable[str] = GROUP_VIEWS, tail: str = "haar", seed: int = 42, alpha: float = 0.5,
                group_size: int = 64, bits: int = 4) -> dict[str, Any]:
    """The values of one quantization group of one held-out token before and after each transform.

    ``token``: row of ``stats.sample`` (None or < 0: ``outlier_token``). ``group``: index of the group
    of ``group_size`` values along the input (None or < 0: the group holding the token's largest
    |value|, or the planted channel's group). ``plant`` > 0 sets channel ``plant_channel`` of the token
    (None or < 0: the quietest channel of the group) to ``plant`` × the token's RMS before any
    transform, to watch one large value set the group's scale. The transforms are those of
    ``outlier_views``: SmoothQuant's x/s (s from the calibration abs-max, so it only knows the
    outliers it saw; needs ``weight (o, d)``, else skipped), QuaRot's randomized Hadamard and DiRotQ's
    x·T with its first ``rank`` coefficients removed (they stay 16-bit). Each view quantizes what it
    sends to INT4 (symmetric, scale = group abs-max / 7) and reports group ``group`` of it (the last
    group when it has fewer).

    Returns ``{"token", "n_tokens", "group", "group_size", "d", "rank", "rms", "planted": None or
    {"channel", "value"}, "views": {view: {"values", "dequant", "codes", "error": (≤ group_size,),
    "levels": (16,), "scale", "group", "n_groups", "offset" (first index of the group in the quantized
    part), "n16" (coefficients kept 16-bit), "zeroed" (non-zero values rounded to 0), "group_err"
    (‖error‖² / ‖values‖² of the group), "token_err" (INT4 error of the whole token relative to its
    energy in that view), "absmax_over_median"}}}``.
    """
    sample = stats.sample
    m, d = sample.shape
    t = outlier_token(sample) if token is None or int(token) < 0 else int(token)
    if not 0 <= t < m:
        raise ValueError(f"token {t} is outside 0…{m - 1} (the sample holds {m} held-out tokens)")
    x = sample[t].detach().double().clone()
    rms = float(x.pow(2).mean().sqrt())
    n_groups = -(-d // group_size)
    planted = None
    if group is None or int(group) < 0:
        if plant and plant_channel is not None and int(plant_channel) >= 0:
            gi = int(plant_channel) // group_size
        else:
            gi = int(x.abs().argmax()) // group_size
    else:
        gi = int(group)
    if not 0 <= gi < n_groups:
        raise ValueError(f"group {gi} is outside 0…{n_groups - 1} ({d} inputs in groups of {group_size})")
    if plant:
        lo, hi = gi * group_size, min((gi + 1) * group_size, d)
        c = lo + int(x[lo:hi].abs().argmin()) if plant_channel is None or int(plant_channel) < 0 else int(plant_channel)
        if not 0 <= c < d:
            raise ValueError(f"channel {c} is outside 0…{d - 1}")
        x[c] = float(plant) * rms
        planted = {"channel": c, "value": float(plant) * rms}
    rank = int(min(max(rank, 0), d))
    out: dict[str, Any] = {}
    for view in views:
        if view not in GROUP_VIEWS:
            raise ValueError(f"unknown view {view!r}; known: {GROUP_VIEWS}")
        viewed = view_input(view, x, stats, rank, weight, tail=tail, seed=seed, alpha=alpha)
        if viewed is None:
            continue
        a, n16 = viewed
        # the 16-bit coefficients carry no error but count in the token's energy (as in outlier_views)
        g = _group_of(a[n16:], gi, group_size, bits, float(a.float().double().pow(2).sum()))
        g["n16"] = n16
        out[view] = g
    return {"token": t, "n_tokens": m, "group": gi, "group_size": group_size, "d": d, "rank": rank, "rms": rms,
            "planted": planted, "views": out}


# ------------------------------------------------------------------------------- error vs cost
COST_AXES = {"rank": "rank r (16-bit directions)",
             "params16": "extra 16-bit parameters (against plain W4A4)",
             "flops16": "extra 16-bit FLOPs per token (against plain W4A4)"}


def cost_axis(method: str, ranks: Iterable[int], d: int, o: int, axis: str = "rank") -> list[float]:
    """x of each rank on ``axis`` for ``method`` on a (d → o) layer: the rank itself, or the extra
    16-bit parameters / FLOPs per token against plain W4A4 (``analysis.costs.layer_cost``, the Rank
    plan tab's cost model; the layer counted as W4A4, as its error curve is)."""
    if axis == "rank":
        return [float(r) for r in ranks]
    key = {"params16": "extra_params16", "flops16": "flops16_extra"}.get(axis)
    if key is None:
        raise ValueError(f"unknown x axis {axis!r}; known: {tuple(COST_AXES)}")
    from .costs import layer_cost

    return [float(layer_cost(d, o, method, int(r))[key]) for r in ranks]


# ------------------------------------------------------------------------------ layer error
def rank_grid(d: int) -> list[int]:
    """Ranks 0..d for an error-vs-rank curve: 0, powers of two from 1 (dense at small r, where the
    curve bends most: one direction can remove half of a layer's error, and rank plans use ranks 1,
    2 and 4), the paper's d/8 rank, d/4, d/2, 3d/4 (multiples of 8), d itself (exactly the
    16-bit layer for DiRotQ) and every rank an allocation may choose (``dirotq.allocate.
    candidate_ranks``), so the explorer's rank plans read these curves. 12–22 points: each costs one
    quantization per method."""
    cand = {0, d, *candidate_ranks(d)}
    if d >= 8:
        cand.add(paper_rank(d))
        for f in (0.25, 0.5, 0.75):
            cand.add(int(round(f * d / 8)) * 8)
    r = 1
    while r < d:
        cand.add(r)
        r *= 2
    return sorted(c for c in cand if 0 <= c <= d)


def method_config(method: str, base: Mapping[str, Any] | None = None, rank: int | None = None) -> QuantConfig:
    """The config of ``method`` with the shared quantizer settings ``base`` (bits, group, weights…)
    and, for a ranked method, the uniform ``rank``."""
    base = dict(base or {})
    if rank is not None:
        base["rank"] = int(rank)
    return make_config(method, base)


def curve_methods() -> tuple[str, ...]:
    """Methods drawn as error-vs-rank curves: the ranked ones."""
    return method_names(ranked=True)


def reference_methods() -> tuple[str, ...]:
    """Methods drawn as rank-free reference lines: the unranked ones that quantize activations."""
    return method_names(ranked=False, activations=True)


def error_curves(linear: nn.Linear, stats: Any, *, ranks: Iterable[int] | None = None, spec: Any = None,
                 base: Mapping[str, Any] | None = None, curves: Iterable[str] | None = None,
                 references: Iterable[str] | None = None,
                 progress: Callable[[float, str], Any] | None = None) -> dict[str, Any]:
    """Output error vs rank on the stored tokens ``stats.sample``.

    With ``calibrate(holdout_prompts=k)`` (the explorer's default) the sample holds only tokens of
    held-out prompts, so the numbers are out-of-sample for the PCA basis and GPTQ; otherwise they
    are in-sample (optimistic).

    Returns ``{"ranks": [r...], "curves": {method: {"rel_mse": [...], "sqnr_db": [...]}},
    "references": {method: {"rel_mse", "sqnr_db"}}}``.
    """
    x = stats.sample.float()
    d = linear.in_features
    ranks = rank_grid(d) if ranks is None else sorted({int(r) for r in ranks if 0 <= int(r) <= d})
    y = reference_output(linear, x)
    curve_list = list(curve_methods() if curves is None else curves)
    reference_list = list(reference_methods() if references is None else references)
    total = len(curve_list) * len(ranks) + len(reference_list)
    done = 0
    curves: dict[str, dict[str, list[float]]] = {}
    for m in curve_list:
        cur = {"rel_mse": [], "sqnr_db": []}
        for r in ranks:
            q = quantize_layer(linear, stats, method_config(m, base, r), rank=r, spec=spec)
            e = layer_error(linear, q, x, y)
            cur["rel_mse"].append(e["rel_mse"])
            cur["sqnr_db"].append(e["sqnr_db"])
            done += 1
            if progress:
                progress(done / total, f"{m} rank {r}")
        curves[m] = cur
    refs = {}
    for m in reference_list:
        q = quantize_layer(linear, stats, method_config(m, base), rank=0, spec=spec)
        refs[m] = layer_error(linear, q, x, y)
        done += 1
        if progress:
            progress(done / total, m)
    return {"ranks": ranks, "curves": curves, "references": refs}


def interp_curve(ranks: list[int], values: list[float], rank: int) -> float:
    """Linear interpolation of a curve at ``rank`` (finite values only)."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    if not ok.any():
        return float("inf")
    return float(np.interp(rank, np.asarray(ranks, dtype=float)[ok], v[ok]))


# ----------------------------------------------------------------------------- image metrics
def _to_float_image(img: Any) -> np.ndarray:
    """PIL / uint8 / float image -> (H, W, 3) float64 in [0, 1]."""
    a = np.asarray(img)
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    return a[..., :3]


def psnr_ssim(ref: Any, img: Any) -> tuple[float, float]:
    """PSNR (dB) and SSIM of ``img`` against ``ref`` (dirotq.eval.metrics: torchmetrics SSIM)."""
    from dirotq.eval.metrics import psnr, ssim

    a, b = _to_float_image(ref), _to_float_image(img)
    return float(psnr(a, b)), float(ssim(a, b))


def difference_image(ref: Any, img: Any, gain: float = 4.0) -> np.ndarray:
    """|img − ref| × gain as a uint8 (H, W, 3) image (amplified so small errors are visible)."""
    a, b = _to_float_image(ref), _to_float_image(img)
    return (np.clip(np.abs(a - b) * gain, 0, 1) * 255).round().astype(np.uint8)


def image_report(ref: Any, img: Any, prompt: str | None = None, judge: Any = None) -> dict[str, Any]:
    """PSNR/SSIM of a W4A4 image against the 16-bit image of the same seed; with ``judge`` (the
    embedded model's prompt-faithfulness judge) also its reading of both images:
    ``judge_ref`` / ``judge_w4a4`` = attribute accuracies (dirotq.eval.judge.score_images) and
    ``judge_ref_text`` / ``judge_w4a4_text`` = what the judge sees, or ``judge_unavailable`` saying
    why it cannot read this prompt."""
    p, s = psnr_ssim(ref, img)
    out: dict[str, Any] = {"psnr_db": p, "ssim": s}
    if judge is not None and prompt:
        from dirotq.eval import judge as J

        try:
            J.parse_caption(prompt)
        except ValueError as e:
            out["judge_unavailable"] = f"the judge reads only captions of the shapes world ({e})"
            return out
        arr = np.stack([_to_float_image(ref), _to_float_image(img)]).astype(np.float32)
        t = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        for tag, im in (("judge_ref", t[:1]), ("judge_w4a4", t[1:])):
            out[tag] = J.score_images(judge, im, [prompt])
            out[tag + "_text"] = J.describe(J.predict(judge, im), 0)
    return out


__all__ = ["spectrum", "energy_at", "channel_profile", "outlier_views", "dirotq_transform", "dirotq_rotate",
           "act_quant_error", "rank_grid", "method_config", "curve_methods", "reference_methods", "error_curves",
           "interp_curve", "psnr_ssim", "difference_image", "image_report", "VIEWS", "VIEW_LABELS", "GROUP_VIEWS",
           "outlier_token", "token_group", "COST_AXES", "cost_axis"]
