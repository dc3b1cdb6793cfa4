"""Shared pieces of every method (docs/DESIGN.md §3–4): how the quantized weight
W_q is produced (RTN or GPTQ under the Hessian of the inputs it will meet), SmoothQuant factors,
Hessian transforms H̃ = TᵀHT, and a small cache of eigendecompositions per calibration statistic.

Everything is derived in float64 (``LinalgSettings``: float32 on request) on the layer's device
(CUDA when the model is there) and handed to ``QuantLinear``, which stores its 16-bit tensors in the
float layer's dtype, so the method files stay pure functions: (linear, stats, config, rank) ->
QuantLinear. Inside ``quantize_``, GPTQ requests are deferred (``GPTQBatcher``) so that the layers
of one input group that meet the same Hessian run as one ``gptq_quantize_batch`` call.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..bases import is_power_of_two, pca_basis, pca_top_basis, per_head_basis, tail_rotation
from ..config import QuantConfig
from ..gptq import gptq_quantize, gptq_quantize_batch
from ..modules import QuantLinear
from ..ondisk import row_blocks
from ..quantizers import QuantizedTensor, quantize

_EPS = 1e-8
# GPTQ Hessians (and their projected / rotated forms) are built in float64 whatever the compute
# dtype, then rounded once inside GPTQ: P H P and Tᵀ H T cancel the large top directions, and in
# float32 the cancellation noise exceeds the 1 % damping (Cholesky failures on the tiny models).
HESSIAN_DTYPE = torch.float64
_CHUNK_ELEMENTS = 1 << 23  # elements per row chunk of a d×d conversion (64 MiB in float64)


# --- where and in which precision the linear algebra runs ---------------------------------------
EIGENSOLVERS = ("eigh", "top")


@dataclass(frozen=True)
class LinalgSettings:
    """Where and how handlers run their linear algebra (Hessians, eigh, SVD, GPTQ).

    device: None = the layer's own device (CUDA when the model is there), else e.g. ``"cpu"``.
    dtype: ``torch.float64`` (default) or ``torch.float32`` for eigh, the bases, the weight
    transforms and GPTQ (faster, half their memory; tests/test_scale.py bounds its change of layer
    SQNR on a calibrated model). GPTQ Hessians are formed in float64 either way (``HESSIAN_DTYPE``).
    eigensolver: ``"eigh"`` (full decomposition, default) or ``"top"``: only the top-r eigenvectors
    by subspace iteration (``bases.pca_top_basis``), for the bases that need nothing else
    (dirotq-lr with ``basis="pca"``); O(d²·r) instead of O(d³), what FLUX's 12288/15360 widths need
    on a CPU. The full rotation and the explorer's spectra always use eigh.
    """

    device: str | torch.device | None = None
    dtype: torch.dtype = torch.float64
    eigensolver: str = "eigh"

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"LinalgSettings.dtype must be torch.float32 or torch.float64, got {self.dtype}")
        if self.eigensolver not in EIGENSOLVERS:
            raise ValueError(f"LinalgSettings.eigensolver must be one of {EIGENSOLVERS}, got {self.eigensolver!r}")
        if self.device is not None:
            object.__setattr__(self, "device", torch.device(self.device))


_LINALG: ContextVar[LinalgSettings] = ContextVar("dirotq_linalg", default=LinalgSettings())


def linalg_settings() -> LinalgSettings:
    """The settings in force (``use_linalg``), default: the layer's device, float64, eigh."""
    return _LINALG.get()


@contextlib.contextmanager
def use_linalg(settings: LinalgSettings | None) -> Iterator[LinalgSettings]:
    """Run the handlers called inside the ``with`` block under ``settings`` (None: the defaults)."""
    token = _LINALG.set(settings or LinalgSettings())
    try:
        yield _LINALG.get()
    finally:
        _LINALG.reset(token)


def compute_device(linear: nn.Module | None = None) -> torch.device:
    """The settings' device, else the layer's (its weight's) device, else the CPU."""
    s = _LINALG.get()
    if s.device is not None:
        return s.device
    w = getattr(linear, "weight", None)
    return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")


def symmetrize_(a: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """a ← 0.5·(a + aᵀ) in place, tile by tile (no d×d temporary); returns ``a: (d, d)``.

    Bit for bit what ``0.5 * (a + a.T)`` gives."""
    d = a.shape[0]
    for i in range(0, d, block):
        for j in range(i, d, block):
            x, y = a[i:i + block, j:j + block], a[j:j + block, i:i + block]
            sym = 0.5 * (x + y.T)
            x.copy_(sym)
            y.copy_(sym.T)
    return a


# --- inputs ------------------------------------------------------------------------------------
def weight_and_bias(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W (o, d), bias (o,) or None)``, detached copies in the compute dtype (float64 unless
    ``LinalgSettings`` says float32) on the compute device (the layer's own by default)."""
    dev, dt = compute_device(linear), _LINALG.get().dtype
    w = linear.weight.detach().to(device=dev, dtype=dt, copy=True)
    b = None if linear.bias is None else linear.bias.detach().to(device=dev, dtype=dt, copy=True)
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


def hessian(stats: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    """H = C / n (d, d): the second moment of the layer input, normalised by the token count
    (GPTQ is scale-invariant; normalising only keeps the numbers O(1)), symmetrised.

    In the compute dtype (float64 by default) on ``device`` (default: the settings' device, else
    where C is). C is converted in row chunks, so neither a float64 copy of C on the host nor more
    than the result on the device is ever made; statistics loaded from disk are read from their
    file chunk by chunk (``OnDiskMatrix``), so C's memory map does not become resident as well."""
    n = max(int(getattr(stats, "count", 1) or 1), 1)
    c = stats.second_moment.detach()
    disk = getattr(stats, "second_moment_file", None)
    s = _LINALG.get()
    device = torch.device(device) if device is not None else (s.device or c.device)
    dtype = dtype or s.dtype
    d = c.shape[0]
    h = torch.empty(c.shape, dtype=dtype, device=device)
    for lo, hi, chunk in row_blocks(disk if disk is not None else c, max(1, _CHUNK_ELEMENTS // max(d, 1))):
        h[lo:hi] = chunk.to(device=device, dtype=torch.float64) / n
    return symmetrize_(h)


def transform_hessian(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """H̃ = Tᵀ H T for inputs x̃ = x T; ``h: (d, d)``, ``t: (d, d_q)`` -> (d_q, d_q)."""
    return symmetrize_(t.T @ h @ t)


def project_out_hessian(h: torch.Tensor, v: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """P H P with P = I − V Vᵀ (``v: (d, r)`` orthonormal), the Hessian of the residual x − x V Vᵀ.

    = H − V (H V)ᵀ − (H V) Vᵀ + V (Vᵀ H V) Vᵀ: O(d²·r) and one d×d result (``h`` itself when
    ``inplace``), where forming P and ``transform_hessian(h, P)`` costs two d³ products and three
    d×d arrays."""
    hv = h @ v
    out = h if inplace else h.clone()
    out.addmm_(v, hv.T, alpha=-1.0)
    out.addmm_(hv, v.T, alpha=-1.0)
    out.addmm_(v @ (v.T @ hv), v.T)
    return symmetrize_(out)


def block_hadamard_hessian(h: torch.Tensor, signs: torch.Tensor, block: int, inplace: bool = False
                           ) -> torch.Tensor:
    """Mᵀ H M for M = diag(signs)·blockdiag(H_block) without forming M: rows, then columns, in
    chunks, O(d²·block) and one d×d result (``h`` itself when ``inplace``; ``transform_hessian(h,
    M)`` is two d³ products)."""
    out = h if inplace else h.clone()
    d = out.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(d, 1))
    for lo in range(0, d, rows):  # out ← out M, row by row
        out[lo:lo + rows] = apply_block_hadamard(out[lo:lo + rows], signs, block)
    for lo in range(0, d, rows):  # out ← Mᵀ out = (outᵀ M)ᵀ, column by column
        out[:, lo:lo + rows] = apply_block_hadamard(out[:, lo:lo + rows].T, signs, block).T
    return symmetrize_(out)


def scale_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """diag(1/s) H diag(1/s): the Hessian of smoothed inputs x / s."""
    inv = 1.0 / s.to(device=h.device, dtype=h.dtype)
    return (h * inv.unsqueeze(0)).mul_(inv.unsqueeze(1))


# --- smoothing -----------------------------------------------------------------------------------
def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant migration factors s_j = max|x_j|^α / max|W_j|^(1−α), (d,) float64.

    x / s and W·diag(s) leave the product unchanged. Dead channels (max|x_j| = 0 or max|W_j| = 0)
    get s_j = 1 (nothing to migrate), and s is clamped to [1e-5, 1e5] so neither side explodes.
    """
    dt = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float64
    ax = act_absmax.detach().to(device=weight.device, dtype=dt).abs()
    aw = weight.to(dt).abs().amax(0)
    s = ax.clamp(min=_EPS).pow(alpha) / aw.clamp(min=_EPS).pow(1.0 - alpha)
    dead = (ax <= _EPS) | (aw <= _EPS) | ~torch.isfinite(s)
    s = torch.where(dead, torch.ones_like(s), s)
    return s.clamp(1e-5, 1e5)


# --- block Hadamard (kernel form) ----------------------------------------------------------------
def block_hadamard_matrix(signs: torch.Tensor, block: int) -> torch.Tensor:
    """M = diag(signs) · blockdiag(H_block): a @ M equals ``modules.block_hadamard_transform``."""
    from ..bases import block_hadamard

    d = signs.shape[0]
    dt = signs.dtype if signs.dtype in (torch.float32, torch.float64) else torch.float64
    return signs.to(dt).unsqueeze(1) * block_hadamard(d, block, dtype=dt).to(signs.device)


def apply_block_hadamard(w: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """w @ M for ``w: (o, d)`` without forming M (O(o·d·block) instead of O(o·d²)), in w's dtype
    when float32/float64 (else float64), on w's device."""
    from ..bases import hadamard

    o, d = w.shape
    dt = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float64
    had = hadamard(block, dtype=dt).to(w.device)
    return ((w.to(dt) * signs.to(device=w.device, dtype=dt)).reshape(o, d // block, block) @ had).reshape(o, d)


def check_block_hadamard(d: int, group_size: int, layer: str | None) -> None:
    if not is_power_of_two(group_size):
        raise ValueError(f"the block Hadamard needs a power-of-two group size, got {group_size}")
    if d % group_size:
        raise ValueError(f"layer {layer or '?'}: input width {d} is not a multiple of the group size "
                         f"{group_size}, which the block Hadamard (one {group_size}×{group_size} block per group) "
                         "needs; use quarot hadamard='dense' / dirotq full rotation for this layer")


# --- weights ------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, h: torch.Tensor | None, config: QuantConfig, *, defer: bool = True
                    ) -> QuantizedTensor | torch.Tensor:
    """W_q (o, d_q) -> the stored weight: a float32 tensor (weight_bits 16), RTN codes, or GPTQ
    codes under ``h: (d_q, d_q)``, the Hessian of the inputs W_q will meet.

    GPTQ runs in the ``LinalgSettings`` dtype on w's device. Inside ``quantize_`` (a
    ``GPTQBatcher`` active, ``defer=True``) it returns a placeholder of the right shapes that
    ``make_quant_linear`` attaches to its module; the batcher fills it later."""
    if config.weight_bits == 16:
        return w.float()
    if config.weights == "gptq" and w.shape[1] > 0 and w.shape[0] > 0:
        if h is None:
            raise ValueError("GPTQ weights need the layer's Hessian (calibration statistics)")
        batcher = _GPTQ_BATCHER.get()
        if defer and batcher is not None:
            return batcher.request(w, h, config)
        return gptq_quantize(w, h, config.weight_bits, config.group_size, config.scale_format, config.gptq_damping,
                             config.gptq_block, config.gptq_act_order, dtype=_LINALG.get().dtype)
    return quantize(w.float(), config.weight_bits, config.group_size, True, config.scale_format,
                    row_search=config.scale_format == "int_ratio")


def fake_quantize_weight(w: torch.Tensor, h: torch.Tensor | None, config: QuantConfig) -> torch.Tensor:
    """Quantize-dequantize ``w: (o, k)`` with the weight quantizer; result in w's dtype (same shape).
    Never deferred: the values are needed at once."""
    q = quantize_weight(w, h, config, defer=False)
    return (q if isinstance(q, torch.Tensor) else q.dequantize()).to(w.dtype)


def storage_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a ``QuantLinear`` stores its 16-bit tensors in: the float layer's weight dtype."""
    w = getattr(linear, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32


def make_quant_linear(linear: nn.Linear, config: QuantConfig, weight: QuantizedTensor | torch.Tensor, *,
                      method: str, rank: int = 0, bias: torch.Tensor | None = None, **fields: Any) -> QuantLinear:
    """The ``QuantLinear`` with the config's activation settings and the given method fields, its
    16-bit tensors (down, up, bias, smooth, rotation, a 16-bit weight) in the float layer's dtype."""
    meta = {"rank": rank, "weights": config.weights}
    meta.update(fields.pop("extra_meta", {}) or {})
    q = QuantLinear(linear.in_features, linear.out_features, method=method, weight=weight,
                    act_bits=config.act_bits, group_size=config.group_size, act_symmetric=config.act_symmetric,
                    scale_format=config.scale_format, bias=bias, dtype=storage_dtype(linear), extra_meta=meta,
                    **fields)
    batcher = _GPTQ_BATCHER.get()
    if batcher is not None and isinstance(weight, QuantizedTensor):
        batcher.attach(weight, q)
    return q


# --- GPTQ over the layers that share a Hessian ----------------------------------------------------
@dataclass
class _Request:
    placeholder: QuantizedTensor
    weight: torch.Tensor  # W_q (o, d_q) in the compute dtype
    hessian: torch.Tensor  # (d_q, d_q); the same object for every request under an equal Hessian
    config: QuantConfig
    dtype: torch.dtype
    module: QuantLinear | None = None


class GPTQBatcher:
    """Defers GPTQ so that layers meeting the same Hessian run as one ``gptq_quantize_batch`` call.

    Which layers those are is not a per-method rule: a request whose Hessian equals (bit for bit) a
    pending one joins it, so the q/k/v of one attention (RTN, W4A16, QuaRot, DiRotQ and DiRotQ-LR
    with a PCA or HSVD basis at one rank: the Hessian depends only on the input group) share rows,
    and per-layer Hessians (SmoothQuant, SVDQuant, a weight-SVD basis) simply run alone. Results
    equal undeferred GPTQ exactly. Used by ``quantize_`` through ``deferred_gptq``."""

    def __init__(self) -> None:
        self._requests: list[_Request] = []
        self._hessians: list[torch.Tensor] = []

    def request(self, w: torch.Tensor, h: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
        for known in self._hessians:
            if known is h or (known.shape == h.shape and known.dtype == h.dtype and known.device == h.device
                              and torch.equal(known, h)):
                h = known
                break
        else:
            self._hessians.append(h)
        o, d = w.shape
        g = config.group_size
        d_pad = d + (-d) % g
        ratio = config.scale_format == "int_ratio"
        zeros = lambda *shape, dt=torch.float32: torch.zeros(*shape, dtype=dt, device=w.device)  # noqa: E731
        ph = QuantizedTensor(zeros(o, d_pad, dt=torch.int8), zeros(o, 1) if ratio else zeros(o, d_pad // g), None,
                             zeros(o, d_pad // g, dt=torch.int8) if ratio else None, config.weight_bits, g, d,
                             config.scale_format)
        self._requests.append(_Request(ph, w, h, config, _LINALG.get().dtype))
        return ph

    def attach(self, placeholder: QuantizedTensor, module: QuantLinear) -> None:
        for r in self._requests:
            if r.placeholder is placeholder:
                r.module = module
                return

    def discard_unattached(self) -> bool:
        """Drop requests whose placeholder no ``make_quant_linear`` took (a handler that builds its
        ``QuantLinear`` itself); True when there were any (the caller reruns that handler undeferred)."""
        keep = [r for r in self._requests if r.module is not None]
        dropped = len(keep) != len(self._requests)
        self._requests = keep
        self._hessians = [h for h in self._hessians if any(r.hessian is h for r in keep)]
        return dropped

    @property
    def pending_elements(self) -> int:
        """Weight elements waiting (the caller flushes before they use too much memory)."""
        return sum(r.weight.numel() for r in self._requests)

    def __len__(self) -> int:
        return len(self._requests)

    def run(self, consume: bool = False) -> None:
        """Quantize every pending request, one ``gptq_quantize_batch`` per (Hessian, settings), and
        write the codes and scales into the modules built from the placeholders. ``consume``: a
        Hessian nothing but this batcher references (no alias, no view) is factorised in its own
        storage and freed (quantize_ passes it at the end of a group, once the group's cache is
        dropped)."""
        batches: dict[tuple, list[_Request]] = {}
        for r in self._requests:
            c = r.config
            key = (id(r.hessian), c.weight_bits, c.group_size, c.scale_format, c.gptq_damping, c.gptq_block,
                   c.gptq_act_order, r.dtype)
            batches.setdefault(key, []).append(r)
        requests, self._requests, self._hessians = self._requests, [], []
        for batch in batches.values():
            c = batch[0].config
            held = [batch[0].hessian]
            for r in batch:
                r.hessian = None
            own = consume and _sole_owner(held)
            results = gptq_quantize_batch([r.weight for r in batch], held, c.weight_bits, c.group_size,
                                          c.scale_format, c.gptq_damping, c.gptq_block, c.gptq_act_order,
                                          dtype=batch[0].dtype, overwrite_hessians=own)
            for r, qt in zip(batch, results):
                r.module.set_quantized_weight(qt)
                r.weight = None
            del held
        del requests


def _storage_users(t: torch.Tensor) -> int | None:
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except Exception:  # a torch without this introspection: never overwrite
        return None


_FRESH_STORAGE_USERS = _storage_users(torch.empty(1))


def _sole_owner(held: list) -> bool:
    """True when ``held[0]`` is referenced only by that list and shares its storage with nothing."""
    t = held[0]
    refs = sys.getrefcount(t) - 2  # the local name and getrefcount's own argument
    users = _storage_users(t)
    return refs == 1 and t._base is None and users is not None and users <= _FRESH_STORAGE_USERS


_GPTQ_BATCHER: ContextVar[GPTQBatcher | None] = ContextVar("dirotq_gptq_batcher", default=None)


@contextlib.contextmanager
def deferred_gptq(batcher: GPTQBatcher | None) -> Iterator[GPTQBatcher | None]:
    """Handlers called inside the block defer GPTQ to ``batcher`` (None: run it at once)."""
    token = _GPTQ_BATCHER.set(batcher)
    try:
        yield batcher
    finally:
        _GPTQ_BATCHER.reset(token)


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

    def drop(self, stats: Any) -> None:
        """Forget every entry of ``stats`` (quantize_ calls it when a group is done, so a d×d basis
        or Hessian never outlives its group)."""
        with self._lock:
            for k in [k for k, v in self._data.items() if k[0] == id(stats) and v[0]() is stats]:
                del self._data[k]


BASIS_CACHE = BasisCache()


def device_key(device: torch.device | str) -> str:
    return str(torch.device(device))


def cached(stats: Any, key: tuple, compute: Callable[[], Any], cache: BasisCache | None) -> Any:
    """``compute()`` through ``cache`` under (stats, key); computed afresh when ``cache`` is None."""
    return compute() if cache is None else cache.get(stats, key, compute)


def stats_hessian(stats: Any, cache: BasisCache | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype = HESSIAN_DTYPE) -> torch.Tensor:
    """``hessian(stats)`` in float64 (the GPTQ Hessian), shared through ``cache`` (quantize_'s per-run
    cache) so that every layer of an input group gets the same tensor object (and GPTQBatcher
    batches them without comparing)."""
    s = _LINALG.get()
    device = torch.device(device) if device is not None else (s.device or stats.second_moment.device)
    return cached(stats, ("hessian", device_key(device), dtype), lambda: hessian(stats, device, dtype), cache)


def stats_basis(stats: Any, *, head_dim: int | None = None, damping: float = 0.0,
                cache: BasisCache | None = None, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues (d,), V (d, d))`` of the layer's second moment, descending, in the compute
    dtype (float64 by default) on ``device`` (default: the settings' device, else where C is).

    ``head_dim``: the block-diagonal per-head basis (attention out-projection variant).
    """
    cache = BASIS_CACHE if cache is None else cache
    s = _LINALG.get()
    device = torch.device(device) if device is not None else (s.device or stats.second_moment.device)
    dtype = dtype or s.dtype

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        h = hessian(stats, device, dtype)
        if damping:
            h = h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        return per_head_basis(h, head_dim, dtype) if head_dim else pca_basis(h, dtype=dtype)

    return cache.get(stats, ("pca", head_dim, float(damping), device_key(device), dtype), compute)


def stats_top_basis(stats: Any, rank: int, *, cache: BasisCache | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """V_r (d, rank): the top-``rank`` principal directions of the layer's second moment, by the
    settings' eigensolver: columns of the full (cached) ``stats_basis`` ("eigh"), or
    ``bases.pca_top_basis`` ("top", cached per rank)."""
    s = _LINALG.get()
    if s.eigensolver == "eigh":
        return stats_basis(stats, cache=cache, device=device, dtype=dtype)[1][:, :rank]
    device = torch.device(device) if device is not None else (s.device or stats.second_moment.device)
    dtype = dtype or s.dtype
    store = BASIS_CACHE if cache is None else cache

    def compute() -> torch.Tensor:
        c = stats.second_moment
        # the eigenvectors of C and C/n agree: use C itself where it already is (no d×d copy); C
        # read from disk stays there and is read in row blocks (never resident, ondisk.py)
        disk = getattr(stats, "second_moment_file", None)
        if disk is not None and disk.device == device and disk.dtype == dtype == c.dtype:
            src = disk
        else:
            src = c if (c.device == device and c.dtype == dtype) else hessian(stats, device, dtype)
        return pca_top_basis(src, rank, dtype=dtype)[1]

    return store.get(stats, ("top", rank, device_key(device), dtype), compute)


@functools.lru_cache(maxsize=32)
def cached_tail_rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    """(n, n) tail rotation R, cached (one R per width and seed, as the paper reuses it)."""
    return tail_rotation(n, kind, seed)
