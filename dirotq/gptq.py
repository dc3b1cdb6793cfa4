"""GPTQ weight quantization (Frantar et al., 2022), as used for DiRotQ's 4-bit weights (docs/DESIGN.md §3
"Weights": damping 0.01 × mean diag, block 128, optional act-order).

Column by column, each weight column is rounded and the rounding error is pushed onto the columns
not yet quantized through the Cholesky factor of the inverse Hessian H⁻¹, H = Σ xᵀx of the inputs
the quantized weight will meet. Group scales use exactly the formats of ``quantizers.py``:
"exact" (one step per 64-group) and "int_ratio" (row scale × 4-bit group multiplier).
"""

from __future__ import annotations

import torch

from .quantizers import INT_RATIO_MAX_MULTIPLIER, QuantizedTensor, pad_to_groups, qrange


def _group_step(w: torch.Tensor, qmax: int, scale_format: str, row_scale: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step for one group of columns ``w: (o, g)``; returns (step (o,), int multiplier or None)."""
    absmax = w.abs().amax(1)
    if scale_format == "exact":
        return (absmax / qmax).clamp(min=1e-12), None
    ratio = torch.ceil(absmax / (qmax * row_scale) - 1e-6).clamp(1, INT_RATIO_MAX_MULTIPLIER)
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
) -> QuantizedTensor:
    """Quantize ``weight: (o, d)`` with GPTQ under ``hessian: (d, d)`` (Σ xᵀx, any positive scale).

    Symmetric codes in [-8, 7] (int_ratio: [-7, 7]), groups of ``group_size`` along d, d padded to
    a multiple of the group size. ``static_groups`` fixes every group's step from the unquantized
    weight up front (required with ``act_order``, which quantizes columns by decreasing diag(H)).
    With H = I no error is propagated and the result is plain RTN.
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight (o, d) and hessian (d, d) expected, got {tuple(weight.shape)} and {tuple(hessian.shape)}")
    if block_size % group_size:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {group_size}")
    o, d_in = weight.shape
    static_groups = static_groups or act_order
    qmax = qrange(bits, True)[1] if scale_format == "exact" else (7 if bits == 4 else 127)
    qmin = -qmax - 1 if scale_format == "exact" else -qmax

    w = pad_to_groups(weight.double(), group_size).clone()
    d = w.shape[1]
    h = torch.zeros(d, d, dtype=torch.float64)
    h[:d_in, :d_in] = hessian.double()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    n_groups = d // group_size
    row_scale = None
    if scale_format == "int_ratio":
        row_max = w.abs().amax(1).clamp(min=1e-12)
        row_scale = row_max / (qmax * INT_RATIO_MAX_MULTIPLIER)
    steps = torch.zeros(o, n_groups, dtype=torch.float64)
    ratios = torch.zeros(o, n_groups, dtype=torch.float64) if scale_format == "int_ratio" else None
    if static_groups:
        for g in range(n_groups):
            steps[:, g], r = _group_step(w[:, g * group_size:(g + 1) * group_size], qmax, scale_format, row_scale)
            if ratios is not None:
                ratios[:, g] = r

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(d)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damping * h.diagonal().mean() * torch.eye(d, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(o, d, dtype=torch.float64)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            group = col // group_size
            if not static_groups and (i1 + i) % group_size == 0:
                # groups lie inside a block (block_size % group_size == 0), so the current block holds them
                steps[:, group], r = _group_step(w1[:, i:i + group_size], qmax, scale_format, row_scale)
                if ratios is not None:
                    ratios[:, group] = r
            step = steps[:, group]
            q = torch.clamp(torch.round(w1[:, i] / step), qmin, qmax)
            codes[:, i1 + i] = q
            err = (w1[:, i] - q * step) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]

    codes = codes[:, torch.argsort(perm)].to(torch.int8)
    if scale_format == "int_ratio":
        return QuantizedTensor(codes, row_scale.float().unsqueeze(1), None, ratios.to(torch.int8), bits,
                               group_size, d_in, "int_ratio")
    return QuantizedTensor(codes, steps.float(), None, None, bits, group_size, d_in, "exact")
