"""GPTQ weight quantization (Frantar et al., 2022), as used for DiRotQ's 4-bit weights (docs/DESIGN.md §3
"Weights": damping 0.01 × mean diag, block 128, optional act-order).

Column by column, each weight column is rounded and the rounding error is pushed onto the columns
not yet quantized through the Cholesky factor of the inverse Hessian H⁻¹, H = Σ xᵀx of the inputs
the quantized weight will meet. Group scales use exactly the formats of ``quantizers.py``:
"exact" (one step per 64-group) and "int_ratio" (row scale × 4-bit group multiplier).

``gptq_quantize_batch`` runs the column loop once for several layers of one width (rows of layers
that share a Hessian concatenated, distinct Hessians as a batch dimension); ``gptq_quantize`` is
its one-layer case. Both run on the weight's device, in float64 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .quantizers import QuantizedTensor, int_ratio_codes, qrange, quantize

log = logging.getLogger(__name__)


def _group_step(w: torch.Tensor, qmax: int, scale_format: str, row_scale: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step for one group of columns ``w: (..., rows, g)``; returns (step (..., rows), int multiplier or None)."""
    if scale_format == "exact":
        return (w.abs().amax(-1) / qmax).clamp(min=1e-12), None
    # the multiplier rule of the format (quantizers.int_ratio_codes) on the group's current values
    ratio = int_ratio_codes(w.unsqueeze(-2), row_scale.unsqueeze(-1), 4 if qmax == 7 else 8)[1].squeeze(-1)
    return ratio * row_scale, ratio


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 64,
    scale_format: str = "exact",
    damping: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    dtype: torch.dtype = torch.float64,
) -> QuantizedTensor:
    """Quantize ``weight: (o, d)`` with GPTQ under ``hessian: (d, d)`` (Σ xᵀx, any positive scale).

    Symmetric codes in [-8, 7], groups of ``group_size`` along d, d padded to
    a multiple of the group size. ``static_groups`` fixes every group's step from the unquantized
    weight up front (required with ``act_order``, which quantizes columns by decreasing diag(H)).
    With H = I no error is propagated and the result is plain RTN. Runs on ``weight``'s device in
    ``dtype`` (float64 by default; float32 is the fast option). ``gptq_quantize_batch`` with one
    layer: the two give identical codes and scales.
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight (o, d) and hessian (d, d) expected, got {tuple(weight.shape)} and {tuple(hessian.shape)}")
    return gptq_quantize_batch([weight], hessian, bits, group_size, scale_format, damping, block_size, act_order,
                               static_groups, dtype)[0]


def _inverse_hessian_factor(hessians: list, k: int, d_in: int, d: int, damping: float, act_order: bool,
                            dtype: torch.dtype, device: torch.device, overwrite: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, list[int] | None, torch.Tensor]:
    """``(U (d, d), dead (d,) bool, perm as a list or None, perm (d,))`` for the Hessian
    ``hessians[k]`` (d_in, d_in) padded to d: U the upper Cholesky factor of (H + λI)⁻¹ with dead
    channels set to 1 on the diagonal, columns permuted by decreasing diag(H) when ``act_order``.
    Intermediates are freed as soon as the next factor exists, so the peak is two d×d arrays beside
    the input; ``overwrite`` (the list holds the only reference) takes the Hessian out of the list,
    works in it and frees it once factorised: two d×d arrays in all. (The list, not the tensor, is
    passed: a call argument stays referenced by the caller until the call returns.)"""
    hessian = hessians[k]
    if overwrite and d_in == d and hessian.device == device and hessian.dtype == dtype and hessian.is_contiguous():
        hessians[k] = None
        h = hessian
        del hessian
    elif d_in == d:
        h = hessian.to(device=device, dtype=dtype, copy=True)
    else:
        h = torch.zeros(d, d, dtype=dtype, device=device)
        h[:d_in, :d_in] = hessian.to(device=device, dtype=dtype)
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    perm_list = None
    perm = torch.arange(d, device=device)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        perm_list = perm.tolist()
        h = h[perm][:, perm]
    mean_diag = h.diagonal().mean()
    h.diagonal().add_(damping * mean_diag)
    factor, info = torch.linalg.cholesky_ex(h)
    extra = damping
    while int(info) and extra < 1.0:  # rounding (float32) broke positive-definiteness: damp more, as GPTQ codes do
        log.warning("GPTQ: Hessian of width %d not positive definite at damping %.3g; retrying with %.3g",
                    d, extra, extra * 10)
        h.diagonal().add_(9 * extra * mean_diag)
        extra *= 10
        factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise ValueError(f"GPTQ: the Hessian (width {d}) is not positive definite even with damping {extra:g}")
    del h
    h_inv = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(h_inv, upper=True), dead, perm_list, perm


def gptq_quantize_batch(
    weights: Sequence[torch.Tensor],
    hessians: torch.Tensor | Sequence[torch.Tensor],
    bits: int = 4,
    group_size: int = 64,
    scale_format: str = "exact",
    damping: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    dtype: torch.dtype = torch.float64,
    overwrite_hessians: bool = False,
) -> list[QuantizedTensor]:
    """GPTQ for L layers of one input width at once: the column loop runs once for all of them.

    weights: L tensors ``(o_i, d)``; hessians: one ``(d, d)`` shared by every layer (the q/k/v of one
    attention: their rows are concatenated), an ``(L, d, d)`` stack, or a list of L ``(d, d)`` (the
    same tensor object listed twice is factorised once and its layers share rows) or of one shared
    by all. Layers under distinct Hessians run side by side as a batch dimension. Every per-column
    step is elementwise over rows and each block's error propagation is one matmul per layer with
    that layer's own shapes, so each result equals ``gptq_quantize(weights[i], hessian_i)`` exactly
    (codes and scales). ``overwrite_hessians`` (a list only): the list is emptied and each Hessian
    is factorised in its own storage and freed, one d×d array less; pass it only when nothing else
    holds them. Other arguments as ``gptq_quantize``. Returns one ``QuantizedTensor`` per layer.
    """
    weights = list(weights)
    if not weights:
        return []
    if any(w.ndim != 2 for w in weights) or len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"weights must be 2-D (o_i, d) of one width d, got {[tuple(w.shape) for w in weights]}")
    if block_size % group_size:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {group_size}")
    n_layers, d_in = len(weights), weights[0].shape[1]
    owned = overwrite_hessians and isinstance(hessians, list)
    if isinstance(hessians, torch.Tensor) and hessians.ndim == 2:
        distinct, which = [hessians], [0] * n_layers
    elif isinstance(hessians, list) and len(hessians) == 1 and n_layers > 1:
        distinct, which = list(hessians), [0] * n_layers
    else:
        listed = list(hessians.unbind(0)) if isinstance(hessians, torch.Tensor) else list(hessians)
        if len(listed) != n_layers:
            raise ValueError(f"{n_layers} weights need one shared (d, d) Hessian or {n_layers} of them, "
                             f"got {len(listed)}")
        distinct, which, seen = [], [], {}
        for h in listed:
            if id(h) not in seen:
                seen[id(h)] = len(distinct)
                distinct.append(h)
            which.append(seen[id(h)])
        del listed  # with overwrite_hessians, ``distinct`` must hold the only references
    for h in distinct:
        if tuple(h.shape) != (d_in, d_in):
            raise ValueError(f"weight (o, d) and hessian (d, d) expected, got d = {d_in} and {tuple(h.shape)}")
    del h
    if owned:
        hessians.clear()  # the caller's references go: each Hessian is freed once factorised
    device = weights[0].device
    static_groups = static_groups or act_order
    qmin, qmax = qrange(bits, True)
    d = d_in + (-d_in) % group_size
    n_groups = d // group_size

    # rows of the layers under one Hessian are concatenated: segments[k] = (hessian index, lo, hi)
    n_h = len(distinct)
    segments: list[tuple[int, int, int]] = []
    fill = [0] * n_h
    for i, w in enumerate(weights):
        k = which[i]
        segments.append((k, fill[k], fill[k] + w.shape[0]))
        fill[k] += w.shape[0]
    rows = max(fill)
    w = torch.zeros(n_h, rows, d, dtype=dtype, device=device)
    for (k, lo, hi), wt in zip(segments, weights):
        w[k, lo:hi, :d_in] = wt.to(device=device, dtype=dtype)
    factors, perms, perm_lists = [], [], []
    for k in range(n_h):
        u, dead, perm_list, perm = _inverse_hessian_factor(distinct, k, d_in, d, damping, act_order, dtype, device,
                                                           overwrite=owned)
        w[k][:, dead] = 0.0
        factors.append(u)
        perms.append(perm)
        perm_lists.append(perm_list)
    h_inv = factors[0].unsqueeze(0) if n_h == 1 else torch.stack(factors)
    del factors

    row_scale = None
    if scale_format == "int_ratio":
        # the row scale RTN would choose (with its offline search) on the unquantized weights
        row_scale = quantize(w.float(), bits, group_size, True, "int_ratio", row_search=True).scale
        row_scale = row_scale.squeeze(-1).to(dtype)
    steps = torch.zeros(n_h, rows, n_groups, dtype=dtype, device=device)
    ratios = torch.zeros(n_h, rows, n_groups, dtype=dtype, device=device) if scale_format == "int_ratio" else None
    if static_groups:
        for g in range(n_groups):
            steps[..., g], r = _group_step(w[..., g * group_size:(g + 1) * group_size], qmax, scale_format, row_scale)
            if ratios is not None:
                ratios[..., g] = r
    if act_order:
        for k in range(n_h):
            w[k] = w[k][:, perms[k]]

    # the group of the column at each position: one int for all Hessians unless act_order differs
    shared_order = not act_order or n_h == 1
    if shared_order:
        group_at = [(c // group_size) for c in (perm_lists[0] if act_order else range(d))]
    else:
        group_at_t = torch.tensor([[pl[pos] // group_size for pl in perm_lists] for pos in range(d)], device=device)

    codes = torch.zeros(n_h, rows, d, dtype=torch.int8, device=device)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = w[..., i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = h_inv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            if not static_groups and (i1 + i) % group_size == 0:
                # groups lie inside a block (block_size % group_size == 0), so the current block holds them
                g = (i1 + i) // group_size
                steps[..., g], r = _group_step(w1[..., i:i + group_size], qmax, scale_format, row_scale)
                if ratios is not None:
                    ratios[..., g] = r
            if shared_order:
                step = steps[..., group_at[i1 + i]]
            else:
                idx = group_at_t[i1 + i].view(n_h, 1, 1).expand(n_h, rows, 1)
                step = steps.gather(2, idx).squeeze(2)
            q = torch.clamp(torch.round(w1[..., i] / step), qmin, qmax)
            codes[..., i1 + i] = q.to(torch.int8)
            err = (w1[..., i] - q * step) / hinv1[:, i, i].unsqueeze(1)
            w1[..., i:] -= err.unsqueeze(2) * hinv1[:, i, i:].unsqueeze(1)
            err1[..., i] = err
        if i2 < d:
            for k, lo, hi in segments:  # one matmul per layer with its own shapes: results do not depend on the batch
                w[k, lo:hi, i2:] -= err1[k, lo:hi] @ h_inv[k, i1:i2, i2:]
    del w, h_inv

    out = []
    for k, lo, hi in segments:
        c = codes[k, lo:hi]
        if act_order:
            c = c[:, torch.argsort(perms[k])]
        if scale_format == "int_ratio":
            out.append(QuantizedTensor(c.clone(), row_scale[k, lo:hi].float().unsqueeze(1), None,
                                       ratios[k, lo:hi].to(torch.int8), bits, group_size, d_in, "int_ratio"))
        else:
            out.append(QuantizedTensor(c.clone(), steps[k, lo:hi].float(), None, None, bits, group_size, d_in,
                                       "exact"))
    return out
