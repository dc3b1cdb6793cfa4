"""W4A4 GEMM with the fused 16-bit branch (docs/KERNELS.md "Design").

Swap-AB: the program computes the transposed tile acc[BO, BT] = W_tile · X_tileᵀ, so the weight
(unpacked from INT4 in registers) is the dot's first operand (wgmma's register operand on Hopper)
and the int8 activation codes (loaded as they are stored) are the shared-memory operand; tokens sit
on the MMA's N dimension, which also makes ≤ 16-token calls efficient (BT = 16) without leaving
the W4A4 numerics the quality was measured with.

Per 64-group the packed byte tile (BO, 32) yields both halves: low nibble = values 0..31,
high nibble = 32..63 (``quantizers.pack_int4``), sign-extended by (v ^ 8) − 8; the activation codes
are read as the matching two (32, BT) halves: two K = 32 int8 dots, no reshape.

- Format A body ("exact"): per group int32 partial → fp32 × (w_scale[o, g] ⊗ x_scale[t, g]) → fp32 acc.
- Format C body ("int_ratio"): weight operand k_w·q_w (|·| ≤ 120, formed in registers from the
  packed codes and the int8 multipliers), activation operand k_a·q_a from the activation kernel;
  one chained int32 accumulator over all of K (|Σ| ≤ 120²·K < 2³¹ for K ≤ 149 000); the epilogue
  scales by w_row_scale[o] ⊗ x_row_scale[t].
- Asymmetric format C (``ASYM``): the activation operand is k_a·(u − 8) and the epilogue subtracts
  the zero-point term Σ_g k_a,g·(z_g − 8)·S_g[o] from the int32 sum before scaling (docs/KERNELS.md,
  "Formats"). S (|S| ≤ 64·120) does not fit int8, so it is stored as S = 128·S_hi + S_lo
  (S_hi ∈ [−60, 60], S_lo ∈ [0, 127], stored negated) and the term is int8 dots over the groups,
  exact in int32.
- Epilogue: + up · cᵀ as a float ``tl.dot`` (K = r, in chunks of R_BLK), + bias, store yᵀ in the
  activation dtype. ``DEBUG_INT`` stores the int32 sum Σ q_w q_a (format C: Σ k_w q_w k_a q_a, minus
  the zero-point term when asymmetric) instead, for the byte-exact tests.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..activations import KERNEL_CODES, ActivationSpec, apply_activation
from .act_quant import _dot_dtype, _fdot, _interpreting, _pow2_at_least
from .host_ints import cdiv
from .simd_unpack import ASM_HI_A, ASM_HI_C, ASM_LO_A, ASM_LO_C, _SIMD_OK, simd_unpack_enabled
from .tuning import autotune_enabled


@triton.jit
def _unpack_halves(w_ptr, stride_wo, offs_o, omask, g, HALF: tl.constexpr):
    j = tl.arange(0, HALF)
    p = tl.load(w_ptr + offs_o[:, None] * stride_wo + (g * HALF + j)[None, :], mask=omask[:, None], other=0)
    p = p.to(tl.int32)
    lo = ((p & 15) ^ 8) - 8
    hi = (((p >> 4) & 15) ^ 8) - 8
    return lo, hi


# SIMD unpack (GPU only; the interpreter runs _unpack_halves, its pure-tl twin): the PTX sequences of
# dirotq/kernels/simd_unpack.py, which says how they work
_ASM_LO_A = tl.constexpr(ASM_LO_A)
_ASM_HI_A = tl.constexpr(ASM_HI_A)
_ASM_LO_C = tl.constexpr(ASM_LO_C)
_ASM_HI_C = tl.constexpr(ASM_HI_C)


@triton.jit
def _unpack_simd(w_ptr, stride_wo, wk_ptr, stride_wko, offs_o, omask, g, HALF: tl.constexpr, FMT_C: tl.constexpr):
    """(lo, hi) int8 (BO, HALF): q (A) or k·q (C), four bytes per instruction sequence."""
    j = tl.arange(0, HALF)
    p = tl.load(w_ptr + offs_o[:, None] * stride_wo + (g * HALF + j)[None, :], mask=omask[:, None], other=0)
    if FMT_C:
        k = tl.load(wk_ptr + offs_o * stride_wko + g, mask=omask, other=0)
        kb = tl.broadcast_to(k[:, None], p.shape)
        lo = tl.inline_asm_elementwise(_ASM_LO_C, "=r,r,r", [p, kb], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_ASM_HI_C, "=r,r,r", [p, kb], dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = tl.inline_asm_elementwise(_ASM_LO_A, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_ASM_HI_A, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
    return lo, hi


@triton.jit
def _weight_operand(w_ptr, stride_wo, wk_ptr, stride_wko, offs_o, omask, g, GS: tl.constexpr, FMT_C: tl.constexpr,
                    W_INT8: tl.constexpr, SIMD: tl.constexpr):
    """Group ``g``'s weight operand as two (BO, GS/2) halves: q [A] or k·q [C], from the cached int8
    codes (``W_INT8``), the SIMD unpack, or the pure-tl unpack (the interpreter; the SIMD oracle)."""
    HALF: tl.constexpr = GS // 2
    if W_INT8:  # cached unpacked operand (q, or k*q for C): plain int8 loads, no unpack
        j = tl.arange(0, HALF)
        lo = tl.load(w_ptr + offs_o[:, None] * stride_wo + (g * GS + j)[None, :], mask=omask[:, None], other=0)
        hi = tl.load(w_ptr + offs_o[:, None] * stride_wo + (g * GS + HALF + j)[None, :], mask=omask[:, None],
                     other=0)
    elif SIMD:  # GPU: 4 values per 32-bit op (inline PTX)
        lo, hi = _unpack_simd(w_ptr, stride_wo, wk_ptr, stride_wko, offs_o, omask, g, HALF, FMT_C)
    else:
        lo, hi = _unpack_halves(w_ptr, stride_wo, offs_o, omask, g, HALF)
        if FMT_C:
            k = tl.load(wk_ptr + offs_o * stride_wko + g, mask=omask, other=0).to(tl.int32)
            lo = lo * k[:, None]
            hi = hi * k[:, None]
    return lo, hi


@triton.jit
def _grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """(pid_a, pid_b) of program ``pid`` in grouped order: GROUP consecutive tiles along a share one
    sweep over the tiles along b (L2 reuse of the operand indexed by b)."""
    per_group = GROUP * num_b
    first_a = (pid // per_group) * GROUP
    size_a = tl.minimum(num_a - first_a, GROUP)
    return first_a + (pid % per_group) % size_a, (pid % per_group) // size_a


@triton.jit
def _add_branch_and_bias(acc, offs_o, omask, offs_t, tmask, c_ptr, stride_cn, stride_cr, up_ptr, stride_uo, stride_ur,
                         bias_ptr, r, R_BLK: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """acc + up · cᵀ (the 16-bit branch, K = r in chunks of R_BLK) + bias: the epilogue shared by the
    W4A4 and W4A16 GEMMs; acc is (BO, BT), or (BT, BO) in the token-major GEMM."""
    if HAS_LR:
        for r0 in range(0, r, R_BLK):
            rc = r0 + tl.arange(0, R_BLK)
            if TOKEN_MAJOR:
                cc = tl.load(c_ptr + offs_t[:, None] * stride_cn + rc[None, :] * stride_cr,
                             mask=tmask[:, None] & (rc[None, :] < r), other=0.0)
                ut = tl.load(up_ptr + offs_o[None, :] * stride_uo + rc[:, None] * stride_ur,
                             mask=omask[None, :] & (rc[:, None] < r), other=0.0)
                acc += _fdot(cc, ut, DOT_DTYPE)
            else:
                u = tl.load(up_ptr + offs_o[:, None] * stride_uo + rc[None, :] * stride_ur,
                            mask=omask[:, None] & (rc[None, :] < r), other=0.0)
                ct = tl.load(c_ptr + offs_t[None, :] * stride_cn + rc[:, None] * stride_cr,
                             mask=tmask[None, :] & (rc[:, None] < r), other=0.0)
                acc += _fdot(u, ct, DOT_DTYPE)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
        if TOKEN_MAJOR:
            acc += b[None, :]
        else:
            acc += b[:, None]
    return acc


@triton.jit
def _activation(acc, offs_o, act_lo, act_hi, ACT: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """GELU on output columns [act_lo, act_hi) of the fp32 tile (``dirotq.activations``): ACT 1 the
    erf form, 2 the tanh form, written as x·σ(2u) (= ½x(1 + tanh u)), u = √(2/π)(x + 0.044715x³);
    acc is (BO, BT), or (BT, BO) in the token-major GEMM."""
    if ACT == 1:
        g = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    else:
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        g = acc * tl.sigmoid(tl.maximum(2.0 * u, -80.0))  # σ(−80) ≈ 2e−35: exp never overflows
    on = (offs_o >= act_lo) & (offs_o < act_hi)
    if TOKEN_MAJOR:
        return tl.where(on[None, :], g, acc)
    else:
        return tl.where(on[:, None], g, acc)


@triton.jit
def _zero_term_dots(acc, s_ptr, zk_ptr, stride_zkn, stride_so, offs_o, omask, offs_t, tmask, G, GC: tl.constexpr,
                    TOKEN_MAJOR: tl.constexpr):
    """acc + Σ_g S[o, g]·zk[t, g] as int8 dots over GC groups at a time, for an int8 (o, G) weight-side
    table S at ``s_ptr``: acc is (BO, BT) in the swap-AB kernel, (BT, BO) in the token-major one."""
    for g0 in range(0, G, GC):
        gc = g0 + tl.arange(0, GC)
        gmask = gc < G
        if TOKEN_MAJOR:
            zk = tl.load(zk_ptr + offs_t[:, None] * stride_zkn + gc[None, :], mask=tmask[:, None] & gmask[None, :],
                         other=0)
            sw = tl.load(s_ptr + offs_o[None, :] * stride_so + gc[:, None], mask=omask[None, :] & gmask[:, None],
                         other=0)
            acc = tl.dot(zk, sw, acc, out_dtype=tl.int32)
        else:
            zk = tl.load(zk_ptr + offs_t[None, :] * stride_zkn + gc[:, None], mask=tmask[None, :] & gmask[:, None],
                         other=0)
            sw = tl.load(s_ptr + offs_o[:, None] * stride_so + gc[None, :], mask=omask[:, None] & gmask[None, :],
                         other=0)
            acc = tl.dot(sw, zk, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _subtract_zero_point_term(acc_i, zk_ptr, stride_zkn, shi_ptr, slo_ptr, stride_so, offs_o, omask, offs_t, tmask, G,
                              GC: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """acc_i − Σ_g S_g[o]·zk[t, g] with S = −(128·H + L) from the stored negated halves H = −S_hi,
    L = −S_lo: the H dots accumulate into one extra tile, scaled by 128 once, and the L dots
    accumulate straight into acc_i (one extra int32 tile live, not three)."""
    t_hi = _zero_term_dots(tl.zeros_like(acc_i), shi_ptr, zk_ptr, stride_zkn, stride_so, offs_o, omask, offs_t,
                           tmask, G, GC, TOKEN_MAJOR)
    acc_i += 128 * t_hi
    return _zero_term_dots(acc_i, slo_ptr, zk_ptr, stride_zkn, stride_so, offs_o, omask, offs_t, tmask, G, GC,
                           TOKEN_MAJOR)


@triton.jit
def w4a4_gemm_kernel(
    w_ptr, stride_wo,  # packed INT4 (o, G*GS/2) uint8, or [W_INT8] the unpacked operand (o, G*GS) int8
    ws_ptr, stride_wso,  # weight scales fp16/fp32: (o, G) [A] or (o, 1) [C]
    wk_ptr, stride_wko,  # weight multipliers int8 (o, G) [C]
    q_ptr, stride_qn,  # activation codes int8 (n, G*GS) (k*q for C)
    xs_ptr, stride_xsn,  # activation scales fp32: (n, G) [A] or (n,) [C]
    c_ptr, stride_cn, stride_cr,  # 16-bit coefficients (n, r)
    up_ptr, stride_uo, stride_ur,  # up (o, r)
    bias_ptr,  # (o,)
    zk_ptr, stride_zkn,  # [ASYM] activation zero terms k·(z − 8) int8 (n, G)
    shi_ptr, slo_ptr, stride_so,  # [ASYM] weight group sums S = 128·S_hi + S_lo as −S_hi, −S_lo, int8 (o, G) each
    y_ptr, stride_yn,  # out (n, o)
    n, o, r, G, SPLIT, N_KEY, act_lo, act_hi,
    BO: tl.constexpr, BT: tl.constexpr, GS: tl.constexpr, R_BLK: tl.constexpr, GROUP_O: tl.constexpr,
    FMT_C: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, DEBUG_INT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, W_INT8: tl.constexpr, SIMD: tl.constexpr, ATOMIC: tl.constexpr,
    ASYM: tl.constexpr, GC: tl.constexpr, ACT: tl.constexpr = 0,
):
    """Program (i, s): output tile i over the groups of K split s (``SPLIT`` splits; ``ATOMIC``: the
    splits add fp32 (int32 for DEBUG_INT) partials into a zeroed y; split 0 adds the branch, the bias
    and the zero-point term of every group). ``ACT`` (not with ATOMIC: a sum of partials cannot take
    a nonlinearity): GELU on output columns [act_lo, act_hi) before the store."""
    HALF: tl.constexpr = GS // 2
    # grouped ordering: GROUP_O weight tiles share one sweep over the token tiles (L2 reuse of x)
    pid_o, pid_t = _grouped_tile(tl.program_id(0), tl.cdiv(o, BO), tl.cdiv(n, BT), GROUP_O)

    offs_o = pid_o * BO + tl.arange(0, BO)
    offs_t = pid_t * BT + tl.arange(0, BT)
    omask = offs_o < o
    tmask = offs_t < n
    j = tl.arange(0, HALF)

    pid_s = tl.program_id(1)
    per_split = tl.cdiv(G, SPLIT)
    g_lo = pid_s * per_split
    g_hi = tl.minimum(g_lo + per_split, G)

    acc_i = tl.zeros((BO, BT), dtype=tl.int32)
    acc = tl.zeros((BO, BT), dtype=tl.float32)
    for g in tl.range(g_lo, g_hi):
        lo, hi = _weight_operand(w_ptr, stride_wo, wk_ptr, stride_wko, offs_o, omask, g, GS, FMT_C, W_INT8, SIMD)
        xlo = tl.load(q_ptr + offs_t[None, :] * stride_qn + (g * GS + j)[:, None], mask=tmask[None, :], other=0)
        xhi = tl.load(q_ptr + offs_t[None, :] * stride_qn + (g * GS + HALF + j)[:, None], mask=tmask[None, :],
                      other=0)
        if FMT_C or DEBUG_INT:
            acc_i = tl.dot(lo.to(tl.int8), xlo, acc_i, out_dtype=tl.int32)
            acc_i = tl.dot(hi.to(tl.int8), xhi, acc_i, out_dtype=tl.int32)
        else:
            part = tl.dot(lo.to(tl.int8), xlo, out_dtype=tl.int32)
            part = tl.dot(hi.to(tl.int8), xhi, part, out_dtype=tl.int32)
            ws = tl.load(ws_ptr + offs_o * stride_wso + g, mask=omask, other=0.0).to(tl.float32)
            xs = tl.load(xs_ptr + offs_t * stride_xsn + g, mask=tmask, other=0.0)
            acc += part.to(tl.float32) * ws[:, None] * xs[None, :]

    if ASYM:
        if pid_s == 0:
            acc_i = _subtract_zero_point_term(acc_i, zk_ptr, stride_zkn, shi_ptr, slo_ptr, stride_so, offs_o, omask,
                                              offs_t, tmask, G, GC, False)
    y_ptrs = y_ptr + offs_t[None, :] * stride_yn + offs_o[:, None]
    ymask = omask[:, None] & tmask[None, :]
    if DEBUG_INT:
        if ATOMIC:
            tl.atomic_add(y_ptrs, acc_i, mask=ymask)
        else:
            tl.store(y_ptrs, acc_i, mask=ymask)
    else:
        if FMT_C:
            ws = tl.load(ws_ptr + offs_o * stride_wso, mask=omask, other=0.0).to(tl.float32)
            xs = tl.load(xs_ptr + offs_t * stride_xsn, mask=tmask, other=0.0)
            acc = acc_i.to(tl.float32) * ws[:, None] * xs[None, :]
        if pid_s == 0:  # the branch and the bias once, in the first K split
            acc = _add_branch_and_bias(acc, offs_o, omask, offs_t, tmask, c_ptr, stride_cn, stride_cr, up_ptr,
                                       stride_uo, stride_ur, bias_ptr, r, R_BLK, HAS_LR, HAS_BIAS, DOT_DTYPE, False)
        if ACT != 0:
            acc = _activation(acc, offs_o, act_lo, act_hi, ACT, False)
        if ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=ymask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def w4a4_gemm_tm_kernel(
    w_ptr, stride_wo, ws_ptr, stride_wso, wk_ptr, stride_wko, q_ptr, stride_qn, xs_ptr, stride_xsn,
    c_ptr, stride_cn, stride_cr, up_ptr, stride_uo, stride_ur, bias_ptr, zk_ptr, stride_zkn,
    shi_ptr, slo_ptr, stride_so, y_ptr, stride_yn,
    n, o, r, G, N_KEY, act_lo, act_hi,
    BO: tl.constexpr, BT: tl.constexpr, GS: tl.constexpr, R_BLK: tl.constexpr, GROUP_T: tl.constexpr,
    FMT_C: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, DEBUG_INT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, W_INT8: tl.constexpr, SIMD: tl.constexpr, ASYM: tl.constexpr, GC: tl.constexpr,
    ACT: tl.constexpr = 0,
):
    """Token-major tile acc[BT, BO] = X_tile · W_tileᵀ (the arguments of ``w4a4_gemm_kernel``, no
    K split): the activation codes are the MMA's first operand (loaded from memory, pipelined) and the
    unpacked weight tile its second, which Hopper's wgmma reads from shared memory, so the unpack
    of a group is not tied to a register operand that the MMA must finish with first (the swap-AB
    kernel's ``wait 0`` after every group). Needs BT ≥ 64 token rows per tile: the large-token path."""
    HALF: tl.constexpr = GS // 2
    # grouped ordering: GROUP_T token tiles share one sweep over the weight tiles (L2 reuse of W)
    pid_t, pid_o = _grouped_tile(tl.program_id(0), tl.cdiv(n, BT), tl.cdiv(o, BO), GROUP_T)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_o = pid_o * BO + tl.arange(0, BO)
    tmask = offs_t < n
    omask = offs_o < o
    j = tl.arange(0, HALF)

    acc_i = tl.zeros((BT, BO), dtype=tl.int32)
    acc = tl.zeros((BT, BO), dtype=tl.float32)
    for g in tl.range(0, G):
        lo, hi = _weight_operand(w_ptr, stride_wo, wk_ptr, stride_wko, offs_o, omask, g, GS, FMT_C, W_INT8, SIMD)
        xlo = tl.load(q_ptr + offs_t[:, None] * stride_qn + (g * GS + j)[None, :], mask=tmask[:, None], other=0)
        xhi = tl.load(q_ptr + offs_t[:, None] * stride_qn + (g * GS + HALF + j)[None, :], mask=tmask[:, None],
                      other=0)
        if FMT_C or DEBUG_INT:
            acc_i = tl.dot(xlo, tl.trans(lo.to(tl.int8)), acc_i, out_dtype=tl.int32)
            acc_i = tl.dot(xhi, tl.trans(hi.to(tl.int8)), acc_i, out_dtype=tl.int32)
        else:
            part = tl.dot(xlo, tl.trans(lo.to(tl.int8)), out_dtype=tl.int32)
            part = tl.dot(xhi, tl.trans(hi.to(tl.int8)), part, out_dtype=tl.int32)
            ws = tl.load(ws_ptr + offs_o * stride_wso + g, mask=omask, other=0.0).to(tl.float32)
            xs = tl.load(xs_ptr + offs_t * stride_xsn + g, mask=tmask, other=0.0)
            acc += part.to(tl.float32) * xs[:, None] * ws[None, :]

    if ASYM:  # the zero-point term, with the operands' roles of the token-major tile
        acc_i = _subtract_zero_point_term(acc_i, zk_ptr, stride_zkn, shi_ptr, slo_ptr, stride_so, offs_o, omask,
                                          offs_t, tmask, G, GC, True)
    y_ptrs = y_ptr + offs_t[:, None] * stride_yn + offs_o[None, :]
    ymask = tmask[:, None] & omask[None, :]
    if DEBUG_INT:
        tl.store(y_ptrs, acc_i, mask=ymask)
    else:
        if FMT_C:
            ws = tl.load(ws_ptr + offs_o * stride_wso, mask=omask, other=0.0).to(tl.float32)
            xs = tl.load(xs_ptr + offs_t * stride_xsn, mask=tmask, other=0.0)
            acc = acc_i.to(tl.float32) * xs[:, None] * ws[None, :]
        acc = _add_branch_and_bias(acc, offs_o, omask, offs_t, tmask, c_ptr, stride_cn, stride_cr, up_ptr, stride_uo,
                                   stride_ur, bias_ptr, r, R_BLK, HAS_LR, HAS_BIAS, DOT_DTYPE, True)
        if ACT != 0:
            acc = _activation(acc, offs_o, act_lo, act_hi, ACT, True)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


GEMM_LAYOUTS = ("swap", "token", "gluon", "tma", "ws")
TOKEN_MAJOR_MIN_TOKENS = 128  # the token-major tile needs ≥ 64 rows per MMA; below, few tiles anyway


def gemm_layout(n: int, layout: str | None = None) -> str:
    """"swap" (weights on the MMA's M side, any token count; the fastest measured), "token"
    (``w4a4_gemm_tm_kernel``: weights as the shared-memory operand, n ≥ 128 tokens) or "gluon"
    (``gluon_gemm.gluon_w4a4_gemm``: asynchronous int8 wgmma, n ≥ 128, symmetric format C with packed
    weights; other layers keep the swap kernel) or "tma" (``gluon_gemm.gluon_tma_w4a4_gemm``: the same
    with TMA-fed stages, n ≥ 128, symmetric format C, packed or cached int8 weights) or "ws" (its
    warp-specialized form, packed weights). ``layout=None`` reads ``DIROTQ_GEMM_LAYOUT`` (default swap: on
    the H200 the token-major GEMM was 1.3× and the Gluon one 1.7–1.8× slower; tma and ws are not yet
    timed)."""
    layout = layout or os.environ.get("DIROTQ_GEMM_LAYOUT", "swap")
    if layout not in GEMM_LAYOUTS:
        raise ValueError(f"DIROTQ_GEMM_LAYOUT must be one of {', '.join(GEMM_LAYOUTS)}, got {layout!r}")
    return layout if layout != "swap" and n >= TOKEN_MAJOR_MIN_TOKENS else "swap"


def _gluon_covers(plan, act: dict) -> bool:
    """Whether the Gluon GEMM takes this call: symmetric format C, packed weights, a CUDA tensor, a
    16-bit branch (the branch is a bf16/fp16 wgmma there)."""
    return plan.w_int8 is None and _tma_covers(plan, act)


def _tma_covers(plan, act: dict) -> bool:
    """Whether the TMA-fed Gluon GEMM takes this call: symmetric format C (packed or cached int8
    weights), a CUDA tensor, a 16-bit branch."""
    import torch

    lr_ok = not (plan.has_down and plan.r > 0) or act["c"].dtype in (torch.bfloat16, torch.float16)
    return (plan.fmt == "int_ratio" and act.get("zero") is None and lr_ok and act["codes"].is_cuda
            and not _interpreting())


def _tm_configs():
    return [triton.Config({"BT": bt, "BO": bo, "GROUP_T": 8}, num_warps=w, num_stages=s)
            for bt, bo, w, s in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 4),
                                 (64, 256, 4, 3), (256, 128, 8, 3))]


_TUNED_TM = None


def _tuned_tm_kernel():
    global _TUNED_TM
    if _TUNED_TM is None:
        _TUNED_TM = triton.autotune(configs=_tm_configs(),
                                    key=["N_KEY", "o", "G", "r", "FMT_C", "HAS_LR", "W_INT8", "SIMD", "ASYM"],
                                    cache_results=True)(w4a4_gemm_tm_kernel)
    return _TUNED_TM


def _configs():
    """A short list (each config is a compile per shape): swap-AB tiles, weights on the M side."""
    cfgs = [triton.Config({"BO": 32, "BT": 16, "GROUP_O": 8}, num_warps=4, num_stages=4),
            triton.Config({"BO": 64, "BT": 16, "GROUP_O": 8}, num_warps=4, num_stages=4),
            triton.Config({"BO": 128, "BT": 16, "GROUP_O": 8}, num_warps=4, num_stages=4)]
    for bo, bt, warps, stages in ((64, 64, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (128, 128, 4, 4),
                                  (128, 256, 8, 3), (256, 128, 8, 3)):
        cfgs.append(triton.Config({"BO": bo, "BT": bt, "GROUP_O": 8}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Token tiles no larger than needed (≤ 16 tokens: BT = 16 only)."""
    n = named_args["N_KEY"]
    keep = [c for c in configs if c.kwargs["BT"] <= max(16, n)]
    return keep or configs[:1]


_TUNED = None


def _tuned_kernel():
    global _TUNED
    if _TUNED is None:
        # no ATOMIC in the key: it is SPLIT > 1
        _TUNED = triton.autotune(configs=_configs(),
                                 key=["N_KEY", "o", "G", "r", "SPLIT", "FMT_C", "HAS_LR", "W_INT8", "SIMD"],
                                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["y_ptr"],
                                 cache_results=True)(w4a4_gemm_kernel)
    return _TUNED


def _n_key(n: int) -> int:
    """Token-count bucket for autotuning (one tuning per power of two, ≥ 16)."""
    return _pow2_at_least(n)


def simd_self_check(module) -> bool:
    """Once per process and format, on the first GPU layer: the SIMD unpack must reproduce the
    pure-tl twin byte for byte on this layer's weights, else it is switched off with a warning.
    Runs when the layer's plan is built (a host sync: do one eager call before CUDA-graph capture)."""
    fmt_c = getattr(module, "weight_ratio", None) is not None
    if not simd_unpack_enabled() or fmt_c in _SIMD_OK:
        return _SIMD_OK.get(fmt_c, True)
    import torch

    ok = bool(torch.equal(unpack_weights(module, simd=True), unpack_weights(module, simd=False)))
    _SIMD_OK[fmt_c] = ok
    if not ok:
        import warnings

        warnings.warn(f"dirotq kernels: the SIMD INT4 unpack disagrees with its reference on this GPU "
                      f"(format {'C' if fmt_c else 'A'}); using the pure-tl unpack", RuntimeWarning, stacklevel=2)
    return ok


SPLIT_K_MAX_TOKENS = 64  # split K only where tokens alone leave the GPU idle
SPLIT_K_TARGET_PROGRAMS = 264  # ≈ 2 per SM on a 132-SM H100


def split_k(n: int, o: int, groups: int) -> int:
    """K splits for the GEMM: at ≤ 64 tokens the output has few tiles (16 tokens × 3072 outputs are
    48 tiles of 64 × 16 for 132 SMs), so K is cut into splits that add fp32 partials atomically;
    each split keeps ≥ 2 groups."""
    if n > SPLIT_K_MAX_TOKENS or groups < 4:
        return 1
    tiles = cdiv(o, 64) * cdiv(n, 16)
    return max(1, min(groups // 2, cdiv(SPLIT_K_TARGET_PROGRAMS, tiles)))


def launch_tiled(kernel, tuned, grid, args, meta: dict, config: dict | None, fixed: dict, autotune: bool) -> None:
    """Launch ``kernel`` on ``grid(tiles)`` (a function of the tile sizes) with a fixed tile config
    (``config`` if given, else ``fixed``, with ``num_warps`` / ``num_stages`` defaults) under the
    interpreter, when ``config`` is given or ``autotune`` is off; otherwise through the autotuned
    ``tuned()``. The launcher shared by the W4A4 (both layouts) and W4A16 GEMMs."""
    if config is not None or _interpreting() or not autotune:
        cfg = dict(fixed if config is None else config)
        warps = cfg.pop("num_warps", 4)
        stages = cfg.pop("num_stages", 1 if _interpreting() else 3)
        kernel[grid(cfg)](*args, **meta, **cfg, num_warps=warps, num_stages=stages)
    else:
        tuned()[grid](*args, **meta)


def w4a4_gemm(module, plan, act: dict, out_dtype, debug_int: bool = False, config: dict | None = None,
              simd: bool | None = None, split: int | None = None, layout: str | None = None,
              activation: ActivationSpec = None):
    """y (n, o) = dequant(codes) · dequant(W_q)ᵀ + c · upᵀ + bias; ``act`` from
    ``quantize_activations``. ``debug_int``: the int32 sums instead (no scales, branch or bias).
    ``simd``: force the SIMD unpack on/off (default :func:`simd_unpack_enabled`); ``split``: force the
    number of K splits (default :func:`split_k`; swap-AB only). Asymmetric activations (``act["zero"]``,
    format C): the zero-point term is subtracted in the epilogue (``debug_int``: the corrected int32
    sums). ``layout``: "swap", "token", "gluon", "tma" or "ws" (:func:`gemm_layout`; all but swap need
    n ≥ 128; gluon and ws cover symmetric format C with packed weights on a GPU, tma symmetric format C
    with packed or cached int8 weights; anything else runs the swap kernel). ``activation``:
    ``(kind, start, stop)`` (``dirotq.activations``) on those output columns, in the GEMM's epilogue
    before the output is rounded; with K splits the fp32 sum of the partials takes it after the
    kernel. Ignored with ``debug_int``."""
    import torch

    n = act["codes"].shape[0]
    o = plan.o
    dev = act["codes"].device
    if debug_int:
        activation = None
    chosen = gemm_layout(n, layout)
    if chosen == "gluon" and _gluon_covers(plan, act):
        from .gluon_gemm import gluon_core_int32, gluon_w4a4_gemm

        return (gluon_core_int32(module, plan, act) if debug_int
                else gluon_w4a4_gemm(module, plan, act, out_dtype, activation=activation))
    if chosen == "ws" and _gluon_covers(plan, act):
        from .gluon_gemm import gluon_ws_core_int32, gluon_ws_w4a4_gemm

        return (gluon_ws_core_int32(module, plan, act) if debug_int
                else gluon_ws_w4a4_gemm(module, plan, act, out_dtype, activation=activation))
    if chosen == "tma" and _tma_covers(plan, act):
        from .gluon_gemm import gluon_tma_core_int32, gluon_tma_w4a4_gemm

        return (gluon_tma_core_int32(module, plan, act) if debug_int
                else gluon_tma_w4a4_gemm(module, plan, act, out_dtype, activation=activation))
    token_major = chosen == "token"
    split = 1 if token_major else (split_k(n, o, plan.groups) if split is None
                                   else max(1, min(int(split), plan.groups)))
    acc_dtype = torch.int32 if debug_int else (out_dtype if split == 1 else torch.float32)
    y = (torch.empty if split == 1 else torch.zeros)((n, o), dtype=acc_dtype, device=dev)
    if n == 0 or o == 0:
        return y if debug_int else y.to(out_dtype)
    fmt_c = plan.fmt == "int_ratio"
    dummy = plan.dummy
    c = act["c"]
    has_lr = plan.has_down and plan.r > 0 and not debug_int
    up = module.up if has_lr else dummy
    wr = getattr(module, "weight_ratio", None) if fmt_c else None
    w_int8 = plan.w_int8
    wop = w_int8 if w_int8 is not None else module.weight_packed
    args = (
        wop, wop.stride(0),
        module.weight_scale, module.weight_scale.stride(0),
        wr if wr is not None else dummy, wr.stride(0) if wr is not None else 0,
        act["codes"], act["codes"].stride(0),
        act["scale"], act["scale"].stride(0),
        c if has_lr else dummy, c.stride(0) if has_lr else 0, c.stride(1) if has_lr else 0,
        up, up.stride(0) if has_lr else 0, up.stride(1) if has_lr else 0,
        module.bias if plan.has_bias else dummy,
        *_asymmetric_args(module, plan, act),
        y, y.stride(0),
        n, o, plan.r, plan.groups, split, _n_key(n), *(activation[1:] if activation is not None else (0, 0)),
    )
    meta = dict(GS=plan.group_size, R_BLK=min(64, _pow2_at_least(plan.r)),
                FMT_C=fmt_c, HAS_LR=has_lr, HAS_BIAS=plan.has_bias and not debug_int, DEBUG_INT=debug_int,
                DOT_DTYPE=_dot_dtype(c.dtype if has_lr else out_dtype if out_dtype != torch.int32 else torch.float32),
                W_INT8=w_int8 is not None, SIMD=simd_unpack_enabled(fmt_c) if simd is None else bool(simd),
                ATOMIC=split > 1, ASYM=act.get("zero") is not None, GC=ZERO_TERM_GROUPS,
                ACT=KERNEL_CODES[activation[0]] if activation is not None and split == 1 else 0)
    if token_major:
        tm_args = args[:-4] + args[-3:]  # the same arguments without the K-split count
        tm_meta = {k: v for k, v in meta.items() if k != "ATOMIC"}
        launch_tiled(w4a4_gemm_tm_kernel, _tuned_tm_kernel,
                     lambda m: (cdiv(n, m["BT"]) * cdiv(o, m["BO"]),),
                     tm_args, tm_meta, config, dict(BT=64, BO=32, GROUP_T=4), autotune_enabled(plan))
        return y if debug_int or y.dtype == out_dtype else y.to(out_dtype)
    launch_tiled(w4a4_gemm_kernel, _tuned_kernel, lambda m: (cdiv(o, m["BO"]) * cdiv(n, m["BT"]), split),
                 args, meta, config, dict(BO=32, BT=16, GROUP_O=4), autotune_enabled(plan))
    if split > 1:  # the fp32 sum of the splits' partials: the activation after the last one
        y = apply_activation(y, activation)
    return y if debug_int or y.dtype == out_dtype else y.to(out_dtype)



ZERO_TERM_GROUPS = 32  # groups per int8 dot of the zero-point term (Hopper's int8 MMA takes K = 32)


def zero_point_sums(module, plan):
    """(−S_hi, −S_lo), int8 (o, G) each, with S = 128·S_hi + S_lo the per-output, per-group sum of the
    weight operand k_w·q_w over the group: the weight side of the zero-point term (|S| ≤ 64·120, so
    S_hi ∈ [−60, 60], S_lo ∈ [0, 127]), negated so the kernel subtracts by accumulating. Cached on the
    module as a plain attribute, rebuilt when the plan changes (one eager call before CUDA-graph
    capture builds it)."""
    import torch

    cached = getattr(module, "_kernel_zero_sums", None)
    if cached is not None and cached[0] is plan:
        return cached[1]
    wc = plan.w_int8 if plan.w_int8 is not None else unpack_weights(module)
    sums = wc.view(wc.shape[0], plan.groups, plan.group_size).sum(-1, dtype=torch.int32)
    split = ((-torch.div(sums, 128, rounding_mode="floor")).to(torch.int8).contiguous(),
             (-torch.remainder(sums, 128)).to(torch.int8).contiguous())
    module._kernel_zero_sums = (plan, split)
    return split


def _asymmetric_args(module, plan, act: dict) -> tuple:
    """The kernel's zero-point arguments: (zk, its row stride, S_hi, S_lo, their row stride), dummies
    for symmetric activations."""
    zk = act.get("zero")
    if zk is None:
        return (plan.dummy, 0, plan.dummy, plan.dummy, 0)
    s_hi, s_lo = zero_point_sums(module, plan)
    return (zk, zk.stride(0), s_hi, s_lo, s_hi.stride(0))


# --- test hook: what the register operand holds -------------------------------------------------
@triton.jit
def _unpack_kernel(w_ptr, stride_wo, wk_ptr, stride_wko, out_ptr, stride_out, o, G,
                   BO: tl.constexpr, GS: tl.constexpr, FMT_C: tl.constexpr, SIMD: tl.constexpr):
    HALF: tl.constexpr = GS // 2
    offs_o = tl.program_id(0) * BO + tl.arange(0, BO)
    omask = offs_o < o
    j = tl.arange(0, HALF)
    for g in range(0, G):
        lo, hi = _weight_operand(w_ptr, stride_wo, wk_ptr, stride_wko, offs_o, omask, g, GS, FMT_C, False, SIMD)
        base = out_ptr + offs_o[:, None] * stride_out + g * GS
        tl.store(base + j[None, :], lo.to(tl.int8), mask=omask[:, None])
        tl.store(base + HALF + j[None, :], hi.to(tl.int8), mask=omask[:, None])


def unpack_weights(module, simd: bool | None = None):
    """(o, d_pad) int8: q [A] or k·q [C], exactly as the GEMM forms its weight operand
    (``simd``: the SIMD unpack, default on GPUs; the pure-tl twin otherwise)."""
    import torch

    wp = module.weight_packed
    o, g = wp.shape[0], module.group_size
    G = wp.shape[1] * 2 // g
    out = torch.empty((o, G * g), dtype=torch.int8, device=wp.device)
    wr = getattr(module, "weight_ratio", None)
    _unpack_kernel[(cdiv(o, 16),)](wp, wp.stride(0), wr if wr is not None else out,
                                   wr.stride(0) if wr is not None else 0, out, out.stride(0), o, G,
                                   BO=16, GS=g, FMT_C=wr is not None,
                                   SIMD=simd_unpack_enabled(wr is not None) if simd is None else bool(simd))
    return out
