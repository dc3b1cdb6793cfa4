"""Quantize a model in place (docs/DESIGN.md §8, torchao-like ``quantize_``), and one
layer at a time for the app's per-layer views (``quantize_layer`` + ``layer_error``).

Every target ``nn.Linear`` named by the model's adapter is swapped for the ``QuantLinear`` its
method's handler builds (dirotq/methods). Validation runs before anything is modified, and a failure
half-way restores the layers already swapped: bad input loses nothing.

Memory (docs/DESIGN.md "Memory and devices"): targets are quantized one shared-input group at a
time; a group's statistics are read when the group starts and dropped when it ends, its layers'
GPTQ runs as one batch when they meet the same Hessian, and each float layer is freed as soon as
its ``QuantLinear`` replaces it (its tensors spilled to a temporary safetensors file so a failure can
still restore it): at once when nothing waits for GPTQ, else after the group's GPTQ. Layers of
methods whose rows are independent are built a block of output rows at a time (``_build``), so with
RTN weights the peak is the model plus one block's working set; with GPTQ, plus the group's Hessian
and its batch of float64 weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .config import DEFAULT_KEY, KINDS, WEIGHT_ONLY_KINDS, QuantConfig, RankPlan
from .methods.common import BasisCache, GPTQBatcher, LinalgSettings, compute_device, deferred_gptq, use_linalg
from .methods.dirotq_lr import BRANCH_METHODS
from .methods.w4a16 import weight_only_target_config
from .modules import QuantLinear
from .registry import needs_stats, spec_for

ProgressFn = Callable[[float, str], None]
log = logging.getLogger(__name__)

ROLLBACKS = ("auto", "memory", "disk")
_MEMORY_ROLLBACK_BYTES = 1 << 30  # "auto": keep originals in memory up to 1 GiB of target weights
_GPTQ_BATCH_ELEMENTS = 1 << 27  # deferred GPTQ weights (1 GiB in float64) before a batch is run


def quantize_layer(linear: nn.Linear, stats: Any, config: QuantConfig, *, rank: int | str | None = None,
                   spec: Any = None, cache: BasisCache | None = None,
                   linalg: LinalgSettings | None = None) -> QuantLinear:
    """One ``nn.Linear(d, o)`` -> its ``QuantLinear`` under ``config`` (the float layer is untouched).

    stats: the layer's ``LayerStats`` (second moment (d, d), abs_max (d,), …) or None for methods
    that need none; rank: 16-bit rank (default: the config's rank plan for ``spec.name``);
    spec: the ``TargetSpec`` (name for messages, kind "w4a16" / "w8a16" -> weight-only, head_dim);
    cache: eigendecomposition cache (default: a module-level LRU keyed by the stats object, so
    error-vs-rank sweeps over one layer pay for eigh once); linalg: where and in which precision
    the linear algebra runs (default: the layer's device, float64; ``LinalgSettings``).
    Large layers of methods whose rows are independent (RTN weights) are quantized a block of
    rows at a time (same result, a block's memory).
    """
    return _quantize_layer(linear, stats, config, rank, spec, cache, linalg, None)[0]


def _quantize_layer(linear: nn.Linear, stats: Any, config: QuantConfig, rank: int | str | None, spec: Any,
                    cache: BasisCache | None, linalg: LinalgSettings | None, error_sample: torch.Tensor | None
                    ) -> tuple[QuantLinear, tuple[float, float] | None]:
    """``quantize_layer``, and with ``error_sample`` (held-out tokens (m, d)) the output error sums
    ``(‖ŷ − y‖², ‖y‖²)`` when the layer was built in row blocks (measured block by block; None
    otherwise: then measure with ``layer_error``)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_layer takes an nn.Linear, got {type(linear).__name__}")
    name = getattr(spec, "name", None) or "layer"
    kind = getattr(spec, "kind", "w4a4")
    if kind in WEIGHT_ONLY_KINDS:  # weight-only under any method; a branch only where a rank names it
        r = _weight_only_rank(config, rank, name, linear.in_features)
        config = weight_only_target_config(config, kind, r, name)
    else:
        if rank is None:
            rank = config.rank_plan().ranks.get(name, config.rank_plan().ranks.get(DEFAULT_KEY, 0))
        r = RankPlan({DEFAULT_KEY: rank}).resolve({name: _Target(linear.in_features, kind)})[name]
    if stats is None and needs_stats(config):
        raise ValueError(f"method {config.method!r} with {config.weights} weights needs calibration statistics"
                         f"{f' for {name!r}' if name else ''}: pass stats= (see dirotq.calibrate)")
    with torch.no_grad(), (use_linalg(linalg) if linalg is not None else contextlib.nullcontext()):
        q, errors = _build(linear, stats, config, r, spec, cache, error_sample)
    q.meta.setdefault("rank", r)
    q.meta["kind"] = kind
    return q, errors


# float64 weight bytes a row-blocked layer quantizes at once on the CPU (341 rows at d = 3072): FLUX's
# 3072 × 15360 proj_out would otherwise hold several float64 copies of itself (0.36 GiB each) beside the
# model. On a GPU the model leaves tens of GiB free and each block costs kernel launches: larger blocks.
_ROW_BLOCK_BYTES = 8 << 20
_ROW_BLOCK_BYTES_GPU = 256 << 20


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the operating system. glibc keeps freed blocks
    below 32 MiB in its heap, and a heap fragmented by long-lived results (a row block's codes
    between two blocks' float64 temporaries) only ever grows: without this, quantizing one
    3072 × 18432 layer in blocks left 0.2 GiB resident instead of 0.1."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _row_slices(out_features: int, in_features: int, device: torch.device) -> list[slice]:
    """Blocks of output rows of at most ``_ROW_BLOCK_BYTES`` (CPU; ``_ROW_BLOCK_BYTES_GPU`` elsewhere)
    of float64 weights (one block: the whole layer)."""
    budget = _ROW_BLOCK_BYTES if device.type == "cpu" else _ROW_BLOCK_BYTES_GPU
    rows = max(1, budget // (8 * max(in_features, 1)))
    return [slice(i, min(out_features, i + rows)) for i in range(0, out_features, rows)]


def _rows_of(linear: nn.Linear, rows: slice) -> nn.Linear:
    """An ``nn.Linear`` over output rows ``rows`` of ``linear``, its parameters views (no copy)."""
    part = nn.Linear(linear.in_features, rows.stop - rows.start, bias=linear.bias is not None, device="meta",
                     dtype=linear.weight.dtype)
    part.weight = nn.Parameter(linear.weight.detach()[rows], requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach()[rows], requires_grad=False)
    return part


def _build(linear: nn.Linear, stats: Any, config: QuantConfig, rank: int, spec: Any, cache: BasisCache | None,
           error_sample: torch.Tensor | None) -> tuple[QuantLinear, tuple[float, float] | None]:
    """The handler's ``QuantLinear``, built a block of rows at a time when the method's rows are
    independent under ``config`` and the layer exceeds one block (``MethodSpec.rows_independent``):
    each block's float64 copies are freed before the next, and the blocks are joined
    (``fusion.concat_rows``). With ``error_sample`` (held-out tokens (m, d)) the output error sums
    ``(‖ŷ − y‖², ‖y‖²)`` are measured block by block as well (else None), so no float64 or
    dequantized copy of the whole weight is ever made."""
    method = spec_for(config)
    device = compute_device(linear)
    slices = _row_slices(linear.out_features, linear.in_features, device) if method.rows_independent(config) else []
    if len(slices) <= 1:
        return method.handler(linear, stats, config, rank=rank, spec=spec, cache=cache), None
    from .fusion import concat_rows

    parts: list[QuantLinear] = []
    err = ref = 0.0
    for rows in slices:
        part_linear = _rows_of(linear, rows)
        part = method.handler(part_linear, stats, config, rank=rank, spec=spec, cache=cache)
        if error_sample is not None:
            e, r = _error_sums(part_linear, part, error_sample)
            err, ref = err + e, ref + r
            part._dequantized = None
        parts.append(part)
        del part_linear, part
        if device.type == "cpu":
            release_freed_memory()
    return concat_rows(parts), ((err, ref) if error_sample is not None else None)


def check_weight_only_ranks(config: QuantConfig, targets: Mapping[str, Any], ranks: Mapping[str, int]) -> None:
    """A rank on a weight-only target (its 16-bit branch) needs a PCA method: a ``ValueError``
    naming the layers otherwise, before any work."""
    named = [n for n, s in targets.items() if s.kind in WEIGHT_ONLY_KINDS and ranks.get(n, 0)]
    if named and config.method not in BRANCH_METHODS:
        raise ValueError(f"the rank plan gives weight-only layers {named[:3]} a 16-bit branch, which needs a PCA "
                         f"method ({', '.join(BRANCH_METHODS)}); {config.method!r} has none")


def _weight_only_rank(config: QuantConfig, rank: int | str | None, name: str, width: int) -> int:
    """The 16-bit rank of a weight-only target: ``rank`` when given, else its own entry in the
    config's rank plan (``_default`` is for the W4A4 targets), else 0; "paper" as for any layer."""
    plan = config.rank_plan() if rank is None else RankPlan({name: rank})
    r = plan.rank_for(name, width) if name in plan.ranks else 0
    if r > width:
        raise ValueError(f"rank {r} for {name!r} exceeds its input width {width}")
    return r


class _Target:
    """The two facts ``RankPlan.resolve`` needs of a layer quantized on its own."""

    def __init__(self, in_features: int, kind: str):
        self.in_features, self.kind = in_features, kind


def reference_output(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b in float64 from the float layer, ``x: (m, d)`` -> ``(m, o)``."""
    y = x.double() @ linear.weight.detach().double().T
    if linear.bias is not None:
        y = y + linear.bias.detach().double()
    return y


def layer_error(linear: nn.Linear, qlinear: nn.Module, x: torch.Tensor, y_ref: torch.Tensor | None = None
                ) -> dict[str, float]:
    """Output error of ``qlinear`` against ``linear`` on held-out tokens ``x: (m, d)``.

    Both see the same input, ``x`` in the model's dtype; the reference ``y`` is computed from it in
    float64 (pass ``y_ref = reference_output(linear, x)`` to reuse it across many ``qlinear``).
    Returns ``{"rel_mse": ‖ŷ − y‖²/‖y‖², "sqnr_db": 10·log10(‖y‖²/‖ŷ − y‖²)}``, with
    ``sqnr_db = inf`` when the outputs agree exactly.
    """
    return error_report(*_error_sums(linear, qlinear, x, y_ref))


def _error_sums(linear: nn.Linear, qlinear: nn.Module, x: torch.Tensor, y_ref: torch.Tensor | None = None
                ) -> tuple[float, float]:
    """``(‖ŷ − y‖², ‖y‖²)`` of ``layer_error``."""
    if x is None or x.numel() == 0:
        raise ValueError("layer_error needs held-out input tokens (the statistics' sample is empty)")
    x = x.to(device=linear.weight.device, dtype=linear.weight.dtype)
    y = reference_output(linear, x) if y_ref is None else y_ref.double()
    with torch.no_grad():
        y_hat = qlinear(x).double()
    return float((y_hat - y).pow(2).sum()), float(y.pow(2).sum())


def error_report(err: float, ref: float) -> dict[str, float]:
    """``{"rel_mse", "sqnr_db"}`` from the sums ``err = ‖ŷ − y‖²`` and ``ref = ‖y‖²``."""
    rel = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    return {"rel_mse": rel, "sqnr_db": math.inf if err == 0 else 10.0 * math.log10(ref / err) if ref > 0 else -math.inf}


# --- whole model ---------------------------------------------------------------------------------
def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _stats_for(stats: Any, name: str) -> Any:
    if stats is None:
        return None
    try:
        return stats.for_layer(name) if hasattr(stats, "for_layer") else stats[name]
    except KeyError:
        raise KeyError(f"the calibration statistics have no entry for target {name!r} "
                       "(were they collected on another model or with another adapter?)") from None


def _select_targets(all_targets: Mapping[str, Any], targets: Iterable[str] | None) -> dict[str, Any]:
    if targets is None:
        return dict(all_targets)
    names = list(targets)
    unknown = [n for n in names if n not in all_targets]
    if unknown:
        raise ValueError(f"targets not known to the adapter: {unknown[:5]} (see dirotq.models.target_report)")
    return {n: all_targets[n] for n in names}


def _target_bytes(model: nn.Module, names: Iterable[str]) -> int:
    total = 0
    for n in names:
        for p in model.get_submodule(n).parameters(recurse=False):
            total += p.numel() * p.element_size()
    return total


class _Rollback:
    """What restores the float layers if ``quantize_`` fails after swapping some.

    ``"memory"`` keeps each replaced ``nn.Linear`` as it is. ``"disk"`` writes its parameters to a
    temporary safetensors file (one per layer) and frees their storage, keeping only the module
    object (hooks, subclass and parameter objects stay the same); ``restore`` reads them back bit
    for bit. The folder is deleted on success and after a restore."""

    def __init__(self, mode: str, spill_dir: str | os.PathLike | None) -> None:
        self.mode, self.spill_dir = mode, spill_dir
        self.records: list[tuple[nn.Module, str, nn.Module, Path | None]] = []
        self.folder: Path | None = None

    def replace(self, parent: nn.Module, attr: str, linear: nn.Module, new: nn.Module) -> None:
        self.records.append((parent, attr, linear, None))
        setattr(parent, attr, new)
        if self.mode == "disk":
            from safetensors.torch import save_file

            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="dirotq-rollback-", dir=self.spill_dir))
            file = self.folder / f"{len(self.records)}.safetensors"
            params = dict(linear.named_parameters(recurse=False))
            save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(file))
            self.records[-1] = (parent, attr, linear, file)
            for p in params.values():  # the module keeps its Parameter objects, now empty
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def restore(self) -> None:
        from safetensors.torch import load_file

        for parent, attr, linear, file in reversed(self.records):
            if file is not None:
                try:
                    saved = load_file(str(file))
                except Exception as e:
                    raise RuntimeError(f"quantize_ failed and the original of {attr!r} could not be read back from "
                                       f"{file}: {e}") from e
                for k, p in linear.named_parameters(recurse=False):
                    p.data = saved[k].to(device=p.device)
            setattr(parent, attr, linear)
        self.records.clear()

    def close(self) -> None:
        self.records.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def layer_record(module: nn.Module, spec: Any) -> dict:
    """What a checkpoint records of one replaced target (method, rank, kind, widths)."""
    return {"method": module.meta["method"], "rank": module.rank, "kind": spec.kind,
            "in_features": spec.in_features, "out_features": spec.out_features}


def set_quantization_record(model: nn.Module, config: QuantConfig, layers: Mapping[str, Mapping]) -> None:
    """Mark ``model`` as quantized by ``config`` with the per-target ``layers`` records
    (``layer_record``, extra keys kept): what ``save_quantized`` reads. Callers that replace the
    layers themselves (streaming scripts that quantize in passes) call it once at the end."""
    model._dirotq_quantization = {"config": config.to_dict(), "targets": {n: dict(v) for n, v in layers.items()}}


def quantize_(model: nn.Module, config: QuantConfig, stats: Any = None, *, adapter: Any = None,
              targets: Iterable[str] | None = None, progress: ProgressFn | None = None,
              skip_validation: bool = False, measure_error: bool = True, linalg: LinalgSettings | None = None,
              rollback: str = "auto", spill_dir: str | os.PathLike | None = None) -> dict:
    """Quantize ``model``'s targets in place (a pipeline: its ``.transformer``); returns a report ``{"method", "config", "layers": {name:
    {method, rank, kind, rel_mse, sqnr_db}}, "summary"}``.

    adapter: the family adapter (default ``get_adapter(model)``); targets: a subset of its target
    names; progress(fraction, message): callback (else a tqdm bar); skip_validation: skip the
    up-front checks (the caller already ran them). ``kind="w4a16"`` targets get weight-only
    quantization with the config's weight settings. Errors are measured on each layer's stats
    sample when one exists. Everything is checked before the first layer is swapped, and any
    failure during the swap restores the original layers.

    Memory: targets are quantized one shared-input group at a time (statistics loaded with
    ``CalibrationStats.load`` are read for the group and released after it; GPTQ runs once for
    the group's layers that meet the same Hessian), and each float layer is freed when replaced.
    linalg: where and in which precision the linear algebra runs (``LinalgSettings``; default the
    layers' own device, float64, full eigh). rollback: how a failure restores the float model:
    ``"disk"`` spills each replaced layer to a temporary safetensors file under ``spill_dir``
    (default: the system temp folder) and frees it, ``"memory"`` keeps them all until the end,
    ``"auto"`` (default) takes memory when the targets' weights fit in 1 GiB.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "transformer", None), nn.Module):
        model = model.transformer  # a pipeline: quantize its transformer
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (e.g. DiRotQConfig()), got {type(config).__name__}")
    if getattr(model, "_dirotq_quantization", None):
        raise ValueError("this model is already quantized (it has _dirotq_quantization); start from the float model")
    if rollback not in ROLLBACKS:
        raise ValueError(f"rollback must be one of {ROLLBACKS}, got {rollback!r}")
    if linalg is not None and not isinstance(linalg, LinalgSettings):
        raise TypeError(f"linalg must be a LinalgSettings, got {type(linalg).__name__}")
    if adapter is None:
        from .models import get_adapter

        adapter = get_adapter(model)
    specs = _select_targets(adapter.targets(model), targets)
    ranks = config.rank_plan().resolve(adapter.targets(model))
    check_weight_only_ranks(config, specs, ranks)
    if not skip_validation:
        for name, spec in specs.items():
            mod = model.get_submodule(name)
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"target {name!r} is a {type(mod).__name__}, not an nn.Linear (already quantized?)")
        if stats is None and any(needs_stats(weight_only_target_config(config, s.kind, ranks[n], n)
                                             if s.kind in WEIGHT_ONLY_KINDS else config) for n, s in specs.items()):
            raise ValueError(f"method {config.method!r} with {config.weights} weights needs calibration statistics: "
                             "stats = dirotq.calibrate(pipe, prompts), then quantize_(model, config, stats)")
    # one entry per input group, in order of the group's first target: its statistics are read once
    order: dict[Any, list[str]] = {}
    for name, spec in specs.items():
        key, width = _group_and_width(stats, name, spec)
        if width is not None and width != spec.in_features:
            raise ValueError(f"statistics for {name!r} have width {width}, the layer has {spec.in_features}")
        order.setdefault(key, []).append(name)
    if rollback == "auto":
        rollback = "memory" if _target_bytes(model, specs) <= _MEMORY_ROLLBACK_BYTES else "disk"

    bar = None
    if progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), desc=f"quantize {config.method}", unit="layer", leave=False)
    undo = _Rollback(rollback, spill_dir)
    layers: dict[str, dict] = {}
    cache = BasisCache(maxsize=8)  # shared-input groups reuse one basis and Hessian; dropped per group
    batcher = GPTQBatcher()
    # (name, spec, parent, attr, float layer, QuantLinear, held-out sample or None, error sums or None)
    pending: list[tuple[str, Any, nn.Module, str, nn.Module, QuantLinear, Any, Any]] = []
    step = 0

    def finish_pending(consume: bool) -> None:
        """Run the deferred GPTQ, measure each pending layer's error and swap it in."""
        batcher.run(consume=consume)
        for name, spec, parent, attr, linear, q, sample, sums in pending:
            info = layer_record(q, spec)
            if sums is not None:  # measured block by block while the layer was built
                info.update(error_report(*sums))
            elif sample is not None:
                info.update(layer_error(linear, q, sample))
                q._dequantized = None  # the forward cached W_q in float32: 2× the bf16 layer, for every layer
            undo.replace(parent, attr, linear, q)
            if q._device().type == "cpu":
                release_freed_memory()
            layers[name] = info
            if bar is not None:
                bar.update(1)
        pending.clear()

    try:
        with use_linalg(linalg), deferred_gptq(batcher):
            for key, members in order.items():
                st = _stats_for(stats, members[0])
                for name in members:
                    spec = specs[name]
                    msg = f"{name} ({spec.kind}, rank {ranks[name]})"
                    if progress is not None:
                        progress(step / max(len(specs), 1), f"quantizing {msg}")
                    elif bar is not None:
                        bar.set_postfix_str(name, refresh=False)
                    step += 1
                    parent, attr = _split(model, name)
                    linear = getattr(parent, attr)
                    sample = _sample_copy(st) if measure_error else None
                    if sample is not None:
                        sample = sample.to(linear.weight.device) if sample.numel() else None
                    q, sums = _quantize_layer(linear, st, config, ranks[name], spec, cache, None, sample)
                    if batcher.discard_unattached():  # a handler that builds its QuantLinear itself
                        with deferred_gptq(None):
                            q, sums = _quantize_layer(linear, st, config, ranks[name], spec, cache, None, sample)
                    q.to(device=linear.weight.device)
                    pending.append((name, spec, parent, attr, linear, q, sample, sums))
                    if not len(batcher):  # nothing waits for GPTQ: swap it in now and free the float layer
                        finish_pending(consume=False)
                    if batcher.pending_elements > _GPTQ_BATCH_ELEMENTS:
                        finish_pending(consume=False)  # the group's cached Hessians are still in use
                if st is not None:  # the group's handlers are done: free its d×d tensors before its GPTQ
                    cache.drop(st)
                    if hasattr(stats, "release") and not isinstance(key, tuple):
                        stats.release(key)
                del st
                finish_pending(consume=True)
    except BaseException:
        pending.clear()
        undo.restore()
        raise
    finally:
        undo.close()
        if bar is not None:
            bar.close()
    if progress is not None:
        progress(1.0, f"quantized {len(specs)} layers with {config.method}")
    layers = {n: layers[n] for n in specs}  # report in the model's layer order
    set_quantization_record(model, config, layers)
    errs = [v["rel_mse"] for v in layers.values() if "rel_mse" in v]
    summary = {"layers": len(layers), **{k: sum(v["kind"] == k for v in layers.values()) for k in KINDS}}
    if errs:
        summary["mean_rel_mse"] = sum(errs) / len(errs)
        summary["max_rel_mse"] = max(errs)
    settings = linalg or LinalgSettings()
    return {"method": config.method, "config": config.to_dict(), "layers": layers, "summary": summary,
            "linalg": {"device": None if settings.device is None else str(settings.device),
                       "dtype": str(settings.dtype).replace("torch.", ""), "eigensolver": settings.eigensolver},
            "rollback": rollback}


def _sample_copy(st: Any) -> torch.Tensor | None:
    """The group's held-out tokens (m, d), copied: a tensor read from a statistics file keeps the
    whole memory-mapped group (its d×d C included) resident while it lives."""
    sample = getattr(st, "sample", None) if st is not None else None
    return None if sample is None else sample.clone()


def _group_and_width(stats: Any, name: str, spec: Any) -> tuple[Any, int | None]:
    """``(group key, statistics width or None)`` of target ``name`` without reading tensors that
    are still on disk; the key orders and batches the work (the adapter's group without stats)."""
    if stats is None:
        return ("adapter", spec.group), None
    if hasattr(stats, "group_key") and hasattr(stats, "group_width"):
        try:
            key = stats.group_key(name)
        except KeyError:
            raise KeyError(f"the calibration statistics have no entry for target {name!r} "
                           "(were they collected on another model or with another adapter?)") from None
        return key, stats.group_width(key)
    st = _stats_for(stats, name)
    return ("object", id(st)), (None if st is None else st.second_moment.shape[0])


def quantize_model(model: nn.Module, config: QuantConfig, stats: Any = None, **kw: Any) -> nn.Module:
    """``quantize_`` that returns the (same, mutated) model, for chaining."""
    quantize_(model, config, stats, **kw)
    return model


__all__ = ["quantize_", "quantize_model", "quantize_layer", "layer_error", "error_report", "release_freed_memory",
           "reference_output", "LinalgSettings",
           "ROLLBACKS", "layer_record", "set_quantization_record"]
