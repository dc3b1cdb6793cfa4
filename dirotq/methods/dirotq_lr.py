"""DiRotQ low-rank + Hadamard, the kernel-friendly form (docs/DESIGN.md §3).

c = x V_r (16-bit, O(d·r) instead of the full d×d rotation); the residual is quantized after a
blockwise randomized Hadamard M = diag(signs)·blockdiag(H_g), one g×g block per quantization group:

    y = c (W V_r)ᵀ + Q_a((x − c V_rᵀ) M) Q_w(W (I − V_rV_rᵀ) M)ᵀ + b

docs/ARCHITECTURE.md table: down = V_r, up = W V_r, project_out, hadamard_signs, W_q = W(I−V_rV_rᵀ)M.
Bases (``DiRotQLRConfig.basis``):
- ``pca``: top-r eigenvectors of C; ``wsvd``: the weight's right singular vectors (orthonormal,
  same structure);
- ``hsvd``: activation-weighted weight SVD, L = up·downᵀ (``bases.hsvd_lowrank``). Its ``down`` is
  not orthonormal, so there is no project-out: SVDQuant's structure, W_q = (W − up·downᵀ) M on the
  full input x M.
GPTQ sees the inputs W_q meets: Mᵀ P C P M with P = I − V_rV_rᵀ (pca/wsvd), Mᵀ C M (hsvd), formed
without P or M as d×d matrices (``project_out_hessian``, ``block_hadamard_hessian``). With the pca
or hsvd basis it depends only on the input group and the rank, so it is computed once per group
(``cache``) and the group's layers share one GPTQ batch (``GPTQBatcher``).
Rank 0 is exactly QuaRot with ``hadamard="block"`` and the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..bases import hsvd_lowrank, random_signs, weight_svd
from ..config import DEFAULT_KEY, QuantConfig, RankedConfig, RankPlan, weight_only_bits
from ..modules import QuantLinear
from ..registry import MethodCost, MethodSpec, register_method
from .common import (HESSIAN_DTYPE, apply_block_hadamard, block_hadamard_hessian, cached, check_block_hadamard,
                     check_width, device_key, hessian, make_quant_linear, project_out_hessian, quantize_weight,
                     require_stats, stats_hessian, stats_top_basis, weight_and_bias)


BASES = ("pca", "wsvd", "hsvd")


@dataclass(frozen=True)
class DiRotQLRConfig(RankedConfig):
    """DiRotQ low-rank + Hadamard (kernel-friendly): c = x V_r in 16-bit, the residual
    x − c V_rᵀ quantized after a blockwise randomized Hadamard. ``basis``: "pca" (activation PCA),
    "wsvd" (weight SVD) or "hsvd" (activation-weighted weight SVD, ``hsvd_lambda``)."""

    method: ClassVar[str] = "dirotq-lr"
    basis: str = "pca"
    hsvd_lambda: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if self.hsvd_lambda <= 0:
            raise ValueError(f"hsvd_lambda must be > 0, got {self.hsvd_lambda}")


# the methods whose weight-only layers may carry a 16-bit branch: they have the activation statistics
# its basis needs. Full-rotation DiRotQ gives them DiRotQ-LR's form: its own would rotate the input by a
# d × d matrix, which costs more 16-bit parameters than the branch (1 M for a 1024-wide input)
BRANCH_METHODS = ("dirotq", "dirotq-lr")


def weight_only_branch_config(config: QuantConfig, kind: str, rank: int, name: str | None = None) -> DiRotQLRConfig:
    """The config of a weight-only target (``kind`` "w4a16" / "w8a16") given a 16-bit branch of
    ``rank`` under ``config``: DiRotQ-LR with 16-bit activations (``act_bits=None``), so

        y = c (W V_r)ᵀ + (x − c V_rᵀ) M · Q_w(W (I − V_rV_rᵀ) M)ᵀ + b,    c = x V_r,

    the weight bits of ``kind`` and ``config``'s weight settings (group, scale format, RTN/GPTQ).
    It costs (d + o)·r 16-bit parameters and keeps the weight error off the input's top-r PCA
    directions. Only for the PCA methods (``BRANCH_METHODS``); a clear error otherwise."""
    if config.method not in BRANCH_METHODS:
        where = f" for {name!r}" if name else ""
        raise ValueError(f"a rank{where} on a weight-only layer needs a PCA method ({', '.join(BRANCH_METHODS)}): "
                         f"{config.method!r} gives weight-only layers no 16-bit branch")
    bits = weight_only_bits(kind, config.weight_bits)
    plan = RankPlan({DEFAULT_KEY: int(rank)})
    if isinstance(config, DiRotQLRConfig):
        return replace(config, act_bits=None, weight_bits=bits, rank=plan)
    return DiRotQLRConfig(weight_bits=bits, act_bits=None, rank=plan, **config.weight_settings())


def quantize_dirotq_lr(linear: nn.Linear, stats: Any, config: DiRotQLRConfig, *, rank: int, spec: Any = None,
                       cache: Any = None) -> QuantLinear:
    """Low-rank 16-bit branch of rank r (basis per config) + block-Hadamard INT4 residual."""
    name = getattr(spec, "name", None)
    w, b = weight_and_bias(linear)
    d = w.shape[1]
    check_width(stats, d, name)
    check_block_hadamard(d, config.group_size, name)
    basis = config.basis
    if rank and (basis in ("pca", "hsvd") or config.weights == "gptq"):
        require_stats(stats, "dirotq-lr", name, f"statistics (basis {basis!r})")
    dev, dt = w.device, w.dtype
    signs = random_signs(d, config.seed).to(device=dev, dtype=dt)
    g = config.group_size
    gptq = config.weights == "gptq"
    # the plain Hessian is shared through the cache only where the hsvd basis needs it as well;
    # for GPTQ alone it is a temporary turned into the residual Hessian in place
    h = stats_hessian(stats, cache, dev) if (stats is not None and basis == "hsvd" and rank) else None
    fields: dict[str, Any] = {"hadamard_signs": signs}
    w_res, down = w, None
    if rank:
        if basis == "hsvd":
            down, up = hsvd_lowrank(w, h, rank, damping=config.hsvd_lambda, dtype=dt)
            w_res = w - up @ down.T
        else:
            if basis == "pca":
                down = stats_top_basis(stats, rank, cache=cache, device=dev, dtype=dt)
            else:
                down = weight_svd(w, rank, dtype=dt)[0]
            up = w @ down
            w_res = w - up @ down.T  # W (I − V_rV_rᵀ), O(o·d·r)
            fields["project_out"] = True
        fields.update(down=down, up=up)
    h_q = None
    if gptq and stats is not None:  # without statistics quantize_weight names what is missing
        projected = bool(rank) and basis != "hsvd"  # the residual input x − x V_rV_rᵀ: P H P

        def residual_hessian() -> torch.Tensor:
            if h is not None:  # hsvd: the cached Hessian stays as it is
                return block_hadamard_hessian(h, signs, g)
            h_res = hessian(stats, dev, HESSIAN_DTYPE)
            if projected:
                h_res = project_out_hessian(h_res, down.to(HESSIAN_DTYPE), inplace=True)
            return block_hadamard_hessian(h_res, signs, g, inplace=True)

        if projected and basis == "wsvd":  # V_r from this layer's weight: its own Hessian
            h_q = residual_hessian()
        else:
            h_q = cached(stats, ("dirotq-lr", rank if projected else 0, config.seed, g, device_key(dev)),
                         residual_hessian, cache)
    w_q = quantize_weight(apply_block_hadamard(w_res, signs, g), h_q, config)
    return make_quant_linear(linear, config, w_q, method="dirotq-lr", rank=rank, bias=b,
                             extra_meta={"basis": basis, "seed": config.seed}, **fields)


def cost_dirotq_lr(d: int, o: int, rank: int, config: DiRotQLRConfig) -> MethodCost:
    """V_r (d × r) and W V_r (o × r) in 16-bit, 1-bit Hadamard signs; per token c = x V_r, the
    project-out c V_rᵀ, the rank-r branch and one g × g Hadamard per group."""
    bits = {"down": 16.0 * d * rank, "up": 16.0 * o * rank} if rank else {}
    bits["hadamard_signs"] = 1.0 * d
    return MethodCost(bits, flops16=4.0 * d * rank + 2.0 * rank * o + 2.0 * d * config.group_size)


SPEC = register_method(MethodSpec(config_cls=DiRotQLRConfig, handler=quantize_dirotq_lr, cost=cost_dirotq_lr,
                                   label="DiRotQ low-rank + Hadamard", color="#ff7f0e", ranked=True, needs_stats=True,
                                   # wsvd / hsvd bases are built from the whole weight; GPTQ batches rows itself
                                   rows_independent=lambda c: c.weights != "gptq" and c.basis == "pca"))
