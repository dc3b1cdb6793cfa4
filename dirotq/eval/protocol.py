"""End-to-end image-quality evaluation: the paper's protocol (docs/EVALUATION.md).

For one model and an evaluation prompt set with fixed per-prompt seeds:

1. reference images (the transformer in its own dtype: "BF16" in the paper, float32 on CPU), once;
2. calibration statistics on the calibration prompts (cached by ``calibrate``);
3. for every method and preset of the registry (``dirotq.registry``), a quantized copy of the
   transformer with **one shared 16-bit rank** for the ranked methods and the same weight quantizer
   (``weights="rtn"|"gptq"``), and its images at the same seeds (``dirotq.eval.images``: cached);
4. metrics per method: PSNR and SSIM against the reference image of the same prompt and seed (mean
   and 95 % bootstrap CI over images), the judge's per-attribute accuracy and the Fréchet distance
   in judge-feature space (embedded shapes model only), LPIPS / FID / CLIP score only from local
   weights (otherwise the cell says why), and the per-layer error summary of ``quantize_``;
5. a Markdown table, a JSON file and a contact sheet (``dirotq.eval.report``, ``images``); in
   rank-sweep mode the quality-vs-rank table of the ranked methods (its figure:
   ``python -m analysis sweep-html PREFIX.json``).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import WEIGHT_ONLY_KINDS, QuantConfig, RankPlan, as_rank_plan
from ..generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, quantized_copy
from ..pipelines import call_kwargs
from ..registry import is_ranked, method_names, needs_stats, preset_names
from ..registry import make_config as registry_config
from .images import ImageSet, config_hash, ensure_images, make_items, real_images, write_contact_sheet
from .judge import JudgeScorer, frechet_from_features
from .metrics import (MetricUnavailable, bootstrap_ci, clip_score, fid, lpips, paired_bootstrap_diff, psnr_batch,
                      ssim_batch)
from .report import FID_NOTE, device_description, layer_summary, versions, write_results, write_sweep

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EVAL_PROMPTS = REPO_ROOT / "assets" / "prompts" / "eval.txt"
DEFAULT_CALIB_PROMPTS = REPO_ROOT / "assets" / "prompts" / "calibration.txt"
DEFAULT_OUT = Path("out") / "eval"
Progress = Callable[[float, str], object]


def method_choices() -> tuple[str, ...]:
    """Every name ``evaluate`` takes: the registered methods, then their presets."""
    return method_names() + preset_names()


def default_methods() -> tuple[str, ...]:
    """What ``evaluate`` runs by default: every registered method (presets on request)."""
    return method_names()


def sweep_methods() -> tuple[str, ...]:
    """What ``rank_sweep`` varies by default: the ranked methods."""
    return method_names(ranked=True)


def _check_methods(names: Sequence[str]) -> None:
    bad = [m for m in names if m not in method_choices()]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {', '.join(method_choices())}")


# ------------------------------------------------------------------------------------- configs
def make_config(method: str, *, rank: int | str | RankPlan = 32, weights: str = "rtn", **overrides) -> QuantConfig:
    """The config of ``method`` with the shared evaluation settings.

    Ranked methods get ``rank`` (an int, "paper" or a ``RankPlan``); ``weights`` ("rtn" | "gptq")
    applies to every method. A preset's own settings win over ``weights`` (``dirotq-paper``:
    asymmetric activations, GPTQ with act-order) and it takes the shared ``rank``; ``overrides``
    win over both.
    """
    _check_methods([method])
    return registry_config(method, {"rank": rank, "weights": weights}, **overrides)


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Non-empty lines of a prompt file (``#`` comments skipped), the first ``limit`` if given."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {p} has no prompts")
    return prompts[:limit] if limit else prompts


# ------------------------------------------------------------------------------------ items
# ------------------------------------------------------------------------------------ metrics
def _ci(values: Sequence[float], n_boot: int, seed: int = 0) -> dict:
    mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}


def _optional_metrics(ref_images, images, prompts, *, fid_weights, lpips_weights, clip_model, n_boot) -> dict:
    out: dict[str, Any] = {}
    try:
        out["lpips"] = _ci(lpips(ref_images, images, weights_path=lpips_weights), n_boot)
    except MetricUnavailable as e:
        out["lpips"] = str(e)
    try:
        out["fid_vs_ref"] = fid(ref_images, images, weights_path=fid_weights)
    except MetricUnavailable as e:
        out["fid_vs_ref"] = str(e)
    try:
        out["clip"] = _ci(clip_score(images, prompts, model_path=clip_model), n_boot)
    except MetricUnavailable as e:
        out["clip"] = str(e)
    return out


# ------------------------------------------------------------------------------------ evaluation
def _load(model) -> tuple[Any, str]:
    from ..pipelines import DEFAULT_MODEL, load_pipeline

    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, (str, os.PathLike)):
        return load_pipeline(str(model)), Path(str(model)).name
    name = getattr(model, "name_or_path", None) or type(model).__name__
    return model, Path(str(name)).name or type(model).__name__


class Evaluator:
    """Shared machinery of ``evaluate`` and ``rank_sweep``: pipeline, items, reference images,
    calibration, image sets per config (cached), metrics."""

    def __init__(self, model=None, *, prompts=None, seeds_per_prompt: int = 2, seed: int = 0, limit: int | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 calib_prompts=None, calib_limit: int | None = None, calib_steps: int | None = None,
                 out_dir: str | os.PathLike = DEFAULT_OUT, batch_size: int = 8, pipe_kwargs: dict | None = None,
                 judge: Any = "auto", n_boot: int = 1000, progress: Progress | None = None,
                 adapter: Any = None):
        from ..calibration import model_fingerprint

        self.pipe, self.model_name = _load(model)
        if prompts is None:
            prompts = DEFAULT_EVAL_PROMPTS
        # an explicit empty list is allowed: per-layer reports and quantization need no eval prompts
        self.prompts = read_prompts(prompts, limit) if isinstance(prompts, (str, os.PathLike)) else list(prompts)[:limit]
        if calib_prompts is None:
            calib_prompts = DEFAULT_CALIB_PROMPTS
        self.calib_prompts = (read_prompts(calib_prompts, calib_limit) if isinstance(calib_prompts, (str, os.PathLike))
                              else list(calib_prompts)[:calib_limit])
        self.items = make_items(self.prompts, seeds_per_prompt, seed)
        self.seeds_per_prompt = seeds_per_prompt
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.calib_steps = calib_steps or num_inference_steps
        self.out = Path(out_dir)
        self.batch_size, self.n_boot = batch_size, n_boot
        self.pipe_kwargs = {**call_kwargs(self.pipe, pipe_kwargs)}
        self.gen_kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **self.pipe_kwargs)
        self.fingerprint = model_fingerprint(self.pipe.transformer)
        self.base_key = {"model": self.fingerprint, "pipeline": type(self.pipe).__name__,
                         "gen": {k: v for k, v in self.gen_kw.items()}}
        self.progress = progress
        self._stats = None
        # extra calibrate() keywords (layers, max_stats_bytes, dist, data_parallel: large models, torchrun)
        self.calibrate_kwargs: dict[str, Any] = {}
        self._judge_arg = judge
        self._judge = None
        self.reference: ImageSet | None = None
        self.timings: dict[str, float] = {}
        self.generated: dict[str, int] = {"images": 0}  # images generated by this evaluator (resumability)
        from ..models import get_adapter

        # ``adapter``: the family adapter with layer-kind overrides (e.g. PixArt's cross-attention K/V
        # as W4A16); the overrides are part of every image key, so their images are never mixed up
        self.adapter = adapter or get_adapter(self.pipe.transformer)
        self.targets = self.adapter.targets(self.pipe.transformer)
        if self.adapter.overrides:
            self.base_key["layer_kinds"] = {k: self.adapter.overrides[k] for k in sorted(self.adapter.overrides)}

    # -- pieces -------------------------------------------------------------------------------
    @property
    def stats(self):
        if self._stats is None:
            from ..calibration import calibrate

            t0 = time.perf_counter()
            self._stats = calibrate(self.pipe, self.calib_prompts, num_inference_steps=self.calib_steps,
                                    guidance_scale=self.guidance_scale, batch_size=self.batch_size,
                                    cache_dir=self.out / "calibration", pipe_kwargs=self.pipe_kwargs,
                                    progress=self.progress, adapter=self.adapter, **self.calibrate_kwargs)
            self.timings["calibration_s"] = time.perf_counter() - t0
        return self._stats

    @property
    def judge(self) -> JudgeScorer:
        if self._judge is None:
            self._judge = JudgeScorer(self._judge_arg, self.prompts)
        return self._judge

    def check_rank(self, rank) -> None:
        """Fail early (ValueError) when a rank or plan does not fit this model's targets."""
        as_rank_plan(rank).resolve(self.targets)

    def reference_images(self, bar=None) -> ImageSet:
        if self.reference is None:
            folder = self.out / "images" / f"reference-{config_hash({**self.base_key, 'variant': 'reference'})}"
            self.reference = ensure_images(self.pipe, self.items, folder, "reference", transformer_fn=None,
                                            gen_kw=self.gen_kw, batch_size=self.batch_size, bar=bar,
                                            counter=self.generated)
        return self.reference

    def method_images(self, label: str, config: QuantConfig, bar=None) -> tuple[ImageSet, dict | None]:
        """Images of ``config`` (quantizing only if some are missing) and its ``quantize_`` report."""
        uses_stats = needs_stats(config) or any(
            s.kind in WEIGHT_ONLY_KINDS and config.weights == "gptq" for s in self.targets.values())
        key = {**self.base_key, "config": config.to_dict()}
        if config.scale_format == "int_ratio":  # images of an earlier format C encoding are not reused
            from ..quantizers import int_ratio_revision

            key["int_ratio_revision"] = int_ratio_revision(getattr(config, "act_symmetric", True))
        if uses_stats:
            key["calibration"] = {"prompts": config_hash(self.calib_prompts), "steps": self.calib_steps}
        # named by the recipe, not the caller's label: the sweep's r=32 reuses the main table's images
        folder = self.out / "images" / f"{config.tag()}-{config_hash(key)}"
        report_path = folder / "quantize_report.json"
        state: dict[str, Any] = {}

        def build():
            # statistics also for methods that do not need them: the per-layer error report uses
            # their held-out token sample (the images do not depend on them)
            stats = self.stats
            t0 = time.perf_counter()
            q, report = quantized_copy(self.pipe.transformer, config, stats, adapter=self.adapter,
                                       return_report=True)
            state["quantize_s"] = time.perf_counter() - t0
            folder.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(report, indent=1, default=str))
            return q

        imgs = ensure_images(self.pipe, self.items, folder, label, transformer_fn=build, gen_kw=self.gen_kw,
                              batch_size=self.batch_size, bar=bar, counter=self.generated)
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        if "quantize_s" in state:
            imgs.quantize_s = state["quantize_s"]
        return imgs, report

    def fidelity(self, imgs: ImageSet) -> dict:
        ref = self.reference_images()
        p = psnr_batch(ref.images, imgs.images)
        s = ssim_batch(ref.images, imgs.images)
        return {"psnr": _ci(p, self.n_boot), "ssim": _ci(s, self.n_boot), "per_image": {"psnr": p, "ssim": s}}

    def judge_metrics(self, images, ref_feats=None, real_feats=None) -> dict:
        import warnings

        with warnings.catch_warnings():
            # sqrtm of rank-deficient covariances (fewer images than features): the value is noisy
            # (the table says so), the warning per call adds nothing
            warnings.simplefilter("ignore")
            return self._judge_metrics(images, ref_feats, real_feats)

    def _judge_metrics(self, images, ref_feats=None, real_feats=None) -> dict:
        j = self.judge
        if j.model is None:
            return {"judge": j.reason, "judge_fd_real": j.reason, "judge_fd_ref": j.reason}
        per = j.per_image(images, [it.prompt for it in self.items])
        feats = j.features(images)
        out = {"judge": {k: v for k, v in per["pooled"].items()},
               "judge_object_acc": _ci(per["object_all"], self.n_boot),
               "judge_image_acc": _ci(per["image_all"], self.n_boot)}
        out["judge_fd_real"] = frechet_from_features(real_feats, feats) if real_feats is not None else "unavailable"
        out["judge_fd_ref"] = frechet_from_features(ref_feats, feats) if ref_feats is not None else 0.0
        return out

    def real_features(self):
        if self.judge.model is None:
            return None, self.judge.reason
        w, h = self.reference_images().images[0].size
        return self.judge.features(real_images(self.items, (w, h))), None

    def meta(self, **extra) -> dict:
        st = self._stats
        return {
            "model": self.model_name, "model_fingerprint": self.fingerprint, "pipeline": type(self.pipe).__name__,
            "reference_dtype": str(next(self.pipe.transformer.parameters()).dtype),
            "n_prompts": len(self.prompts), "seeds_per_prompt": self.seeds_per_prompt, "n_images": len(self.items),
            "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
            "pipe_kwargs": {k: v for k, v in self.pipe_kwargs.items() if isinstance(v, (int, float, str, bool))},
            "calibration": {"n_prompts": len(self.calib_prompts), "num_inference_steps": self.calib_steps,
                            "cache_key": (st.meta.get("cache_key") if st is not None else None)},
            "device": device_description(), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "notes": [FID_NOTE], **extra,
        }


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def evaluate(model=None, *, methods: Sequence[str] | None = None, rank: int | str | RankPlan = 32,
             weights: str = "rtn", config_overrides: Mapping[str, Mapping] | None = None,
             fid_weights: str | None = None, lpips_weights: str | None = None, clip_model: str | None = None,
             contact_rows: int = 16, report: str | os.PathLike | None = None, command: str | None = None,
             evaluator: Evaluator | None = None, **settings) -> dict:
    """Run the protocol; returns the results dict (also written to ``report``.json/.md/_contact.png).

    model: a local diffusers folder / cached hub id / pipeline (default: the embedded tiny PixArt-Σ).
    methods: names from ``method_choices()`` (default: ``default_methods()``); rank: the shared 16-bit rank of the ranked methods (int,
    "paper" or a ``RankPlan``); weights: "rtn" | "gptq" for every method; config_overrides:
    ``{method: {field: value}}``. ``settings`` go to :class:`Evaluator` (prompts, seeds_per_prompt,
    limit, num_inference_steps, guidance_scale, calib_prompts, calib_limit, calib_steps, out_dir,
    batch_size, pipe_kwargs, judge, n_boot, progress). ``report``: output prefix (default
    ``out_dir/quality``).
    """
    methods = default_methods() if methods is None else tuple(methods)
    _check_methods(methods)
    ev = evaluator or Evaluator(model, **settings)
    if not ev.items:
        raise ValueError("no evaluation prompts")
    if any(is_ranked(m) for m in methods):
        ev.check_rank(rank)
    overrides = dict(config_overrides or {})
    configs = {m: make_config(m, rank=rank, weights=weights, **overrides.get(m, {})) for m in methods}
    n_items = len(ev.items)
    generated_before = ev.generated["images"]
    bar = _bar(n_items * (1 + len(configs)), "evaluate")
    try:
        bar.set_postfix_str("reference")
        ref = ev.reference_images(bar)
        sets: dict[str, tuple[ImageSet, dict | None]] = {}
        for m, cfg in configs.items():
            bar.set_postfix_str(m)
            sets[m] = ev.method_images(m, cfg, bar)
    finally:
        bar.close()
    real_feats, real_reason = ev.real_features()
    ref_feats = ev.judge.features(ref.images) if ev.judge.model is not None else None
    results: dict[str, Any] = {"reference": {}, "methods": {}, "paired": {}}
    jr = ev.judge_metrics(ref.images, None, real_feats)
    jr["judge_fd_ref"] = 0.0 if ref_feats is not None else jr["judge_fd_ref"]
    if real_reason:
        jr["judge_fd_real"] = real_reason
    results["reference"] = {"image_dir": str(ref.folder), "generated": ref.generated, "generate_s": ref.seconds, **jr}
    if ev.judge.model is not None and real_feats is not None:
        # the judge read on the procedural renders themselves: its ceiling on these prompts
        w, h = ref.images[0].size
        per = ev.judge.per_image(real_images(ev.items, (w, h)), [it.prompt for it in ev.items])
        results["real_renders"] = {"judge": per["pooled"], "judge_image_acc": _ci(per["image_all"], ev.n_boot),
                                   "judge_object_acc": _ci(per["object_all"], ev.n_boot)}
    for m, (imgs, rep) in sets.items():
        cfg = configs[m]
        entry: dict[str, Any] = {"config": cfg.to_dict(), "tag": cfg.tag(), "image_dir": str(imgs.folder),
                                 "generated": imgs.generated, "generate_s": imgs.seconds,
                                 "quantize_s": getattr(imgs, "quantize_s", None)}
        entry.update(ev.fidelity(imgs))
        jm = ev.judge_metrics(imgs.images, ref_feats, real_feats)
        if real_reason:
            jm["judge_fd_real"] = real_reason
        entry.update(jm)
        entry.update(_optional_metrics(ref.images, imgs.images, [it.prompt for it in ev.items],
                                       fid_weights=fid_weights, lpips_weights=lpips_weights, clip_model=clip_model,
                                       n_boot=ev.n_boot))
        entry["layers"] = layer_summary(rep)
        entry["layer_errors"] = {n: {k: v[k] for k in ("kind", "rank", "rel_mse", "sqnr_db") if k in v}
                                 for n, v in ((rep or {}).get("layers") or {}).items()}
        results["methods"][m] = entry
    results["paired"] = _paired(results["methods"], ev.n_boot)
    results["meta"] = ev.meta(methods=list(methods), rank=(rank.to_dict() if isinstance(rank, RankPlan) else rank),
                              weights=weights, command=command, timings=ev.timings,
                              images_generated=ev.generated["images"] - generated_before)
    prefix = Path(report) if report is not None else ev.out / "quality"
    write_results(results, prefix)
    write_contact_sheet(ref, {m: s for m, (s, _) in sets.items()}, ev.items, Path(f"{prefix}_contact.png"),
                        rows=contact_rows)
    results["files"] = [str(prefix) + ".json", str(prefix) + ".md", f"{prefix}_contact.png"]
    return results


def _paired(entries: Mapping[str, dict], n_boot: int) -> dict:
    """Paired per-image differences of the comparisons the paper makes (dirotq vs svdquant, …)."""
    out = {}
    pairs = [("dirotq", "svdquant"), ("dirotq-lr", "svdquant"), ("dirotq", "quarot"), ("dirotq", "dirotq-lr"),
             ("svdquant", "quarot"), ("quarot", "smoothquant"), ("smoothquant", "rtn"), ("dirotq-paper", "svdquant")]
    for a, b in pairs:
        if a in entries and b in entries:
            out[f"{a} - {b}"] = {
                k: paired_bootstrap_diff(entries[a]["per_image"][k], entries[b]["per_image"][k], n_boot)
                for k in ("psnr", "ssim")}
    return out


# ------------------------------------------------------------------------------------ rank sweep
def rank_sweep(model=None, *, ranks: Sequence[int] = (0, 8, 16, 32, 64), methods: Sequence[str] | None = None,
               weights: str = "rtn", baselines: Sequence[str] | None = None,
               config_overrides: Mapping[str, Mapping] | None = None, report: str | os.PathLike | None = None,
               command: str | None = None, evaluator: Evaluator | None = None, **settings) -> dict:
    """Quality vs the 16-bit rank budget: each method in ``methods`` at each rank (same seeds, same
    reference), plus rank-free ``baselines`` as horizontal lines. ``methods`` default to the ranked
    methods, ``baselines`` to the unranked ones. Writes ``report``.json/.md (default
    ``out_dir/rank_sweep``); ``python -m analysis sweep-html`` draws it."""
    methods = sweep_methods() if methods is None else tuple(methods)
    baselines = method_names(ranked=False) if baselines is None else tuple(baselines)
    ev = evaluator or Evaluator(model, **settings)
    if not ev.items:
        raise ValueError("no evaluation prompts")
    ranks = sorted({int(r) for r in ranks})
    if not ranks:
        raise ValueError("rank sweep: no ranks given")
    for r in ranks:
        if r < 0:
            raise ValueError(f"rank sweep: rank must be ≥ 0, got {r}")
        ev.check_rank(r)
    _check_methods(list(methods) + list(baselines))
    overrides = dict(config_overrides or {})
    bar = _bar(len(ev.items) * (1 + len(ranks) * len(methods) + len(baselines)), "rank sweep")
    curves: dict[str, dict] = {}
    base: dict[str, dict] = {}
    try:
        ev.reference_images(bar)
        for m in baselines:
            bar.set_postfix_str(m)
            imgs, _ = ev.method_images(m, make_config(m, weights=weights, **overrides.get(m, {})), bar)
            f = ev.fidelity(imgs)
            base[m] = {"psnr": f["psnr"], "ssim": f["ssim"]}
        for m in methods:
            curves[m] = {}
            for r in ranks:
                bar.set_postfix_str(f"{m} r={r}")
                cfg = make_config(m, rank=r, weights=weights, **overrides.get(m, {}))
                imgs, rep = ev.method_images(f"{m}-r{r}", cfg, bar)
                f = ev.fidelity(imgs)
                curves[m][str(r)] = {"psnr": f["psnr"], "ssim": f["ssim"], "per_image_psnr": f["per_image"]["psnr"],
                                     "layers": layer_summary(rep), "tag": cfg.tag()}
    finally:
        bar.close()
    paired = {}
    if "dirotq" in curves and "svdquant" in curves:
        for other in ("dirotq", "dirotq-lr"):
            if other in curves:
                paired[f"{other} - svdquant"] = {
                    r: paired_bootstrap_diff(curves[other][r]["per_image_psnr"], curves["svdquant"][r]["per_image_psnr"],
                                             ev.n_boot) for r in curves[other]}
    results = {"ranks": ranks, "curves": curves, "baselines": base, "paired_psnr": paired,
               "meta": ev.meta(methods=list(methods), baselines=list(baselines), weights=weights, command=command,
                               timings=ev.timings)}
    prefix = Path(report) if report is not None else ev.out / "rank_sweep"
    write_sweep(results, prefix)
    results["files"] = [str(prefix) + ext for ext in (".json", ".md", ".html")]
    return results


# ------------------------------------------------------------------------------------ per-layer
def layer_error_table(model=None, *, methods: Sequence[str] = ("rtn", "quarot", "svdquant", "dirotq", "dirotq-lr"),
                      ranks: Sequence[int | str] | None = (32,), rank_plan: RankPlan | None = None,
                      weights: str = "rtn", stats=None, layers: Sequence[str] | None = None,
                      scale_format: str = "exact", evaluator: Evaluator | None = None, **settings) -> list[dict]:
    """Per-layer output error (held-out calibration tokens) of each method at each rank:
    rows ``{method, rank, layer, kind, in_features, out_features, rel_mse, sqnr_db}``.

    One ``quantize_layer`` + ``layer_error`` per (layer, method, rank): no images are generated.
    ``rank_plan`` replaces ``ranks`` (one row set with the plan's per-layer ranks); ``scale_format``:
    "exact" (format A) or "int_ratio" (format C) for every method.
    """
    from ..quantize import layer_error, quantize_layer

    ev = evaluator or Evaluator(model, **settings)
    stats = stats if stats is not None else ev.stats
    _check_methods(methods)
    rank_list: list = [rank_plan] if rank_plan is not None else list(ranks or [0])
    for r in rank_list:
        ev.check_rank(r)
    mods = dict(ev.pipe.transformer.named_modules())
    names = list(layers) if layers else list(ev.targets)
    missing = [n for n in names if n not in ev.targets]
    if missing:
        raise ValueError(f"not quantization targets of this model: {missing[:5]}")
    rows = []
    from tqdm.auto import tqdm

    jobs = [(m, r) for m in methods for r in (rank_list if is_ranked(m) else rank_list[:1])]
    for m, r in tqdm(jobs, desc="layer errors", unit="config"):
        cfg = make_config(m, rank=r, weights=weights, scale_format=scale_format)
        for n in names:
            spec = ev.targets[n]
            st = stats.for_layer(n)
            q = quantize_layer(mods[n], st, cfg, spec=spec)
            err = layer_error(mods[n], q, st.sample)
            label = "plan" if isinstance(r, RankPlan) else r
            rows.append({"method": m, "rank": label if is_ranked(m) else 0, "layer": n, "kind": spec.kind,
                         "in_features": spec.in_features, "out_features": spec.out_features, **err})
    return rows


__all__ = ["evaluate", "rank_sweep", "layer_error_table", "make_config", "read_prompts", "Evaluator", "method_choices",
           "default_methods", "sweep_methods", "DEFAULT_EVAL_PROMPTS", "DEFAULT_CALIB_PROMPTS"]
