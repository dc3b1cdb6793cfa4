"""The SIMD INT4 unpack shared by the Triton and Gluon GEMMs: its PTX sequences and the switch.

SIMD unpack (GPU only; the interpreter runs _unpack_halves, its pure-tl twin). Four packed bytes
per 32-bit register (pack=4); per byte, n = stored nibble, n ^ 8 = q + 8 ∈ [0, 15]:
  A: (q + 8) + 120 = q + 128 ∈ [120, 135], no carry between bytes; ^ 0x80 → q as int8.
  C: k·(q + 8) ≤ 225 < 256 (one u32 multiply, no carry); + (128 − 8k) per byte ∈ [8, 233]; ^ 0x80 → k·q.
Checked exhaustively on the integers (tests/test_kernels.py::test_simd_unpack_arithmetic).
"""

from __future__ import annotations

import os

from .act_quant import _interpreting

ASM_LO_A = """{ .reg .b32 t; and.b32 t, $1, 0x0F0F0F0F; xor.b32 t, t, 0x08080808; add.u32 t, t, 0x78787878;
 xor.b32 $0, t, 0x80808080; }"""
ASM_HI_A = """{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; xor.b32 t, t, 0x08080808;
 add.u32 t, t, 0x78787878; xor.b32 $0, t, 0x80808080; }"""
ASM_LO_C = """{ .reg .b32 t, k, b, c; and.b32 t, $1, 0x0F0F0F0F; xor.b32 t, t, 0x08080808; and.b32 k, $2, 0xFF;
 mul.lo.u32 t, t, k; mul.lo.u32 b, k, 0x08080808; mov.b32 c, 0x80808080; sub.u32 b, c, b; add.u32 t, t, b;
 xor.b32 $0, t, 0x80808080; }"""
ASM_HI_C = """{ .reg .b32 t, k, b, c; shr.u32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; xor.b32 t, t, 0x08080808;
 and.b32 k, $2, 0xFF; mul.lo.u32 t, t, k; mul.lo.u32 b, k, 0x08080808; mov.b32 c, 0x80808080; sub.u32 b, c, b;
 add.u32 t, t, b; xor.b32 $0, t, 0x80808080; }"""

_SIMD_OK: dict[bool, bool] = {}  # format C? -> the SIMD unpack matched its pure-tl twin on a real layer


def simd_unpack_enabled(fmt_c: bool | None = None) -> bool:
    """SIMD (inline-PTX) INT4 unpack: on by default on GPUs, never under the interpreter (which runs
    the pure-tl twin); ``DIROTQ_SIMD_UNPACK=0`` turns it off, and so does a failed self-check
    (``w4a4_gemm.simd_self_check``)."""
    if _interpreting() or os.environ.get("DIROTQ_SIMD_UNPACK", "1") == "0":
        return False
    return _SIMD_OK.get(fmt_c, True) if fmt_c is not None else True
