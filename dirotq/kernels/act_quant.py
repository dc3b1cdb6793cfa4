"""Activation quantization kernel (docs/KERNELS.md "Design"; docs/DESIGN.md §3 kernel-friendly form).

Grid: (token tiles of ``BT``) × (blocks of ``GPB`` groups), so small token counts still fill the
GPU (a 16-token, d = 12288 input is 192 programs, not one walking the whole row).

1. ``c = x_s · down`` (x_s = x / smooth) is one cuBLAS GEMM before the launch (split-K where n is
   small), stored in the activation dtype; the projection reads the stored c in ``RC`` chunks, so
   the residual and the GEMM epilogue use the same rounded c and no (BT, r) or (r, 64) tile has to
   live in registers (large ranks, e.g. the paper's r = d/8, do not spill).
2. Per group g of ``GS`` columns, the tile a_g (BT, GS) of ``rotate(x_s)``:
   - dense rotation (full-rotation dirotq, QuaRot dense): ``a_g = Σ_k x_s[:, k] · R[k, g]`` (a GEMM
     over d whose epilogue quantizes; the first r columns of xT are ``c``),
   - otherwise the group's own columns of x_s (minus ``c · down[g]ᵀ`` when ``project_out``),
   - then ``a_g ← (a_g · signs_g) · H_GS``, the group's Hadamard as one GS×GS ``tl.dot``.
3. Scales and codes, bit-identical to ``dirotq.quantizers.quantize`` applied to the same a:
   format A ("exact"): scale = max(absmax/7, 1e-12) per (token, group), q = rne(a/scale) ∈ [−8, 7];
   format C ("int_ratio"): a first launch (PASS 0) stores each group's absmax, a second (PASS 1)
   takes the row max of those, s = max(rowmax/105, 1e-12), k₀ = clamp(ceil(absmax/(7s) − 1e-6), 1, 15)
   or k₀ − 1: symmetric codes take k₀ − 1 unless absmax/(7s) ≥ 1.25·(k₀ − 1) (``k_rule`` "spread",
   nothing computed per value), asymmetric ones whichever gives the smaller k²·S_k (S_k the group's
   squared errors in code units as fixed-point integers, summed exactly in float32; k₀ on a tie);
   q = clamp(rne(a·fl32(1/(k·s))), −8, 7) and the stored int8 is k·q (|k·q| ≤ 120). All
   divisions are IEEE (``tl.div_rn``), rounding is half-to-even by the magic-number trick
   (x + 1.5·2²³ − 1.5·2²³ in fp32), no libdevice and no inline asm (the interpreter runs it); the
   kernel is compiled without FMA contraction (``enable_fp_fusion=False``), so a product rounds before
   the rounding trick adds to it, as in PyTorch.

Format C's second pass recomputes a_g instead of keeping it (an (n, G) fp32 absmax scratch, not an
(n, d) one); for the dense rotation this doubles the rotation GEMM (docs/KERNELS.md).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..quantizers import INT_RATIO_STEP_DOWN_REACH, activation_k_rule, sse_unit
from .host_ints import cdiv, next_power_of_2
from .tuning import autotune_enabled

RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it leaves no fraction bits below 2**22
STEP_DOWN_REACH = tl.constexpr(INT_RATIO_STEP_DOWN_REACH)  # format C's "spread" rule (1.25: exact in fp32)
# the kernel's K_RULE per quantizers k_rule (2 and 3 are benchmark ablations: revision 3's float64 rule, k₀ alone)
K_RULE_CODES = {"spread": 0, "sse": 1}


@triton.jit
def _rne(v):
    """Round half to even for |v| < 2**22 (fp32): adding 1.5·2²³ leaves no fraction bits."""
    return (v + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def _to_int8(v):
    """int8 of the integer-valued float32 ``v`` (|v| < 2²²): v + 1.5·2²³ holds v in its low mantissa
    bits as a two's-complement integer, so its low byte is the code. A float-to-integer conversion
    runs at an eighth of the add rate on Hopper (16 per clock and SM, against 128); this is one add
    and a byte select."""
    return (v + RNE_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _codes(a, lo, step, ASYM: tl.constexpr, COVERING: tl.constexpr = False):
    """Format C codes of the tile ``a`` (BT, GS) with per-row ``step``, from r = fl32(1/step) (one IEEE
    division per row): symmetric q = clamp(rne(a·r), −8, 7) and zero 0, or asymmetric
    u = clamp(rne(a·r) + z, 0, 15) with z = rne(−lo·r); and the errors in code units e = t − (q − z),
    t = a·r. The product must round before the magic-number rounding adds to it, so the kernel is
    launched with ``enable_fp_fusion=False`` (no FMA).
    COVERING (symmetric only): ``step`` is k₀·s, the multiplier that covers the group's abs-max
    (|a| ≤ 7·k₀·s up to rounding), so |t| < 7.5 and rne(t) ∈ [−7, 7]: the clamp changes nothing
    and is left out."""
    r = tl.div_rn(tl.full(step.shape, 1.0, tl.float32), step)
    t = a * r[:, None]
    if ASYM:
        z = _rne(-lo * r)
        q = tl.minimum(tl.maximum(_rne(t) + z[:, None], 0.0), 15.0)
        e = t - (q - z[:, None])
    else:
        z = tl.zeros_like(step)
        if COVERING:
            q = _rne(t)
        else:
            q = tl.minimum(tl.maximum(_rne(t), -8.0), 7.0)
        e = t - q
    return q, z, e


@triton.jit
def _spread(a, ASYM: tl.constexpr):
    """Per row of the tile ``a``: (lo, spread), the abs-max and 0 (symmetric), or the range max − min
    of a range containing 0 and its minimum (asymmetric)."""
    if ASYM:
        lo = tl.minimum(tl.min(a, axis=1), 0.0)
        spread = tl.maximum(tl.max(a, axis=1), 0.0) - lo
    else:
        lo = tl.zeros((a.shape[0],), dtype=tl.float32)
        spread = tl.max(tl.abs(a), axis=1)
    return lo, spread


@triton.jit
def _row_scale(row_spread, ASYM: tl.constexpr):
    """Format C's row scale: the row's largest spread takes k = 15 (abs-max over 7 steps, or the
    asymmetric range over 15)."""
    levels = 225.0 if ASYM else 105.0
    return tl.maximum(tl.div_rn(row_spread, tl.full(row_spread.shape, levels, tl.float32)), 1e-12)


@triton.jit
def _sse_float64(a, q, z, step):
    """Revision 3's rule, kept only as a benchmark ablation (``SSE_FLOAT64``): per row, the float64
    sum of squared errors of the float32 values ``(q − z)·step`` against ``a``."""
    e = ((q - z[:, None]) * step[:, None]).to(tl.float64) - a.to(tl.float64)
    return tl.sum(e * e, axis=1)


@triton.jit
def _sse_units(e, UNIT: tl.constexpr):
    """Per row, Σ rne(min(e², 255)·UNIT) / UNIT of format C's candidate errors ``e`` (BT, GS): the sum of
    dirotq.quantizers.sse_units (UNIT = sse_unit(GS), a power of two) divided by UNIT, exactly.
    Rounding v to a multiple of 1/UNIT by adding and subtracting 1.5·2²³/UNIT (v·UNIT < 2²²) is
    rounding v·UNIT to an integer scaled by 1/UNIT, so the terms and every partial sum are the
    reference's integers times the same power of two: exact in float32 in any order, one
    multiplication per value fewer than scaling each term."""
    magic: tl.constexpr = RNE_MAGIC / UNIT
    # min(e², 255) is e² here: the two candidates' errors stay within 15.5 code steps (k₀/k₁ ≤ 2;
    # quantizers.SSE_UNIT_CAP), so the reference's cap never acts
    return tl.sum((e * e + magic) - magic, axis=1)


@triton.jit
def _fdot(a, b, DOT_DTYPE: tl.constexpr):
    """Float dot with fp32 accumulation; fp32 operands use exact (IEEE, not TF32) products."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def _load_raw(x_ptr, stride_xn, rows, cols, n, col_end):
    """The (BT, len(cols)) tile of x as stored (0 past row n and column ``col_end`` ≤ d)."""
    m = (rows[:, None] < n) & (cols[None, :] < col_end)
    return tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :], mask=m, other=0.0)


@triton.jit
def _smooth(xraw, smooth_ptr, cols, d, HAS_SMOOTH: tl.constexpr):
    """fp32 x / smooth of a raw tile."""
    xv = xraw.to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(smooth_ptr + cols, mask=cols < d, other=1.0).to(tl.float32)
        xv = tl.div_rn(xv, sm[None, :])
    return xv


@triton.jit
def _load_xs(x_ptr, stride_xn, smooth_ptr, rows, cols, n, d, HAS_SMOOTH: tl.constexpr):
    return _smooth(_load_raw(x_ptr, stride_xn, rows, cols, n, d), smooth_ptr, cols, d, HAS_SMOOTH)


@triton.jit
def _project(xs, rows, cols, c_ptr, stride_cn, down_ptr, stride_dd, stride_dr, n, d, r, RC: tl.constexpr,
             DOT_DTYPE: tl.constexpr):
    """xs − c · down[cols]ᵀ, c re-read from the output buffer in chunks of RC (it was stored by
    this program before a barrier), so no (BT, r) tile and no (r, GS) tile is ever live at once."""
    for r0 in range(0, r, RC):
        rc = r0 + tl.arange(0, RC)
        cc = tl.load(c_ptr + rows[:, None] * stride_cn + rc[None, :], mask=(rows[:, None] < n) & (rc[None, :] < r),
                     other=0.0).to(tl.float32)
        dt = tl.load(down_ptr + cols[None, :] * stride_dd + rc[:, None] * stride_dr,
                     mask=(cols[None, :] < d) & (rc[:, None] < r), other=0.0)
        xs = xs - _fdot(cc, dt, DOT_DTYPE)
    return xs


@triton.jit
def _group_tile(g, rows, had, x_ptr, stride_xn, smooth_ptr, down_ptr, stride_dd, stride_dr, rot_ptr, stride_rd, stride_rc,
                signs_ptr, c_ptr, stride_cn,
                n, d, d_q, r,
                BT: tl.constexpr, GS: tl.constexpr, BKD: tl.constexpr, RC: tl.constexpr,
                HAS_SMOOTH: tl.constexpr, PROJ: tl.constexpr, HAS_ROT: tl.constexpr, HAS_HAD: tl.constexpr,
                DOT_DTYPE: tl.constexpr):
    """The fp32 tile (BT, GS) of the transformed input for group ``g``."""
    gcols = g * GS + tl.arange(0, GS)
    if HAS_ROT:
        a = tl.zeros((BT, GS), dtype=tl.float32)
        for k0 in range(0, d, BKD):
            kc = k0 + tl.arange(0, BKD)
            xs = _load_xs(x_ptr, stride_xn, smooth_ptr, rows, kc, n, d, HAS_SMOOTH)
            if PROJ:
                xs = _project(xs, rows, kc, c_ptr, stride_cn, down_ptr, stride_dd, stride_dr, n, d, r, RC, DOT_DTYPE)
            rt = tl.load(rot_ptr + kc[:, None] * stride_rd + gcols[None, :] * stride_rc,
                         mask=(kc[:, None] < d) & (gcols[None, :] < d_q), other=0.0)
            a += _fdot(xs, rt, DOT_DTYPE)
        a = _hadamard(a, gcols, had, signs_ptr, d_q, HAS_HAD, DOT_DTYPE)
    else:
        a = _group_tile_from(_load_raw(x_ptr, stride_xn, rows, gcols, n, d), g, rows, had, smooth_ptr, down_ptr,
                             stride_dd, stride_dr, signs_ptr, c_ptr, stride_cn, n, d, d_q, r, 0.0, 0.0, GS, RC,
                             HAS_SMOOTH, PROJ, False, HAS_HAD, DOT_DTYPE)
    return a


@triton.jit
def _hadamard(a, gcols, had, signs_ptr, d_q, HAS_HAD: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(a · signs) · H_GS for the group's columns ``gcols`` (a unchanged without HAS_HAD)."""
    if HAS_HAD:
        sg = tl.load(signs_ptr + gcols, mask=gcols < d_q, other=0.0).to(tl.float32)
        a = _fdot(a * sg[None, :], had, DOT_DTYPE)
    return a


@triton.jit
def _group_tile_from(xraw, g, rows, had, smooth_ptr, down_ptr, stride_dd, stride_dr, signs_ptr, c_ptr, stride_cn,
                     n, d, d_q, r, cc, dt, GS: tl.constexpr, RC: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                     PROJ: tl.constexpr, PROJ_HELD: tl.constexpr, HAS_HAD: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The tile of ``_group_tile`` without a dense rotation, from group g's raw x tile (loaded earlier
    by a prefetching loop, or just now by ``_group_tile``). PROJ_HELD: the projection's operands were
    loaded earlier too, c (BT, RC) as fp32 and this group's down chunk (RC, GS) as stored (r ≤ RC: one
    chunk, the one ``_project`` would load); otherwise ``cc`` and ``dt`` are unused."""
    gcols = g * GS + tl.arange(0, GS)
    a = _smooth(xraw, smooth_ptr, gcols, d, HAS_SMOOTH)
    if PROJ:
        if PROJ_HELD:
            a = a - _fdot(cc, dt, DOT_DTYPE)
        else:
            a = _project(a, rows, gcols, c_ptr, stride_cn, down_ptr, stride_dd, stride_dr, n, d, r, RC, DOT_DTYPE)
    return _hadamard(a, gcols, had, signs_ptr, d_q, HAS_HAD, DOT_DTYPE)


@triton.jit
def _load_down_chunk(down_ptr, stride_dd, stride_dr, gcols, col_end, r, RC: tl.constexpr):
    """down[gcols, :r]ᵀ as the (RC, GS) tile ``_project`` loads (0 past r and column ``col_end``)."""
    rc = tl.arange(0, RC)
    return tl.load(down_ptr + gcols[None, :] * stride_dd + rc[:, None] * stride_dr,
                   mask=(gcols[None, :] < col_end) & (rc[:, None] < r), other=0.0)


@triton.jit
def act_quant_kernel(
    x_ptr, stride_xn,  # x (n, d), 16-bit or fp32
    smooth_ptr,  # (d,)
    down_ptr, stride_dd, stride_dr,  # down (d, r)
    rot_ptr, stride_rd, stride_rc,  # rotation (d, d_q)
    signs_ptr,  # hadamard signs (d_q,)
    had_ptr,  # normalised Hadamard (GS, GS)
    c_ptr, stride_cn,  # c = x_s · down (n, r) in the activation dtype: in (computed before the launch), or out [C_IN_KERNEL]
    q_ptr, stride_qn,  # out: int8 codes (n, G*GS); format C stores k*q
    s_ptr, stride_sn,  # out: fp32 scales, (n, G) [A] or (n,) [C]
    k_ptr, stride_kn,  # out: int8 multipliers (n, G) [C]
    z_ptr, stride_zn,  # out: int8 k·(z − 8) per (token, group) [C, ASYM]
    m_ptr, stride_mn,  # format C: per-(token, group) absmax (n, G) fp32, written by PASS 0, read by PASS 1
    a_ptr, stride_an,  # out (debug): fp32 transformed input (n, G*GS)
    n, d, d_q, r, G, GPB, N_KEY,
    BT: tl.constexpr, GS: tl.constexpr, BKD: tl.constexpr, RC: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, PROJ: tl.constexpr, HAS_ROT: tl.constexpr,
    HAS_HAD: tl.constexpr, FMT_C: tl.constexpr, ASYM: tl.constexpr, PASS: tl.constexpr, STORE_A: tl.constexpr,
    DOT_DTYPE: tl.constexpr, GB_MAX: tl.constexpr, C_IN_KERNEL: tl.constexpr, RP: tl.constexpr,
    SSE_UNIT: tl.constexpr, K_RULE: tl.constexpr = 0, PREFETCH: tl.constexpr = False,
    R_ONE_CHUNK: tl.constexpr = False,
):
    """Program (i, j): tokens [i·BT, (i+1)·BT), groups [j·GPB, (j+1)·GPB). PASS 0: format A, or
    format C's pass 1 (FMT_C: only the per-group absmax to ``m_ptr``); PASS 1: format C's pass 2
    (row scale from the stored absmaxes, then codes); PASS 2 (one launch, the program owns whole
    rows: GPB = G): format C's row scale from a first sweep over the groups, then the codes.
    C_IN_KERNEL (one launch): c = x_s · down (r ≤ RP) is computed here first and stored, so the
    layer needs no GEMM before the launch. K_RULE, format C's multiplier rule
    (dirotq.quantizers, ``k_rule``): 0 "spread" (symmetric activations), 1 "sse" (asymmetric ones);
    benchmarks only, never the layer: 2 revision 3's float64 squared errors (its codes can differ
    from the reference in near-ties), 3 k₀ alone. PREFETCH (no dense rotation): group g + 1's x tile
    (and, R_ONE_CHUNK: r ≤ RC, its down chunk; c once per program) is loaded before group g is
    transformed, so the load latency overlaps work (the same codes; an autotuning choice)."""
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < n
    cols = tl.arange(0, GS)
    g_lo = pid_g * GPB
    g_hi = tl.minimum(g_lo + GPB, G)

    # the Hadamard as the dot's operand type once, not cast in every group's dot (±1/8 for GS = 64 is
    # exact in bf16/fp16; the cast is the one _fdot would make)
    had = tl.zeros((GS, GS), dtype=DOT_DTYPE)
    if HAS_HAD:
        had = tl.load(had_ptr + cols[:, None] * GS + cols[None, :]).to(DOT_DTYPE)

    if C_IN_KERNEL:  # c over the whole row first: every group's projection needs all of it
        rr = tl.arange(0, RP)
        acc_c = tl.zeros((BT, RP), dtype=tl.float32)
        for kb in range(0, d, BKD):  # (not k0: that name is the multiplier below, a loop-carried fp32)
            kc = kb + tl.arange(0, BKD)
            xs = _load_xs(x_ptr, stride_xn, smooth_ptr, rows, kc, n, d, HAS_SMOOTH)
            dn = tl.load(down_ptr + kc[:, None] * stride_dd + rr[None, :] * stride_dr,
                         mask=(kc[:, None] < d) & (rr[None, :] < r), other=0.0)
            acc_c += _fdot(xs, dn, DOT_DTYPE)
        # stored in the activation dtype and read back by the projection: the residual and the GEMM's
        # epilogue use the same rounded c, as with c from cuBLAS
        tl.store(c_ptr + rows[:, None] * stride_cn + rr[None, :], acc_c.to(c_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (rr[None, :] < r))
        tl.debug_barrier()

    s_row = tl.zeros((BT,), dtype=tl.float32)
    if FMT_C and PASS == 1:  # the row scale from every group's absmax (G ≤ GB_MAX values per row)
        gi = tl.arange(0, GB_MAX)
        mx = tl.load(m_ptr + rows[:, None] * stride_mn + gi[None, :], mask=rmask[:, None] & (gi[None, :] < G),
                     other=0.0)
        s_row = _row_scale(tl.max(mx, axis=1), ASYM)
        if pid_g == 0:
            tl.store(s_ptr + rows * stride_sn, s_row, mask=rmask)
    if FMT_C and PASS == 2:  # one launch: the row's largest spread from a first sweep (the same max)
        spread = tl.zeros((BT,), dtype=tl.float32)
        for g in range(g_lo, g_hi):
            a = _group_tile(g, rows, had, x_ptr, stride_xn, smooth_ptr, down_ptr, stride_dd, stride_dr, rot_ptr,
                            stride_rd, stride_rc, signs_ptr, c_ptr, stride_cn, n, d, d_q, r, BT, GS, BKD, RC,
                            HAS_SMOOTH, PROJ, HAS_ROT, HAS_HAD, DOT_DTYPE)
            spread = tl.maximum(spread, _spread(a, ASYM)[1])
        s_row = _row_scale(spread, ASYM)
        tl.store(s_ptr + rows * stride_sn, s_row, mask=rmask)
    base = s_row * (15.0 if ASYM else 7.0)

    # PREFETCH: group g + 1's loads (x tile, and with a one-chunk projection its down chunk; c once per
    # program) are issued before group g is transformed and quantized
    HELD: tl.constexpr = PREFETCH and PROJ and R_ONE_CHUNK and not HAS_ROT
    cc = tl.zeros((BT, RC), dtype=tl.float32)
    dt_next = tl.zeros((RC, GS), dtype=down_ptr.dtype.element_ty)
    if PREFETCH and not HAS_ROT:
        col_end = tl.minimum(d, g_hi * GS)  # nothing past this program's last group
        x_next = _load_raw(x_ptr, stride_xn, rows, g_lo * GS + cols, n, col_end)
        if HELD:
            rcc = tl.arange(0, RC)
            cc = tl.load(c_ptr + rows[:, None] * stride_cn + rcc[None, :], mask=rmask[:, None] & (rcc[None, :] < r),
                         other=0.0).to(tl.float32)
            dt_next = _load_down_chunk(down_ptr, stride_dd, stride_dr, g_lo * GS + cols, col_end, r, RC)
    for g in range(g_lo, g_hi):
        if PREFETCH and not HAS_ROT:
            x_cur = x_next
            x_next = _load_raw(x_ptr, stride_xn, rows, (g + 1) * GS + cols, n, col_end)
            dt_cur = dt_next
            if HELD:
                dt_next = _load_down_chunk(down_ptr, stride_dd, stride_dr, (g + 1) * GS + cols, col_end, r, RC)
            a = _group_tile_from(x_cur, g, rows, had, smooth_ptr, down_ptr, stride_dd, stride_dr, signs_ptr, c_ptr,
                                 stride_cn, n, d, d_q, r, cc, dt_cur, GS, RC, HAS_SMOOTH, PROJ, HELD, HAS_HAD,
                                 DOT_DTYPE)
        else:
            a = _group_tile(g, rows, had, x_ptr, stride_xn, smooth_ptr, down_ptr, stride_dd, stride_dr, rot_ptr,
                            stride_rd, stride_rc, signs_ptr, c_ptr, stride_cn, n, d, d_q, r, BT, GS, BKD, RC,
                            HAS_SMOOTH, PROJ, HAS_ROT, HAS_HAD, DOT_DTYPE)
        gcols = g * GS + cols
        omask = rmask[:, None] & (gcols[None, :] < G * GS)
        lo, amax = _spread(a, ASYM)
        if STORE_A and (PASS >= 1 or not FMT_C):  # the pass that writes codes (debug copy of the input)
            tl.store(a_ptr + rows[:, None] * stride_an + gcols[None, :], a, mask=omask)
        if FMT_C:
            if PASS == 0:
                tl.store(m_ptr + rows * stride_mn + g, amax, mask=rmask)
            else:
                # k₀, the covering multiplier, or k₀ − 1 (dirotq.quantizers.int_ratio_codes)
                ratio = tl.div_rn(amax, base)
                k0 = tl.minimum(tl.maximum(tl.ceil(ratio - 1e-6), 1.0), 15.0)
                k1 = tl.maximum(k0 - 1.0, 1.0)
                if K_RULE == 0 or K_RULE == 3:
                    # "spread": from the group's spread alone, one candidate's codes per value
                    if K_RULE == 0:
                        kf = tl.where(ratio < STEP_DOWN_REACH * k1, k1, k0)
                    else:
                        kf = k0
                    q, z, _ = _codes(a, lo, kf * s_row, ASYM)
                else:
                    # "sse": the one with the smaller k²·S_k, S_k the exact fixed-point sum of squared
                    # code-unit errors; the products (< 2³² units, exact in float64 also when scaled
                    # by 1/UNIT) compare in float64 once per row and group
                    q0, z0, e0 = _codes(a, lo, k0 * s_row, ASYM, COVERING=True)
                    q1, z1, e1 = _codes(a, lo, k1 * s_row, ASYM)
                    if K_RULE == 2:
                        take1 = _sse_float64(a, q1, z1, k1 * s_row) < _sse_float64(a, q0, z0, k0 * s_row)
                    else:
                        w0 = (k0 * k0).to(tl.float64) * _sse_units(e0, SSE_UNIT).to(tl.float64)
                        w1 = (k1 * k1).to(tl.float64) * _sse_units(e1, SSE_UNIT).to(tl.float64)
                        take1 = w1 < w0
                    kf = tl.where(take1, k1, k0)
                    q = tl.where(take1[:, None], q1, q0)
                    z = tl.where(take1, z1, z0)
                if ASYM:  # stored as k·(u − 8) and k·(z − 8), both int8
                    q = q - 8.0
                    tl.store(z_ptr + rows * stride_zn + g, ((z - 8.0) * kf).to(tl.int8), mask=rmask)
                tl.store(q_ptr + rows[:, None] * stride_qn + gcols[None, :], _to_int8(q * kf[:, None]),
                         mask=omask)
                tl.store(k_ptr + rows * stride_kn + g, kf.to(tl.int8), mask=rmask)
        else:
            sc = tl.maximum(tl.div_rn(amax, tl.full((BT,), 7.0, tl.float32)), 1e-12)
            q = _rne(tl.div_rn(a, sc[:, None]))
            q = tl.minimum(tl.maximum(q, -8.0), 7.0)
            tl.store(q_ptr + rows[:, None] * stride_qn + gcols[None, :], _to_int8(q), mask=omask)
            tl.store(s_ptr + rows * stride_sn + g, sc, mask=rmask)


# --- host side ---------------------------------------------------------------------------------
# Triton picks the interpreter when it decorates the kernels of this module, at import: the variable
# is read once here too (it was read on every call, 7 times per W4A4 layer call, ~1.5 µs each)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreting() -> bool:
    return _INTERPRET


# 65,536 registers per SM / (256 threads · 128): two 8-warp programs per SM
ACT_OCCUPANCY_REGS = 128

_TUNED_ACT = None
ACT_LARGE_N = 1024  # token bucket from which only the large tiles are tried


def prune_act_configs(configs, named_args, **kwargs):
    """The tiles worth compiling and timing for this token bucket (each costs a compile on a layer's
    first call). From 1,024 tokens, BT 64–128: on the H200 at 4,096 tokens (2026-11-28, revision 5,
    d = 3072) BT 16 and 32 took 1.6–2.1× the best tile in both passes and BT 256 1.35× in the second;
    below that, BT ≤ 64 and no larger than the bucket (few row blocks: small tiles keep programs in
    flight)."""
    n = named_args["N_KEY"]
    if n >= ACT_LARGE_N:
        keep = [c for c in configs if 64 <= c.kwargs["BT"] <= 128]
    else:
        keep = [c for c in configs if c.kwargs["BT"] <= min(64, max(16, n))]
    return keep or configs[:1]


def _tuned_act_kernel():
    """Few configs (token rows per program × warps); one tuning per token bucket."""
    global _TUNED_ACT
    if _TUNED_ACT is None:
        cfgs = [triton.Config({"BT": bt, "PREFETCH": pf}, num_warps=w, num_stages=s, maxnreg=mr)
                # (64 × 8 warps, the slowest of the H200's four tiles in both passes, gave way to 64 × 4)
                for bt, w, s, pf, mr in ((16, 4, 2, False, None), (32, 4, 2, False, None), (64, 4, 2, False, None),
                                         (128, 8, 3, False, None),  # BT 128: the H200's fastest tile
                                         (32, 4, 2, True, None), (128, 8, 3, True, None),  # next x tile early
                                         # the H200's fastest second pass (25.2 µs against 31.0 at d = 3072)
                                         (64, 4, 3, True, None),
                                         # two programs per SM instead of one: format C's second pass at
                                         # 128 registers (145 uncapped; aot_check, Triton 3.9: 16 bytes
                                         # spilled)
                                         (128, 8, 3, False, ACT_OCCUPANCY_REGS),
                                         # 64 values per thread instead of 32: two independent chains per
                                         # warp to hide latency, fewer instructions per value (23 against
                                         # 26 in the second pass), 248–252 registers, no spills
                                         (128, 4, 3, False, None), (256, 8, 3, False, None))]
        _TUNED_ACT = triton.autotune(cfgs, key=["N_KEY", "d", "d_q", "r", "GPB", "FMT_C", "ASYM", "PASS", "PROJ",
                                                "HAS_ROT", "HAS_HAD", "C_IN_KERNEL"],
                                     prune_configs_by={"early_config_prune": prune_act_configs},
                                     cache_results=True)(act_quant_kernel)
    return _TUNED_ACT


TARGET_PROGRAMS = 1024  # ≈ 8 per SM on a 132-SM H100: enough in flight to hide load latency


def groups_per_program(n: int, groups: int, rotation: bool) -> int:
    """Group-axis split of the grid: tokens alone give few programs at small n (16 tokens were one
    program for the whole row), so each program takes ``GPB`` groups, chosen for about
    ``TARGET_PROGRAMS`` programs at 32-token tiles. A dense rotation makes each group a GEMM over
    d, so it always takes one group per program."""
    if rotation:
        return 1
    token_tiles = -(-max(n, 1) // 32)
    return max(1, min(groups, (groups * token_tiles) // TARGET_PROGRAMS))


def _dot_dtype(dtype):
    import torch

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _pow2_at_least(v: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(max(int(v), 1)))


ONE_LAUNCH_MAX_RANK = 64  # c = x_s · down in registers: a (BT, r) fp32 tile


def one_launch_enabled(plan, one_launch: bool | None = None) -> bool:
    """Whether ``quantize_activations`` runs as one launch whose programs own whole token rows
    (c computed in the kernel, format C's row scale from a first sweep over the groups) instead of
    the c GEMM + one or two launches over (token, group) tiles. ``one_launch=None`` reads
    ``DIROTQ_ACT_ONE_LAUNCH`` (default 0: the one-launch form was slower on the H200, 0.23 against
    0.19 ms at d = 3072). Not with a dense rotation (every group is a GEMM over d: one program per row
    would do all of them)."""
    if one_launch is None:
        one_launch = os.environ.get("DIROTQ_ACT_ONE_LAUNCH", "0") not in ("", "0")
    return bool(one_launch) and not plan.has_rotation


def activation_launch(module, plan, x, store_a: bool = False, one_launch: bool | None = None) -> dict:
    """Everything one ``quantize_activations`` call launches, without launching the kernel: the
    output buffers (``out``: codes, scale, ratio, c, a, zero as documented there), the kernel's
    positional ``args`` and constexpr ``meta`` (BT, PASS and launch options excluded), the group
    blocks of the grid (``g_blocks``) and the ``passes`` to run. The c GEMM (cuBLAS) has run already
    when c is not computed in the kernel. Split out so benchmarks can time passes and tile configs."""
    import torch

    n = x.shape[0]
    g, G = plan.group_size, plan.groups
    dev = x.device
    fmt_c = plan.fmt == "int_ratio"
    codes = torch.empty((n, G * g), dtype=torch.int8, device=dev)
    scale = torch.empty((n,) if fmt_c else (n, G), dtype=torch.float32, device=dev)
    ratio = torch.empty((n, G), dtype=torch.int8, device=dev) if fmt_c else None
    zero = torch.empty((n, G), dtype=torch.int8, device=dev) if plan.asym else None
    c = torch.empty((n, plan.r), dtype=x.dtype, device=dev) if plan.has_down else None
    a = torch.empty((n, G * g), dtype=torch.float32, device=dev) if store_a else None
    out = {"codes": codes, "scale": scale, "ratio": ratio, "c": c, "a": a, "zero": zero}
    if n == 0:
        return {"out": out, "args": None, "meta": None, "g_blocks": 0, "passes": ()}
    dummy = plan.dummy
    down = module.down if plan.has_down else dummy
    rot = module.rotation if plan.has_rotation else dummy
    one = one_launch_enabled(plan, one_launch)
    c_in_kernel = one and c is not None and plan.r <= ONE_LAUNCH_MAX_RANK
    if c is not None and not c_in_kernel:
        # c = x_s · down through cuBLAS (split-K at small n, fp32 accumulation, stored in x's dtype),
        # so the quantization grid below needs no reduction over d before its first group
        xs = x if not plan.has_smooth else (x.float() / module.smooth.float()).to(x.dtype)
        torch.matmul(xs, down.to(x.dtype), out=c)
    gpb = G if one else groups_per_program(n, G, plan.has_rotation)
    amax = torch.empty((n, G), dtype=torch.float32, device=dev) if fmt_c else None
    args = [
        x, x.stride(0),
        module.smooth if plan.has_smooth else dummy,
        down, down.stride(0) if plan.has_down else 0, down.stride(1) if plan.has_down else 0,
        rot, rot.stride(0) if plan.has_rotation else 0, rot.stride(1) if plan.has_rotation else 0,
        module.hadamard_signs if plan.has_hadamard else dummy,
        plan.had if plan.has_hadamard else dummy,
        c if c is not None else dummy, c.stride(0) if c is not None else 0,
        codes, codes.stride(0),
        scale, scale.stride(0),
        ratio if ratio is not None else dummy, ratio.stride(0) if ratio is not None else 0,
        zero if zero is not None else dummy, zero.stride(0) if zero is not None else 0,
        amax if amax is not None else dummy, amax.stride(0) if amax is not None else 0,
        a if a is not None else dummy, a.stride(0) if a is not None else 0,
        n, plan.d, plan.d_q, plan.r, G, gpb, _pow2_at_least(n),
    ]
    meta = dict(GS=g, BKD=g, RC=min(64, _pow2_at_least(plan.r)),
                HAS_SMOOTH=plan.has_smooth, PROJ=plan.project_out and plan.has_down,
                HAS_ROT=plan.has_rotation, HAS_HAD=plan.has_hadamard, FMT_C=fmt_c, ASYM=plan.asym, STORE_A=store_a,
                DOT_DTYPE=_dot_dtype(x.dtype), GB_MAX=_pow2_at_least(G, 1), C_IN_KERNEL=c_in_kernel,
                RP=_pow2_at_least(plan.r) if c_in_kernel else 16, SSE_UNIT=sse_unit(g),
                K_RULE=K_RULE_CODES[activation_k_rule(not plan.asym)],
                R_ONE_CHUNK=plan.r <= min(64, _pow2_at_least(plan.r)))
    # format C: absmax per group, then the row scale and codes (one launch: both in each program)
    passes = ((2,) if one else (0, 1)) if fmt_c else (0,)
    return {"out": out, "args": args, "meta": meta, "g_blocks": cdiv(G, gpb), "passes": passes}


def quantize_activations(module, plan, x, store_a: bool = False, block_t: int | None = None,
                         one_launch: bool | None = None):
    """Run the activation kernel on ``x: (n, d)`` (contiguous, fp32/fp16/bf16).

    Returns a dict: ``codes`` (n, G·g) int8 (k·q for format C), ``scale`` fp32 (n, G) [A] or (n,) [C],
    ``ratio`` (n, G) int8 [C] or None, ``c`` (n, r) in x's dtype or None, ``a`` (n, G·g) fp32 [store_a],
    ``zero`` (n, G) int8 k·(z − 8) [asymmetric format C] or None (then ``codes`` hold k·(u − 8)).
    ``one_launch``: see :func:`one_launch_enabled` (the codes are the same for the same transformed
    input either way).
    """
    n = x.shape[0]
    launch = activation_launch(module, plan, x, store_a, one_launch)
    args, meta, g_blocks = launch["args"], launch["meta"], launch["g_blocks"]
    for pass_ in launch["passes"]:
        if block_t is not None or _interpreting() or not autotune_enabled(plan):
            bt = block_t or (16 if (_interpreting() or n <= 2048) else 32)
            act_quant_kernel[(cdiv(n, bt), g_blocks)](*args, BT=bt, PASS=pass_, **meta, num_warps=4,
                                                      enable_fp_fusion=False)
        else:
            _tuned_act_kernel()[lambda m: (cdiv(n, m["BT"]), g_blocks)](*args, PASS=pass_, **meta,
                                                                        enable_fp_fusion=False)
    return launch["out"]
