"""Per-layer rank plans by policy: pure functions over the layers' spectra and error curves.

The explorer's "Rank plan" tab fills a plan with one of ``POLICIES`` and then lets the user edit
it; the result is a ``{layer name: rank}`` dict that ``dirotq.config.RankPlan.resolve`` checks
against the model. The error-based policies read the DiRotQ curve (``dirotq``) of
``analysis.stats.error_curves``: per-layer error on held-out calibration tokens. Note that a layer's
own error does not say how much it moves the image (docs/DESIGN.md §9): judge plans on images.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from dirotq.bases import allocate_ranks, rank_for_energy, rank_for_error_budget

POLICIES = ("fixed", "energy", "error budget", "16-bit budget")
ErrorCurve = tuple[Sequence[int], Sequence[float]]  # (ranks, relative MSE at each rank)


def fixed_plan(targets: Mapping[str, Any], rank: int) -> dict[str, int]:
    """Rank ``rank`` for every target, capped at its input width."""
    if rank < 0:
        raise ValueError(f"fixed rank must be ≥ 0, got {rank}")
    return {n: min(int(rank), s.in_features) for n, s in targets.items()}


def fill_plan(policy: str, value: float, targets: Mapping[str, Any], *,
              eigenvalues: Callable[[str], Sequence[float]] | None = None,
              error_curve: Callable[[str], ErrorCurve] | None = None) -> dict[str, int]:
    """Per-layer ranks of ``targets`` (name -> spec with ``in_features`` / ``out_features``) by
    ``policy``:

    - "fixed": rank = ``value``;
    - "energy": the smallest rank keeping a fraction ``value`` (0..1) of the input energy
      (``eigenvalues(name)``: the layer input's spectrum, descending);
    - "error budget": the smallest grid rank whose relative MSE is ≤ ``value``
      (``error_curve(name)``);
    - "16-bit budget": a greedy allocation of ``value`` thousand 16-bit branch parameters Σ o·r
      (the W·T_h columns; the d×d rotation costs the same at every rank) where the error drops most
      per parameter.
    """
    if policy == "fixed":
        return fixed_plan(targets, value)
    if policy == "energy":
        if not 0 <= value <= 1:
            raise ValueError(f"energy fraction must be in [0, 1], got {value}")
        return {n: rank_for_energy(torch.as_tensor(eigenvalues(n)), float(value)) for n in targets}
    if policy == "error budget":
        if value <= 0:
            raise ValueError(f"error budget (relative MSE) must be > 0, got {value}")
        out = {}
        for n in targets:
            ranks, errs = error_curve(n)
            by_rank = dict(zip(ranks, errs))
            out[n] = rank_for_error_budget(lambda r: by_rank[r], float(value), list(ranks))
        return out
    if policy == "16-bit budget":
        if value < 0:
            raise ValueError(f"16-bit budget must be ≥ 0 (thousands of parameters), got {value}")
        curves = {n: dict(zip(*error_curve(n))) for n in targets}
        cost = {n: float(s.out_features) for n, s in targets.items()}  # W·T_h: o extra params per rank
        return allocate_ranks(curves, cost, float(value) * 1e3)
    raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")


__all__ = ["POLICIES", "fixed_plan", "fill_plan"]
