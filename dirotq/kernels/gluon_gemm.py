"""Format C's integer GEMM core in Gluon, with asynchronous int8 wgmma (an experiment for the GPU).

Triton 3.9 issues every int8 wgmma synchronously (``aot_check``'s probe: ``wait_group 0`` after each
MMA, while the same FP8 GEMM keeps one in flight), so our Triton GEMMs cannot overlap a group's MMAs
with the next group's INT4 unpack. Gluon, Triton's lower-level dialect, lets the kernel say so
itself: NBUF shared-memory buffers per operand, ``warpgroup_mma(..., is_async=True)`` and
``warpgroup_mma_wait(2·(NBUF − 1))``, so the two MMAs of each of the last NBUF − 1 groups run while
this group's weights are unpacked (k_w·q_w, as the Triton kernels form them) and stored.

Only the core: acc[t, o] = Σ_g codes[t, g]·(k_w·q_w)[o, g]ᵀ in int32, the integer sums the Triton
kernels' ``debug_int`` mode returns for symmetric format C, so the two can be compared exactly and
timed against each other (``benchmarks/bench_linear.py``); no scales, branch or bias yet. It cannot
run on the CPU (Gluon has no interpreter): ``aot_check`` compiles it for sm_90a, and a CUDA test
checks it against the Triton kernel.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)

BT, BO, NBUF, NUM_WARPS = 128, 128, 2, 4  # compiled for sm_90a: 210 registers (224 with 3 buffers), no spills


@gluon.jit
def gluon_core_kernel(w_ptr, stride_wo, wk_ptr, stride_wko, q_ptr, stride_qn, y_ptr, stride_yn, n, o, G,
                      BT: gl.constexpr, BO: gl.constexpr, NBUF: gl.constexpr):
    """acc[BT, BO] int32 = Σ_g X_g·(k_w·q_w)_gᵀ for one (token, output) tile; each 64-group is two
    K = 32 MMAs (the packed byte's low and high nibbles), issued asynchronously."""
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
    for g in range(0, G):
        s = g % NBUF
        # this group's operands, in registers while the previous groups' MMAs run
        p = gl.load(w_ptr + offs_o[:, None] * stride_wo + (g * HALF + j)[None, :], mask=omask[:, None],
                    other=0).to(gl.int32)
        k = gl.load(wk_ptr + offs_o * stride_wko + g, mask=omask, other=0).to(gl.int32)
        lo = ((((p & 15) ^ 8) - 8) * k[:, None]).to(gl.int8)
        hi = (((((p >> 4) & 15) ^ 8) - 8) * k[:, None]).to(gl.int8)
        xl = gl.load(q_ptr + offs_t[:, None] * stride_qn + (g * 64 + j)[None, :], mask=tmask[:, None], other=0)
        xh = gl.load(q_ptr + offs_t[:, None] * stride_qn + (g * 64 + HALF + j)[None, :], mask=tmask[:, None],
                     other=0)
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
    out_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    acc = gl.convert_layout(acc, out_l)
    ot = gl.program_id(0) * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, out_l))
    oo = gl.program_id(1) * BO + gl.arange(0, BO, layout=gl.SliceLayout(0, out_l))
    gl.store(y_ptr + ot[:, None] * stride_yn + oo[None, :], acc, mask=(ot[:, None] < n) & (oo[None, :] < o))


def gluon_core_int32(module, plan, act: dict, nbuf: int = NBUF):
    """The int32 sums (n, o) of symmetric format C codes ``act["codes"]`` against the layer's packed
    weights (what ``w4a4_gemm(..., debug_int=True)`` returns for them). CUDA (Hopper) only.
    ``nbuf``: shared-memory buffers per operand (2 or 3: 2·(nbuf − 1) MMAs left in flight)."""
    import torch

    if plan.fmt != "int_ratio" or act.get("zero") is not None or plan.w_int8 is not None:
        raise ValueError("the Gluon core covers symmetric format C with packed weights only")
    codes = act["codes"]
    n, o = codes.shape[0], plan.o
    y = torch.empty((n, o), dtype=torch.int32, device=codes.device)
    wp, wr = module.weight_packed, module.weight_ratio
    grid = (triton.cdiv(n, BT), triton.cdiv(o, BO))
    gluon_core_kernel[grid](wp, wp.stride(0), wr, wr.stride(0), codes, codes.stride(0), y, y.stride(0), n, o,
                            plan.groups, BT=BT, BO=BO, NBUF=int(nbuf), num_warps=NUM_WARPS)
    return y


__all__ = ["gluon_core_kernel", "gluon_core_int32", "BT", "BO", "NBUF", "NUM_WARPS"]
