"""Per-layer ranks by what the model output sees (docs/DESIGN.md §9, "Judge rank plans by images").

A layer's own quantization error does not say how much it moves the image: on the embedded model
the feed-forward input projections carry 20–40× more of the model-output error than the attention
projections whose layer SQNR is worst, so policies that spend rank where the layer error is worst
make images worse than a fixed rank. This module measures each layer's effect on the output
directly and spends a 16-bit budget where the output gains most:

1. ``record_transformer_calls``: the transformer's inputs while the 16-bit pipeline denoises a few
   calibration prompts (kept in memory: a few MB for the embedded model), and how the pipeline
   turns a transformer output into what its sampler steps with (``SamplerView``: PixArt drops the
   learned-variance channels and mixes the two halves of the guidance batch);
2. ``layer_sensitivity``: for every W4A4 target, the relative error of what the sampler steps with
   when only that layer is quantized (rank 0; the other layers 16-bit), divided by that layer's own relative
   output error on its held-out tokens: how much of a layer's error reaches the model output. One
   quantized forward pass per layer; ``output_error_curves`` measures the output error at every
   rank instead (a forward pass per layer and rank: for checks and small models);
3. ``sensitivity_curves``: a layer's error-vs-rank curve (held-out tokens, cheap) times its
   sensitivity: the predicted output error at every rank;
4. ``allocate``: a greedy on output-error reduction per extra 16-bit parameter, the method's own cost
   (``MethodSpec.cost``), under the budget of a uniform rank, taking the steepest jump to any larger
   candidate rank (so a flat stretch of a curve does not stop a layer that gains later).

Per-layer output errors are treated as additive and proportional to the layer's own error, which
holds to first order for small perturbations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .config import DEFAULT_KEY, WEIGHT_ONLY_KINDS, QuantConfig, RankPlan
from .methods.dirotq_lr import BRANCH_METHODS
from .methods.w4a16 import weight_only_target_config
from .quantize import quantize_layer
from .registry import spec_for

Progress = Callable[[float, str], Any]
Call = tuple[tuple, dict]


# ------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass(frozen=True)
class SamplerView:
    """What the sampler steps with, as a function of the transformer's output: the part of the
    output a layer's error can reach the image through.

    call_batch: samples per recorded call (classifier-free guidance: 2 × prompts); keep: the
    leading channels (dim 1) the pipeline passes on (PixArt: the first half; the rest is a learned
    variance it discards), None = all; guidance: g of ``uncond + g·(cond − uncond)`` over the two
    halves of each call's batch, None = no guidance batch.
    """

    call_batch: int
    keep: int | None = None
    guidance: float | None = None

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        """out: (n·call_batch, C, …), n recorded calls merged -> (n·call_batch [/2], keep, …)."""
        if self.keep is not None:
            out = out[:, :self.keep]
        if self.guidance is None:
            return out
        parts = []
        for chunk in out.split(self.call_batch, dim=0):
            uncond, cond = chunk.chunk(2, dim=0)
            parts.append(uncond + self.guidance * (cond - uncond))
        return torch.cat(parts, dim=0)


class Recording(list):
    """The recorded transformer calls (a list of ``(args, kwargs)``) and their ``view``: the
    ``SamplerView`` fitted to what the pipeline passed its sampler, or None where no simple view
    reproduces it (then the raw transformer output is used)."""

    view: SamplerView | None = None


def fit_sampler_view(outputs: Sequence[torch.Tensor], sampled: Sequence[torch.Tensor],
                     tol: float = 1e-3) -> SamplerView | None:
    """The ``SamplerView`` that maps each transformer output to what the sampler stepped with, fitted
    on recorded pairs, or None if none does (to relative error ``tol``).

    outputs: per call, the transformer output (B, C, …); sampled: per call, the scheduler's
    model_output (B or B/2, C or fewer, …). Guidance g is the least-squares fit of
    ``sampled − uncond = g·(cond − uncond)`` over all calls (uncond the first half, as diffusers
    orders the guidance batch), so no pipeline argument needs to be known.
    """
    if not outputs or len(outputs) != len(sampled):
        return None
    y0, m0 = outputs[0], sampled[0]
    b = y0.shape[0]
    if any(y.shape != y0.shape for y in outputs) or any(m.shape != m0.shape for m in sampled):
        return None
    if y0.dim() != m0.dim() or y0.shape[2:] != m0.shape[2:] or m0.shape[0] not in (b, b // 2):
        return None
    keep = m0.shape[1] if m0.shape[1] != y0.shape[1] else None
    if keep is not None and keep > y0.shape[1]:
        return None
    kept = [(y[:, :keep] if keep is not None else y).double() for y in outputs]
    target = [m.double() for m in sampled]
    guidance = None
    if m0.shape[0] != b:
        if b % 2:
            return None
        num = den = 0.0
        for y, m in zip(kept, target):
            u, c = y.chunk(2, dim=0)
            num += float(((m - u) * (c - u)).sum())
            den += float((c - u).pow(2).sum())
        if den == 0:
            return None
        guidance = num / den
    view = SamplerView(call_batch=b, keep=keep, guidance=guidance)
    err = sum(float((view(y.double()) - m).pow(2).sum()) for y, m in zip(outputs, target))
    ref = sum(float(m.pow(2).sum()) for m in target)
    return view if ref > 0 and err <= tol ** 2 * ref else None


def record_transformer_calls(pipe: Any, prompts: Sequence[str], *, num_inference_steps: int = 10,
                             steps: Iterable[int] | None = None, seed: int = 0,
                             pipe_kwargs: Mapping[str, Any] | None = None) -> Recording:
    """(args, kwargs) of every transformer forward while ``pipe`` denoises ``prompts`` (one batch,
    prompt j with generator seed ``seed + j``), at denoising steps ``steps`` (default: all), with
    tensors detached and cloned. Classifier-free guidance doubles the batch inside each call.
    The result's ``view`` (``fit_sampler_view``) says what of each output the sampler used."""
    from .pipelines import call_kwargs

    if not prompts:
        raise ValueError("record_transformer_calls needs at least one prompt")
    keep = set(range(num_inference_steps)) if steps is None else {int(s) for s in steps}
    calls = Recording()
    outputs: list[torch.Tensor] = []
    sampled: list[torch.Tensor] = []
    state = {"step": 0}

    def grab(module, args, kwargs):
        if state["step"] in keep:
            calls.append((_detached(args), _detached(kwargs)))

    def grab_output(module, args, kwargs, out):
        if state["step"] in keep:
            outputs.append(_first(out).detach().float().cpu())

    sched = pipe.scheduler
    orig_step = sched.step

    def counting_step(*a, **kw):
        if state["step"] in keep:
            sampled.append(_first(a[0] if a else kw["model_output"]).detach().float().cpu())
        out = orig_step(*a, **kw)
        state["step"] += 1
        return out

    handles = [pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True),
               pipe.transformer.register_forward_hook(grab_output, with_kwargs=True)]
    own_step = sched.__dict__.get("step")  # a wrapper someone set on the instance: put back below
    sched.step = counting_step  # an instance attribute shadows the method
    try:
        gens = [torch.Generator(device="cpu").manual_seed(seed + j) for j in range(len(prompts))]
        with torch.no_grad():
            pipe(prompt=list(prompts), num_inference_steps=num_inference_steps, generator=gens,
                 output_type="latent", **call_kwargs(pipe, pipe_kwargs))
    finally:
        for h in handles:
            h.remove()
        if own_step is None:
            del sched.step
        else:
            sched.step = own_step
    # one transformer call per sampler step is the case a view can describe (not e.g. Heun's two)
    calls.view = fit_sampler_view(outputs, sampled) if len(outputs) == len(sampled) else None
    return calls


def _first(out: Any) -> torch.Tensor:
    """The tensor of a module output: itself, or the first field of a tuple or ``return_dict`` output."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _detached(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


def merge_calls(calls: Sequence[Call], max_batch: int = 256) -> list[Call]:
    """The same forwards in fewer, larger batches: consecutive calls whose tensors agree in all but
    the batch dimension (and whose other arguments are equal) are concatenated along it, up to
    ``max_batch`` samples. Outputs are the same per sample (every sample is independent); a tiny
    model runs far faster in one large batch than in many small ones."""
    merged: list[Call] = []
    group: list[Call] = []

    def flush():
        if group:
            merged.append(group[0] if len(group) == 1 else _cat(group))
            group.clear()

    for call in calls:
        if group and (not _compatible(group[0], call) or _batch(group) + _batch([call]) > max_batch):
            flush()
        group.append(call)
    flush()
    return merged


def _leaves(obj: Any) -> list:
    if isinstance(obj, dict):
        return [x for k in sorted(obj) for x in ([k] + _leaves(obj[k]))]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _leaves(v)]
    return [obj]


def _compatible(a: Any, b: Any) -> bool:
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dim() == 0 or x.shape[1:] != y.shape[1:] or x.dtype != y.dtype:
                return False
        elif x != y:
            return False
    return True


def _batch(group: Sequence[Call]) -> int:
    return sum(next(t.shape[0] for t in _leaves(c) if isinstance(t, torch.Tensor)) for c in group)


def _cat(objs: Sequence[Any]) -> Any:
    first = objs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(objs), dim=0)
    if isinstance(first, dict):
        return {k: _cat([o[k] for o in objs]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([o[i] for o in objs]) for i in range(len(first)))
    return first


def _output(transformer: nn.Module, calls: Sequence[Call], view: SamplerView | None = None) -> list[torch.Tensor]:
    """The transformer's outputs on ``calls`` (float64), seen through ``view`` if given."""
    outs = []
    with torch.no_grad():
        for args, kwargs in calls:
            out = _first(transformer(*args, **{**kwargs, "return_dict": False})).double()
            outs.append(view(out) if view is not None else out)
    return outs


def output_error(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """Σ‖ŷ − y‖² / Σ‖y‖² over all recorded calls."""
    num = sum(float((o - r).pow(2).sum()) for r, o in zip(reference, outputs))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# ------------------------------------------------------------------------------------ curves
# Error-vs-rank curves bend hardest below rank 8: on the embedded model one direction removes half
# of cross-attention q's error (its input, the normalized image tokens, has a dominant direction) and
# a rank-1 branch 17-71 % of the weight-only ff.net.2's, at an eighth of rank 8's cost; then steps of
# 8 up to 32, then coarser
RANK_GRID = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def candidate_ranks(d: int) -> list[int]:
    """Ranks an allocation may choose for a layer of input width ``d``: ``RANK_GRID`` capped at d."""
    return [r for r in RANK_GRID if r <= d]


def output_error_curves(transformer: nn.Module, calls: Sequence[Call], stats: Any,
                        config_for_rank: Callable[[int], QuantConfig], *, targets: Mapping[str, Any],
                        ranks: Callable[[int], Sequence[int]] = candidate_ranks,
                        progress: Progress | None = None) -> dict[str, dict[int, float]]:
    """``{layer: {rank: output relative error}}`` with only that layer quantized (the rest 16-bit).

    transformer: the float model (left unchanged); calls: ``record_transformer_calls``; stats:
    calibration statistics (``for_layer``); config_for_rank(r): the method's config at rank r;
    targets: name -> TargetSpec (W4A4 targets only are measured); ranks(d): the candidate ranks.
    The error is that of what the sampler steps with where the recording has a ``view``.
    """
    view = getattr(calls, "view", None)
    calls = merge_calls(calls)
    reference = _output(transformer, calls, view)
    names = [n for n, s in targets.items() if getattr(s, "kind", "w4a4") == "w4a4"]
    jobs = sum(len(ranks(targets[n].in_features)) for n in names)
    done = 0
    curves: dict[str, dict[int, float]] = {}
    for name in names:
        spec = targets[name]
        parent_name, _, attr = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        linear = getattr(parent, attr)
        curve: dict[int, float] = {}
        for r in ranks(spec.in_features):
            q = quantize_layer(linear, stats.for_layer(name), config_for_rank(r), rank=r, spec=spec)
            q.to(device=linear.weight.device)
            setattr(parent, attr, q)
            try:
                curve[r] = output_error(reference, _output(transformer, calls, view))
            finally:
                setattr(parent, attr, linear)
            done += 1
            if progress is not None:
                progress(done / max(jobs, 1), f"output error: {name} at rank {r}")
        curves[name] = curve
    return curves


def _measured(targets: Mapping[str, Any], weight_only: bool) -> list[str]:
    """The targets an allocation measures: the W4A4 ones, and the weight-only ones if asked."""
    return [n for n, s in targets.items() if getattr(s, "kind", "w4a4") == "w4a4"
            or (weight_only and getattr(s, "kind", "w4a4") in WEIGHT_ONLY_KINDS)]


def layer_sensitivity(transformer: nn.Module, calls: Sequence[Call], stats: Any, config: QuantConfig, *,
                      targets: Mapping[str, Any], rank: int = 0, weight_only: bool = False,
                      progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """How much of each W4A4 target's error reaches the model output.

    For every target: ``output`` = the relative error on ``calls`` of what the sampler steps with
    (the recording's ``view``; the raw transformer output for a plain list of calls) with only
    that layer quantized by ``config`` at ``rank``; ``layer`` = the layer's own relative output error
    on its held-out tokens (``stats.for_layer(name).sample``); ``gain`` = output / layer. The model
    is left unchanged. weight_only: also the weight-only targets (quantized as they run at rank 0:
    weight-only). Returns ``{layer: {"output", "layer", "gain"}}``.

    Why the view: PixArt's transformer also returns a learned variance that the pipeline discards,
    and guidance amplifies the conditional-minus-unconditional difference 4.5×; an error that only
    reaches the discarded half must not buy rank, and one in the difference counts 4.5× (the image
    study in docs/EVALUATION.md measures what this changes).
    """
    from .quantize import layer_error

    view = getattr(calls, "view", None)
    calls = merge_calls(calls)
    reference = _output(transformer, calls, view)
    names = _measured(targets, weight_only)
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        spec = targets[name]
        parent_name, _, attr = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        linear = getattr(parent, attr)
        st = stats.for_layer(name)
        q = quantize_layer(linear, st, config, rank=rank, spec=spec)
        q.to(device=linear.weight.device)
        own = layer_error(linear, q, st.sample)["rel_mse"]
        setattr(parent, attr, q)
        try:
            seen = output_error(reference, _output(transformer, calls, view))
        finally:
            setattr(parent, attr, linear)
        out[name] = {"output": seen, "layer": own, "gain": seen / own if own > 0 else 0.0}
        if progress is not None:
            progress((i + 1) / len(names), f"sensitivity: {name}")
    return out


def sensitivity_curves(layer_curves: Mapping[str, Mapping[int, float]],
                       sensitivity: Mapping[str, Mapping[str, float]]) -> dict[str, dict[int, float]]:
    """Predicted output error per layer and rank: the layer's error curve times its gain."""
    return {n: {int(r): sensitivity[n]["gain"] * e for r, e in curve.items()}
            for n, curve in layer_curves.items() if n in sensitivity}


# -------------------------------------------------------------------------------- allocation
def layer_params16(spec: Any, config: QuantConfig, rank: int) -> float:
    """Extra 16-bit parameters of target ``spec`` at ``rank`` under ``config``'s method (its cost
    function; 1-bit Hadamard signs are not 16-bit parameters). A weight-only target's rank is its
    16-bit branch (``weight_only_branch_config``): (d + o) per rank, nothing at rank 0."""
    if getattr(spec, "kind", "w4a4") in WEIGHT_ONLY_KINDS:
        config = weight_only_target_config(config, spec.kind, rank, getattr(spec, "name", None))
    return spec_for(config).cost(spec.in_features, spec.out_features, rank, config).params16


def allocate(curves: Mapping[str, Mapping[int, float]], cost: Callable[[str, int], float],
             budget: float) -> dict[str, int]:
    """Ranks that spend ``budget`` where the summed error drops most per unit of cost.

    curves: layer -> {rank: error} (each with rank 0); cost(layer, rank): the layer's cost at that
    rank; budget: what may be spent beyond rank 0 everywhere (Σ cost(layer, r) − cost(layer, 0)).
    Greedy from rank 0 everywhere: each step moves one layer to the larger candidate rank with the
    best error drop per cost (the steepest jump, not just the next rank) that still fits.
    Returns layer -> rank.
    """
    plan = {name: 0 for name in curves}
    spent = 0.0
    while True:
        best = None
        for name, curve in curves.items():
            r0 = plan[name]
            for r in sorted(x for x in curve if x > r0):
                step = cost(name, r) - cost(name, r0)
                if spent + step > budget + 1e-9:
                    break  # costs grow with rank: larger jumps do not fit either
                gain = (curve[r0] - curve[r]) / max(step, 1e-12)
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name, r, step)
        if best is None:
            return plan
        _, name, r, step = best
        plan[name] = r
        spent += step


def shared_input_units(targets: Mapping[str, Any]) -> dict[str, str]:
    """Layer -> the unit that gets one rank when ranks are tied: its shared-input group within its
    block (q/k/v, FLUX's proj_mlp + q/k/v), the layers ``dirotq.fusion`` runs as one."""
    return {n: f"{s.group}@{s.block}" for n, s in targets.items()}


def uniform_budget(targets: Mapping[str, Any], config: QuantConfig, rank: int) -> float:
    """Extra 16-bit parameters the fixed plan ``rank`` spends: the uniform rank (capped at each
    width) on the W4A4 ``targets``; weight-only targets get no branch from it."""
    return sum(layer_params16(s, config, min(rank, s.in_features)) - layer_params16(s, config, 0)
               for s in targets.values() if getattr(s, "kind", "w4a4") == "w4a4")


def allocate_like_uniform(curves: Mapping[str, Mapping[int, float]], targets: Mapping[str, Any],
                          config: QuantConfig, rank: int, *, tie: Mapping[str, str] | None = None) -> dict[str, int]:
    """``allocate`` under the 16-bit parameter budget of a uniform ``rank`` (each layer capped at its
    width), with the method's own cost.

    The budget is what the fixed plan ``rank`` spends: the uniform rank on the W4A4 targets of
    ``curves``. Weight-only targets in ``curves`` compete for it with their 16-bit branches
    ((d + o) per rank, ``layer_params16``); the fixed plan gives them none.
    tie: layer -> unit (``shared_input_units``): the layers of a unit get one rank, chosen on their
    summed curves and costs, so a fused shared-input group keeps one activation side."""
    names = [n for n in curves if n in targets]

    def cost(name: str, r: int) -> float:
        return layer_params16(targets[name], config, r)

    budget = uniform_budget({n: targets[n] for n in names}, config, rank)
    if not tie:
        return allocate({n: curves[n] for n in names}, cost, budget)
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(tie.get(n, n), []).append(n)
    unit_curves = {u: {r: sum(curves[m][r] for m in ms) for r in sorted(set.intersection(*(set(curves[m]) for m in ms)))}
                   for u, ms in units.items()}
    plan = allocate(unit_curves, lambda u, r: sum(cost(m, r) for m in units[u]), budget)
    return {n: plan[tie.get(n, n)] for n in names}


def layer_error_curves(transformer: nn.Module, stats: Any, config_for_rank: Callable[[int], QuantConfig], *,
                       targets: Mapping[str, Any], ranks: Callable[[int], Sequence[int]] = candidate_ranks,
                       weight_only: bool = False, linear: Callable[[str], nn.Module] | None = None,
                       progress: Progress | None = None) -> dict[str, dict[int, float]]:
    """``{layer: {rank: the layer's own relative output error}}`` on its held-out tokens
    (``stats.for_layer(name).sample``): one quantization per layer and rank. W4A4 targets, and with
    ``weight_only`` the weight-only ones too (rank r > 0: their 16-bit branch,
    ``weight_only_branch_config``). linear(name): the float layer to quantize (default: the
    transformer's own; the explorer passes a CPU copy when the model runs on a GPU)."""
    from .quantize import layer_error, reference_output

    names = _measured(targets, weight_only)
    curves: dict[str, dict[int, float]] = {}
    for i, name in enumerate(names):
        spec, st = targets[name], stats.for_layer(name)
        linear_ = transformer.get_submodule(name) if linear is None else linear(name)
        x = st.sample.to(dtype=linear_.weight.dtype)
        y = reference_output(linear_, x)
        curves[name] = {r: layer_error(linear_, quantize_layer(linear_, st, config_for_rank(r), rank=r, spec=spec), x,
                                       y)["rel_mse"] for r in ranks(spec.in_features)}
        if progress is not None:
            progress((i + 1) / len(names), f"layer error vs rank: {name}")
    return curves


def output_error_plan(pipe: Any, stats: Any, config: QuantConfig, rank: int, prompts: Sequence[str], *,
                      adapter: Any = None, num_inference_steps: int = 10, seed: int = 0,
                      pipe_kwargs: Mapping[str, Any] | None = None, layers: Sequence[str] | None = None,
                      dist: Any = None, tie_shared_inputs: bool = False, weight_only_ranks: bool = False,
                      progress: Progress | None = None) -> tuple[RankPlan, dict]:
    """The rank plan that spends the 16-bit budget of a uniform ``rank`` where the model output
    gains most, for ``config``'s method, from sensitivities measured on ``prompts`` (use prompts
    the evaluation will not: e.g. calibration prompts). Returns ``(plan, report)`` with the report
    holding the per-layer gains, the ranks and the budget.

    layers: only these targets (``--layers``; default all W4A4 targets). dist: a
    ``dirotq.distributed.DistInfo`` under torchrun: each process measures the layers whose input
    groups it owns (the calibration's sharding, so it holds their statistics), the measurements are
    all-gathered, and every process runs the same greedy on all of them: the plan of one process.
    tie_shared_inputs: one rank per shared-input group of a block (``shared_input_units``), so
    ``dirotq.fusion`` can run each group as one layer.
    weight_only_ranks: the weight-only targets (e.g. PixArt's ``ff.net.2``) compete for the same
    budget with a 16-bit branch each (``weight_only_branch_config``; dirotq / dirotq-lr only).
    """
    from .distributed import DistInfo, gather_objects, owned_targets
    from .models import get_adapter

    transformer = pipe.transformer
    adapter = adapter or get_adapter(transformer)
    all_targets = adapter.targets(transformer)
    dist = dist or DistInfo()
    mine = set(owned_targets(all_targets, dist, layers))
    wanted = set(layers) if layers is not None else set(all_targets)
    if weight_only_ranks and config.method not in BRANCH_METHODS:
        raise ValueError(f"weight-only ranks need a PCA method ({', '.join(BRANCH_METHODS)}), not {config.method!r}")
    kinds = ("w4a4", *WEIGHT_ONLY_KINDS) if weight_only_ranks else ("w4a4",)
    targets = {n: s for n, s in all_targets.items() if s.kind in kinds and n in wanted}
    measured = {n: s for n, s in targets.items() if n in mine}

    def config_at(r: int) -> QuantConfig:
        return dataclasses.replace(config, rank=RankPlan({DEFAULT_KEY: r}))

    say = progress or (lambda f, m: None)
    say(0.0, "recording the transformer inputs of the sensitivity prompts")
    calls = record_transformer_calls(pipe, prompts, num_inference_steps=num_inference_steps,
                                     steps=range(0, num_inference_steps, 2), seed=seed, pipe_kwargs=pipe_kwargs)
    sens = layer_sensitivity(transformer, calls, stats, config_at(0), targets=measured, weight_only=weight_only_ranks,
                             progress=lambda f, m: say(0.05 + 0.6 * f, m))
    layer = layer_error_curves(transformer, stats, config_at, targets=measured, weight_only=weight_only_ranks,
                               progress=lambda f, m: say(0.65 + 0.35 * f, m))
    if dist.distributed:  # JSON-able: the curves' int ranks become strings on the way
        parts = gather_objects({"sens": sens, "layer": {n: {str(r): e for r, e in c.items()} for n, c in layer.items()}},
                               dist)
        sens = {n: v for part in parts for n, v in part["sens"].items()}
        layer = {n: {int(r): e for r, e in c.items()} for part in parts for n, c in part["layer"].items()}
    sens = {n: sens[n] for n in targets}  # the targets' order on every process: the same greedy
    layer = {n: layer[n] for n in targets}
    ranks = allocate_like_uniform(sensitivity_curves(layer, sens), targets, config, rank,
                                  tie=shared_input_units(targets) if tie_shared_inputs else None)
    cost = {n: layer_params16(targets[n], config, r) - layer_params16(targets[n], config, 0) for n, r in ranks.items()}
    budget = uniform_budget(targets, config, rank)
    say(1.0, "rank plan by output error")
    report = {"policy": "output error", "uniform_rank": rank, "budget_params16": budget,
              "spent_params16": sum(cost.values()), "ranks": ranks,
              "gain": {n: v["gain"] for n, v in sens.items()}, "sensitivity_prompts": len(prompts),
              "processes": dist.world_size if dist.distributed else 1, "tied_shared_inputs": tie_shared_inputs,
              "weight_only_ranks": weight_only_ranks,
              "sensitivity_on": view_note(calls.view),
              "weight_only_branches": sorted(n for n, r in ranks.items() if r and targets[n].kind != "w4a4")}
    return as_plan(ranks), report


def view_note(view: SamplerView | None) -> str:
    """One line for reports: where the sensitivities were measured."""
    if view is None:
        return "the transformer output (no sampler view fitted)"
    parts = [f"first {view.keep} channels" if view.keep is not None else "all channels"]
    if view.guidance is not None:
        parts.append(f"guidance {view.guidance:.3g}")
    return f"what the sampler steps with ({', '.join(parts)})"


def as_plan(ranks: Mapping[str, int]) -> RankPlan:
    """The ``RankPlan`` of explicit per-layer ranks (``_default`` 0 for anything not listed)."""
    return RankPlan({DEFAULT_KEY: 0, **{n: int(r) for n, r in ranks.items()}})


__all__ = ["record_transformer_calls", "Recording", "SamplerView", "fit_sampler_view", "view_note", "merge_calls",
           "output_error", "candidate_ranks", "RANK_GRID", "output_error_curves",
           "layer_sensitivity", "sensitivity_curves", "layer_params16", "uniform_budget", "allocate",
           "allocate_like_uniform", "as_plan", "shared_input_units", "layer_error_curves", "output_error_plan"]
