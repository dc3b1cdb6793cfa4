"""Integer group quantizers and INT4 packing (docs/DESIGN.md §1; docs/KERNELS.md "Formats").

This is the reference (pure PyTorch) definition of every number format the project uses; the Triton
kernels are tested against it bit for bit.

Groups run along the last dimension (the input/reduction dimension of a linear layer): for
activations that is per token, for weights per output row. A last dimension that is not a multiple
of the group size is zero-padded (zeros do not change a group's abs-max or min/max, except that an
asymmetric group then always contains 0, which is harmless).

Scale formats
- ``"exact"`` (format A): one 16-bit scale per group, scale = absmax / qmax.
- ``"int_ratio"`` (format C): one 16-bit scale ``s`` per row and a 4-bit integer multiplier
  ``k ∈ 1..15`` per group; the group's step is ``k·s``. The row scale makes the row's largest group
  need k = 15 (``s = rowmax / 105``). Each group takes one of two multipliers (``k_rule`` below): the
  smallest k whose step covers the group's abs-max (no code saturates) or that k − 1 (a finer step;
  the largest values may saturate). A value's code is
  ``round(x · fl32(1 / step))``: one division per group, a multiplication per value (format A divides
  each value by its scale). Codes are in [−8, 7], so the int8
  operand ``k·q`` of the fast kernel has |k·q| ≤ 120 and one int32 accumulator serves the whole
  reduction. Asymmetric codes (reference only): the same with the group's range (max − min) in place
  of 2·abs-max, codes in [0, 15] and a zero point per group.
  Offline (weights), ``row_search=True`` also tries a few smaller row scales per row and keeps the
  one with the least squared error; activations are quantized online with ``s = rowmax / 105``.

How a group chooses between the two multipliers (``k_rule``):
- ``"sse"`` (weights, and asymmetric activations): compare k²·S_k, S_k the group's squared errors
  in code units as fixed-point integers (``sse_units``: 1/1024 of a step², summed exactly in float32
  in any order), so the activation kernel, which sums a tile in its own order, makes exactly this
  choice;
- ``"spread"`` (symmetric activations, revision 5): from the group's spread alone, with no work per
  value: k₀ − 1 unless the spread overshoots k₀ − 1's range by a quarter or more
  (ratio ≥ 1.25·(k₀ − 1), ratio = spread / (7·s)). On the embedded model's rotated activations it
  keeps all but 0.04 dB of what the squared-error choice gains (layer SQNR), and it spares the
  activation kernel 18 of its 42 instructions per value (docs/KERNELS.md).
  ``activation_k_rule`` names the rule activations use.

Rounding is half-to-even everywhere (``torch.round``), which is what the kernels' magic-number
rounding gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_FORMATS = ("exact", "int_ratio")
INT_RATIO_MAX_MULTIPLIER = 15  # k is stored in 4 bits (1..15)
# revision of format C's encoding rule (cache keys of images made with it): 1 = covering multiplier,
# codes ±7; 2 = the better of k₀ and k₀ − 1, codes [−8, 7], offline row-scale search; 3 = codes from
# a multiplication by the step's float32 reciprocal instead of a division; 4 = k₀ or k₀ − 1 chosen by
# an exact float32 sum of squared errors in fixed-point code units (sse_units) instead of float64;
# 5 = symmetric activations choose by the group's spread alone (k_rule "spread"; weights and
# asymmetric activations keep revision 4's rule)
INT_RATIO_REVISION = 5
K_RULES = ("sse", "spread")
# "spread": k₀ − 1 unless the spread reaches this many times k₀ − 1's range (exact in float32)
INT_RATIO_STEP_DOWN_REACH = 1.25
INT_RATIO_ROW_SEARCH = (1.0, 0.97, 0.94, 0.91, 0.88)  # row-scale factors tried offline (row_search)
_TINY = 1e-12  # guards all-zero groups against 0/0


def _check(bits: int, group_size: int, scale_format: str) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: symmetric INT4 is [-8, 7], asymmetric INT4 is [0, 15]."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def pad_to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x: (..., d)`` up to a multiple of ``group_size``."""
    d = x.shape[-1]
    pad = (-d) % group_size
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


@dataclass
class QuantizedTensor:
    """Integer codes and their scales for ``x: (..., d)`` grouped along the last dimension.

    q:      (..., d_pad) int8 codes (d_pad = d rounded up to the group size)
    scale:  exact: (..., d_pad / g) float32 group scales;
            int_ratio: (..., 1) float32 row scale
    zero:   (..., d_pad / g) float32 zero points (asymmetric only) or None
    ratio:  (..., d_pad / g) int8 multipliers k ∈ 1..15 (int_ratio only) or None
    Dequantized value: (q - zero) * scale, or q * ratio * scale for int_ratio.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    ratio: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    scale_format: str = "exact"

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def group_scales(self) -> torch.Tensor:
        """Effective per-group step, (..., d_pad / g) float32, for either format."""
        if self.scale_format == "int_ratio":
            return self.ratio.float() * self.scale
        return self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Back to real values, ``(..., d)`` in ``dtype`` (padding removed)."""
        shape = self.q.shape
        g = self.group_size
        q = self.q.float().reshape(*shape[:-1], shape[-1] // g, g)
        if self.zero is not None:
            q = q - self.zero.unsqueeze(-1)
        x = (q * self.group_scales().unsqueeze(-1)).reshape(shape)
        return x[..., : self.in_features].to(dtype)


def _div_scalar(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor`` rounded as one IEEE division on every device. On CUDA, PyTorch computes a
    tensor divided by a Python number as ``x * (1 / divisor)``, which can differ from ``x / divisor``
    in the last bit (1/7 is inexact); the scales must equal the kernels' ``div_rn`` bit for bit, or
    values on a rounding tie (frequent with bf16 inputs) round the other way."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def activation_k_rule(symmetric: bool) -> str:
    """Format C's multiplier rule for activations (quantized online, by the kernel on a GPU):
    ``"spread"`` for symmetric codes, ``"sse"`` for asymmetric ones (where deciding from the spread
    alone loses 0.47 dB of tail SQNR on the embedded model)."""
    return "spread" if symmetric else "sse"


def int_ratio_revision(act_symmetric: bool) -> int:
    """The revision of format C's encoding that a model with these activations runs: 5 changed
    only symmetric activations, so asymmetric ones are still revision 4 (image caches key on it)."""
    return INT_RATIO_REVISION if act_symmetric else 4


def quantize(
    x: torch.Tensor,
    bits: int = 4,
    group_size: int = 64,
    symmetric: bool = True,
    scale_format: str = "exact",
    clip_ratio: float = 1.0,
    row_search: bool = False,
    k_rule: str = "sse",
) -> QuantizedTensor:
    """Group-quantize ``x: (..., d)`` along its last dimension.

    Activations use it per token (dynamic), weights per output row. ``clip_ratio`` < 1 shrinks the
    range before rounding (values beyond it saturate), as some baselines do for weights.
    ``row_search`` (int_ratio only, for offline weights): try the row scales of
    ``INT_RATIO_ROW_SEARCH`` and keep, per row, the one with the least squared error.
    ``k_rule`` (int_ratio; format A has no multiplier and ignores it): how a group chooses its
    multiplier, ``"sse"`` or ``"spread"`` (the module docstring; activations: ``activation_k_rule``).
    """
    _check(bits, group_size, scale_format)
    if k_rule not in K_RULES:
        raise ValueError(f"k_rule must be one of {K_RULES}, got {k_rule!r}")
    if row_search and scale_format != "int_ratio":
        raise ValueError("row_search applies to scale_format='int_ratio' only (format A has one scale per group)")
    d = x.shape[-1]
    xp = pad_to_groups(x.float(), group_size)
    groups = xp.reshape(*xp.shape[:-1], xp.shape[-1] // group_size, group_size)
    qmin, qmax = qrange(bits, symmetric)

    if scale_format == "int_ratio":
        return _quantize_int_ratio(groups, xp.shape, bits, group_size, d, symmetric, clip_ratio, row_search, k_rule)

    if not symmetric:
        lo = (groups.amin(-1) * clip_ratio).clamp(max=0)
        hi = (groups.amax(-1) * clip_ratio).clamp(min=0)
        scale = _div_scalar(hi - lo, qmax - qmin).clamp(min=_TINY)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(groups / scale.unsqueeze(-1)) + zero.unsqueeze(-1), qmin, qmax)
        return QuantizedTensor(q.reshape(xp.shape).to(torch.int8), scale, zero, None, bits, group_size, d)

    absmax = groups.abs().amax(-1) * clip_ratio
    scale = _div_scalar(absmax, qmax).clamp(min=_TINY)
    q = torch.clamp(torch.round(groups / scale.unsqueeze(-1)), qmin, qmax)
    return QuantizedTensor(q.reshape(xp.shape).to(torch.int8), scale, None, None, bits, group_size, d)


def int_ratio_codes(groups: torch.Tensor, row_scale: torch.Tensor, bits: int = 4, symmetric: bool = True,
                    spread: torch.Tensor | None = None, lo: torch.Tensor | None = None, k_rule: str = "sse",
                    with_sse: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Format C codes of ``groups: (..., G, g)`` float32 under ``row_scale: (..., 1)``.

    Per group, of the multipliers k₀ = clamp(ceil(spread / (levels·s) − 1e-6), 1, 15) (spread =
    abs-max and levels = 7 when symmetric, max − min and 15 otherwise) and max(k₀ − 1, 1), the one
    with the smaller squared error k²·S_k (k₀ on a tie), where S_k = Σ rne(min(e², 255)·u) over the
    group's errors in code units, e = t − (q − zero), t = x·fl32(1/(k·s)), u = ``sse_unit(g)`` (1024
    for g = 64; ``sse_units``): integers whose sum stays below 2²⁴, so it is exact in float32 in any
    order and the kernel's choice is this one. ``k_rule="spread"``: k₀ − 1 if spread / (levels·s) <
    1.25·(k₀ − 1), else k₀ (one candidate, no squared errors compared).
    ``spread``/``lo``: ``_group_spread(groups, symmetric)`` when already known.
    Returns ``(q (..., G, g) float, k (..., G) float, zero (..., G) or None, sse (..., G) float64)``,
    sse = s²·k²·S_k / u ≈ the group's squared error in x's units (the offline row search sums it);
    ``with_sse=False``: sse is None, and the "spread" rule computes no squared errors at all (a
    quarter of its time when activations are quantized on the reference path).
    """
    qmin, qmax = qrange(bits, symmetric)
    if spread is None:
        spread, lo = _group_spread(groups, symmetric)
    ratio = spread / (_int_ratio_levels(bits, symmetric) * row_scale)
    k0 = torch.ceil(ratio - 1e-6).clamp(1, INT_RATIO_MAX_MULTIPLIER)
    k1 = (k0 - 1).clamp(min=1)
    if k_rule == "spread":
        candidates = (torch.where(ratio < INT_RATIO_STEP_DOWN_REACH * k1, k1, k0),)
    else:
        candidates = (k0, k1)
    need_sse = with_sse or len(candidates) > 1
    best = None
    for k in candidates:
        step = k * row_scale
        # one IEEE division per group, then a multiplication per value: the kernel's rule (a divide
        # per value cost the activation kernel more than the rest of its arithmetic on the H200)
        inv = torch.ones_like(step) / step
        t = groups * inv.unsqueeze(-1)
        if symmetric:
            zero = None
            q = torch.clamp(torch.round(t), qmin, qmax)
            e = t - q
        else:
            zero = torch.round(-lo * inv)
            q = torch.clamp(torch.round(t) + zero.unsqueeze(-1), qmin, qmax)
            e = t - (q - zero.unsqueeze(-1))
        # (..., G): k² times exact float32 integers (sse_units)
        weighted = k.double().square() * sse_units(e).double() if need_sse else None
        cand = (q, k, zero, weighted)
        best = cand if best is None else _keep_better(cand[3] < best[3], cand, best)
    q, k, zero, weighted = best
    if not with_sse:
        return q, k, zero, None
    return q, k, zero, weighted * row_scale.double().square() / sse_unit(groups.shape[-1])


SSE_UNIT_CAP = 255.0  # e² is at most 15.5² for the candidates format C compares; the cap bounds every term


def sse_unit(group_size: int) -> float:
    """Fixed-point units per code step² of ``sse_units`` for groups of ``group_size``: the largest
    power of two with group_size · 255 · unit ≤ 2²⁴ (1024 for 64, 512 for 128), at most 2¹⁴ so a
    term stays below 2²², where the kernels' magic-number rounding is exact."""
    return float(min(2**14, 2 ** math.floor(math.log2(2**24 / (group_size * SSE_UNIT_CAP)))))


def sse_units(e: torch.Tensor) -> torch.Tensor:
    """Σ rne(min(e², 255)·u) over the last dimension of ``e: (..., g)`` float32 errors in code units,
    u = ``sse_unit(g)``: every term and partial sum is an integer below 2²⁴, so the float32 sum is
    exact whatever the summation order (the kernel sums a tile, PyTorch its own way; both get these
    bits). ``e·e`` rounds to float32 before the cap; the power-of-two scaling is exact."""
    return torch.round(torch.clamp(e * e, max=SSE_UNIT_CAP) * sse_unit(e.shape[-1])).sum(-1)


def _int_ratio_levels(bits: int, symmetric: bool) -> int:
    """Code steps a group's spread covers at k = 1: 7 (symmetric INT4: codes ±7 cover ±absmax),
    127 (symmetric INT8), 2^bits − 1 (asymmetric: the range max − min)."""
    qmin, qmax = qrange(bits, symmetric)
    return (qmax if bits == 8 else 7) if symmetric else qmax - qmin


def _group_spread(groups: torch.Tensor, symmetric: bool, clip_ratio: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(spread, lo)`` of ``groups: (..., G, g)``: abs-max and None (symmetric), or max − min and
    min, with the range stretched to contain 0 (asymmetric)."""
    if symmetric:
        return groups.abs().amax(-1) * clip_ratio, None
    lo = (groups.amin(-1) * clip_ratio).clamp(max=0)
    return (groups.amax(-1) * clip_ratio).clamp(min=0) - lo, lo


def _keep_better(better: torch.Tensor, new: tuple, old: tuple) -> tuple:
    """Candidate tuples ``(codes (..., g), then tensors shaped like better or None)``: ``new`` where
    ``better`` (a mask over the codes' leading dimensions), else ``old``."""
    codes = torch.where(better.unsqueeze(-1), new[0], old[0])
    return (codes, *(o if o is None else torch.where(better, n, o) for n, o in zip(new[1:], old[1:])))


INT_RATIO_CHUNK_ELEMENTS = 1 << 22  # rows per block of at most ~4 M values: bounds the float64 temporaries


def _quantize_int_ratio(groups: torch.Tensor, shape: torch.Size, bits: int, group_size: int, d: int,
                        symmetric: bool, clip_ratio: float, row_search: bool, k_rule: str = "sse") -> QuantizedTensor:
    """Format C (see the module docstring); ``groups: (..., G, g)`` float32. Rows are independent,
    so they are encoded in blocks (the float64 error sums would otherwise need 2–3 float64 copies
    of the whole tensor: gigabytes for a FLUX weight or activation)."""
    lead = groups.shape[:-2]
    flat = groups.reshape(-1, *groups.shape[-2:])
    rows = max(1, INT_RATIO_CHUNK_ELEMENTS // max(1, flat.shape[1] * flat.shape[2]))
    parts = [_int_ratio_rows(flat[i:i + rows], bits, symmetric, clip_ratio, row_search, k_rule)
             for i in range(0, flat.shape[0], rows)] or [_int_ratio_rows(flat, bits, symmetric, clip_ratio, row_search,
                                                                         k_rule)]
    q, k, zero, row_scale = (torch.cat([p[j] for p in parts]) if parts[0][j] is not None else None for j in range(4))
    n_groups = groups.shape[-2]
    return QuantizedTensor(q.reshape(shape).to(torch.int8), row_scale.reshape(*lead, 1),
                           None if zero is None else zero.reshape(*lead, n_groups),
                           k.reshape(*lead, n_groups).to(torch.int8), bits, group_size, d, "int_ratio")


def _int_ratio_rows(groups: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float, row_search: bool,
                    k_rule: str = "sse") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Format C of ``groups: (rows, G, g)``: ``(q (rows, G, g), k (rows, G), zero or None, row scale (rows, 1))``."""
    spread, lo = _group_spread(groups, symmetric, clip_ratio)
    row_max = spread.amax(-1, keepdim=True)
    row_scale = _div_scalar(row_max, _int_ratio_levels(bits, symmetric) * INT_RATIO_MAX_MULTIPLIER).clamp(min=_TINY)
    q, k, zero, sse = int_ratio_codes(groups, row_scale, bits, symmetric, spread, lo, k_rule, with_sse=row_search)
    if row_search:
        best = (q, k, zero, row_scale, sse.sum(-1, keepdim=True))
        for factor in INT_RATIO_ROW_SEARCH[1:]:
            s_try = (row_scale * factor).clamp(min=_TINY)
            q2, k2, z2, sse2 = int_ratio_codes(groups, s_try, bits, symmetric, spread, lo, k_rule)
            cand = (q2, k2, z2, s_try, sse2.sum(-1, keepdim=True))
            best = _keep_better(cand[4] < best[4], cand, best)
        q, k, zero, row_scale, _ = best
    return q.to(torch.int8), k, zero, row_scale


def fake_quantize(
    x: torch.Tensor,
    bits: int = 4,
    group_size: int = 64,
    symmetric: bool = True,
    scale_format: str = "exact",
    clip_ratio: float = 1.0,
    row_search: bool = False,
    k_rule: str = "sse",
) -> torch.Tensor:
    """Quantize then dequantize ``x: (..., d)``; same shape and dtype as ``x``."""
    return quantize(x, bits, group_size, symmetric, scale_format, clip_ratio, row_search, k_rule).dequantize(x.dtype)


def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Relative MSE ‖x − x̂‖² / ‖x‖² and SQNR in dB of an approximation ``x_hat`` of ``x``."""
    err = (x.double() - x_hat.double()).pow(2).sum()
    ref = x.double().pow(2).sum().clamp(min=1e-30)
    rel = float(err / ref)
    sqnr = float(10 * torch.log10(ref / err.clamp(min=1e-30)))
    return {"rel_mse": rel, "sqnr_db": sqnr}


# --- INT4 packing ------------------------------------------------------------------------------
# Layout (the kernels read it): within each group of g values, byte j (0 ≤ j < g/2) holds value j
# in its low nibble and value j + g/2 in its high nibble, both as 4-bit two's complement (symmetric
# codes) or unsigned (asymmetric codes). A kernel then gets each group's two halves from one byte
# load with a mask and a shift: two K = g/2 dots, no reshape.


def pack_int4(q: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """Pack codes ``q: (..., d_pad)`` int8 in [-8, 7] or [0, 15] into ``(..., d_pad / 2)`` uint8."""
    if q.shape[-1] % group_size:
        raise ValueError(f"last dimension {q.shape[-1]} is not a multiple of the group size {group_size}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 15):
        raise ValueError("pack_int4 takes 4-bit codes in [-8, 7] (signed) or [0, 15] (unsigned)")
    half = group_size // 2
    groups = q.reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size).to(torch.int16)
    low = groups[..., :half] & 0xF
    high = groups[..., half:] & 0xF
    return (low | (high << 4)).to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4(packed: torch.Tensor, group_size: int = 64, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``(..., d_pad / 2)`` uint8 -> ``(..., d_pad)`` int8."""
    half = group_size // 2
    p = packed.to(torch.int16).reshape(*packed.shape[:-1], packed.shape[-1] // half, half)
    low, high = p & 0xF, (p >> 4) & 0xF
    if signed:
        low = torch.where(low > 7, low - 16, low)
        high = torch.where(high > 7, high - 16, high)
    return torch.cat([low, high], dim=-1).to(torch.int8).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
