"""Quantize a model in place (docs/DESIGN.md §8, torchao-like ``quantize_``), and one
layer at a time for the app's per-layer views (``quantize_layer`` + ``layer_error``).

Every target ``nn.Linear`` named by the model's adapter is swapped for the ``QuantLinear`` its
method's handler builds (dirotq/methods). Validation runs before anything is modified, and a failure
half-way restores the layers already swapped: bad input loses nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import math

import torch
from torch import nn

from .config import DEFAULT_KEY, QuantConfig, RankPlan
from .methods.common import BasisCache
from .methods.w4a16 import weight_only_config
from .modules import QuantLinear
from .registry import needs_stats, spec_for

ProgressFn = Callable[[float, str], None]


def quantize_layer(linear: nn.Linear, stats: Any, config: QuantConfig, *, rank: int | str | None = None,
                   spec: Any = None, cache: BasisCache | None = None) -> QuantLinear:
    """One ``nn.Linear(d, o)`` -> its ``QuantLinear`` under ``config`` (the float layer is untouched).

    stats: the layer's ``LayerStats`` (second moment (d, d), abs_max (d,), …) or None for methods
    that need none; rank: 16-bit rank (default: the config's rank plan for ``spec.name``);
    spec: the ``TargetSpec`` (name for messages, kind "w4a16" -> weight-only, head_dim);
    cache: eigendecomposition cache (default: a module-level LRU keyed by the stats object, so
    error-vs-rank sweeps over one layer pay for eigh once).
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_layer takes an nn.Linear, got {type(linear).__name__}")
    name = getattr(spec, "name", None) or "layer"
    kind = getattr(spec, "kind", "w4a4")
    if kind == "w4a16":  # weight-only under any method: no 16-bit branch
        config, r = weight_only_config(config), 0
    else:
        if rank is None:
            rank = config.rank_plan().ranks.get(name, config.rank_plan().ranks.get(DEFAULT_KEY, 0))
        r = RankPlan({DEFAULT_KEY: rank}).resolve({name: _Target(linear.in_features, kind)})[name]
    if stats is None and needs_stats(config):
        raise ValueError(f"method {config.method!r} with {config.weights} weights needs calibration statistics"
                         f"{f' for {name!r}' if name else ''}: pass stats= (see dirotq.calibrate)")
    with torch.no_grad():
        q = spec_for(config).handler(linear, stats, config, rank=r, spec=spec, cache=cache)
    q.meta.setdefault("rank", r)
    q.meta["kind"] = kind
    return q


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
    if x is None or x.numel() == 0:
        raise ValueError("layer_error needs held-out input tokens (the statistics' sample is empty)")
    x = x.to(device=linear.weight.device, dtype=linear.weight.dtype)
    y = reference_output(linear, x) if y_ref is None else y_ref.double()
    with torch.no_grad():
        y_hat = qlinear(x).double()
    err = float((y_hat - y).pow(2).sum())
    ref = float(y.pow(2).sum())
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


def quantize_(model: nn.Module, config: QuantConfig, stats: Any = None, *, adapter: Any = None,
              targets: Iterable[str] | None = None, progress: ProgressFn | None = None,
              skip_validation: bool = False, measure_error: bool = True) -> dict:
    """Quantize ``model``'s targets in place (a pipeline: its ``.transformer``); returns a report ``{"method", "config", "layers": {name:
    {method, rank, kind, rel_mse, sqnr_db}}, "summary"}``.

    adapter: the family adapter (default ``get_adapter(model)``); targets: a subset of its target
    names; progress(fraction, message): callback (else a tqdm bar); skip_validation: skip the
    up-front checks (the caller already ran them). ``kind="w4a16"`` targets get weight-only
    quantization with the config's weight settings. Errors are measured on each layer's stats
    sample when one exists. Everything is checked before the first layer is swapped, and any
    failure during the swap restores the original layers.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "transformer", None), nn.Module):
        model = model.transformer  # a pipeline: quantize its transformer
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (e.g. DiRotQConfig()), got {type(config).__name__}")
    if getattr(model, "_dirotq_quantization", None):
        raise ValueError("this model is already quantized (it has _dirotq_quantization); start from the float model")
    if adapter is None:
        from .models import get_adapter

        adapter = get_adapter(model)
    specs = _select_targets(adapter.targets(model), targets)
    ranks = config.rank_plan().resolve(adapter.targets(model))
    layer_stats: dict[str, Any] = {}
    if not skip_validation:
        for name, spec in specs.items():
            mod = model.get_submodule(name)
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"target {name!r} is a {type(mod).__name__}, not an nn.Linear (already quantized?)")
        if stats is None and any(needs_stats(weight_only_config(config) if s.kind == "w4a16" else config)
                                 for s in specs.values()):
            raise ValueError(f"method {config.method!r} with {config.weights} weights needs calibration statistics: "
                             "stats = dirotq.calibrate(pipe, prompts), then quantize_(model, config, stats)")
    for name, spec in specs.items():
        layer_stats[name] = _stats_for(stats, name)
        st = layer_stats[name]
        if st is not None and tuple(st.second_moment.shape) != (spec.in_features, spec.in_features):
            raise ValueError(f"statistics for {name!r} have width {st.second_moment.shape[0]}, "
                             f"the layer has {spec.in_features}")

    bar = None
    if progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), desc=f"quantize {config.method}", unit="layer", leave=False)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    layers: dict[str, dict] = {}
    cache = BasisCache(maxsize=4)  # shared-input groups reuse one basis; not the app's global LRU
    try:
        for i, (name, spec) in enumerate(specs.items()):
            msg = f"{name} ({spec.kind}, rank {ranks[name]})"
            if progress is not None:
                progress(i / max(len(specs), 1), f"quantizing {msg}")
            elif bar is not None:
                bar.set_postfix_str(name, refresh=False)
            parent, attr = _split(model, name)
            linear = getattr(parent, attr)
            st = layer_stats[name]
            q = quantize_layer(linear, st, config, rank=ranks[name], spec=spec, cache=cache)
            q.to(device=linear.weight.device)
            info = {"method": q.meta["method"], "rank": q.rank, "kind": spec.kind,
                    "in_features": spec.in_features, "out_features": spec.out_features}
            sample = getattr(st, "sample", None) if st is not None else None
            if measure_error and sample is not None and sample.numel():
                info.update(layer_error(linear, q, sample.to(linear.weight.device)))
            setattr(parent, attr, q)
            swapped.append((parent, attr, linear))
            layers[name] = info
            if bar is not None:
                bar.update(1)
    except BaseException:
        for parent, attr, linear in reversed(swapped):
            setattr(parent, attr, linear)
        raise
    finally:
        if bar is not None:
            bar.close()
    if progress is not None:
        progress(1.0, f"quantized {len(specs)} layers with {config.method}")
    model._dirotq_quantization = {"config": config.to_dict(),
                                  "targets": {n: dict(v) for n, v in layers.items()}}
    errs = [v["rel_mse"] for v in layers.values() if "rel_mse" in v]
    summary = {"layers": len(layers), "w4a4": sum(v["kind"] == "w4a4" for v in layers.values()),
               "w4a16": sum(v["kind"] == "w4a16" for v in layers.values())}
    if errs:
        summary["mean_rel_mse"] = sum(errs) / len(errs)
        summary["max_rel_mse"] = max(errs)
    return {"method": config.method, "config": config.to_dict(), "layers": layers, "summary": summary}


def quantize_model(model: nn.Module, config: QuantConfig, stats: Any = None, **kw: Any) -> nn.Module:
    """``quantize_`` that returns the (same, mutated) model, for chaining."""
    quantize_(model, config, stats, **kw)
    return model


__all__ = ["quantize_", "quantize_model", "quantize_layer", "layer_error", "reference_output"]
