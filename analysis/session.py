"""The explorer's UI-free session: one model, its calibration and every per-layer quantity the app
plots, cached (docs/APP.md: after calibration a layer or rank change redraws without recomputing).

``ExplorerSession(model)`` holds the pipeline, the adapter's targets and the calibration statistics;
per-layer results (spectra, outlier views, error-vs-rank curves, quantized models) are memoised in
the session and, for the slow ones (statistics, curves), on disk under a content hash of the model
fingerprint, prompts and calibration settings, so a restart neither recalibrates nor re-sweeps.
``get_session`` is the process-level cache: two browser users of the same model share one session.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dirotq.calibration import CalibrationStats, calibrate, model_fingerprint
from dirotq.config import DEFAULT_KEY, WEIGHT_ONLY_KINDS, RankPlan
from dirotq.eval.judge import DEFAULT_JUDGE_PATH, load_judge
from dirotq.eval.protocol import DEFAULT_CALIB_PROMPTS, read_prompts
from dirotq.fusion import fuse_for_inference
from dirotq.generate import check_sampling, generate_pair, truncation_warning, unknown_words
from dirotq.models import get_adapter, target_report
from dirotq.pipelines import DEFAULT_MODEL, call_kwargs, load_pipeline
from dirotq.quantize import layer_error, quantize_, quantize_layer
from dirotq.allocate import (RANK_GRID, candidate_ranks, layer_error_curves, layer_params16, layer_sensitivity,
                             record_transformer_calls, sensitivity_curves)
from dirotq.methods import BRANCH_METHODS
from dirotq.registry import get_method, method_names

from . import plans
from .costs import plan_cost
from .plans import DEFAULT_POLICY, POLICIES
from .stats import (difference_image, energy_at, error_curves, image_report, interp_curve,
                    method_config, outlier_views, rank_grid, spectrum)

Progress = Callable[[float, str], Any]
W4A4_ONLY = "output error, tied, W4A4 layers only"  # the budget plot's reference: no weight-only branches
MAX_STEPS = 100  # Generate's step limit: an interactive view, where a longer schedule only makes users wait

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("DIROTQ_CACHE", str(ROOT / ".cache" / "explorer")))
# Fallback calibration prompts in the embedded model's caption grammar (dirotq/eval/shapes_grammar.py);
# assets/prompts/calibration.txt replaces them when present.
BUILTIN_PROMPTS = [
    "a large red circle in the center, on a white background",
    "a small blue square on the left and a large yellow star on the right, on a black background",
    "a large green diamond at the top, on a gray background",
    "a small white triangle in the bottom left, on a blue background",
    "a large purple star in the top right and a small orange circle at the bottom, on a white background",
    "a small pink diamond in the center, on a gradient background from black to blue",
    "a large cyan square on the right, on a yellow background",
    "a small black circle in the top left, on a pink background",
    "a large orange triangle on the left, on a gradient background from white to gray",
    "a small red star at the top and a small blue circle in the center and a large green square at the bottom, on a white background",
    "a large yellow diamond in the bottom right, on a green background",
    "a small purple square at the bottom, on a gradient background from blue to black",
    "a large white circle on the left and a small red triangle on the right, on a blue background",
    "a small green star in the center, on a black background",
    "a large blue triangle in the top left, on a gradient background from yellow to pink",
    "a small orange square in the top right, on a gray background",
]


@dataclass(frozen=True)
class CalibSettings:
    """How the explorer calibrates (small on purpose: seconds on 2 CPU cores for the embedded model)."""

    num_prompts: int = 16
    num_inference_steps: int = 10
    steps: tuple[int, ...] | None = (0, 3, 6, 9)  # a spread of the short schedule (None: every step)
    seed: int = 0
    batch_size: int = 16
    sample_tokens: int = 512
    holdout_prompts: int = 4  # their tokens fill only the error sample: per-layer errors are out-of-sample


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def methods() -> tuple[str, ...]:
    """The explorer's method menu: every registered method."""
    return method_names()


def default_prompts() -> list[str]:
    """assets/prompts/calibration.txt (one prompt a line) when present, else the built-in set."""
    if DEFAULT_CALIB_PROMPTS.is_file():
        return read_prompts(DEFAULT_CALIB_PROMPTS)
    return list(BUILTIN_PROMPTS)


class _LRU(OrderedDict):
    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)
        return value


class ExplorerSession:
    """Everything the app shows for one model. Methods raise ``ValueError`` / ``KeyError`` /
    ``FileNotFoundError`` with readable messages (the app shows them)."""

    def __init__(self, model: str | None = None, *, pipe: Any = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
                 prompts: list[str] | None = None, calib: CalibSettings = CalibSettings(),
                 base: Mapping[str, Any] | None = None, model_id: str | None = None, cuda_graphs: bool = False):
        self.model = str(model or DEFAULT_MODEL)
        # Generate replays both transformers' steps from CUDA graphs (dirotq.cuda_graphs; GPU only)
        self.cuda_graphs = bool(cuda_graphs)
        if pipe is None:
            pipe = load_pipeline(self.model, device=device, dtype=dtype)
        self.pipe = pipe
        self.device = device
        self.transformer = pipe.transformer.eval()
        self.adapter = get_adapter(self.transformer)
        self.targets = self.adapter.targets(self.transformer)
        if not self.targets:
            raise ValueError(f"{self.model}: no quantization targets found")
        self.modules = dict(self.transformer.named_modules())
        self.fingerprint = model_fingerprint(self.transformer)
        self.model_id = model_id or f"{Path(self.model).name}#{self.fingerprint}"
        self.prompts = list(prompts or default_prompts())[: calib.num_prompts + calib.holdout_prompts]
        self.calib = calib
        self.base = dict(base or {})  # shared quantizer settings (weights "rtn"/"gptq", group size…)
        self.pipe_kwargs = call_kwargs(self.pipe)
        self.key = _hash({"model": self.fingerprint, "family": self.adapter.family, "prompts": self.prompts,
                          "calib": asdict(calib), "pipe_kwargs": self.pipe_kwargs})
        self.cache_dir = Path(cache_dir) / self.key if cache_dir is not None else None
        self.stats = None
        self.lock = threading.RLock()  # pipeline runs (calibration, generation) one at a time
        self.compute_lock = threading.RLock()  # guards the memo tables and the in-flight sweeps
        self._inflight: dict[str, threading.Event] = {}
        self._quant_lock = threading.Lock()  # one whole-model quantization at a time
        self._cpu_linears: dict[str, Any] = {}
        self._memo: dict[str, _LRU] = {k: _LRU(n) for k, n in
                                       (("spectrum", 512), ("views", 64), ("curves", 1024), ("point", 256),
                                        ("quantized", 2), ("judge", 1))}
        self._curves_disk: dict[str, Any] = {}  # layer-error curves by layer, sensitivities by method
        self._calls = None  # transformer inputs of the held-out prompts (the output-error policy)
        self._warm: threading.Thread | None = None
        self._stop = threading.Event()
        self.is_embedded = Path(self.model).resolve() == Path(DEFAULT_MODEL).resolve()

    # ------------------------------------------------------------------------------ plumbing
    def describe(self) -> str:
        return f"`{self.model_id}` ({self.adapter.family}): {target_report(self.transformer, self.adapter)}"

    # --------------------------------------------------------------------------- calibration
    @property
    def calibrated(self) -> bool:
        return self.stats is not None

    def load_cached(self) -> bool:
        """Load statistics saved by an earlier run (no model run). True when found."""

        if self.stats is not None:
            return True
        if self.cache_dir is not None and (self.cache_dir / "stats" / "meta.json").is_file():
            self.stats = CalibrationStats.load(self.cache_dir / "stats")
            self._load_curves()
            return True
        return False

    def calibrate(self, progress: Progress | None = None) -> Any:
        """Calibrate once (cached in memory and on disk); returns the ``CalibrationStats``."""

        with self.lock:
            if self.load_cached():
                if progress:
                    progress(1.0, "statistics loaded from cache")
                return self.stats
            c = self.calib
            stats = calibrate(self.pipe, self.prompts, num_inference_steps=c.num_inference_steps,
                              steps=list(c.steps) if c.steps is not None else None, seed=c.seed,
                              batch_size=c.batch_size, sample_tokens=c.sample_tokens, adapter=self.adapter,
                              holdout_prompts=min(c.holdout_prompts, len(self.prompts) - 1),
                              progress=progress or (lambda f, m: None), pipe_kwargs=self.pipe_kwargs)
            if self.cache_dir is not None:
                stats.save(self.cache_dir / "stats")
            self.stats = stats
            return stats

    def require_stats(self):
        if self.stats is None:
            raise ValueError("not calibrated yet: press “Calibrate” first")
        return self.stats

    # -------------------------------------------------------------------------------- layers
    def linear(self, name: str):
        """The float ``nn.Linear`` of target ``name`` on the CPU, where the statistics live (a cached
        copy when the model runs on a GPU): per-layer analysis never touches the device."""
        mod = self.modules[name]
        if mod.weight.device.type == "cpu":
            return mod
        with self.compute_lock:
            if name not in self._cpu_linears:
                self._cpu_linears[name] = copy.deepcopy(mod).float().cpu()
            return self._cpu_linears[name]

    def layer_spec(self, name: str):
        if name not in self.targets:
            raise KeyError(f"{name!r} is not a quantization target of this model")
        return self.targets[name]

    def blocks(self) -> list[int]:
        return sorted({s.block for s in self.targets.values()})

    def layer_types(self, block: int | None = None) -> list[str]:
        return list(dict.fromkeys(s.layer_type for s in self.targets.values() if block is None or s.block == block))

    def layer_name(self, block: int, layer_type: str) -> str:
        for n, s in self.targets.items():
            if s.block == int(block) and s.layer_type == layer_type:
                return n
        raise KeyError(f"block {block} has no target {layer_type!r}")

    def layer_label(self, name: str) -> str:
        s = self.layer_spec(name)
        shared = [n.rsplit(".", 1)[-1] for n, t in self.targets.items() if t.group == s.group and n != name]
        note = f", shares its input with {', '.join(shared)}" if shared else ""
        kind = f"{s.kind.upper()} by default (weight-only)" if s.kind != "w4a4" else "W4A4"
        text = f"`{name}`: {s.in_features} → {s.out_features}, {kind}{note}"
        if self.stats is not None:
            st = self.stats.for_layer(name)
            am = st.abs_max.double()
            ratio = float(am.max() / am.median().clamp_min(1e-12))
            text += (f". Input outliers: largest channel abs-max {ratio:.1f}× the median channel's, "
                     f"largest channel kurtosis {float(st.kurtosis().max()):.0f} (Gaussian: 3)")
        return text

    # ------------------------------------------------------------------------- per-layer views
    def spectrum(self, name: str) -> dict:
        s = self.layer_spec(name)
        memo = self._memo["spectrum"]
        if s.group not in memo:
            memo.put(s.group, spectrum(self.require_stats().for_layer(name)))
        return memo[s.group]

    def energy(self, name: str, rank: int) -> float:
        return energy_at(self.spectrum(name)["explained"], rank)

    def outliers(self, name: str, rank: int, views: tuple[str, ...]) -> dict:
        key = (name, int(rank), tuple(views))
        memo = self._memo["views"]
        if key not in memo:
            memo.put(key, outlier_views(self.require_stats().for_layer(name), int(rank), self.linear(name).weight,
                                        views=views))
        return memo[key]

    def _curve_key(self, name: str) -> str:
        return f"{name}|{_hash(self.base)}|{_hash(rank_grid(self.layer_spec(name).in_features))}"

    def curves(self, name: str, progress: Progress | None = None) -> dict:
        """Error vs rank of layer ``name`` (computed once; memory + disk cache). A layer being swept
        by another thread (the background warm-up) is waited for, not computed twice."""

        key = self._curve_key(name)
        memo = self._memo["curves"]
        while True:
            with self.compute_lock:
                if key in memo:
                    return memo[key]
                if key in self._curves_disk:
                    return memo.put(key, self._curves_disk[key])
                ev = self._inflight.get(key)
                if ev is None:
                    ev = self._inflight[key] = threading.Event()
                    break
            ev.wait()
        try:
            st = self.require_stats().for_layer(name)
            cur = error_curves(self.linear(name), st, spec=self._spec_as_w4a4(name), base=self.base,
                               progress=progress)
            with self.compute_lock:
                memo.put(key, cur)
                self._curves_disk[key] = cur
            return cur
        finally:
            with self.compute_lock:
                self._inflight.pop(key, None)
            ev.set()

    def _spec_as_w4a4(self, name: str):
        """The target spec with kind "w4a4": per-layer curves show what W4A4 would do even for
        layers the adapter runs W4A16 (ff.net.2 in PixArt), so their outliers can be studied."""

        return replace(self.layer_spec(name), kind="w4a4")

    def error_at(self, name: str, rank: int, methods: tuple[str, ...] | None = None, exact: bool = False) -> dict:
        """Error of ``methods`` (default: every curve of the layer) at ``rank`` from the cached curve:
        measured at grid ranks, linearly interpolated in between (``"interpolated": True``);
        ``exact=True`` measures off-grid ranks (one quantization per method: seconds on the widest
        layers, so not on a slider move)."""
        cur = self.curves(name)
        out = {}
        for m in (tuple(cur["curves"]) if methods is None else methods):
            if int(rank) in cur["ranks"]:
                i = cur["ranks"].index(int(rank))
                out[m] = {k: cur["curves"][m][k][i] for k in ("rel_mse", "sqnr_db")}
                out[m]["interpolated"] = False
                continue
            if not exact:
                out[m] = {k: interp_curve(cur["ranks"], cur["curves"][m][k], int(rank)) for k in ("rel_mse", "sqnr_db")}
                out[m]["interpolated"] = True
                continue
            key = (name, m, int(rank), _hash(self.base))
            memo = self._memo["point"]
            if key not in memo:
                st = self.require_stats().for_layer(name)
                q = quantize_layer(self.linear(name), st, method_config(m, self.base, rank), rank=int(rank),
                                   spec=self._spec_as_w4a4(name))
                memo.put(key, {**layer_error(self.linear(name), q, st.sample), "interpolated": False})
            out[m] = memo[key]
        return out

    def precompute_curves(self, progress: Progress | None = None, stop: threading.Event | None = None) -> int:
        """Fill the error-curve cache for every target (disk-saved at the end); returns layers done."""
        names = list(self.targets)
        n = 0
        for i, name in enumerate(names):
            if stop is not None and stop.is_set():
                break
            if progress:
                progress(i / len(names), f"error vs rank: {name}")
            self.curves(name)
            n += 1
            if n % 8 == 0:
                self._save_curves()  # keep progress across restarts
        self._save_curves()
        return n

    def warm_up(self) -> None:
        """Precompute every layer's curves in a background thread (after calibration)."""
        if self._warm is not None and self._warm.is_alive():
            return
        self._stop.clear()
        self._warm = threading.Thread(target=self.precompute_curves, kwargs={"stop": self._stop},
                                      name="dirotq-explorer-warmup", daemon=True)
        self._warm.start()

    def stop_warm_up(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._warm is not None:
            self._warm.join(timeout)

    def _save_curves(self) -> None:
        if self.cache_dir is None or not self._curves_disk:
            return
        path = self.cache_dir / "curves.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        with self.compute_lock:
            data = dict(self._curves_disk)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def _load_curves(self) -> None:
        path = self.cache_dir / "curves.json" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                return
            for key, cur in list(data.items()):
                if key.startswith(("sensitivity", "branch|")):  # not error-vs-rank curves
                    continue
                for c in cur["curves"].values():  # inf was saved as null
                    c["sqnr_db"] = [float("inf") if v is None else v for v in c["sqnr_db"]]
            self._curves_disk.update(data)

    # ---------------------------------------------------------------------------- rank plans
    def w4a4_targets(self) -> dict:
        return {n: s for n, s in self.targets.items() if s.kind == "w4a4"}

    def weight_only_targets(self) -> dict:
        """The targets that run weight-only (PixArt's ff.net.2, …): a rank on one is a 16-bit branch
        (DiRotQ-LR's form, its activations stay 16-bit) under the PCA methods, nothing under the others."""
        return {n: s for n, s in self.targets.items() if s.kind in WEIGHT_ONLY_KINDS}

    def plan_targets(self) -> dict:
        """The rows of the Rank plan tab: the W4A4 targets, then the weight-only ones."""
        return {**self.w4a4_targets(), **self.weight_only_targets()}

    @staticmethod
    def has_branches(method: str) -> bool:
        """Whether ``method`` gives weight-only layers a 16-bit branch for their rank."""
        return method in BRANCH_METHODS

    def ignored_branches(self, ranks: Mapping[str, int] | None, method: str) -> list[str]:
        """Weight-only layers with a rank that ``method`` does not use (it has no branch for them)."""
        if ranks is None or self.has_branches(method):
            return []
        return [n for n in self.weight_only_targets() if int(ranks.get(n, 0))]

    def ignored_note(self, ranks: Mapping[str, int] | None, method: str) -> str | None:
        """One line for the UI when ``method`` leaves the plan's weight-only ranks unused, else None."""
        ignored = self.ignored_branches(ranks, method)
        if not ignored:
            return None
        more = f" and {len(ignored) - 2} more" if len(ignored) > 2 else ""
        return (f"{method} gives weight-only layers no 16-bit branch: the ranks of {', '.join(ignored[:2])}{more} are "
                f"not used (the branch needs {' or '.join(BRANCH_METHODS)})")

    def default_plan(self, rank: int = 32) -> dict[str, int]:
        """The fixed plan: ``rank`` on every W4A4 target, no branch on the weight-only ones."""
        return {**plans.fixed_plan(self.w4a4_targets(), rank), **{n: 0 for n in self.weight_only_targets()}}

    def plan_cost_fn(self, method: str):
        """(layer, rank) -> extra 16-bit parameters of ``method`` (its own cost function; a weight-only
        layer's branch under the PCA methods, nothing under the others)."""
        cfg = self.config(method)
        branches = self.has_branches(method)

        def cost(name: str, r: int) -> float:
            spec = self.targets[name]
            if spec.kind != "w4a4" and not branches:
                return 0.0
            return layer_params16(spec, cfg, int(r))

        return cost

    def allocated_targets(self, method: str) -> dict:
        """The layers the output-error policies give ranks to under ``method``: the W4A4 targets, and
        the weight-only ones too when the method can give them a branch (the same budget: the fixed
        plan's, which gives them none)."""
        return self.plan_targets() if self.has_branches(method) else self.w4a4_targets()

    def fill_plan(self, policy: str, value: float, method: str = "dirotq",
                  progress: Progress | None = None) -> dict[str, int]:
        """Per-layer ranks of the plan's rows by ``policy`` (``analysis.plans.fill_plan``) for
        ``method``: its costs, its held-out layer-error curves, its output-error curves. The
        output-error policies also give the weight-only layers a branch where it pays more than a
        W4A4 layer's rank (PCA methods); the other policies plan the W4A4 layers only."""
        if policy != "fixed":
            self.require_stats()

        def layer_curve(name: str) -> dict[int, float]:
            cur = self.curves(name)
            m = method if method in cur["curves"] else "dirotq"  # unranked methods: the DiRotQ curve
            return dict(zip(cur["ranks"], cur["curves"][m]["rel_mse"]))

        output_policy = policy in ("output error", "output error, tied")
        targets = self.allocated_targets(method) if output_policy else self.w4a4_targets()
        plan = plans.fill_plan(policy, value, targets, cost=self.plan_cost_fn(method),
                               eigenvalues=lambda n: self.spectrum(n)["eigenvalues"], layer_curve=layer_curve,
                               output_curves=lambda: self.output_curves(method, progress), config=self.config(method))
        return {**{n: 0 for n in self.plan_targets()}, **plan}

    def _sensitivity_key(self, method: str, weight_only: bool = False) -> str:
        # "sampler": measured on what the sampler steps with (``SamplerView``); older caches measured
        # the raw transformer output and are not reused
        return f"sensitivity{'-weight-only' if weight_only else ''}|{method}|{_hash(self.base)}|sampler"

    def _measure_sensitivity(self, method: str, targets: Mapping[str, Any], weight_only: bool,
                             progress: Progress | None) -> dict:
        key = self._sensitivity_key(method, weight_only)
        with self.compute_lock:
            if key in self._curves_disk:
                return self._curves_disk[key]
        stats = self.require_stats()
        with self.lock:  # the pipeline runs one thing at a time
            if self._calls is None:
                c = self.calib
                held_out = self.prompts[-c.holdout_prompts:] if c.holdout_prompts else self.prompts[:4]
                self._calls = record_transformer_calls(self.pipe, held_out, seed=c.seed,
                                                       num_inference_steps=c.num_inference_steps,
                                                       steps=range(0, c.num_inference_steps, 2),
                                                       pipe_kwargs=self.pipe_kwargs)
            sens = layer_sensitivity(self.transformer, self._calls, stats, self.config(method),
                                     targets=targets, weight_only=weight_only, progress=progress)
        with self.compute_lock:
            self._curves_disk[key] = sens
        self._save_curves()
        return sens

    def sensitivity(self, method: str, progress: Progress | None = None) -> dict[str, dict[str, float]]:
        """How much of each layer's error reaches the model output under ``method`` at rank 0
        (``dirotq.allocate.layer_sensitivity``), on the transformer inputs of the held-out
        calibration prompts at every other denoising step; once per method (memory and disk cache).
        The W4A4 targets, and the weight-only ones (quantized weight-only) under the PCA methods."""
        sens = dict(self._measure_sensitivity(method, self.w4a4_targets(), False, progress))
        if self.has_branches(method) and self.weight_only_targets():
            sens.update(self._measure_sensitivity(method, self.weight_only_targets(), True, progress))
        return sens

    def has_sensitivity(self, method: str) -> bool:
        """Whether ``sensitivity(method)`` is measured already (it runs the model: ~20 s for the embedded model on 2 CPU cores)."""
        keys = [self._sensitivity_key(method)]
        if self.has_branches(method) and self.weight_only_targets():
            keys.append(self._sensitivity_key(method, True))
        with self.compute_lock:
            return all(k in self._curves_disk for k in keys)

    def _branch_key(self, name: str, method: str) -> str:
        return f"branch|{method}|{name}|{_hash(self.base)}|{_hash(RANK_GRID)}"

    def allocation_curve(self, name: str, method: str) -> dict[int, float]:
        """Held-out relative error of layer ``name`` under ranked ``method`` at the ranks an allocation
        may choose (``dirotq.allocate.candidate_ranks``, the grid ``quantize --allocate`` uses): for a
        W4A4 layer read from its error-vs-rank curve (``curves``, whose grid holds these ranks); for a
        weight-only layer (PCA methods only) the rank is its 16-bit branch, measured here (memory and
        disk cache)."""
        spec = self.layer_spec(name)
        grid = candidate_ranks(spec.in_features)
        if spec.kind == "w4a4":
            cur = self.curves(name)
            return {r: e for r, e in zip(cur["ranks"], cur["curves"][method]["rel_mse"]) if r in grid}
        if not self.has_branches(method):
            raise ValueError(f"{method} gives weight-only layers no 16-bit branch")
        key = self._branch_key(name, method)
        with self.compute_lock:
            if key in self._curves_disk:
                return {int(r): e for r, e in self._curves_disk[key].items()}
        cfg = self.config(method)
        curve = layer_error_curves(self.transformer, self.require_stats(),
                                   lambda r: replace(cfg, rank=RankPlan({DEFAULT_KEY: r})),
                                   targets={name: spec}, weight_only=True, linear=self.linear)[name]
        with self.compute_lock:
            self._curves_disk[key] = {str(r): e for r, e in curve.items()}
        return curve

    def output_curves(self, method: str, progress: Progress | None = None) -> dict[str, dict[int, float]]:
        """``{layer: {rank: predicted model-output error}}`` of a ranked ``method``: each allocated
        layer's held-out error curve (``allocation_curve``) times its sensitivity
        (``dirotq.allocate.sensitivity_curves``); the weight-only layers' branch curves too under the
        PCA methods."""
        if not get_method(method).ranked:
            raise ValueError(f"{method} has no 16-bit rank to allocate")
        sens = self.sensitivity(method, progress)
        names = list(self.allocated_targets(method))
        with self.compute_lock:
            new = [n for n in names if (self._curve_key(n) if self.targets[n].kind == "w4a4"
                                        else self._branch_key(n, method)) not in self._curves_disk]
        layer = {}
        for i, n in enumerate(names):
            layer[n] = self.allocation_curve(n, method)
            if progress is not None and n in new:
                progress((i + 1) / len(names), f"error vs rank: {n}")
        if new:  # on disk once; every budget redraw after a plan edit comes here
            self._save_curves()
        return sensitivity_curves(layer, sens)

    def budget_curves(self, method: str, ranks: Mapping[str, int] | None = None,
                      budgets: tuple[int, ...] = (0, 8, 16, 32, 64, 128)) -> dict:
        """Predicted output error against the extra 16-bit parameters of plans by "fixed", "output
        error, tied", "output error" and "energy" at the budgets of uniform ranks ``budgets`` (and of
        ``ranks``, the plan in the table). Under the PCA methods the output-error policies give
        weight-only layers branches too, and "output error, tied, W4A4 layers only" shows what that
        adds. Needs the method's sensitivities (``sensitivity``): call after an "output error" fill.
        Returns ``{"curves": {policy: [(params, error), ...]}, "current": (params, error) | None}``."""
        out_curves = self.output_curves(method)
        w4a4, cost, cfg = self.w4a4_targets(), self.plan_cost_fn(method), self.config(method)
        allocated = self.allocated_targets(method)
        rest = {n: 0 for n in allocated if n not in w4a4}  # weight-only layers at rank 0: their error stays

        def point(plan):
            return plans.plan_params16(plan, cost), plans.predicted_output_error(plan, out_curves)

        policies = ["fixed", "output error, tied", "output error", "energy"]
        if rest:
            policies.insert(3, W4A4_ONLY)
        curves: dict[str, list] = {p: [] for p in policies}
        w4a4_curves = {n: c for n, c in out_curves.items() if n in w4a4}
        for r in budgets:
            fixed = plans.fixed_plan(w4a4, r)
            curves["fixed"].append(point({**fixed, **rest}))
            for policy in ("output error, tied", "output error"):
                curves[policy].append(point(plans.fill_plan(policy, r, allocated, config=cfg,
                                                            output_curves=lambda: out_curves)))
            if rest:
                curves[W4A4_ONLY].append(point({**plans.fill_plan("output error, tied", r, w4a4, config=cfg,
                                                                  output_curves=lambda: w4a4_curves), **rest}))
            limit = plans.plan_params16(fixed, cost)
            energy = plans.match_budget(
                lambda f: plans.fill_plan("energy", f, w4a4, eigenvalues=lambda n: self.spectrum(n)["eigenvalues"]),
                cost, limit, 0.0, 1.0, increasing=True)
            curves["energy"].append(point({**energy, **rest}))
        current = point({n: int(ranks.get(n, 0)) for n in allocated}) if ranks is not None else None
        return {"curves": curves, "current": current}

    def validate_plan(self, ranks: Mapping[str, Any]) -> dict[str, int]:
        """Check a ``{layer: rank}`` plan against this model (``RankPlan.resolve``: unknown names,
        ranks above a layer's width); returns every plan row's rank as an int. ``"_default"`` sets
        the W4A4 layers only: a weight-only layer's rank (its 16-bit branch) is set by name."""
        resolved = RankPlan(dict(ranks)).resolve(self.targets)
        return {n: resolved[n] for n in self.plan_targets()}

    def import_plan(self, ranks: Mapping[str, Any]) -> dict:
        """What an imported ``{layer: rank}`` plan does to this model, checked by ``RankPlan.resolve``.

        Returns ``{"ranks": {plan row: rank}, "named": [...], "from_default": [...], "zero": [...],
        "unknown": [...], "branches": [...], "message": one line}``: the W4A4 targets the plan names,
        those that take its ``"_default"``, those left at rank 0 (no ``"_default"``), the names this
        model does not have (left out, so a plan from a sibling model still sets the layers both
        share), and the weight-only layers it gives a 16-bit branch. A plan that sets no layer (``{}``,
        or only unknown names) is a ``ValueError``; so are ranks above a layer's width (resolve's
        messages).
        """
        plan = RankPlan(dict(ranks))  # types: names are strings, ranks ints ≥ 0 or "paper"
        unknown = [n for n in plan.ranks if n != DEFAULT_KEY and n not in self.targets]
        known = {n: r for n, r in plan.ranks.items() if n not in unknown}
        if not known:
            if unknown:
                try:
                    plan.resolve(self.targets)
                except ValueError as err:  # resolve's message names the unknown layers
                    raise ValueError(f"nothing imported: {err}") from None
            raise ValueError('nothing imported: the plan sets no layer (it is empty); a plan is '
                             '{"layer name": rank, …} with "_default": rank for the layers it does not name')
        resolved = self.validate_plan(known)
        w4a4 = self.w4a4_targets()
        named = [n for n in w4a4 if n in known]
        rest = [n for n in w4a4 if n not in known]
        branches = [n for n in self.weight_only_targets() if resolved[n]]
        default = known.get(DEFAULT_KEY)
        parts = [f"{len(named)} of {len(w4a4)} W4A4 layers set by name"]
        if rest:
            parts.append(f"the other {len(rest)} from _default = {default}" if default is not None
                         else f"the other {len(rest)} at rank 0 (the plan has no _default)")
        if branches:
            parts.append(f"{len(branches)} weight-only layer{'s' if len(branches) > 1 else ''} with a 16-bit branch")
        msg = "imported a plan: " + ", ".join(parts)
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            msg += (f"; ignored {len(unknown)} name{'s' if len(unknown) > 1 else ''} this model does not have: "
                    f"{unknown[:3]}{more}")
        return {"ranks": resolved, "named": named, "from_default": rest if default is not None else [],
                "zero": rest if default is None else [], "unknown": unknown, "branches": branches, "message": msg}

    def plan_from_json(self, text: str) -> dict:
        """``import_plan`` of a ``RankPlan`` JSON text (ValueError when it is not one)."""
        return self.import_plan(RankPlan.from_json(text).ranks)

    def plan_cost(self, ranks: Mapping[str, int], method: str) -> dict:
        return plan_cost(self.targets, ranks, method)

    # ------------------------------------------------------------------------ quantized models
    def config(self, method: str, ranks: Mapping[str, int] | None = None, scale_format: str | None = None):
        """``method``'s config with the session's shared settings, the plan ``ranks`` and, if given,
        the INT4 ``scale_format`` ("exact" = format A, "int_ratio" = format C, "int_ratio+asym" = format C
        with asymmetric activation codes) instead of the shared one."""
        if method not in methods():
            raise ValueError(f"unknown method {method!r}; choose one of {methods()}")
        base = dict(self.base)
        if scale_format is not None:
            fmt, _, asym = scale_format.partition("+")
            base.update(scale_format=fmt, **({"act_symmetric": False} if asym == "asym" else {}))
        cfg = method_config(method, base)
        if ranks is not None and hasattr(cfg, "rank"):
            ignored = set(self.ignored_branches(ranks, method))  # no branch under this method: not used
            cfg = replace(cfg, rank=RankPlan({DEFAULT_KEY: 0, **{k: int(v) for k, v in ranks.items()
                                                                 if k not in ignored}}))
        return cfg

    def quantized(self, method: str, ranks: Mapping[str, int] | None = None,
                  progress: Progress | None = None, scale_format: str | None = None) -> tuple[Any, dict]:
        """(quantized copy of the transformer, quantize_ report) for (method, plan, format); LRU of 2."""

        ranks = self.validate_plan(ranks) if ranks is not None else None
        cfg = self.config(method, ranks, scale_format)
        key = _hash(cfg.to_dict())
        memo = self._memo["quantized"]
        if key in memo:
            return memo[key]
        stats = self.require_stats()
        with self._quant_lock:
            if key in memo:
                return memo[key]
            # quantize on the CPU, where the statistics live, then move the result to the model's device
            dev = next(self.transformer.parameters()).device
            model = copy.deepcopy(self.transformer) if dev.type == "cpu" else copy.deepcopy(self.transformer).cpu()
            report = quantize_(model, cfg, stats, adapter=self.adapter, progress=progress or (lambda f, m: None))
            # the copy only generates: layers that read one input run as one, GELUs in their projections'
            # epilogues (same image, fewer passes)
            fuse_for_inference(model, adapter=self.adapter)
            return memo.put(key, (model.to(dev).eval(), report))

    def all_layer_errors(self, method: str, ranks: Mapping[str, int] | None = None,
                         progress: Progress | None = None, sensitivity: bool = False,
                         scale_format: str | None = None) -> list[dict]:
        """Per-layer error rows (name, block, layer_type, kind, rank, rel_mse, sqnr_db). With
        ``sensitivity`` (measured once per method, ``self.sensitivity``) the W4A4 rows also get
        ``gain`` (how much of the layer's error reaches the model output) and ``output_error``
        (gain × the layer's relative error at its rank: its predicted share of the model-output error);
        weight-only rows get them under the PCA methods (whose plans can give them a branch), NaN
        under the others. ``scale_format`` as in ``config``; the
        sensitivities are the shared format's (a ratio of output to layer error, alike in both)."""
        _, report = self.quantized(method, ranks, progress, scale_format)
        sens = self.sensitivity(method, progress) if sensitivity else {}
        rows = []
        for name, info in report["layers"].items():
            s = self.targets[name]
            row = {"name": name, "block": s.block, "layer_type": s.layer_type, "kind": s.kind,
                   "rank": info.get("rank", 0), "rel_mse": info.get("rel_mse", float("nan")),
                   "sqnr_db": info.get("sqnr_db", float("nan"))}
            if sensitivity:
                gain = sens.get(name, {}).get("gain", float("nan"))
                row["gain"] = gain
                row["output_error"] = gain * row["rel_mse"]
            rows.append(row)
        return rows

    # ------------------------------------------------------------------------------ generation
    def unknown_words(self, prompt: str) -> list[str]:
        """Words of ``prompt`` that the model's tokenizer maps to its unknown token (the tiny models
        know a few dozen words)."""
        return unknown_words(getattr(self.pipe, "tokenizer", None), prompt)

    def truncation_warning(self, prompt: str) -> str | None:
        """One line when ``prompt`` is longer than the text the model reads (48 tokens on the
        embedded model), else None."""
        return truncation_warning(self.pipe, prompt, self.pipe_kwargs)

    def default_prompt(self) -> str:
        """A prompt this model knows every word of (the embedded grammar's, else a calibration prompt)."""
        for p in [BUILTIN_PROMPTS[0], *self.prompts, "a red circle on the left", "a photo"]:
            if not self.unknown_words(p):
                return p
        return self.prompts[0]

    def judge(self):
        """The embedded model's prompt-faithfulness judge (None for other models or when missing)."""
        memo = self._memo["judge"]
        if "j" not in memo:
            j = None
            if self.is_embedded and os.path.isfile(os.path.join(DEFAULT_JUDGE_PATH, "config.json")):
                j = load_judge()  # a broken judge file is an error to see, not a silent "no judge"
            memo.put("j", j)
        return memo["j"]

    def check_inputs(self, prompt: str, seed: Any, steps: Any, guidance: Any) -> tuple[str, int, int, float]:
        """``(prompt, seed, steps, guidance)`` checked before anything runs (``ValueError`` naming
        the first bad one): a non-empty prompt of known words, ``dirotq.generate.check_sampling``
        ranges with at most ``MAX_STEPS`` steps (an interactive tool, not a batch job)."""
        steps, seed, guidance = check_sampling(steps, seed, guidance, max_steps=MAX_STEPS)
        prompt = (prompt or "").strip()
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = self.unknown_words(prompt)
        if bad:
            raise ValueError(f"this model does not know the words {bad}; it was trained on the shapes captions "
                             "(shapes, colours, sizes, positions, backgrounds)")
        return prompt, seed, steps, guidance

    def generate(self, prompt: str, seed: int, steps: int, guidance: float, method: str,
                 ranks: Mapping[str, int] | None = None, progress: Progress | None = None,
                 scale_format: str | None = None) -> dict:
        """16-bit and quantized image of one prompt and seed, with metrics, timings, backend and
        ``warnings`` (lines to show: a truncated prompt)."""

        prompt, seed, steps, guidance = self.check_inputs(prompt, seed, steps, guidance)
        qmodel, _ = self.quantized(method, ranks, progress, scale_format)
        if self.cuda_graphs:
            from dirotq.cuda_graphs import graph_transformer

            # idempotent; off CUDA the wrapper runs eagerly; a layer swapped or a hook added later makes
            # it capture again or run eagerly
            graph_transformer(self.transformer)
            graph_transformer(qmodel)
        with self.lock:
            ref, quant, timings = generate_pair(self.pipe, qmodel, prompt, seed, num_inference_steps=steps,
                                                guidance_scale=float(guidance), **self.pipe_kwargs)
        metrics = image_report(ref, quant, prompt, self.judge())
        warn = self.truncation_warning(prompt)
        return {"reference": ref, "quantized": quant, "difference": difference_image(ref, quant),
                "metrics": metrics, "timings": timings, "warnings": [warn] if warn else []}


# ------------------------------------------------------------------------------ process cache
_SESSIONS: dict[str, ExplorerSession] = {}
_SESSIONS_LOCK = threading.Lock()


def get_session(model: str | None = None, **kw: Any) -> ExplorerSession:
    """The process-wide session of ``model`` (created on first use with ``kw``, shared by every user)."""
    key = str(model or DEFAULT_MODEL)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = ExplorerSession(key, **kw)
        return _SESSIONS[key]


def register_session(name: str, session: ExplorerSession) -> ExplorerSession:
    """Put a ready session (e.g. built from an in-memory pipeline in tests) under ``name``."""
    with _SESSIONS_LOCK:
        _SESSIONS[str(name)] = session
    return session


def timed(fn: Callable, *a: Any, **kw: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


__all__ = ["ExplorerSession", "W4A4_ONLY", "CalibSettings", "get_session", "register_session", "default_prompts", "methods",
           "POLICIES", "DEFAULT_POLICY", "BUILTIN_PROMPTS"]
