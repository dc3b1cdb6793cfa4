"""Weight-only INT4 / INT8 GEMM/GEMV (docs/KERNELS.md "Design"): layers whose activations stay
16-bit (PixArt-Σ ff.net.2, FLUX adaLN modulation, the conditioning linears kept at 8 bits by the
``w8a16`` kind; QuantLinear with ``act_bits=None``).

Same swap-AB tiling and packed layout as the W4A4 GEMM; the weight halves (INT4 unpacked, or the
stored INT8 codes of an 8-bit layer) are dequantized in registers, q · step with step = w_scale[o, g]
(A) or k[o, g] · s[o] (C) in fp32 (the same products as ``QuantizedTensor.dequantize``), cast to the
activation dtype and fed to a float ``tl.dot``.
Small token counts use BT = 16 and BO = 32..64 so enough programs stream the weights (the GEMV
regime is bound by reading 4-bit weights: 0.28 bytes per weight with scales).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .act_quant import _dot_dtype, _fdot, _pow2_at_least
from .host_ints import cdiv
from .tuning import autotune_enabled
from ..activations import KERNEL_CODES, ActivationSpec
from .w4a4_gemm import _activation, _add_branch_and_bias, _grouped_tile, _n_key, _prune, _unpack_halves, launch_tiled


@triton.jit
def w4a16_kernel(
    w_ptr, stride_wo, ws_ptr, stride_wso, wk_ptr, stride_wko,
    a_ptr, stride_an,  # activations (n, d_q) in their own dtype
    c_ptr, stride_cn, stride_cr, up_ptr, stride_uo, stride_ur, bias_ptr,
    y_ptr, stride_yn,
    n, o, d_q, r, G, N_KEY, act_lo, act_hi,
    BO: tl.constexpr, BT: tl.constexpr, GS: tl.constexpr, R_BLK: tl.constexpr, GROUP_O: tl.constexpr,
    FMT_C: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ACT: tl.constexpr = 0, W8: tl.constexpr = False,
):
    HALF: tl.constexpr = GS // 2
    pid_o, pid_t = _grouped_tile(tl.program_id(0), tl.cdiv(o, BO), tl.cdiv(n, BT), GROUP_O)
    offs_o = pid_o * BO + tl.arange(0, BO)
    offs_t = pid_t * BT + tl.arange(0, BT)
    omask = offs_o < o
    tmask = offs_t < n
    j = tl.arange(0, HALF)
    if FMT_C:
        s_row = tl.load(ws_ptr + offs_o * stride_wso, mask=omask, other=0.0).to(tl.float32)

    acc = tl.zeros((BO, BT), dtype=tl.float32)
    for g in tl.range(0, G):
        if W8:  # int8 codes (o, G·GS): the group's two halves are two plain loads
            w_tile = w_ptr + offs_o[:, None] * stride_wo + (g * GS + j)[None, :]
            lo = tl.load(w_tile, mask=omask[:, None], other=0).to(tl.int32)
            hi = tl.load(w_tile + HALF, mask=omask[:, None], other=0).to(tl.int32)
        else:
            lo, hi = _unpack_halves(w_ptr, stride_wo, offs_o, omask, g, HALF)
        if FMT_C:
            k = tl.load(wk_ptr + offs_o * stride_wko + g, mask=omask, other=0).to(tl.float32)
            step = k * s_row
        else:
            step = tl.load(ws_ptr + offs_o * stride_wso + g, mask=omask, other=0.0).to(tl.float32)
        wlo = lo.to(tl.float32) * step[:, None]
        whi = hi.to(tl.float32) * step[:, None]
        clo = g * GS + j
        chi = clo + HALF
        alo = tl.load(a_ptr + offs_t[None, :] * stride_an + clo[:, None], mask=tmask[None, :] & (clo[:, None] < d_q),
                      other=0.0)
        ahi = tl.load(a_ptr + offs_t[None, :] * stride_an + chi[:, None], mask=tmask[None, :] & (chi[:, None] < d_q),
                      other=0.0)
        acc += _fdot(wlo, alo, DOT_DTYPE)
        acc += _fdot(whi, ahi, DOT_DTYPE)

    acc = _add_branch_and_bias(acc, offs_o, omask, offs_t, tmask, c_ptr, stride_cn, stride_cr, up_ptr, stride_uo,
                               stride_ur, bias_ptr, r, R_BLK, HAS_LR, HAS_BIAS, DOT_DTYPE, False)
    if ACT != 0:
        acc = _activation(acc, offs_o, act_lo, act_hi, ACT, False)
    tl.store(y_ptr + offs_t[None, :] * stride_yn + offs_o[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=omask[:, None] & tmask[None, :])


def _configs():
    cfgs = [triton.Config({"BO": bo, "BT": 16, "GROUP_O": 8}, num_warps=4, num_stages=4) for bo in (32, 64, 128)]
    for bo, bt, warps, stages in ((64, 64, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3)):
        cfgs.append(triton.Config({"BO": bo, "BT": bt, "GROUP_O": 8}, num_warps=warps, num_stages=stages))
    return cfgs


_TUNED = None


def _tuned_kernel():
    global _TUNED
    if _TUNED is None:
        _TUNED = triton.autotune(configs=_configs(), key=["N_KEY", "o", "G", "r", "FMT_C", "HAS_LR", "W8"],
                                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)(w4a16_kernel)
    return _TUNED


def w4a16_gemm(module, plan, a, c, out_dtype, config: dict | None = None, activation: ActivationSpec = None):
    """y (n, o) = a · dequant(W_q)ᵀ + c · upᵀ + bias, a: (n, d_q) (16-bit or fp32), c: (n, r) or None;
    W_q the layer's INT4 (``weight_packed``) or INT8 (``weight_codes``) weights;
    ``activation`` (``dirotq.activations``) on its output columns in the epilogue."""
    import torch

    n, o = a.shape[0], plan.o
    y = torch.empty((n, o), dtype=out_dtype, device=a.device)
    if n == 0 or o == 0:
        return y
    fmt_c = plan.fmt == "int_ratio"
    dummy = plan.dummy
    has_lr = c is not None and plan.r > 0
    up = module.up if has_lr else dummy
    wr = getattr(module, "weight_ratio", None) if fmt_c else None
    w8 = plan.weight_bits == 8
    codes = module.weight_codes if w8 else module.weight_packed
    args = (
        codes, codes.stride(0),
        module.weight_scale, module.weight_scale.stride(0),
        wr if wr is not None else dummy, wr.stride(0) if wr is not None else 0,
        a, a.stride(0),
        c if has_lr else dummy, c.stride(0) if has_lr else 0, c.stride(1) if has_lr else 0,
        up, up.stride(0) if has_lr else 0, up.stride(1) if has_lr else 0,
        module.bias if plan.has_bias else dummy,
        y, y.stride(0),
        n, o, plan.d_q, plan.r, plan.groups, _n_key(n), *(activation[1:] if activation is not None else (0, 0)),
    )
    meta = dict(GS=plan.group_size, R_BLK=min(64, _pow2_at_least(plan.r)),
                FMT_C=fmt_c, HAS_LR=has_lr, HAS_BIAS=plan.has_bias, DOT_DTYPE=_dot_dtype(a.dtype),
                ACT=KERNEL_CODES[activation[0]] if activation is not None else 0, W8=w8)
    launch_tiled(w4a16_kernel, _tuned_kernel, lambda m: (cdiv(o, m["BO"]) * cdiv(n, m["BT"]),), args,
                 meta, config, dict(BO=32, BT=16, GROUP_O=4), autotune_enabled(plan))
    return y
