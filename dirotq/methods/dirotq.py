"""DiRotQ, full rotation — the paper's form (docs/DESIGN.md §3).

PCA basis V of the calibration second moment, T = V·diag(I_r, R) (R: Haar / Hadamard / identity on
the tail). Online x̃ = x T: the first r coefficients stay 16-bit, the other d − r are INT4.
docs/ARCHITECTURE.md table: down = T[:, :r], up = W T[:, :r], rotation = T[:, r:], W_q = W T[:, r:].

Options (``DiRotQConfig``):
- ``weight_basis="original"``: the paper's reference code. W is quantized unrotated; the module
  rotates the mixed-precision activations back, x' = c·T_hᵀ + Q_a(x T_t)·T_tᵀ, then y = x' Q_w(W)ᵀ
  (``weights_in_original_basis=True``; no ``up``). GPTQ uses H = C (x' ≈ x).
- ``keep_head_weights=False``: the head columns W T[:, :r] are quantized too. The reference module
  has one quantized operand, so they are stored in ``up`` as quantize-dequantized values: 16-bit
  storage holding 4-bit-representable numbers (numerically what a W4 kernel with a separate head
  GEMM computes; the memory saving is not realised in this form).
- ``per_head_out_proj``: for attention output projections (``spec.head_dim``) a block-diagonal
  basis, one head_dim×head_dim eigenbasis per head; the rank is split evenly over the heads and
  any remainder goes to the largest remaining eigenvalues.
GPTQ sees the rotated tail: H̃ = T_tᵀ C T_t, computed once per (input group, rank), so the group's
layers at one rank share one GPTQ batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import RankedConfig
from ..modules import QuantLinear
from ..registry import MethodCost, MethodSpec, Preset, register_method, register_preset
from .common import (cached, cached_tail_rotation, check_width, device_key, fake_quantize_weight, linalg_settings,
                     make_quant_linear, quantize_weight, require_stats, stats_basis, stats_hessian,
                     transform_hessian, weight_and_bias)


# The paper preset's choices beside its rank (asymmetric activation codes, GPTQ with act-order).
PAPER_SETTINGS = dict(tail_rotation="haar", seed=42, act_symmetric=False, weights="gptq", gptq_act_order=True,
                      keep_head_weights=True, weight_basis="folded")


@dataclass(frozen=True)
class DiRotQConfig(RankedConfig):
    """DiRotQ, full rotation (the paper's form): x T with T = V·diag(I_r, R); first r coefficients
    16-bit, the rest INT4.

    tail_rotation: "haar" (paper), "hadamard" or "none"; seed: of R (paper: 42).
    weight_basis: "folded" (quantize W T, what a kernel runs) or "original" (quantize W unrotated,
    rotate activations back after quantization: the paper's reference code).
    keep_head_weights: the r columns of W T that meet 16-bit coefficients stay 16-bit.
    per_head_out_proj: block-diagonal per-head basis for attention output projections.
    """

    method: ClassVar[str] = "dirotq"
    tail_rotation: str = "haar"
    seed: int = 42
    weight_basis: str = "folded"
    keep_head_weights: bool = True
    per_head_out_proj: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tail_rotation not in ("haar", "hadamard", "none"):
            raise ValueError(f"tail_rotation must be 'haar', 'hadamard' or 'none', got {self.tail_rotation!r}")
        if self.weight_basis not in ("folded", "original"):
            raise ValueError(f"weight_basis must be 'folded' or 'original', got {self.weight_basis!r}")

    @classmethod
    def paper(cls, **overrides) -> "DiRotQConfig":
        """The authors' reference code as read from it (docs/DESIGN.md §3, "The `paper` preset"): rank
        d/8 rounded up to a multiple of 64, plus ``PAPER_SETTINGS``."""
        return cls(**{"rank": "paper", **PAPER_SETTINGS, **overrides})


def per_head_order(eigenvalues: torch.Tensor, head_dim: int, rank: int) -> torch.Tensor:
    """Column order of a block-diagonal per-head basis putting the 16-bit columns first.

    eigenvalues: (d,) listed head by head, each head descending. Each head contributes its top
    ⌊r/h⌋ directions; the r mod h remaining slots go to the largest remaining eigenvalues.
    Returns a permutation (d,) of column indices; the first ``rank`` are the 16-bit subspace.
    """
    d = eigenvalues.shape[0]
    heads = d // head_dim
    per = rank // heads
    chosen = [h * head_dim + i for h in range(heads) for i in range(per)]
    rest = [j for j in range(d) if j not in set(chosen)]
    extra = rank - len(chosen)
    if extra:
        rest_sorted = sorted(rest, key=lambda j: -float(eigenvalues[j]))
        chosen += sorted(rest_sorted[:extra])
        rest = [j for j in rest if j not in set(chosen)]
    return torch.tensor(chosen + rest, dtype=torch.long)


def dirotq_rotation(stats: Any, rank: int, config: DiRotQConfig, spec: Any = None, cache: Any = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_h (d, r), T_t (d, d − r)) with T = [T_h | T_t] = V·diag(I_r, R) orthogonal, in the
    compute dtype (float64 by default) on ``device`` (default: the settings', else where C is).

    Cached per (statistics, rank, tail, seed, head_dim): V_t·R costs O(d³), and the app redraws
    the same layer at the same ranks.
    """
    from .common import BASIS_CACHE

    head_dim = getattr(spec, "head_dim", None) if config.per_head_out_proj else None
    store = BASIS_CACHE if cache is None else cache
    s = linalg_settings()
    device = torch.device(device) if device is not None else (s.device or stats.second_moment.device)
    dtype = dtype or s.dtype

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        evals, v = stats_basis(stats, head_dim=head_dim, cache=cache, device=device, dtype=dtype)
        if head_dim:
            v = v[:, per_head_order(evals, head_dim, rank).to(v.device)]
        v_t = v[:, rank:]
        if config.tail_rotation != "none":
            v_t = v_t @ cached_tail_rotation(v.shape[0] - rank, config.tail_rotation, config.seed).to(v)
        return v[:, :rank], v_t

    return store.get(stats, ("T", head_dim, rank, config.tail_rotation, config.seed, device_key(device), dtype),
                     compute)


def quantize_dirotq(linear: nn.Linear, stats: Any, config: DiRotQConfig, *, rank: int, spec: Any = None,
                    cache: Any = None) -> QuantLinear:
    """y = (x T_h)(W T_h)ᵀ + Q_a(x T_t) Q_w(W T_t)ᵀ + b with T = [T_h | T_t], T_h (d, r)."""
    name = getattr(spec, "name", None)
    require_stats(stats, "dirotq", name, "statistics (the PCA basis)")
    w, b = weight_and_bias(linear)
    d = w.shape[1]
    check_width(stats, d, name)
    t_h, t_t = dirotq_rotation(stats, rank, config, spec, cache, w.device, w.dtype)
    gptq = config.weights == "gptq"
    h = stats_hessian(stats, cache, w.device) if gptq else None  # float64 (common.HESSIAN_DTYPE)
    meta = {"tail_rotation": config.tail_rotation, "seed": config.seed, "weight_basis": config.weight_basis,
            "keep_head_weights": config.keep_head_weights,
            "per_head": bool(config.per_head_out_proj and getattr(spec, "head_dim", None))}
    fields: dict[str, Any] = {"rotation": t_t}
    if config.weight_basis == "original":
        # quantize W itself; the module rotates the mixed-precision input back before W
        if rank:
            fields["down"] = t_h
        return make_quant_linear(linear, config, quantize_weight(w, h, config), method="dirotq", rank=rank,
                                 bias=b, weights_in_original_basis=True, extra_meta=meta, **fields)
    w_t = w @ t_t
    head_dim = getattr(spec, "head_dim", None) if config.per_head_out_proj else None
    h_t = cached(stats, ("dirotq-tail", head_dim, rank, config.tail_rotation, config.seed, device_key(w.device)),
                 lambda: transform_hessian(h, t_t.to(h.dtype)), cache) if gptq else None
    if rank:
        up = w @ t_h
        if not config.keep_head_weights:
            up = fake_quantize_weight(up, transform_hessian(h, t_h.to(h.dtype)) if gptq else None, config)
        fields.update(down=t_h, up=up)
    return make_quant_linear(linear, config, quantize_weight(w_t, h_t, config), method="dirotq", rank=rank,
                             bias=b, extra_meta=meta, **fields)


def cost_dirotq(d: int, o: int, rank: int, config: DiRotQConfig) -> MethodCost:
    """T_h (d × r), W T_h (o × r) and the tail rotation T_t (d × (d − r)) in 16-bit; the 4-bit GEMM
    is d − r wide; per token the full x T (d × d) and the rank-r head product.

    ``keep_head_weights=False`` quantizes the head columns, but the reference module still stores
    them in 16-bit ``up``, so the storage is the same."""
    bits = {"down": 16.0 * d * rank, "up": 16.0 * o * rank} if rank else {}
    bits["rotation"] = 16.0 * d * (d - rank)
    return MethodCost(bits, quantized_width=d - rank, flops16=2.0 * d * d + 2.0 * rank * o)


SPEC = register_method(MethodSpec(config_cls=DiRotQConfig, handler=quantize_dirotq, cost=cost_dirotq,
                                   label="DiRotQ full rotation (paper form)", color="#d62728", ranked=True, needs_stats=True,
                                   rows_independent=lambda c: c.weights != "gptq"))
# In evaluations the preset takes the shared rank budget (pass rank="paper" for the authors' d/8).
PAPER = register_preset(Preset("dirotq-paper", "dirotq", PAPER_SETTINGS, label="DiRotQ, the paper's recipe",
                               color="#e377c2"))
