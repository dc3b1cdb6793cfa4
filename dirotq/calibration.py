"""Calibration: streaming input statistics of the target linears (docs/DESIGN.md §2).

The BF16 pipeline runs on calibration prompts; forward pre-hooks on the target linears (one hook per
shared-input group, q/k/v of one attention are calibrated once) accumulate, in float64:

- C = Σ xᵀx (uncentered second moment, what the quantizer sees; PCA basis of DiRotQ),
- token count, per-channel abs-max, Σx, Σx², Σx⁴ (mean, variance, kurtosis for outlier views),
- a bounded, seeded reservoir of input tokens (held-out tokens for error measurements).

Memory is O(Σ d²) over groups plus the reservoirs: raw activations are never kept. Statistics are
saved as ``stats.safetensors`` + ``meta.json`` and cached on disk under a content hash of what
produced them (model, prompts, steps, guidance, seed, dtype), so the same calibration never runs
twice.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ._files import default_mode

Progress = Callable[[float, str], object]

_CHUNK = 8192  # rows per float64 matmul: bounds the transient float64 copy of a large batch
_FORMAT = 1  # on-disk format version (meta.json "format")


def _reservoir_seed(seed: int, count: int) -> int:
    """Seed of the key stream for the tokens after ``count`` seen tokens.

    A pure function of (seed, count) instead of a live generator: no RNG state to save, so a loaded
    LayerStats continues exactly as the unsaved one would have.
    """
    return (seed * 1_000_003 + count * 7_919 + 0x9E3779B9) % (2**63 - 1)


@dataclass
class LayerStats:
    """float64 accumulators for one shared-input group of width d.

    - ``second_moment``: (d, d) C = Σ xᵀx over all tokens (uncentered).
    - ``count``: tokens seen. ``abs_max``, ``sum``, ``sum_sq``, ``sum_4th``: (d,) per channel.
    - ``sample``: (m, d) float32, m ≤ ``sample_tokens``: a uniform sample without replacement of
      the tokens offered to it (bottom-m of i.i.d. uniform keys, ``sample_keys`` (m,) float64 — the
      vectorised equivalent of Algorithm R), deterministic for a seed and the update sequence.
    - ``sample_seen``: tokens offered to the sample. Equal to ``count`` unless the sample was fed
      held-out tokens that never entered the moments (``calibrate(holdout_prompts=k)``): then the
      error measurements on ``sample`` are out-of-sample for bases and GPTQ built from C.
    """

    second_moment: Tensor
    count: int
    abs_max: Tensor
    sum: Tensor
    sum_sq: Tensor
    sum_4th: Tensor
    sample: Tensor
    sample_keys: Tensor
    sample_tokens: int = 512
    seed: int = 0
    sample_seen: int | None = None

    def __post_init__(self) -> None:
        if self.sample_seen is None:
            self.sample_seen = self.count

    @classmethod
    def empty(cls, d: int, sample_tokens: int = 512, seed: int = 0, device: torch.device | str = "cpu") -> "LayerStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(
            second_moment=z(d, d), count=0, abs_max=z(d), sum=z(d), sum_sq=z(d), sum_4th=z(d),
            sample=torch.zeros(0, d, dtype=torch.float32), sample_keys=torch.zeros(0, dtype=torch.float64),
            sample_tokens=int(sample_tokens), seed=int(seed),
        )

    @property
    def dim(self) -> int:
        return self.second_moment.shape[0]

    def _to(self, device: torch.device) -> None:
        for f in ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th"):
            setattr(self, f, getattr(self, f).to(device))

    @torch.no_grad()
    def update(self, x: Tensor, *, moments: bool = True, sample: bool = True) -> None:
        """Accumulate ``x: (..., d)`` (any float dtype) as tokens of width d, in float64.

        ``moments=False`` offers the tokens to the sample only (held-out tokens); ``sample=False``
        adds them to the moments only.
        """
        d = self.dim
        if x.shape[-1] != d:
            raise ValueError(f"LayerStats.update: input width {x.shape[-1]} != stats width {d}")
        x = x.detach().reshape(-1, d)
        n = x.shape[0]
        if n == 0:
            return
        if self.second_moment.device != x.device:
            # accumulate where the activations live (a GPU calibration stays on the GPU)
            self._to(x.device)
        for chunk in (x.split(_CHUNK) if moments else ()):
            x64 = chunk.to(torch.float64)
            self.second_moment.addmm_(x64.T, x64)
            sq = x64 * x64
            self.sum += x64.sum(0)
            self.sum_sq += sq.sum(0)
            self.sum_4th += (sq * sq).sum(0)
            torch.maximum(self.abs_max, x64.abs().amax(0), out=self.abs_max)
        if sample and self.sample_tokens > 0:
            g = torch.Generator().manual_seed(_reservoir_seed(self.seed, self.sample_seen))
            keys = torch.rand(n, generator=g, dtype=torch.float64)
            self._keep_smallest(keys, x)
        if sample:
            self.sample_seen += n
        if moments:
            self.count += n

    def _keep_smallest(self, keys: Tensor, rows: Tensor) -> None:
        """Reservoir step: keep the ``sample_tokens`` smallest keys of (old ∪ new)."""
        k_old = self.sample_keys.numel()
        all_keys = torch.cat([self.sample_keys, keys])
        m = min(self.sample_tokens, all_keys.numel())
        sel = torch.topk(all_keys, m, largest=False).indices.sort().values
        old, new = sel[sel < k_old], sel[sel >= k_old] - k_old
        picked = rows[new.to(rows.device)].to(torch.float32).cpu()
        self.sample = torch.cat([self.sample[old], picked])
        self.sample_keys = torch.cat([self.sample_keys[old], keys[new]])

    def merge(self, other: "LayerStats") -> "LayerStats":
        """Statistics of the union of both token sets (a new object; inputs unchanged).

        Moments are exact sums. The merged sample is the bottom-m of the union of keys; it is a
        uniform sample of the union when the two key streams are independent (different seeds).
        """
        if other.dim != self.dim:
            raise ValueError(f"LayerStats.merge: widths differ ({self.dim} vs {other.dim})")
        dev = self.second_moment.device
        o = {f: getattr(other, f).to(dev) for f in ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th")}
        out = LayerStats(
            second_moment=self.second_moment + o["second_moment"], count=self.count + other.count,
            abs_max=torch.maximum(self.abs_max, o["abs_max"]), sum=self.sum + o["sum"],
            sum_sq=self.sum_sq + o["sum_sq"], sum_4th=self.sum_4th + o["sum_4th"],
            sample=self.sample.clone(), sample_keys=self.sample_keys.clone(),
            sample_tokens=max(self.sample_tokens, other.sample_tokens), seed=self.seed,
            sample_seen=self.sample_seen + other.sample_seen,
        )
        if other.sample_keys.numel():
            out._keep_smallest(other.sample_keys, other.sample)
        return out

    def _require_tokens(self) -> None:
        if self.count == 0:
            raise ValueError("LayerStats: no tokens recorded (was the layer ever called during calibration?)")

    def mean(self) -> Tensor:
        """Per-channel mean E[x], (d,) float64."""
        self._require_tokens()
        return self.sum / self.count

    def second_moment_mean(self) -> Tensor:
        """C / count = E[xᵀx], (d, d) float64 (the paper preset's normalised C)."""
        self._require_tokens()
        return self.second_moment / self.count

    def covariance(self) -> Tensor:
        """Centered population covariance E[xᵀx] − E[x]ᵀE[x], (d, d) float64."""
        mu = self.mean()
        return self.second_moment_mean() - torch.outer(mu, mu)

    def kurtosis(self) -> Tensor:
        """Per-channel kurtosis about zero, E[x⁴] / E[x²]², (d,) float64.

        Uncentered (what a symmetric quantizer sees: outliers measured from 0); 3 for a zero-mean
        Gaussian, 1.8 for a uniform, large for heavy-tailed outlier channels. Dead channels
        (E[x²] = 0) give 0.
        """
        self._require_tokens()
        m2 = self.sum_sq / self.count
        m4 = self.sum_4th / self.count
        return torch.where(m2 > 0, m4 / m2.clamp_min(1e-300) ** 2, torch.zeros_like(m2))

    def to(self, device: torch.device | str) -> "LayerStats":
        self._to(torch.device(device))
        return self


_FIELDS = ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th", "sample", "sample_keys")


@dataclass
class CalibrationStats:
    """Statistics of every shared-input group of one model.

    - ``layers``: group key -> LayerStats (the group key is the group's first target's name).
    - ``groups``: every target layer name -> its group key.
    - ``meta``: model id, family, prompts sha256, number of prompts, recorded step indices,
      num_inference_steps, guidance_scale, dtype, versions (torch, diffusers, dirotq).
    """

    layers: dict[str, LayerStats]
    groups: dict[str, str]
    meta: dict = field(default_factory=dict)

    def for_layer(self, name: str) -> LayerStats:
        """The statistics of ``name``'s input group (``name`` a target layer or a group key)."""
        key = self.groups.get(name, name)
        if key in self.layers:
            return self.layers[key]
        close = difflib.get_close_matches(name, list(self.groups) + list(self.layers), n=5, cutoff=0.5)
        hint = f"; close names: {close}" if close else ""
        raise KeyError(f"no calibration statistics for layer {name!r} ({len(self.groups)} layers calibrated){hint}")

    def merge(self, other: "CalibrationStats") -> "CalibrationStats":
        """Combine two calibrations: groups present in both are ``LayerStats.merge`` d (more
        prompts), the others are taken as they are (layer-subset passes). ``meta`` is this one's,
        with the other's under ``"merged"``."""
        layers = dict(self.layers)
        for key, st in other.layers.items():
            layers[key] = layers[key].merge(st) if key in layers else st
        meta = {**self.meta, "merged": [*self.meta.get("merged", []), other.meta]}
        return CalibrationStats(layers=layers, groups={**self.groups, **other.groups}, meta=meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/stats.safetensors`` + ``path/meta.json`` (atomically: a temp folder renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tensors: dict[str, Tensor] = {}
            layers_meta = {}
            for i, (key, st) in enumerate(self.layers.items()):
                for f in _FIELDS:
                    tensors[f"{i}.{f}"] = getattr(st, f).detach().cpu().contiguous()
                layers_meta[key] = {"index": i, "count": st.count, "sample_tokens": st.sample_tokens, "seed": st.seed,
                                    "sample_seen": st.sample_seen}
            save_file(tensors, str(tmp / "stats.safetensors"))
            doc = {"format": _FORMAT, "layers": layers_meta, "groups": self.groups, "meta": self.meta}
            (tmp / "meta.json").write_text(json.dumps(doc, indent=1, sort_keys=False, default=str))
            # mkdtemp makes the folder 0700 and save_file the tensors 0600: the user's umask modes instead
            default_mode(tmp, tmp / "stats.safetensors")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationStats":
        """Read a folder written by ``save``; missing or corrupt files raise ``ValueError`` /
        ``FileNotFoundError`` naming the file."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_p, st_p = path / "meta.json", path / "stats.safetensors"
        for p in (meta_p, st_p):
            if not p.is_file():
                raise FileNotFoundError(f"calibration statistics incomplete: {p} is missing")
        try:
            doc = json.loads(meta_p.read_text())
            layers_meta, groups = doc["layers"], doc["groups"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt calibration metadata {meta_p}: {e}; delete the folder to recalibrate") from e
        if doc.get("format") != _FORMAT:
            raise ValueError(f"{meta_p}: unsupported stats format {doc.get('format')!r} (expected {_FORMAT})")
        try:
            tensors = load_file(str(st_p))
        except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
            raise ValueError(f"corrupt calibration tensors {st_p}: {e}; delete the folder to recalibrate") from e
        layers = {}
        for key, lm in layers_meta.items():
            i = lm["index"]
            try:
                fields = {f: tensors[f"{i}.{f}"] for f in _FIELDS}
            except KeyError as e:
                raise ValueError(f"corrupt calibration tensors {st_p}: missing {e} for group {key!r}") from e
            layers[key] = LayerStats(count=int(lm["count"]), sample_tokens=int(lm["sample_tokens"]),
                                     seed=int(lm["seed"]), sample_seen=int(lm.get("sample_seen", lm["count"])),
                                     **fields)
        return cls(layers=layers, groups=dict(groups), meta=doc.get("meta", {}))


# ------------------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, list[Tensor]]]:
    """Record the inputs of the named submodules during forwards inside the ``with`` block.

    Yields ``{name: [x (..., d_in), ...]}`` (detached clones, one per call). For tests and analysis
    on small models: it keeps raw activations, unlike ``calibrate``.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"capture_inputs: no such modules {missing}")
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_pre_hook(lambda mod, args, n=n: out[n].append(args[0].detach().clone()))
        for n in names
    ]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _group_seed(seed: int, key: str) -> int:
    # a different key stream per group: reservoirs of different layers are independent samples
    return (seed * 2_654_435_761 + zlib.crc32(key.encode())) % (2**31)


class _Recorder:
    """Forward pre-hooks, one per shared-input group (on the group's first member).

    ``active`` gates recording, so a pipeline run can record only chosen denoising steps.
    """

    def __init__(self, model: nn.Module, adapter, sample_tokens: int, seed: int, layers: list[str] | None = None):
        self.targets = adapter.targets(model)
        if not self.targets:
            raise ValueError(f"{type(model).__name__}: the {adapter.family} adapter found no target layers")
        if layers is not None:
            # a subset (names or group keys): whole groups are kept, so for_layer stays consistent
            unknown = [n for n in layers if n not in self.targets and n not in {s.group for s in self.targets.values()}]
            if unknown:
                raise KeyError(f"calibration layers {unknown[:5]} are not targets of the {adapter.family} adapter")
            keep = {self.targets[n].group if n in self.targets else n for n in layers}
            self.targets = {n: s for n, s in self.targets.items() if s.group in keep}
        self.groups = {n: s.group for n, s in self.targets.items()}
        modules = dict(model.named_modules())
        self.layers: dict[str, LayerStats] = {}
        self.handles = []
        self.active = True
        self.moments, self.sampling = True, True  # what the current prompts feed (held-out: sample only)
        for key in dict.fromkeys(self.groups.values()):
            lin = modules[key]
            self.layers[key] = LayerStats.empty(lin.in_features, sample_tokens, _group_seed(seed, key))
            self.handles.append(lin.register_forward_pre_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(mod, args):
            if self.active:
                self.layers[key].update(args[0], moments=self.moments, sample=self.sampling)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def result(self, meta: dict) -> CalibrationStats:
        for st in self.layers.values():
            st.to("cpu")
        return CalibrationStats(layers=self.layers, groups=self.groups, meta=meta)


def _versions() -> dict:
    import diffusers

    from ._version import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "dirotq": __version__}


def _tqdm_progress(desc: str, total: int, unit: str) -> tuple[Progress, Callable[[], None]]:
    """A ``progress(fraction, message)`` drawing a tqdm bar of ``total`` ``unit``s: with a real
    total (denoising steps, not per mille) the bar's rate and ETA read in those units."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def progress(frac: float, msg: str) -> None:
        bar.n = int(round(total * min(max(frac, 0.0), 1.0)))
        bar.set_postfix_str(msg, refresh=False)
        bar.refresh()

    return progress, bar.close


@torch.no_grad()
def calibrate_transformer(
    transformer: nn.Module,
    inputs: Iterable[dict],
    *,
    adapter=None,
    sample_tokens: int = 512,
    seed: int = 0,
    progress: Progress | None = None,
    layers: list[str] | None = None,
) -> CalibrationStats:
    """Statistics of every target group over ``transformer(**kw)`` for each ``kw`` in ``inputs``.

    Use when the inputs are at hand (tests, tiny models, custom loops); ``calibrate`` runs a
    pipeline instead. ``progress(fraction, message)`` is called after each input when the
    iterable has a length. ``layers``: record only the groups of these targets (see ``calibrate``).
    """
    from .models import get_adapter

    adapter = adapter or get_adapter(transformer)
    rec = _Recorder(transformer, adapter, sample_tokens, seed, layers)
    total = len(inputs) if hasattr(inputs, "__len__") else None
    n = 0
    try:
        for kw in inputs:
            transformer(**kw)
            n += 1
            if progress is not None:
                progress(n / total if total else 0.0, f"calibrating: forward {n}" + (f"/{total}" if total else ""))
    finally:
        rec.remove()
    meta = {"family": adapter.family, "forwards": n, "sample_tokens": sample_tokens, "seed": seed,
            "dtype": str(next(transformer.parameters()).dtype), "versions": _versions()}
    return rec.result(meta)


# --------------------------------------------------------------------------- pipeline calibration
def _json_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stats_cache_key(
    model_id: str,
    prompts: list[str],
    num_inference_steps: int,
    steps: list[int] | None,
    guidance_scale: float | None,
    seed: int,
    dtype,
    **extra,
) -> str:
    """sha256 hex of everything that determines the statistics (the cache folder name).

    ``extra``: further determinants (sample size, adapter family, pipeline kwargs), JSON-able.
    """
    return _json_hash({
        "model": model_id, "prompts": list(prompts), "num_inference_steps": int(num_inference_steps),
        "steps": None if steps is None else sorted(int(s) for s in steps),
        "guidance_scale": guidance_scale, "seed": int(seed), "dtype": str(dtype), "extra": extra,
    })


def model_fingerprint(model: nn.Module) -> str:
    """Cheap content hash of a model: names, shapes, dtypes and a few values of every parameter.

    Part of the cache key, so two different weight sets behind the same path (a retrained tiny
    model, random inits) never share cached statistics; hashing every byte of a 12B model would
    cost more than it saves.
    """
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        if flat.numel() and not flat.is_meta:  # offloaded (meta) weights: shapes only
            idx = torch.linspace(0, flat.numel() - 1, steps=min(16, flat.numel())).long()
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _model_id(pipe) -> str:
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return f"{name or type(pipe).__name__}#{model_fingerprint(pipe.transformer)}"


def calibrate(
    pipe,
    prompts: list[str],
    *,
    num_inference_steps: int = 20,
    steps: list[int] | int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    sample_tokens: int = 512,
    adapter=None,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    pipe_kwargs: dict | None = None,
    layers: list[str] | None = None,
    holdout_prompts: int = 0,
) -> CalibrationStats:
    """Run the diffusers ``pipe`` on ``prompts`` and return the target groups' statistics.

    - Denoising step ``i`` (0-based, the i-th call of ``pipe.scheduler.step``) is recorded when
      ``i in steps`` (``None``: all steps; an int ``n``: all steps of an ``n``-step schedule). Every transformer forward during a recorded step is
      pooled, so CFG's conditional and unconditional branches both count (PixArt batches them in
      one forward; pipelines with separate forwards are covered the same way).
    - Prompt ``j`` gets its own generator seeded ``seed + j``: results do not depend on
      ``batch_size``. Latents only (``output_type="latent"``): the VAE never runs.
    - ``guidance_scale=None`` keeps the pipeline's default. ``pipe_kwargs`` go to ``pipe(...)``
      (e.g. ``height``, ``width``, ``max_sequence_length``).
    - ``cache_dir``: statistics are looked up in / saved to ``cache_dir/<stats_cache_key>/``.
    - ``progress(fraction, message)``: Gradio's ``gr.Progress`` fits; a tqdm bar when ``None``.
    - ``layers``: only the groups of these target names are recorded (default: all). Memory is
      Σ d² · 8 bytes over recorded groups: 5.8 GiB for PixArt-Σ, 16 GiB SD3-medium, 120 GiB for
      FLUX.1 (its 12288- and 15360-wide down-projections dominate), so FLUX calibrates in passes
      over layer subsets, combined with ``CalibrationStats.merge``.
    - ``holdout_prompts=k``: the last k prompts are held out: their tokens fill only the token
      sample (used for error measurements), never the moments that bases and GPTQ are built from;
      the other prompts feed only the moments. 0 (default): the sample is drawn from the same
      tokens as the moments (in-sample).
    """
    from .models import get_adapter
    from .pipelines import call_kwargs

    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibrate: no prompts given")
    if not isinstance(holdout_prompts, int) or not 0 <= holdout_prompts < len(prompts):
        raise ValueError(f"calibrate: holdout_prompts must be an int in [0, {len(prompts) - 1}] "
                         f"(at least one prompt must feed the statistics), got {holdout_prompts!r}")
    if isinstance(steps, int):  # calibrate(pipe, prompts, steps=20): every step of a 20-step schedule
        num_inference_steps, steps = steps, None
    if steps is not None:
        steps = sorted({int(s) for s in steps})
        bad = [s for s in steps if not 0 <= s < num_inference_steps]
        if bad:
            raise ValueError(f"calibrate: steps {bad} outside [0, {num_inference_steps})")
    transformer = pipe.transformer
    adapter = adapter or get_adapter(transformer)
    pipe_kwargs = call_kwargs(pipe, pipe_kwargs)
    if guidance_scale is not None:
        pipe_kwargs["guidance_scale"] = guidance_scale
    dtype = next(transformer.parameters()).dtype
    model_id = _model_id(pipe)
    key = stats_cache_key(model_id, prompts, num_inference_steps, steps, guidance_scale, seed, dtype,
                          sample_tokens=sample_tokens, family=adapter.family,
                          overrides=getattr(adapter, "overrides", {}), pipe_kwargs=pipe_kwargs,
                          layers=None if layers is None else sorted(layers), holdout_prompts=holdout_prompts)
    cache_path = Path(cache_dir) / key if cache_dir is not None else None
    if cache_path is not None and (cache_path / "meta.json").is_file():
        if progress is not None:
            progress(1.0, "calibration statistics loaded from cache")
        return CalibrationStats.load(cache_path)

    rec = _Recorder(transformer, adapter, sample_tokens, seed, layers)
    record = set(range(num_inference_steps)) if steps is None else set(steps)
    state = {"step": 0, "batch": 0}
    # batches never mix calibration and held-out prompts: each batch feeds one kind of accumulator
    n_cal = len(prompts) - holdout_prompts
    batches = [(b, min(b + batch_size, n_cal)) for b in range(0, n_cal, batch_size)]
    batches += [(b, min(b + batch_size, len(prompts))) for b in range(n_cal, len(prompts), batch_size)]
    n_batches = len(batches)
    total = n_batches * num_inference_steps
    done = {"n": 0}
    close_bar = None
    if progress is None:
        progress, close_bar = _tqdm_progress("calibrating", total, "step")
    sched = pipe.scheduler
    orig_step = sched.step

    def counting_step(*a, **kw):
        # one scheduler.step per denoising step in every diffusers pipeline: the step counter
        out = orig_step(*a, **kw)
        state["step"] += 1
        rec.active = state["step"] in record
        done["n"] += 1
        progress(min(done["n"] / total, 1.0),
                 f"calibrating: batch {state['batch'] + 1}/{n_batches}, step {state['step']}/{num_inference_steps}")
        return out

    sched.step = counting_step  # instance attribute shadows the method; deleted below
    try:
        for b, (lo, hi) in enumerate(batches):
            batch = prompts[lo:hi]
            gens = [torch.Generator(device="cpu").manual_seed(seed + j) for j in range(lo, hi)]
            rec.moments = rec.sampling = True
            if holdout_prompts:
                rec.moments, rec.sampling = (hi <= n_cal), (lo >= n_cal)
            state["step"], state["batch"] = 0, b
            rec.active = 0 in record
            pipe(prompt=batch, num_inference_steps=num_inference_steps, generator=gens,
                 output_type="latent", **pipe_kwargs)
    finally:
        del sched.step
        rec.remove()
        if close_bar is not None:
            close_bar()
    meta = {
        "model_id": model_id, "family": adapter.family, "cache_key": key,
        "prompts_sha256": _json_hash(prompts), "num_prompts": len(prompts), "holdout_prompts": holdout_prompts,
        "steps": sorted(record), "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "seed": seed, "sample_tokens": sample_tokens,
        "dtype": str(dtype), "pipe_kwargs": {k: v for k, v in pipe_kwargs.items() if isinstance(v, (int, float, str, bool))},
        "versions": _versions(),
    }
    stats = rec.result(meta)
    if cache_path is not None:
        stats.save(cache_path)
    return stats
