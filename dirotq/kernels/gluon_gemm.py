"""Format C's W4A4 GEMM in Gluon, with asynchronous int8 wgmma (the Hopper speed paths under test).

Triton 3.9 issues every int8 wgmma synchronously (``aot_check``'s probe: ``wait_group 0`` after each
MMA, while the same FP8 GEMM keeps one in flight), so our Triton GEMMs cannot overlap a group's MMAs
with the next group's INT4 unpack. Gluon, Triton's lower-level dialect, lets the kernel say so
itself. Three kernels, one shared epilogue (``_epilogue``: y = acc·s_x[t]·s_w[o] + c·upᵀ + bias, the
16-bit branch as a bf16/fp16 wgmma):

- ``gluon_gemm_kernel`` (``DIROTQ_GEMM_LAYOUT=gluon``): NBUF shared-memory buffers per operand filled
  from registers, ``warpgroup_mma(..., is_async=True)`` and ``warpgroup_mma_wait(2·(NBUF − 1))``, so
  the MMAs of the last NBUF − 1 groups run while this group's weights are unpacked (k_w·q_w, as the
  Triton kernels form them). Measured on the H200: 1.7–1.8× slower than the Triton GEMM (its loads
  are synchronous).
- ``gluon_tma_gemm_kernel`` (``tma``): the operands arrive by TMA into a ring of mbarrier stages
  several groups ahead of the MMAs; packed or cached int8 weights.
- ``gluon_ws_gemm_kernel`` (``ws``): the same ring handed between a TMA warp, unpack warps and the
  MMA warps (warp specialization).

Entry points per kernel: ``*_core_int32`` (the int32 sums Σ_g codes·(k_w·q_w)ᵀ, what the Triton
kernels' ``debug_int`` mode returns for symmetric format C) and ``*_w4a4_gemm`` (what ``w4a4_gemm``
returns for that layout). Gluon has no interpreter, so none of this runs on the CPU: ``aot_check``
compiles every config for sm_90a, a CPU test checks the launch wrappers against the kernels'
parameters, and the CUDA tests compare them with the Triton kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)

from ..activations import KERNEL_CODES
from .host_ints import cdiv
from .simd_unpack import ASM_HI_C, ASM_LO_C, simd_unpack_enabled

BT, BO, NBUF, NUM_WARPS = 128, 128, 2, 4  # compiled for sm_90a: 210 registers (224 with 3 buffers), no spills
# the TMA load under its name in this Triton: ``async_copy_global_to_shared`` in 3.6 (the GPU image's),
# ``async_load`` since (3.9 raises on the old name)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# the SIMD INT4 unpack of format C (four bytes per 32-bit PTX sequence), as the Triton GEMM runs it
_ASM_LO_C = gl.constexpr(ASM_LO_C)
_ASM_HI_C = gl.constexpr(ASM_HI_C)
PREFETCH = False  # load group g + 1's operands before group g's unpack (timed against False on the GPU)
GLUON_MIN_TOKENS = 128  # one token tile; fewer tokens leave most of each MMA idle (the swap-AB kernel fits)


@gluon.jit
def _load_group(g, G, w_ptr, stride_wo, wk_ptr, stride_wko, q_ptr, stride_qn, offs_o, offs_t, j, omask, tmask,
                HALF: gl.constexpr):
    """Group g's raw operands (all masked off past the last group): packed weight bytes (BO, 32), the
    multipliers (BO,), the activation codes' low and high halves (BT, 32) each."""
    live = g < G
    p = gl.load(w_ptr + offs_o[:, None] * stride_wo + (g * HALF + j)[None, :], mask=omask[:, None] & live, other=0)
    k = gl.load(wk_ptr + offs_o * stride_wko + g, mask=omask & live, other=0)
    xl = gl.load(q_ptr + offs_t[:, None] * stride_qn + (g * 2 * HALF + j)[None, :], mask=tmask[:, None] & live,
                 other=0)
    xh = gl.load(q_ptr + offs_t[:, None] * stride_qn + (g * 2 * HALF + HALF + j)[None, :],
                 mask=tmask[:, None] & live, other=0)
    return p, k, xl, xh


@gluon.jit
def _unpack_kq(p, k, SIMD: gl.constexpr):
    """Format C's int8 weight operand k·q of packed bytes ``p`` (BO, 32) with multipliers ``k`` (BO,):
    the low and high nibbles' halves, four bytes per 32-bit PTX sequence (SIMD) or per value."""
    if SIMD:
        kb = gl.broadcast(k[:, None], p)[0]
        lo = gl.inline_asm_elementwise(_ASM_LO_C, "=r,r,r", [p, kb], dtype=gl.int8, is_pure=True, pack=4)
        hi = gl.inline_asm_elementwise(_ASM_HI_C, "=r,r,r", [p, kb], dtype=gl.int8, is_pure=True, pack=4)
    else:
        pi = p.to(gl.int32)
        ki = k.to(gl.int32)
        lo = ((((pi & 15) ^ 8) - 8) * ki[:, None]).to(gl.int8)
        hi = (((((pi >> 4) & 15) ^ 8) - 8) * ki[:, None]).to(gl.int8)
    return lo, hi


@gluon.jit
def _epilogue(acc, t0, o0, y_ptr, stride_yn, ws_ptr, stride_wso, xs_ptr, stride_xsn, c_ptr, stride_cn, stride_cr,
              up_ptr, stride_uo, stride_ur, bias_ptr, n, o, r, act_lo, act_hi,
              BT: gl.constexpr, BO: gl.constexpr, R_BLK: gl.constexpr, INT_OUT: gl.constexpr, HAS_LR: gl.constexpr,
              HAS_BIAS: gl.constexpr, ACT: gl.constexpr):
    """Store the tile [t0, t0 + BT) × [o0, o0 + BO): the int32 sums ``acc`` (INT_OUT), or
    acc·s_x·s_w + c·upᵀ (a 16-bit wgmma over r in chunks of R_BLK) + bias in y's dtype, with GELU on
    output columns [act_lo, act_hi) when ACT is 1 (erf form) or 2 (tanh form, as x·σ(2u); the Triton
    GEMMs' ``_activation``)."""
    num_warps: gl.constexpr = gl.num_warps()
    out_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    ot = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, out_l))
    oo = o0 + gl.arange(0, BO, layout=gl.SliceLayout(0, out_l))
    ymask = (ot[:, None] < n) & (oo[None, :] < o)
    if INT_OUT:
        gl.store(y_ptr + ot[:, None] * stride_yn + oo[None, :], gl.convert_layout(acc, out_l), mask=ymask)
    else:
        # the 16-bit branch's accumulator: a K = 16 wgmma layout (same registers per (t, o) as acc_l)
        f_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BO, 16])
        at = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, f_l))
        ao = o0 + gl.arange(0, BO, layout=gl.SliceLayout(0, f_l))
        xs = gl.load(xs_ptr + at * stride_xsn, mask=at < n, other=0.0)
        ws = gl.load(ws_ptr + ao * stride_wso, mask=ao < o, other=0.0).to(gl.float32)
        accf = gl.convert_layout(acc, f_l).to(gl.float32) * xs[:, None] * ws[None, :]
        if HAS_LR:
            c_dtype: gl.constexpr = c_ptr.dtype.element_ty
            c_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, R_BLK], c_dtype)
            u_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BO, R_BLK], c_dtype)
            c_s = gl.allocate_shared_memory(c_dtype, [BT, R_BLK], c_sl)
            u_s = gl.allocate_shared_memory(c_dtype, [BO, R_BLK], u_sl)
            rl: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
            ct = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, rl))
            co = o0 + gl.arange(0, BO, layout=gl.SliceLayout(1, rl))
            for r0 in range(0, r, R_BLK):
                rc = r0 + gl.arange(0, R_BLK, layout=gl.SliceLayout(0, rl))
                cv = gl.load(c_ptr + ct[:, None] * stride_cn + rc[None, :] * stride_cr,
                             mask=(ct[:, None] < n) & (rc[None, :] < r), other=0.0)
                uv = gl.load(up_ptr + co[:, None] * stride_uo + rc[None, :] * stride_ur,
                             mask=(co[:, None] < o) & (rc[None, :] < r), other=0.0)
                c_s.store(cv)
                u_s.store(uv)
                fence_async_shared()
                accf = warpgroup_mma(c_s, u_s.permute((1, 0)), accf)
        if HAS_BIAS:
            b = gl.load(bias_ptr + ao, mask=ao < o, other=0.0).to(gl.float32)
            accf = accf + b[None, :]
        if ACT != 0:
            if ACT == 1:
                g = 0.5 * accf * (1.0 + gl.erf(accf * 0.7071067811865476))
            else:
                u = 0.7978845608028654 * (accf + 0.044715 * accf * accf * accf)
                g = accf / (1.0 + gl.exp(-gl.maximum(2.0 * u, -80.0)))  # exp never overflows
            on = (ao >= act_lo) & (ao < act_hi)
            accf = gl.where(on[None, :], g, accf)
        gl.store(y_ptr + ot[:, None] * stride_yn + oo[None, :],
                 gl.convert_layout(accf.to(y_ptr.dtype.element_ty), out_l), mask=ymask)


@gluon.jit
def gluon_gemm_kernel(w_ptr, stride_wo, wk_ptr, stride_wko, q_ptr, stride_qn, y_ptr, stride_yn,
                      ws_ptr, stride_wso, xs_ptr, stride_xsn, c_ptr, stride_cn, stride_cr, up_ptr, stride_uo,
                      stride_ur, bias_ptr, n, o, r, G, act_lo, act_hi,
                      BT: gl.constexpr, BO: gl.constexpr, NBUF: gl.constexpr, R_BLK: gl.constexpr,
                      INT_OUT: gl.constexpr, HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr, PREFETCH: gl.constexpr,
                      ACT: gl.constexpr = 0):
    """One (BT tokens, BO outputs) tile. acc int32 = Σ_g X_g·(k_w·q_w)_gᵀ, each 64-group two K = 32
    MMAs (the packed byte's low and high nibbles) issued asynchronously; then either the int32 sums
    (INT_OUT) or acc·s_x·s_w (+ c·upᵀ as a 16-bit wgmma, + bias) in y's dtype."""
    HALF: gl.constexpr = 32
    num_warps: gl.constexpr = gl.num_warps()
    ld: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [num_warps, 1], [1, 0])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BO, 32])
    sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2)
    offs_t = gl.program_id(0) * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, ld))
    offs_o = gl.program_id(1) * BO + gl.arange(0, BO, layout=gl.SliceLayout(1, ld))
    j = gl.arange(0, HALF, layout=gl.SliceLayout(0, ld))
    tmask = offs_t < n
    omask = offs_o < o
    x_lo = gl.allocate_shared_memory(gl.int8, [NBUF, BT, HALF], sl)
    x_hi = gl.allocate_shared_memory(gl.int8, [NBUF, BT, HALF], sl)
    w_lo = gl.allocate_shared_memory(gl.int8, [NBUF, BO, HALF], sl)
    w_hi = gl.allocate_shared_memory(gl.int8, [NBUF, BO, HALF], sl)
    acc = warpgroup_mma_init(gl.zeros([BT, BO], gl.int32, layout=acc_l))
    if PREFETCH:
        p_n, k_n, xl_n, xh_n = _load_group(0, G, w_ptr, stride_wo, wk_ptr, stride_wko, q_ptr, stride_qn, offs_o, offs_t,
                                           j, omask, tmask, HALF)
    for g in range(0, G):
        s = g % NBUF
        if PREFETCH:  # this group's operands came one iteration ago; the next group's loads go out now
            p, k, xl, xh = p_n, k_n, xl_n, xh_n
            p_n, k_n, xl_n, xh_n = _load_group(g + 1, G, w_ptr, stride_wo, wk_ptr, stride_wko, q_ptr, stride_qn,
                                               offs_o, offs_t, j, omask, tmask, HALF)
        else:  # this group's operands, in registers while the previous groups' MMAs run
            p, k, xl, xh = _load_group(g, G, w_ptr, stride_wo, wk_ptr, stride_wko, q_ptr, stride_qn, offs_o, offs_t,
                                       j, omask, tmask, HALF)
        lo, hi = _unpack_kq(p, k, False)
        # the two MMAs that read buffer s were issued NBUF groups ago: wait for them only
        acc = warpgroup_mma_wait(num_outstanding=2 * (NBUF - 1), deps=(acc,))
        w_lo.index(s).store(lo)
        w_hi.index(s).store(hi)
        x_lo.index(s).store(xl)
        x_hi.index(s).store(xh)
        fence_async_shared()
        acc = warpgroup_mma(x_lo.index(s), w_lo.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(x_hi.index(s), w_hi.index(s).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _epilogue(acc, gl.program_id(0) * BT, gl.program_id(1) * BO, y_ptr, stride_yn, ws_ptr, stride_wso, xs_ptr,
              stride_xsn, c_ptr, stride_cn, stride_cr, up_ptr, stride_uo, stride_ur, bias_ptr, n, o, r, act_lo, act_hi,
              BT, BO, R_BLK, INT_OUT, HAS_LR, HAS_BIAS, ACT)


@gluon.jit
def _tma_issue(g, G, t0, o0, x_desc, w_desc, x_lo, x_hi, w_a, w_b, bars, NS: gl.constexpr, W_INT8: gl.constexpr):
    """Start group g's TMA loads into stage g % NS (nothing past the last group): the activation
    codes' two K = 32 halves, and the weights: the packed bytes (BO, 32), or with cached int8 weights
    their two halves. All complete on the stage's barrier, which expects their bytes."""
    s = g % NS
    live = g < G
    bar = bars.index(s)
    if W_INT8:
        nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
    else:
        nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes
    mbarrier.expect(bar, nbytes, pred=live)
    _tma_load(x_desc, [t0, g * 64], bar, x_lo.index(s), pred=live)
    _tma_load(x_desc, [t0, g * 64 + 32], bar, x_hi.index(s), pred=live)
    if W_INT8:
        _tma_load(w_desc, [o0, g * 64], bar, w_a.index(s), pred=live)
        _tma_load(w_desc, [o0, g * 64 + 32], bar, w_b.index(s), pred=live)
    else:
        _tma_load(w_desc, [o0, g * 32], bar, w_a.index(s), pred=live)


@gluon.jit
def gluon_tma_gemm_kernel(x_desc, w_desc, wk_ptr, stride_wko, y_ptr, stride_yn,
                          ws_ptr, stride_wso, xs_ptr, stride_xsn, c_ptr, stride_cn, stride_cr, up_ptr, stride_uo,
                          stride_ur, bias_ptr, n, o, r, G, act_lo, act_hi,
                          BT: gl.constexpr, BO: gl.constexpr, NS: gl.constexpr, NBU: gl.constexpr,
                          R_BLK: gl.constexpr, INT_OUT: gl.constexpr, HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr,
                          W_INT8: gl.constexpr, SIMD: gl.constexpr, ACT: gl.constexpr = 0):
    """One (BT tokens, BO outputs) tile of symmetric format C, its operands brought by TMA.

    A ring of NS shared-memory stages, each filled by TMA for one 64-group (codes (BT, 2×32), packed
    weights (BO, 32) or cached int8 weights (BO, 2×32)) and completed on its own mbarrier, is kept
    NS − NBU groups ahead of the MMAs, so the loads' latency hides behind the MMAs of the groups
    before. Per group: wait for its stage, unpack k_w·q_w from the packed bytes into one of NBU
    shared-memory buffers (cached int8 weights go to the MMA straight from their stage), issue the
    two K = 32 int8 wgmmas asynchronously from shared memory (codes × weightsᵀ), and keep
    2·(NBU − 1) of them in flight: at group g, those of groups ≤ g − NBU have finished, which frees
    both the unpack buffer and the stage that group g + NS − NBU is loaded into. Then the epilogue
    of ``gluon_gemm_kernel``. SIMD: the unpack four bytes per 32-bit PTX sequence (the Triton GEMM's
    ``_ASM_*_C``), else per value."""
    HALF: gl.constexpr = 32
    num_warps: gl.constexpr = gl.num_warps()
    ld: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [num_warps, 1], [1, 0])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BO, 32])
    sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2)
    t0 = gl.program_id(0) * BT
    o0 = gl.program_id(1) * BO
    offs_o = o0 + gl.arange(0, BO, layout=gl.SliceLayout(1, ld))
    omask = offs_o < o
    x_lo = gl.allocate_shared_memory(gl.int8, [NS, BT, HALF], x_desc.layout)
    x_hi = gl.allocate_shared_memory(gl.int8, [NS, BT, HALF], x_desc.layout)
    if W_INT8:  # the weights' two halves, straight from TMA
        w_a = gl.allocate_shared_memory(gl.int8, [NS, BO, HALF], w_desc.layout)
        w_b = gl.allocate_shared_memory(gl.int8, [NS, BO, HALF], w_desc.layout)
    else:  # packed bytes from TMA (w_b unused), unpacked k·q halves in NBU buffers of their own
        w_a = gl.allocate_shared_memory(gl.uint8, [NS, BO, HALF], w_desc.layout)
        w_b = w_a
        u_lo = gl.allocate_shared_memory(gl.int8, [NBU, BO, HALF], sl)
        u_hi = gl.allocate_shared_memory(gl.int8, [NBU, BO, HALF], sl)
    bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NS):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(NS - NBU):
        _tma_issue(i, G, t0, o0, x_desc, w_desc, x_lo, x_hi, w_a, w_b, bars, NS, W_INT8)
    acc = warpgroup_mma_init(gl.zeros([BT, BO], gl.int32, layout=acc_l))
    if not W_INT8:
        k_next = gl.load(wk_ptr + offs_o * stride_wko, mask=omask & (G > 0), other=0)
    for g in range(0, G):
        s = g % NS
        mbarrier.wait(bars.index(s), (g // NS) & 1)
        if not W_INT8:
            k = k_next
            k_next = gl.load(wk_ptr + offs_o * stride_wko + g + 1, mask=omask & (g + 1 < G), other=0)
            lo, hi = _unpack_kq(w_a.index(s).load(ld), k, SIMD)
        # groups ≤ g − NBU are done: their unpack buffer and their stage may be written again
        acc = warpgroup_mma_wait(num_outstanding=2 * (NBU - 1), deps=(acc,))
        _tma_issue(g + NS - NBU, G, t0, o0, x_desc, w_desc, x_lo, x_hi, w_a, w_b, bars, NS, W_INT8)
        if W_INT8:
            acc = warpgroup_mma(x_lo.index(s), w_a.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(x_hi.index(s), w_b.index(s).permute((1, 0)), acc, is_async=True)
        else:
            u = g % NBU
            u_lo.index(u).store(lo)
            u_hi.index(u).store(hi)
            fence_async_shared()
            acc = warpgroup_mma(x_lo.index(s), u_lo.index(u).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(x_hi.index(s), u_hi.index(u).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(NS):
        mbarrier.invalidate(bars.index(i))
    _epilogue(acc, t0, o0, y_ptr, stride_yn, ws_ptr, stride_wso, xs_ptr, stride_xsn, c_ptr, stride_cn, stride_cr,
              up_ptr, stride_uo, stride_ur, bias_ptr, n, o, r, act_lo, act_hi, BT, BO, R_BLK, INT_OUT, HAS_LR,
              HAS_BIAS, ACT)


# --- warp-specialized form of the TMA GEMM ------------------------------------------------------
@gluon.jit
def _ws_load_partition(x_desc, w_desc, x_lo, x_hi, w_pk, loaded, empty, G, t0, o0, NS: gl.constexpr):
    """One warp: for each group, wait until its stage is free (the MMAs that read it have finished;
    mbarriers start with phase 1 complete, so the first pass waits for nothing), then start the TMA
    loads of the codes' halves and the packed weights, completing on ``loaded``."""
    for g in range(G):
        s = g % NS
        mbarrier.wait(empty.index(s), ((g // NS) & 1) ^ 1)
        _tma_issue(g, G, t0, o0, x_desc, w_desc, x_lo, x_hi, w_pk, w_pk, loaded, NS, False)


@gluon.jit
def _ws_unpack_partition(x_desc, w_desc, x_lo, x_hi, w_pk, u_lo, u_hi, loaded, ready, wk_ptr, stride_wko, o, G, o0,
                         NS: gl.constexpr, BO: gl.constexpr, SIMD: gl.constexpr):
    """Four warps: for each group, wait for its packed weights, form k_w·q_w (the SIMD unpack or per
    value) into the stage's unpack buffers, fence them for the tensor cores, and signal ``ready``."""
    ld: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
    offs_o = o0 + gl.arange(0, BO, layout=gl.SliceLayout(1, ld))
    omask = offs_o < o
    for g in range(G):
        s = g % NS
        k = gl.load(wk_ptr + offs_o * stride_wko + g, mask=omask, other=0)
        mbarrier.wait(loaded.index(s), (g // NS) & 1)
        lo, hi = _unpack_kq(w_pk.index(s).load(ld), k, SIMD)
        u_lo.index(s).store(lo)
        u_hi.index(s).store(hi)
        # orders the stores (for the MMAs) and the packed bytes' read (before the stage's next TMA load)
        fence_async_shared()
        mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _ws_mma_partition(x_lo, x_hi, u_lo, u_hi, ready, empty, G, BT: gl.constexpr, BO: gl.constexpr,
                      NS: gl.constexpr):
    """The default partition (one or two warpgroups): for each group, wait until its weights are
    unpacked, issue its two int8 wgmmas asynchronously, and once the previous group's MMAs have
    finished, free that group's stage. Returns (the int32 accumulator,)."""
    num_warps: gl.constexpr = gl.num_warps()
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BO, 32])
    acc = gl.zeros([BT, BO], gl.int32, layout=acc_l)  # the loop ends each trip with a wait: a plain tensor
    for g in range(G):
        s = g % NS
        mbarrier.wait(ready.index(s), (g // NS) & 1)
        acc = warpgroup_mma(x_lo.index(s), u_lo.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(x_hi.index(s), u_hi.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc,))  # group g − 1's two MMAs are done
        mbarrier.arrive(empty.index((g + NS - 1) % NS), count=1, pred=g > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return (acc,)  # a tuple: what warp_specialize hands back in Triton 3.6 and 3.9 alike


@gluon.jit
def gluon_ws_gemm_kernel(x_desc, w_desc, wk_ptr, stride_wko, y_ptr, stride_yn,
                         ws_ptr, stride_wso, xs_ptr, stride_xsn, c_ptr, stride_cn, stride_cr, up_ptr, stride_uo,
                         stride_ur, bias_ptr, n, o, r, G, act_lo, act_hi,
                         BT: gl.constexpr, BO: gl.constexpr, NS: gl.constexpr, R_BLK: gl.constexpr,
                         INT_OUT: gl.constexpr, HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr, SIMD: gl.constexpr,
                         UNPACK_REGS: gl.constexpr, ACT: gl.constexpr = 0):
    """``gluon_tma_gemm_kernel`` (packed weights) with warp specialization: a one-warp TMA partition, a
    four-warp unpack partition and the MMA warpgroup(s) run concurrently and hand each NS-deep stage
    on through three mbarriers (loaded → ready → empty), so the unpack of later groups overlaps the
    MMAs of earlier ones without the MMA warps issuing it. Then the shared epilogue."""
    HALF: gl.constexpr = 32
    sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2)
    t0 = gl.program_id(0) * BT
    o0 = gl.program_id(1) * BO
    x_lo = gl.allocate_shared_memory(gl.int8, [NS, BT, HALF], x_desc.layout)
    x_hi = gl.allocate_shared_memory(gl.int8, [NS, BT, HALF], x_desc.layout)
    w_pk = gl.allocate_shared_memory(gl.uint8, [NS, BO, HALF], w_desc.layout)
    u_lo = gl.allocate_shared_memory(gl.int8, [NS, BO, HALF], sl)
    u_hi = gl.allocate_shared_memory(gl.int8, [NS, BO, HALF], sl)
    loaded = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NS):
        mbarrier.init(loaded.index(i), count=1)
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    acc = gl.warp_specialize([
        (_ws_mma_partition, (x_lo, x_hi, u_lo, u_hi, ready, empty, G, BT, BO, NS)),
        (_ws_load_partition, (x_desc, w_desc, x_lo, x_hi, w_pk, loaded, empty, G, t0, o0, NS)),
        (_ws_unpack_partition, (x_desc, w_desc, x_lo, x_hi, w_pk, u_lo, u_hi, loaded, ready, wk_ptr, stride_wko, o,
                                G, o0, NS, BO, SIMD)),
    ], [1, 4], [24, UNPACK_REGS])[0]
    _epilogue(acc, t0, o0, y_ptr, stride_yn, ws_ptr, stride_wso, xs_ptr, stride_xsn, c_ptr, stride_cn, stride_cr,
              up_ptr, stride_uo, stride_ur, bias_ptr, n, o, r, act_lo, act_hi, BT, BO, R_BLK, INT_OUT, HAS_LR,
              HAS_BIAS, ACT)


def _check_covered(plan, act: dict, what: str = "the Gluon GEMM") -> None:
    if plan.fmt != "int_ratio" or act.get("zero") is not None or plan.w_int8 is not None:
        raise ValueError(f"{what} covers symmetric format C with packed INT4 weights only")


def _check_tma_covered(plan, act: dict) -> None:
    if plan.fmt != "int_ratio" or act.get("zero") is not None:
        raise ValueError("the Gluon TMA GEMM covers symmetric format C only")


def _epilogue_args(module, plan, act: dict, y, int_out: bool, activation=None) -> tuple[list, dict]:
    """What every Gluon GEMM passes its shared epilogue: the runtime arguments from ``y_ptr`` to
    ``act_hi`` (the output, scales, the 16-bit branch's c and up, bias, sizes, the activation's
    columns) and the epilogue's constexprs; ``activation``: ``(kind, start, stop)`` or None."""
    dummy = plan.dummy
    has_lr = not int_out and plan.has_down and plan.r > 0
    c = act["c"] if has_lr else dummy
    up = module.up if has_lr else dummy
    has_bias = not int_out and plan.has_bias
    ws, xs = module.weight_scale, act["scale"]
    args = [y, y.stride(0), ws, ws.stride(0), xs, xs.stride(0) if xs.dim() else 0,
            c, c.stride(0) if has_lr else 0, c.stride(1) if has_lr else 0,
            up, up.stride(0) if has_lr else 0, up.stride(1) if has_lr else 0,
            module.bias if has_bias else dummy, act["codes"].shape[0], plan.o, plan.r if has_lr else 0, plan.groups,
            *(activation[1:] if activation is not None and not int_out else (0, 0))]
    act_code = KERNEL_CODES[activation[0]] if activation is not None and not int_out else 0
    return args, dict(R_BLK=32 if plan.r <= 32 else 64, INT_OUT=int_out, HAS_LR=has_lr, HAS_BIAS=has_bias, ACT=act_code)


def _grid(act: dict, plan, bt: int, bo: int) -> tuple[int, int]:
    return cdiv(act["codes"].shape[0], bt), cdiv(plan.o, bo)


def _tma_descriptors(codes, weights, bt: int, bo: int) -> tuple:
    """Host TMA descriptors of the activation codes (boxes (bt, 32)) and the weights, packed or int8
    (boxes (bo, 32)); TMA zero-fills rows past n (tokens) and o (outputs), and every row stride is a
    multiple of 16 bytes."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    sl = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2)
    return TensorDescriptor.from_tensor(codes, [bt, 32], sl), TensorDescriptor.from_tensor(weights, [bo, 32], sl)


def _output(plan, act: dict, dtype, launch):
    """y (n, o) in ``dtype``, filled by ``launch(y)`` unless it is empty."""
    import torch

    y = torch.empty((act["codes"].shape[0], plan.o), dtype=dtype, device=act["codes"].device)
    if y.numel():
        launch(y)
    return y


def _launch(module, plan, act: dict, y, nbuf: int, int_out: bool, config: dict | None = None,
            activation=None) -> None:
    codes = act["codes"]
    cfg = {"BT": BT, "BO": BO, "num_warps": NUM_WARPS, "PREFETCH": PREFETCH, **(config or {})}
    wp, wr = module.weight_packed, module.weight_ratio
    tail, epi = _epilogue_args(module, plan, act, y, int_out, activation)
    gluon_gemm_kernel[_grid(act, plan, cfg["BT"], cfg["BO"])](
        wp, wp.stride(0), wr, wr.stride(0), codes, codes.stride(0), *tail,
        BT=cfg["BT"], BO=cfg["BO"], NBUF=int(nbuf), PREFETCH=bool(cfg["PREFETCH"]), **epi,
        num_warps=cfg["num_warps"])


def gluon_core_int32(module, plan, act: dict, nbuf: int = NBUF):
    """The int32 sums (n, o) of symmetric format C codes ``act["codes"]`` against the layer's packed
    weights (what ``w4a4_gemm(..., debug_int=True)`` returns for them). CUDA (Hopper) only.
    ``nbuf``: shared-memory buffers per operand (2 or 3: 2·(nbuf − 1) MMAs left in flight)."""
    import torch

    _check_covered(plan, act)
    return _output(plan, act, torch.int32, lambda y: _launch(module, plan, act, y, nbuf, int_out=True))


def gluon_w4a4_gemm(module, plan, act: dict, out_dtype, nbuf: int = NBUF, config: dict | None = None,
                    activation=None):
    """y (n, o) = s_x[t]·s_w[o]·Σ codes·(k_w·q_w)ᵀ + c·upᵀ + bias for symmetric format C, in
    ``out_dtype``: the result of ``w4a4_gemm`` for the same ``act``. CUDA (Hopper) only.
    ``config``: BT / BO / num_warps / PREFETCH overrides (BT = 256 wants num_warps = 8: two warpgroups).
    ``activation``: ``(kind, start, stop)`` (``dirotq.activations``) in the epilogue."""
    _check_covered(plan, act)
    return _output(plan, act, out_dtype, lambda y: _launch(module, plan, act, y, nbuf, int_out=False, config=config,
                                                           activation=activation))


# TMA kernel: 128×128 tiles, one warpgroup, 6 stages kept 4 groups ahead, 2 unpack buffers (88 KB of
# shared memory); 256×128 with two warpgroups is the other config bench_linear times. The SIMD unpack
# follows the Triton GEMM's switch (config "SIMD" overrides)
TMA_CONFIG = dict(BT=128, BO=128, NS=6, NBU=2, num_warps=4)


def _launch_tma(module, plan, act: dict, y, int_out: bool, config: dict | None = None, activation=None) -> None:
    cfg = {**TMA_CONFIG, **(config or {})}
    bt, bo = cfg["BT"], cfg["BO"]
    if cfg["NBU"] < 2 or cfg["NS"] <= cfg["NBU"]:
        raise ValueError(f"the TMA GEMM needs 2 ≤ NBU < NS, got NS={cfg['NS']}, NBU={cfg['NBU']}")
    w_int8 = plan.w_int8
    x_desc, w_desc = _tma_descriptors(act["codes"], w_int8 if w_int8 is not None else module.weight_packed, bt, bo)
    wr = module.weight_ratio
    tail, epi = _epilogue_args(module, plan, act, y, int_out, activation)
    gluon_tma_gemm_kernel[_grid(act, plan, bt, bo)](
        x_desc, w_desc, wr, wr.stride(0), *tail,
        BT=bt, BO=bo, NS=cfg["NS"], NBU=cfg["NBU"], W_INT8=w_int8 is not None,
        SIMD=bool(cfg.get("SIMD", simd_unpack_enabled(True))), **epi, num_warps=cfg["num_warps"])


def gluon_tma_core_int32(module, plan, act: dict, config: dict | None = None):
    """:func:`gluon_core_int32` by the TMA kernel (packed or, where the plan caches them, int8 weights)."""
    import torch

    _check_tma_covered(plan, act)
    return _output(plan, act, torch.int32, lambda y: _launch_tma(module, plan, act, y, int_out=True, config=config))


def gluon_tma_w4a4_gemm(module, plan, act: dict, out_dtype, config: dict | None = None, activation=None):
    """:func:`gluon_w4a4_gemm` by the TMA kernel: what ``w4a4_gemm`` returns for
    ``DIROTQ_GEMM_LAYOUT=tma``. ``config``: BT / BO / NS / NBU / num_warps overrides of
    ``TMA_CONFIG`` (BT = 256 wants num_warps = 8)."""
    _check_tma_covered(plan, act)
    return _output(plan, act, out_dtype, lambda y: _launch_tma(module, plan, act, y, int_out=False, config=config,
                                                               activation=activation))


# warp-specialized TMA kernel: 128×128 with one MMA warpgroup, 4 stages; the registers per thread the
# kernel starts with (maxnreg) and the unpack partition's share (the TMA warp gets 24, the MMA warps the rest)
WS_CONFIG = dict(BT=128, BO=128, NS=4, num_warps=4, maxnreg=168, UNPACK_REGS=80)


def _launch_ws(module, plan, act: dict, y, int_out: bool, config: dict | None = None, activation=None) -> None:
    cfg = {**WS_CONFIG, **(config or {})}
    bt, bo = cfg["BT"], cfg["BO"]
    x_desc, w_desc = _tma_descriptors(act["codes"], module.weight_packed, bt, bo)
    wr = module.weight_ratio
    tail, epi = _epilogue_args(module, plan, act, y, int_out, activation)
    gluon_ws_gemm_kernel[_grid(act, plan, bt, bo)](
        x_desc, w_desc, wr, wr.stride(0), *tail,
        BT=bt, BO=bo, NS=cfg["NS"], SIMD=bool(cfg.get("SIMD", simd_unpack_enabled(True))),
        UNPACK_REGS=cfg["UNPACK_REGS"], **epi, num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])


_WS = "the warp-specialized Gluon GEMM"


def gluon_ws_core_int32(module, plan, act: dict, config: dict | None = None):
    """:func:`gluon_core_int32` by the warp-specialized TMA kernel (packed weights)."""
    import torch

    _check_covered(plan, act, _WS)
    return _output(plan, act, torch.int32, lambda y: _launch_ws(module, plan, act, y, int_out=True, config=config))


def gluon_ws_w4a4_gemm(module, plan, act: dict, out_dtype, config: dict | None = None, activation=None):
    """:func:`gluon_w4a4_gemm` by the warp-specialized TMA kernel: what ``w4a4_gemm`` returns for
    ``DIROTQ_GEMM_LAYOUT=ws``. ``config``: BT / BO / NS / num_warps / maxnreg / UNPACK_REGS overrides of
    ``WS_CONFIG`` (BT = 256 wants num_warps = 8 and maxnreg = 128)."""
    _check_covered(plan, act, _WS)
    return _output(plan, act, out_dtype, lambda y: _launch_ws(module, plan, act, y, int_out=False, config=config,
                                                              activation=activation))

__all__ = ["gluon_gemm_kernel", "gluon_core_int32", "gluon_w4a4_gemm", "gluon_tma_gemm_kernel", "gluon_tma_core_int32",
           "gluon_tma_w4a4_gemm", "TMA_CONFIG", "gluon_ws_gemm_kernel", "gluon_ws_core_int32", "gluon_ws_w4a4_gemm",
           "WS_CONFIG", "BT", "BO", "NBUF", "NUM_WARPS", "PREFETCH",
           "GLUON_MIN_TOKENS"]
