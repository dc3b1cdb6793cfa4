"""Per-layer rank plans by policy: pure functions over the layers' spectra, error curves and costs.

The explorer's "Rank plan" tab fills a plan with one of ``POLICIES`` and then lets the user edit
it; the result is a ``{layer name: rank}`` dict that ``dirotq.config.RankPlan.resolve`` checks
against the model. Policies, best first (measured on images: docs/EVALUATION.md, "Rank plans"):

- "output error, tied": the same with one rank per shared-input group of a block (q/k/v, FLUX's
  proj_mlp + q/k/v), so every group can run as one fused layer (``dirotq.fusion``). The default: on
  images it is as good as or better than the untied plan, and it is the one that runs fused.
- "output error": spend the 16-bit budget of a uniform rank where the *model output* gains most per
  extra 16-bit parameter (``dirotq.allocate``: each layer's output error measured with only that
  layer quantized): a layer's own error does not say how much it moves the image. Weight-only
  targets among ``targets`` (with output curves for their 16-bit branch) compete for the same budget,
  which is the uniform rank's on the W4A4 targets; the explorer passes them under the PCA methods.
- "fixed": one rank everywhere (the reference every policy must beat at equal cost);
- "energy": the smallest rank keeping a fraction of each layer's input energy;
- "error budget": the smallest rank whose held-out *layer* error is below a threshold;
- "16-bit budget": a greedy on *layer* error per extra 16-bit parameter.

Costs are the plan's method's own (``MethodSpec.cost``: e.g. d + o parameters per rank for
DiRotQ-LR and SVDQuant, o for full-rotation DiRotQ, whose d×d rotation is paid at every rank).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from dirotq.allocate import allocate, allocate_like_uniform, shared_input_units
from dirotq.bases import rank_for_energy, rank_for_error_budget

POLICIES = ("output error, tied", "output error", "fixed", "energy", "error budget", "16-bit budget")
DEFAULT_POLICY = "output error, tied"  # the best on images for the default method, DiRotQ-LR (docs/EVALUATION.md)
Curve = Mapping[int, float]  # rank -> error
Cost = Callable[[str, int], float]  # (layer, rank) -> extra 16-bit parameters


def fixed_plan(targets: Mapping[str, Any], rank: int) -> dict[str, int]:
    """Rank ``rank`` for every target, capped at its input width."""
    if rank < 0:
        raise ValueError(f"fixed rank must be ≥ 0, got {rank}")
    return {n: min(int(rank), s.in_features) for n, s in targets.items()}


def fill_plan(policy: str, value: float, targets: Mapping[str, Any], *, cost: Cost | None = None,
              eigenvalues: Callable[[str], Sequence[float]] | None = None,
              layer_curve: Callable[[str], Curve] | None = None,
              output_curves: Callable[[], Mapping[str, Curve]] | None = None,
              config: Any = None) -> dict[str, int]:
    """Per-layer ranks of ``targets`` (name -> spec with ``in_features`` / ``out_features``) by
    ``policy`` (see the module docstring); ``value`` is, per policy: "output error" the uniform rank
    whose 16-bit budget is spent; "fixed" the rank; "energy" the fraction of energy kept (0..1);
    "error budget" the largest layer relative MSE; "16-bit budget" thousands of extra 16-bit
    parameters beyond rank 0.

    cost(layer, rank): the method's extra 16-bit parameters; eigenvalues(layer): the input spectrum,
    descending; layer_curve(layer): {rank: layer relative MSE} of the plan's method on held-out
    tokens; output_curves(): {layer: {rank: output relative error}}; config: the method's config
    ("output error" needs it for the budget of the uniform rank).
    """
    if policy == "fixed":
        return fixed_plan(targets, value)
    if policy in ("output error", "output error, tied"):
        if value < 0:
            raise ValueError(f"the uniform rank whose budget is spent must be ≥ 0, got {value}")
        tie = shared_input_units(targets) if policy == "output error, tied" else None
        return allocate_like_uniform(output_curves(), targets, config, int(value), tie=tie)
    if policy == "energy":
        if not 0 <= value <= 1:
            raise ValueError(f"energy fraction must be in [0, 1], got {value}")
        return {n: rank_for_energy(torch.as_tensor(eigenvalues(n)), float(value)) for n in targets}
    if policy == "error budget":
        if value <= 0:
            raise ValueError(f"error budget (relative MSE) must be > 0, got {value}")
        out = {}
        for n in targets:
            curve = layer_curve(n)
            out[n] = rank_for_error_budget(lambda r: curve[r], float(value), sorted(curve))
        return out
    if policy == "16-bit budget":
        if value < 0:
            raise ValueError(f"16-bit budget must be ≥ 0 (thousands of parameters), got {value}")
        return allocate({n: layer_curve(n) for n in targets}, cost, float(value) * 1e3)
    raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")


def plan_params16(plan: Mapping[str, int], cost: Cost) -> float:
    """Extra 16-bit parameters of ``plan`` beyond rank 0 everywhere."""
    return sum(cost(n, r) - cost(n, 0) for n, r in plan.items())


def match_budget(make_plan: Callable[[float], dict[str, int]], cost: Cost, budget: float, lo: float, hi: float,
                 *, increasing: bool = True, iters: int = 30) -> dict[str, int]:
    """The plan of a one-parameter policy (energy fraction, error threshold…) whose 16-bit cost is
    the largest not above ``budget``: bisection on the parameter in [lo, hi]. ``increasing``: the
    cost grows with the parameter (energy) rather than shrinks (error threshold)."""
    best = make_plan(lo if increasing else hi)
    if plan_params16(best, cost) > budget:
        return best  # even the cheapest setting is over budget: the closest there is
    a, b = lo, hi
    for _ in range(iters):
        mid = 0.5 * (a + b)
        plan = make_plan(mid)
        fits = plan_params16(plan, cost) <= budget
        if fits:
            best = plan
        if fits == increasing:
            a = mid
        else:
            b = mid
    return best


def predicted_output_error(plan: Mapping[str, int], curves: Mapping[str, Curve]) -> float:
    """Σ over layers of the output error with that layer alone at its rank (linear interpolation
    between measured ranks): the allocator's own objective, a first-order prediction of the output
    error of the whole plan."""
    total = 0.0
    for n, r in plan.items():
        ranks = sorted(curves[n])
        total += float(np.interp(r, ranks, [curves[n][k] for k in ranks]))
    return total


__all__ = ["POLICIES", "DEFAULT_POLICY", "fixed_plan", "fill_plan", "plan_params16", "match_budget", "predicted_output_error"]
