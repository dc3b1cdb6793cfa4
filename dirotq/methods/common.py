"""Shared pieces of every method (docs/DESIGN.md §3–4): how the quantized weight
W_q is produced (RTN or GPTQ under the Hessian of the inputs it will meet), SmoothQuant factors,
Hessian transforms H̃ = TᵀHT, and a small cache of eigendecompositions per calibration statistic.

Everything is derived in float64 and handed to ``QuantLinear`` (which stores float32), so the
method files stay pure functions: (linear, stats, config, rank) -> QuantLinear.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from ..bases import is_power_of_two, pca_basis, per_head_basis, tail_rotation
from ..config import QuantConfig
from ..gptq import gptq_quantize
from ..modules import QuantLinear
from ..quantizers import QuantizedTensor, quantize

_EPS = 1e-8


# --- inputs ------------------------------------------------------------------------------------
def weight_and_bias(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W (o, d) float64, bias (o,) float64 or None)``, detached copies."""
    # derived on the CPU in float64 (eigh/SVD/GPTQ numerics); quantize_ moves the module back
    w = linear.weight.detach().to("cpu", torch.float64).clone()
    b = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float64).clone()
    return w, b


def require_stats(stats: Any, method: str, layer: str | None, what: str = "statistics") -> Any:
    if stats is None:
        where = f" for layer {layer!r}" if layer else ""
        raise ValueError(f"method {method!r} needs calibration {what}{where}: pass stats= (see dirotq.calibrate)")
    return stats


def check_width(stats: Any, d: int, layer: str | None) -> None:
    if stats is not None and tuple(stats.second_moment.shape) != (d, d):
        raise ValueError(f"calibration statistics of width {stats.second_moment.shape[0]} do not match "
                         f"layer {layer or '?'} of input width {d} (statistics of another model?)")


def hessian(stats: Any) -> torch.Tensor:
    """H = C / n (d, d) float64: the second moment of the layer input, normalised by the token count
    (GPTQ is scale-invariant; normalising only keeps the numbers O(1))."""
    n = max(int(getattr(stats, "count", 1) or 1), 1)
    c = stats.second_moment.detach().to("cpu", torch.float64) / n
    return 0.5 * (c + c.T)


def transform_hessian(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """H̃ = Tᵀ H T for inputs x̃ = x T; ``h: (d, d)``, ``t: (d, d_q)`` -> (d_q, d_q)."""
    h2 = t.T @ h @ t
    return 0.5 * (h2 + h2.T)


def scale_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """diag(1/s) H diag(1/s): the Hessian of smoothed inputs x / s."""
    inv = 1.0 / s.double()
    return h * inv.unsqueeze(0) * inv.unsqueeze(1)


# --- smoothing -----------------------------------------------------------------------------------
def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant migration factors s_j = max|x_j|^α / max|W_j|^(1−α), (d,) float64.

    x / s and W·diag(s) leave the product unchanged. Dead channels (max|x_j| = 0 or max|W_j| = 0)
    get s_j = 1 (nothing to migrate), and s is clamped to [1e-5, 1e5] so neither side explodes.
    """
    ax = act_absmax.detach().to("cpu", torch.float64).abs()
    aw = weight.double().abs().amax(0)
    s = ax.clamp(min=_EPS).pow(alpha) / aw.clamp(min=_EPS).pow(1.0 - alpha)
    dead = (ax <= _EPS) | (aw <= _EPS) | ~torch.isfinite(s)
    s = torch.where(dead, torch.ones_like(s), s)
    return s.clamp(1e-5, 1e5)


# --- block Hadamard (kernel form) ----------------------------------------------------------------
def block_hadamard_matrix(signs: torch.Tensor, block: int) -> torch.Tensor:
    """M = diag(signs) · blockdiag(H_block): a @ M equals ``modules.block_hadamard_transform``."""
    from ..bases import block_hadamard

    d = signs.shape[0]
    return signs.double().unsqueeze(1) * block_hadamard(d, block)


def apply_block_hadamard(w: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """w @ M for ``w: (o, d)`` without forming M (O(o·d·block) instead of O(o·d²)), float64."""
    from ..bases import hadamard

    o, d = w.shape
    return ((w.double() * signs.double()).reshape(o, d // block, block) @ hadamard(block)).reshape(o, d)


def check_block_hadamard(d: int, group_size: int, layer: str | None) -> None:
    if not is_power_of_two(group_size):
        raise ValueError(f"the block Hadamard needs a power-of-two group size, got {group_size}")
    if d % group_size:
        raise ValueError(f"layer {layer or '?'}: input width {d} is not a multiple of the group size "
                         f"{group_size}, which the block Hadamard (one {group_size}×{group_size} block per group) "
                         "needs; use quarot hadamard='dense' / dirotq full rotation for this layer")


# --- weights ------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, h: torch.Tensor | None, config: QuantConfig
                    ) -> QuantizedTensor | torch.Tensor:
    """W_q (o, d_q) -> the stored weight: a float32 tensor (weight_bits 16), RTN codes, or GPTQ
    codes under ``h: (d_q, d_q)``, the Hessian of the inputs W_q will meet."""
    if config.weight_bits == 16:
        return w.float()
    if config.weights == "gptq" and w.shape[1] > 0 and w.shape[0] > 0:
        if h is None:
            raise ValueError("GPTQ weights need the layer's Hessian (calibration statistics)")
        return gptq_quantize(w.double(), h.double(), config.weight_bits, config.group_size, config.scale_format,
                             config.gptq_damping, config.gptq_block, config.gptq_act_order)
    return quantize(w.float(), config.weight_bits, config.group_size, True, config.scale_format)


def fake_quantize_weight(w: torch.Tensor, h: torch.Tensor | None, config: QuantConfig) -> torch.Tensor:
    """Quantize-dequantize ``w: (o, k)`` with the weight quantizer; float64 result (same shape)."""
    q = quantize_weight(w, h, config)
    return (q if isinstance(q, torch.Tensor) else q.dequantize()).double()


def make_quant_linear(linear: nn.Linear, config: QuantConfig, weight: QuantizedTensor | torch.Tensor, *,
                      method: str, rank: int = 0, bias: torch.Tensor | None = None, **fields: Any) -> QuantLinear:
    """The ``QuantLinear`` with the config's activation settings and the given method fields."""
    meta = {"rank": rank, "weights": config.weights}
    meta.update(fields.pop("extra_meta", {}) or {})
    return QuantLinear(linear.in_features, linear.out_features, method=method, weight=weight,
                       act_bits=config.act_bits, group_size=config.group_size, act_symmetric=config.act_symmetric,
                       scale_format=config.scale_format, bias=bias, dtype=torch.float32, extra_meta=meta, **fields)


# --- cached bases ---------------------------------------------------------------------------------
class BasisCache:
    """LRU of eigendecompositions keyed by the identity of a ``LayerStats`` object.

    The app redraws error-vs-rank curves by calling ``quantize_layer`` for ~10 ranks on one layer;
    the d×d eigh dominates each call, and it does not depend on the rank. Entries hold a weak
    reference to the statistics and their token count, so a freed or updated object is recomputed.
    """

    def __init__(self, maxsize: int = 16) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[tuple, tuple[Any, int, Any]] = OrderedDict()
        self._lock = threading.Lock()  # the app serves several users from one process

    def get(self, stats: Any, key: tuple, compute: Callable[[], Any]) -> Any:
        full = (id(stats),) + key
        count = int(getattr(stats, "count", 0) or 0)
        with self._lock:
            hit = self._data.get(full)
            if hit is not None and hit[0]() is stats and hit[1] == count:
                self._data.move_to_end(full)
                return hit[2]
        value = compute()  # outside the lock: two threads may both compute, never block each other
        try:
            ref = weakref.ref(stats)
        except TypeError:  # objects without weakref support: cache nothing
            return value
        with self._lock:
            self._data[full] = (ref, count, value)
            self._data.move_to_end(full)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


BASIS_CACHE = BasisCache()


def stats_basis(stats: Any, *, head_dim: int | None = None, damping: float = 0.0,
                cache: BasisCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues (d,), V (d, d))`` float64 of the layer's second moment, descending.

    ``head_dim``: the block-diagonal per-head basis (attention out-projection variant).
    """
    cache = BASIS_CACHE if cache is None else cache

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        h = hessian(stats)
        if damping:
            h = h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
        return per_head_basis(h, head_dim) if head_dim else pca_basis(h)

    return cache.get(stats, ("pca", head_dim, float(damping)), compute)


@functools.lru_cache(maxsize=32)
def cached_tail_rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    """(n, n) tail rotation R, cached (one R per width and seed, as the paper reuses it)."""
    return tail_rotation(n, kind, seed)
