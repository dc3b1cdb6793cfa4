"""End-to-end image-quality evaluation: the paper's protocol (docs/EVALUATION.md).

For one model and an evaluation prompt set with fixed per-prompt seeds:

1. reference images (the transformer in its own dtype: "BF16" in the paper, float32 on CPU), once;
2. calibration statistics on the calibration prompts (cached by ``calibrate``);
3. for every method (rtn, smoothquant, quarot, svdquant, dirotq, dirotq-lr, w4a16 as a reference
   point), a quantized copy of the transformer with **one shared 16-bit rank** for the ranked methods
   and the same weight quantizer (``weights="rtn"|"gptq"``), and its images at the same seeds;
4. metrics per method: PSNR and SSIM against the reference image of the same prompt and seed (mean
   and 95 % bootstrap CI over images), the judge's per-attribute accuracy and the Fréchet distance
   in judge-feature space (embedded shapes model only), LPIPS / FID / CLIP score only from local
   weights (otherwise the cell says why), and the per-layer error summary of ``quantize_``;
5. a Markdown table, a JSON file, a contact sheet and, in rank-sweep mode, the quality-vs-rank curve
   of dirotq / dirotq-lr vs svdquant (plotly HTML + table).

Every image is a PNG under ``out_dir/images/<label>-<hash>/<prompt hash>-s<seed>.png``: the hash
covers the model weights, the sampling settings, the method config and the calibration, so a rerun
generates only what is missing (resumable) and a changed setting never reuses stale images.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .config import (DiRotQConfig, DiRotQLRConfig, QuantConfig, QuaRotConfig, RankPlan, RTNConfig, SmoothQuantConfig,
                     SVDQuantConfig, W4A16Config)
from .generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate, pipeline_kwargs, quantized_copy

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EVAL_PROMPTS = REPO_ROOT / "assets" / "prompts" / "eval.txt"
DEFAULT_CALIB_PROMPTS = REPO_ROOT / "assets" / "prompts" / "calibration.txt"
DEFAULT_OUT = Path("out") / "eval"
DEFAULT_METHODS = ("rtn", "smoothquant", "quarot", "svdquant", "dirotq", "dirotq-lr", "w4a16")
SWEEP_METHODS = ("svdquant", "dirotq", "dirotq-lr")
RANKED = ("svdquant", "dirotq", "dirotq-lr", "dirotq-paper")
_FACTORIES: dict[str, Callable[..., QuantConfig]] = {
    "rtn": RTNConfig, "smoothquant": SmoothQuantConfig, "quarot": QuaRotConfig, "svdquant": SVDQuantConfig,
    "dirotq": DiRotQConfig, "dirotq-lr": DiRotQLRConfig, "w4a16": W4A16Config, "dirotq-paper": DiRotQConfig.paper,
}
METHOD_NAMES = tuple(_FACTORIES)
FID_NOTE = "FID / Fréchet distances from fewer than 1000 images are noise: compare only at equal sample counts."
Progress = Callable[[float, str], object]


# ------------------------------------------------------------------------------------- configs
def make_config(method: str, *, rank: int | str | RankPlan = 32, weights: str = "rtn", **overrides) -> QuantConfig:
    """The config of ``method`` with the shared evaluation settings.

    Ranked methods (svdquant, dirotq, dirotq-lr) get ``rank`` (an int, "paper" or a ``RankPlan``);
    ``weights`` ("rtn" | "gptq") applies to every method. ``dirotq-paper`` is the authors' preset
    (asymmetric activations, GPTQ act-order, r = d/8) and ignores ``weights`` unless overridden.
    """
    if method not in _FACTORIES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_NAMES)}")
    kw = dict(overrides)
    if method == "dirotq-paper":
        kw.setdefault("rank", rank)  # the shared budget; pass rank="paper" for the authors' d/8
        return DiRotQConfig.paper(**kw)
    kw.setdefault("weights", weights)
    if method in RANKED:
        kw.setdefault("rank", rank)
    return _FACTORIES[method](**kw)


def config_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:10]


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


def default_pipe_kwargs(pipe) -> dict:
    """Pipeline call settings shared by calibration and generation: no resolution binning, no caption
    cleaning, and a text length no longer than the tokenizer's own maximum (tiny tokenizers have 16)."""
    import inspect

    kw = pipeline_kwargs(pipe)
    params = inspect.signature(pipe.__call__).parameters
    if "clean_caption" in params:
        # PixArt's caption cleaning needs bs4 + ftfy and silently turns itself off without them (with a
        # warning per call); fix it off so calibration and generation agree on every machine
        kw["clean_caption"] = False
    tok = getattr(pipe, "tokenizer", None)
    # the tokenizer's own limit, or the length it was saved with (the embedded model was trained
    # with 48 text tokens and says so in tokenizer_config.json "max_length")
    limits = [getattr(tok, "model_max_length", None), (getattr(tok, "init_kwargs", None) or {}).get("max_length")]
    limits = [v for v in limits if isinstance(v, int) and 0 < v < 10_000]
    if "max_sequence_length" in params and limits:
        default = params["max_sequence_length"].default
        if isinstance(default, int) and min(limits) < default:
            kw["max_sequence_length"] = min(limits)
    return kw


# ------------------------------------------------------------------------------------ items
@dataclass(frozen=True)
class Item:
    """One evaluation image: prompt ``index`` with replicate ``rep`` and its seed."""

    index: int
    prompt: str
    seed: int
    rep: int = 0

    @property
    def filename(self) -> str:
        return f"{prompt_hash(self.prompt)}-s{self.seed}.png"


def make_items(prompts: Sequence[str], seeds_per_prompt: int = 2, seed: int = 0) -> list[Item]:
    """Prompt i, replicate j -> seed ``seed + 1000·j + i`` (stable when prompts are appended)."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be ≥ 1, got {seeds_per_prompt}")
    return [Item(i, p, seed + 1000 * j + i, j) for j in range(seeds_per_prompt) for i, p in enumerate(prompts)]


@dataclass
class ImageSet:
    """Images of one variant (reference or method) for the evaluation items, cached as PNGs."""

    label: str
    folder: Path
    images: list = field(default_factory=list)
    generated: int = 0
    seconds: float = 0.0


def _load_png(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _ensure_images(pipe, items: Sequence[Item], folder: Path, label: str, *, transformer_fn: Callable[[], Any] | None,
                   gen_kw: dict, batch_size: int, bar=None, counter: dict | None = None) -> ImageSet:
    """Load cached PNGs of ``items`` from ``folder``; generate the missing ones (``transformer_fn()``
    builds the transformer lazily, so a fully cached method is never quantized)."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [it for it in items if not (folder / it.filename).is_file()]
    out = ImageSet(label, folder)
    if missing:
        transformer = transformer_fn() if transformer_fn is not None else None
        t0 = time.perf_counter()
        for b in range(0, len(missing), batch_size):
            chunk = missing[b:b + batch_size]
            imgs = generate(pipe, [it.prompt for it in chunk], [it.seed for it in chunk], transformer=transformer,
                            batch_size=batch_size, **gen_kw)
            for it, im in zip(chunk, imgs):
                tmp = folder / (it.filename + ".tmp.png")
                im.save(tmp)
                os.replace(tmp, folder / it.filename)  # atomic: an interrupted run leaves no half image
            if bar is not None:
                bar.update(len(chunk))
        out.seconds = time.perf_counter() - t0
        out.generated = len(missing)
        if counter is not None:
            counter["images"] = counter.get("images", 0) + len(missing)
    out.images = [_load_png(folder / it.filename) for it in items]
    if bar is not None and not missing:
        bar.update(0)
    return out


# ------------------------------------------------------------------------------------ metrics
def _ci(values: Sequence[float], n_boot: int, seed: int = 0) -> dict:
    from analysis.metrics import bootstrap_ci

    mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}


class _Judge:
    """The embedded model's judge, or the reason it does not apply."""

    def __init__(self, judge: Any, prompts: Sequence[str]):
        self.model, self.reason = None, None
        if judge is None or judge is False:
            self.reason = "unavailable: judge disabled"
            return
        try:
            from analysis import judge as J

            if judge in ("auto", True):
                path = J.DEFAULT_JUDGE_PATH
                if not Path(path, "config.json").is_file():
                    self.reason = f"unavailable: no judge weights at {path}"
                    return
                judge = path
            for p in set(prompts):
                J.parse_caption(p)  # the judge only reads the shapes world
            self.model = J.load_judge(judge) if isinstance(judge, (str, os.PathLike)) else judge
            self.J = J
        except ValueError as e:
            self.reason = f"unavailable: prompts outside the shapes grammar ({e})"
        except Exception as e:  # missing files, analysis package absent
            self.reason = f"unavailable: judge could not be loaded ({type(e).__name__}: {e})"

    def per_image(self, images, prompts) -> dict:
        """Per-image object accuracy (fraction of named objects fully right) and all-correct flags,
        plus the pooled per-attribute accuracies."""
        J = self.J
        pred = J.predict(self.model, images)
        lab = J.labels_from_prompts(list(prompts))
        pooled = J.attribute_accuracy(pred, lab)
        obj, img = [], []
        for i in range(len(prompts)):
            one = J.attribute_accuracy({k: v[i:i + 1] for k, v in pred.items()}, {k: v[i:i + 1] for k, v in lab.items()})
            obj.append(one["object_all"])
            img.append(one["image_all"])
        return {"pooled": pooled, "object_all": obj, "image_all": img}

    def features(self, images) -> np.ndarray:
        return self.J.judge_features(self.model, images)


def _real_images(items: Sequence[Item], size: tuple[int, int]) -> list:
    """Procedural renders of the scenes the prompts describe (the "real" side of the Fréchet
    distance), with per-seed jitter/rotation/shade drawn like the training data."""
    from PIL import Image

    from analysis.shapes_grammar import Scene, parse_caption

    spec = importlib.util.spec_from_file_location("_dirotq_shapes_data", REPO_ROOT / "scripts" / "shapes_data.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError("scripts/shapes_data.py (the procedural renderer) is missing")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = []
    for it in items:
        sc = parse_caption(it.prompt)
        n = len(sc.objects)
        rng = np.random.default_rng([it.seed, 7])
        meta = {"jitter": rng.uniform(-0.035, 0.035, size=(n, 2)).round(4).tolist(),
                "rot": rng.uniform(-12, 12, size=n).round(2).tolist(),
                "shade": rng.integers(-12, 13, size=(n + 2, 3)).tolist()}
        arr = mod.render(Scene(sc.objects, sc.background, sc.bg_top, sc.bg_bottom, meta), size=max(size))
        out.append(Image.fromarray(arr).resize(size, Image.BICUBIC))
    return out


def _optional_metrics(ref_images, images, prompts, *, fid_weights, lpips_weights, clip_model, n_boot) -> dict:
    from analysis.metrics import MetricUnavailable, clip_score, fid, lpips

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


def _layer_type(name: str) -> str:
    """``transformer_blocks.3.attn1.to_q`` -> ``attn1.to_q`` (the part after the block index)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1:]) or name
    return name


def _layer_summary(report: Mapping | None) -> dict:
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


# ------------------------------------------------------------------------------------ evaluation
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


def _versions() -> dict:
    import diffusers

    try:
        from . import __version__ as dv
    except Exception:
        dv = "unknown"
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "dirotq": dv,
            "python": platform.python_version()}


def _load(model) -> tuple[Any, str]:
    from .pipelines import DEFAULT_MODEL, load_pipeline

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
                 judge: Any = "auto", n_boot: int = 1000, progress: Progress | None = None):
        from .calibration import model_fingerprint

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
        self.pipe_kwargs = {**default_pipe_kwargs(self.pipe), **(pipe_kwargs or {})}
        self.gen_kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **self.pipe_kwargs)
        self.fingerprint = model_fingerprint(self.pipe.transformer)
        self.base_key = {"model": self.fingerprint, "pipeline": type(self.pipe).__name__,
                         "gen": {k: v for k, v in self.gen_kw.items()}}
        self.progress = progress
        self._stats = None
        self._judge_arg = judge
        self._judge = None
        self.reference: ImageSet | None = None
        self.timings: dict[str, float] = {}
        self.generated: dict[str, int] = {"images": 0}  # images generated by this evaluator (resumability)
        from .models import get_adapter

        self.adapter = get_adapter(self.pipe.transformer)
        self.targets = self.adapter.targets(self.pipe.transformer)

    # -- pieces -------------------------------------------------------------------------------
    @property
    def stats(self):
        if self._stats is None:
            from .calibration import calibrate

            t0 = time.perf_counter()
            self._stats = calibrate(self.pipe, self.calib_prompts, num_inference_steps=self.calib_steps,
                                    guidance_scale=self.guidance_scale, batch_size=self.batch_size,
                                    cache_dir=self.out / "calibration", pipe_kwargs=self.pipe_kwargs,
                                    progress=self.progress)
            self.timings["calibration_s"] = time.perf_counter() - t0
        return self._stats

    @property
    def judge(self) -> _Judge:
        if self._judge is None:
            self._judge = _Judge(self._judge_arg, self.prompts)
        return self._judge

    def check_rank(self, rank) -> None:
        """Fail early (ValueError) when a rank or plan does not fit this model's targets."""
        plan = rank if isinstance(rank, RankPlan) else RankPlan({"_default": rank})
        widths = {n: min(s.in_features, s.out_features) for n, s in self.targets.items() if s.kind == "w4a4"}
        plan.validate({n: s.in_features for n, s in self.targets.items()})
        for n, d in widths.items():
            r = plan.rank_for(n, self.targets[n].in_features)
            if r > d:
                raise ValueError(f"rank {r} for {n!r} exceeds min(in, out) = {d} of that layer")

    def reference_images(self, bar=None) -> ImageSet:
        if self.reference is None:
            folder = self.out / "images" / f"reference-{config_hash({**self.base_key, 'variant': 'reference'})}"
            self.reference = _ensure_images(self.pipe, self.items, folder, "reference", transformer_fn=None,
                                            gen_kw=self.gen_kw, batch_size=self.batch_size, bar=bar,
                                            counter=self.generated)
        return self.reference

    def method_images(self, label: str, config: QuantConfig, bar=None) -> tuple[ImageSet, dict | None]:
        """Images of ``config`` (quantizing only if some are missing) and its ``quantize_`` report."""
        from .methods import needs_stats

        uses_stats = needs_stats(config) or any(
            s.kind == "w4a16" and config.weights == "gptq" for s in self.targets.values())
        key = {**self.base_key, "config": config.to_dict()}
        if uses_stats or config.method not in ("rtn", "w4a16", "quarot"):
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

        imgs = _ensure_images(self.pipe, self.items, folder, label, transformer_fn=build, gen_kw=self.gen_kw,
                              batch_size=self.batch_size, bar=bar, counter=self.generated)
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        if "quantize_s" in state:
            imgs.quantize_s = state["quantize_s"]
        return imgs, report

    def fidelity(self, imgs: ImageSet) -> dict:
        from analysis.metrics import psnr_batch, ssim_batch

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
        from analysis.judge import frechet_from_features

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
        try:
            w, h = self.reference_images().images[0].size
            return self.judge.features(_real_images(self.items, (w, h))), None
        except Exception as e:
            return None, f"unavailable: real renders failed ({type(e).__name__}: {e})"

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
            "device": device_description(), "versions": _versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "notes": [FID_NOTE], **extra,
        }


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def evaluate(model=None, *, methods: Sequence[str] = DEFAULT_METHODS, rank: int | str | RankPlan = 32,
             weights: str = "rtn", config_overrides: Mapping[str, Mapping] | None = None,
             fid_weights: str | None = None, lpips_weights: str | None = None, clip_model: str | None = None,
             contact_rows: int = 16, report: str | os.PathLike | None = None, command: str | None = None,
             evaluator: Evaluator | None = None, **settings) -> dict:
    """Run the protocol; returns the results dict (also written to ``report``.json/.md/_contact.png).

    model: a local diffusers folder / cached hub id / pipeline (default: the embedded tiny PixArt-Σ).
    methods: names from ``METHOD_NAMES``; rank: the shared 16-bit rank of the ranked methods (int,
    "paper" or a ``RankPlan``); weights: "rtn" | "gptq" for every method; config_overrides:
    ``{method: {field: value}}``. ``settings`` go to :class:`Evaluator` (prompts, seeds_per_prompt,
    limit, num_inference_steps, guidance_scale, calib_prompts, calib_limit, calib_steps, out_dir,
    batch_size, pipe_kwargs, judge, n_boot, progress). ``report``: output prefix (default
    ``out_dir/quality``).
    """
    ev = evaluator or Evaluator(model, **settings)
    if not ev.items:
        raise ValueError("no evaluation prompts")
    unknown = [m for m in methods if m not in _FACTORIES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHOD_NAMES)}")
    if any(m in RANKED for m in methods):
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
        try:
            w, h = ref.images[0].size
            real = _real_images(ev.items, (w, h))
            per = ev.judge.per_image(real, [it.prompt for it in ev.items])
            results["real_renders"] = {"judge": per["pooled"], "judge_image_acc": _ci(per["image_all"], ev.n_boot),
                                       "judge_object_acc": _ci(per["object_all"], ev.n_boot)}
        except Exception as e:  # pragma: no cover - renderer problems are reported, not fatal
            results["real_renders"] = {"judge": f"unavailable: {e}"}
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
        entry["layers"] = _layer_summary(rep)
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
    from analysis.metrics import paired_bootstrap_diff

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
def rank_sweep(model=None, *, ranks: Sequence[int] = (0, 8, 16, 32, 64), methods: Sequence[str] = SWEEP_METHODS,
               weights: str = "rtn", baselines: Sequence[str] = ("rtn", "quarot", "w4a16"),
               config_overrides: Mapping[str, Mapping] | None = None, report: str | os.PathLike | None = None,
               command: str | None = None, evaluator: Evaluator | None = None, **settings) -> dict:
    """Quality vs the 16-bit rank budget: each method in ``methods`` at each rank (same seeds, same
    reference), plus rank-free ``baselines`` as horizontal lines. Writes ``report``.json/.md/.html
    (default ``out_dir/rank_sweep``)."""
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
    bad = [m for m in list(methods) + list(baselines) if m not in _FACTORIES]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {', '.join(METHOD_NAMES)}")
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
                                     "layers": _layer_summary(rep), "tag": cfg.tag()}
    finally:
        bar.close()
    paired = {}
    if "dirotq" in curves and "svdquant" in curves:
        from analysis.metrics import paired_bootstrap_diff

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
                      evaluator: Evaluator | None = None, **settings) -> list[dict]:
    """Per-layer output error (held-out calibration tokens) of each method at each rank:
    rows ``{method, rank, layer, kind, in_features, out_features, rel_mse, sqnr_db}``.

    One ``quantize_layer`` + ``layer_error`` per (layer, method, rank): no images are generated.
    ``rank_plan`` replaces ``ranks`` (one row set with the plan's per-layer ranks).
    """
    from .quantize import layer_error, quantize_layer

    ev = evaluator or Evaluator(model, **settings)
    stats = stats if stats is not None else ev.stats
    bad = [m for m in methods if m not in _FACTORIES]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {', '.join(METHOD_NAMES)}")
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

    jobs = [(m, r) for m in methods for r in (rank_list if m in RANKED else rank_list[:1])]
    for m, r in tqdm(jobs, desc="layer errors", unit="config"):
        cfg = make_config(m, rank=r, weights=weights)
        for n in names:
            spec = ev.targets[n]
            st = stats.for_layer(n)
            q = quantize_layer(mods[n], st, cfg, spec=spec)
            err = layer_error(mods[n], q, st.sample)
            label = "plan" if isinstance(r, RankPlan) else r
            rows.append({"method": m, "rank": label if m in RANKED else 0, "layer": n, "kind": spec.kind, "in_features": spec.in_features,
                         "out_features": spec.out_features, **err})
    return rows


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
    cols = list(dict.fromkeys(f"{r['method']}@r{r['rank']}" if r["method"] in RANKED else r["method"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cell = {}
    for r in rows:
        c = f"{r['method']}@r{r['rank']}" if r["method"] in RANKED else r["method"]
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


# ------------------------------------------------------------------------------------ writers
def _fmt_ci(d: Any, digits: int = 2) -> str:
    if isinstance(d, Mapping) and "mean" in d:
        f = f"%.{digits}f"
        return f"{f % d['mean']} [{f % d['lo']}, {f % d['hi']}]"
    if isinstance(d, float):
        return f"{d:.{digits}f}"
    return str(d)


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
        lines.append(f"| {name} | {p} | {s} | {_fmt_ci(r.get('judge_image_acc', r.get('judge')), 3)} | "
                     f"{_fmt_ci(r.get('judge_object_acc', '–'), 3)} | {_fmt_ci(r.get('judge_fd_real', '–'), 1)} | "
                     f"{_fmt_ci(r.get('judge_fd_ref', '–'), 1)} | – | – | – |")
    for m, e in ms.items():
        lines.append(f"| {m} (`{e['tag']}`) | {_fmt_ci(e['psnr'])} | {_fmt_ci(e['ssim'], 3)} | "
                     f"{_fmt_ci(e.get('judge_image_acc', e.get('judge')), 3)} | {_fmt_ci(e.get('judge_object_acc', '–'), 3)} | "
                     f"{_fmt_ci(e.get('judge_fd_real'), 1)} | {_fmt_ci(e.get('judge_fd_ref'), 1)} | "
                     f"{_fmt_ci(e.get('lpips'), 3)} | {_fmt_ci(e.get('fid_vs_ref'), 1)} | {_fmt_ci(e.get('clip'), 1)} |")
    if results.get("paired"):
        lines += ["", "## Paired differences (same prompts and seeds)", "",
                  "| comparison | ΔPSNR (dB) | wins (PSNR) | ΔSSIM |", "|---|---|---|---|"]
        for k, v in results["paired"].items():
            lines.append(f"| {k} | {_fmt_ci(v['psnr'])} | {v['psnr']['win_rate']:.0%} | {_fmt_ci(v['ssim'], 3)} |")
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


def write_contact_sheet(ref: ImageSet, sets: Mapping[str, ImageSet], items: Sequence[Item], path: Path,
                        rows: int = 16, thumb: int = 128) -> Path:
    """Rows = prompts (first seed of each), columns = reference then methods; labelled."""
    from PIL import Image, ImageDraw

    idx = [k for k, it in enumerate(items) if it.rep == 0][:rows]
    cols = [("reference", ref)] + list(sets.items())
    label_w, head_h, pad = 40, 16, 2
    W = label_w + len(cols) * (thumb + pad) + pad
    H = head_h + len(idx) * (thumb + pad) + pad
    sheet = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(sheet)
    for c, (name, s) in enumerate(cols):
        x = label_w + pad + c * (thumb + pad)
        d.text((x + 2, 2), name[: thumb // 6], fill="black")
        for r, k in enumerate(idx):
            y = head_h + pad + r * (thumb + pad)
            sheet.paste(s.images[k].resize((thumb, thumb), Image.LANCZOS), (x, y))
    for r, k in enumerate(idx):
        y = head_h + pad + r * (thumb + pad)
        d.text((3, y + thumb // 2 - 6), f"p{items[k].index}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the committed sheets small (~4× smaller) at no visible cost
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


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
        lines.append(f"| {m} | " + " | ".join(_fmt_ci(c[str(r)]["psnr"]) for r in ranks) + " |")
    lines += ["", "SSIM:", "", "| method | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
    for m, c in results["curves"].items():
        lines.append(f"| {m} | " + " | ".join(_fmt_ci(c[str(r)]["ssim"], 3) for r in ranks) + " |")
    lines += ["", "Mean per-layer SQNR (dB):", "", "| method | " + " | ".join(f"r={r}" for r in ranks) + " |",
              "|---|" + "---|" * len(ranks)]
    for m, c in results["curves"].items():
        lines.append(f"| {m} | " + " | ".join(
            "%.2f" % c[str(r)]["layers"]["mean_sqnr_db"] if "mean_sqnr_db" in c[str(r)]["layers"] else "–"
            for r in ranks) + " |")
    if results.get("baselines"):
        lines += ["", "Rank-free baselines: " + "; ".join(
            f"{m} PSNR {_fmt_ci(b['psnr'])}, SSIM {_fmt_ci(b['ssim'], 3)}" for m, b in results["baselines"].items())]
    for k, v in results.get("paired_psnr", {}).items():
        lines += ["", f"Paired ΔPSNR {k} (dB): " + "; ".join(f"r={r}: {_fmt_ci(d)} (wins {d['win_rate']:.0%})"
                                                           for r, d in v.items())]
    return "\n".join(lines) + "\n"


def sweep_figure(results: Mapping):
    """plotly figure: PSNR and SSIM vs rank with 95 % CI error bars; baselines as dashed lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ranks = results["ranks"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("PSNR vs reference (dB)", "SSIM vs reference"))
    for m, c in results["curves"].items():
        for col, key in ((1, "psnr"), (2, "ssim")):
            ys = [c[str(r)][key]["mean"] for r in ranks]
            hi = [c[str(r)][key]["hi"] - c[str(r)][key]["mean"] for r in ranks]
            lo = [c[str(r)][key]["mean"] - c[str(r)][key]["lo"] for r in ranks]
            fig.add_trace(go.Scatter(x=ranks, y=ys, name=m, legendgroup=m, showlegend=col == 1, mode="lines+markers",
                                     error_y=dict(type="data", array=hi, arrayminus=lo)), row=1, col=col)
    for m, b in results.get("baselines", {}).items():
        for col, key in ((1, "psnr"), (2, "ssim")):
            fig.add_trace(go.Scatter(x=[ranks[0], ranks[-1]], y=[b[key]["mean"]] * 2, name=m, legendgroup=m,
                                     showlegend=col == 1, mode="lines", line=dict(dash="dash")), row=1, col=col)
    meta = results["meta"]
    fig.update_layout(title=f"{meta['model']}: quality vs 16-bit rank ({meta['n_images']} images, "
                            f"weights {meta['weights']})", template="plotly_white")
    fig.update_xaxes(title_text="16-bit rank r (per layer)")
    return fig


def write_sweep(results: Mapping, prefix: str | os.PathLike) -> None:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(_jsonable(results), indent=1, default=str))
    Path(f"{prefix}.md").write_text(sweep_markdown(results))
    # plotly.js beside the HTML (written once per folder): the page must render offline
    sweep_figure(results).write_html(f"{prefix}.html", include_plotlyjs="directory")


__all__ = ["evaluate", "rank_sweep", "layer_error_table", "format_layer_table", "make_config", "make_items",
           "read_prompts", "Evaluator", "DEFAULT_METHODS", "SWEEP_METHODS", "METHOD_NAMES", "FID_NOTE"]
