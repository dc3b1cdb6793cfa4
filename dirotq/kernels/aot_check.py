"""Compile the kernels for a GPU target without a GPU (``python -m dirotq.kernels.aot_check``).

Triton lowers to PTX and the bundled ``ptxas`` assembles it for ``sm_90a`` on any machine, so a
CPU-only session can still check that every kernel variant compiles for Hopper, that the W4A4 GEMM
uses int8 ``wgmma`` with the weight as the register operand and cp.async pipelining, and how many
registers / spill bytes each tile config needs, which operand of each int8 wgmma comes from registers,
and which ``wgmma.wait_group`` depths the code uses (a probe line says whether Triton issues int8 and
FP8 MMAs asynchronously at all); for the activation kernel, the SASS instructions per value of its
loop over the groups (``nvdisasm``) and the programs per SM its registers allow. Integer arguments
get the divisibility-by-16 specialisation the JIT applies at launch for real shapes (strides d/2,
G·64, o are multiples of 16).
Must run in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces ``@triton.jit``).
Prints one JSON line per variant; exit status 1 if any variant failed to compile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

PTR_TYPES = {
    "gemm": {"w_ptr": "*u8", "ws_ptr": "*fp16", "wk_ptr": "*i8", "q_ptr": "*i8", "xs_ptr": "*fp32", "c_ptr": "*bf16",
             "up_ptr": "*bf16", "bias_ptr": "*bf16", "zk_ptr": "*i8", "shi_ptr": "*i8", "slo_ptr": "*i8",
             "y_ptr": "*bf16"},
    "act": {"x_ptr": "*bf16", "smooth_ptr": "*bf16", "down_ptr": "*bf16", "rot_ptr": "*bf16", "signs_ptr": "*bf16",
            "had_ptr": "*fp32", "c_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "k_ptr": "*i8", "z_ptr": "*i8",
            "m_ptr": "*fp32", "a_ptr": "*fp32"},
    "w4a16": {"w_ptr": "*u8", "ws_ptr": "*fp16", "wk_ptr": "*i8", "a_ptr": "*bf16", "c_ptr": "*bf16", "up_ptr": "*bf16",
              "bias_ptr": "*bf16", "y_ptr": "*bf16"},
}


# the activation kernel's options as the layer launches it: fixed-point units of 64-wide groups
# (quantizers.sse_unit(64)); format C's multiplier rule (K_RULE) follows the variant's ASYM in
# compile_variant, as activation_launch chooses it
ACT_RULE = dict(SSE_UNIT=1024.0, PREFETCH=False, R_ONE_CHUNK=True)


def default_variants():
    bf = tl.bfloat16
    out = []
    for fmt_c in (False, True):
        f = "C" if fmt_c else "A"
        for bo, bt, w, s in ((128, 128, 8, 3), (64, 16, 4, 4)):
            out.append((f"gemm {f} {bo}x{bt} w{w} s{s} packed+lr", "gemm",
                        dict(BO=bo, BT=bt, GS=64, R_BLK=32, GROUP_O=8, FMT_C=fmt_c, HAS_LR=True, HAS_BIAS=True,
                             DEBUG_INT=False, DOT_DTYPE=bf, W_INT8=False, SIMD=False, ATOMIC=False, ASYM=False, GC=32),
                        dict(num_warps=w, num_stages=s)))
            simd_name = f"gemm {f} {bo}x{bt} w{w} s{s} packed+lr simd-unpack" + (" split-k" if bt == 16 else "")
            out.append((simd_name, "gemm",
                        dict(BO=bo, BT=bt, GS=64, R_BLK=32, GROUP_O=8, FMT_C=fmt_c, HAS_LR=True, HAS_BIAS=True,
                             DEBUG_INT=False, DOT_DTYPE=bf, W_INT8=False, SIMD=True, ATOMIC=bt == 16, ASYM=False, GC=32),
                        dict(num_warps=w, num_stages=s)))
        out.append((f"gemm {f} 128x128 w8 s3 int8-weights", "gemm",
                     dict(BO=128, BT=128, GS=64, R_BLK=32, GROUP_O=8, FMT_C=fmt_c, HAS_LR=True, HAS_BIAS=True,
                          DEBUG_INT=False, DOT_DTYPE=bf, W_INT8=True, SIMD=False, ATOMIC=False, ASYM=False, GC=32),
                     dict(num_warps=8, num_stages=3)))
        for bt, bo, w, st, asym in ((128, 128, 8, 3, False), (128, 256, 8, 3, False), (128, 128, 8, 3, True)
                                    ) if fmt_c else ():  # token-major: weights in smem
            out.append((f"gemm_tm {f} {bt}x{bo} w{w} s{st} packed+lr simd-unpack" + (" asymmetric" if asym else ""),
                        "gemm_tm",
                        dict(BT=bt, BO=bo, GS=64, R_BLK=32, GROUP_T=8, FMT_C=fmt_c, HAS_LR=True, HAS_BIAS=True,
                             DEBUG_INT=False, DOT_DTYPE=bf, W_INT8=False, SIMD=True, ASYM=asym, GC=32),
                        dict(num_warps=w, num_stages=st)))
        if fmt_c:  # asymmetric activations: the zero-point term in the epilogue
            for bo, bt, w, s in ((128, 128, 8, 3), (64, 16, 4, 4)):
                out.append((f"gemm C {bo}x{bt} w{w} s{s} packed+lr simd-unpack asymmetric" + (" split-k" if bt == 16 else ""),
                            "gemm", dict(BO=bo, BT=bt, GS=64, R_BLK=32, GROUP_O=8, FMT_C=True, HAS_LR=True,
                                         HAS_BIAS=True, DEBUG_INT=False, DOT_DTYPE=bf, W_INT8=False, SIMD=True,
                                         ATOMIC=bt == 16, ASYM=True, GC=32), dict(num_warps=w, num_stages=s)))
        for rot, asym in ((False, False), (True, False)) + (((False, True),) if fmt_c else ()):
            name = f"act {f} {'dense-rotation' if rot else 'lowrank+hadamard'}{' asymmetric' if asym else ''} BT32"
            out.append((name, "act",
                        dict(BT=32, GS=64, BKD=64, RC=64, HAS_SMOOTH=False, PROJ=not rot, HAS_ROT=rot,
                             HAS_HAD=not rot, FMT_C=fmt_c, ASYM=asym, PASS=int(fmt_c), STORE_A=False, DOT_DTYPE=bf,
                             GB_MAX=256, C_IN_KERNEL=False, RP=16, **ACT_RULE), dict(num_warps=4)))
        # the tile the H200 run of 2026-11-28 measured fastest for both passes (bench_act_quant), also
        # with the next group's x tile loaded early (an autotuning choice); for format C's second pass
        # the autotuner's latency configs too: capped at 128 registers (two 8-warp programs per SM, not
        # one), and 64 values per thread (BT 256 × 8 warps, BT 128 × 4)
        tiles = [("BT128 w8", 128, False, dict(num_warps=8, num_stages=3)),
                 ("BT128 w8 prefetch", 128, True, dict(num_warps=8, num_stages=3)),
                 # the fastest second pass of the H200 run of revision 5 (2026-11-28, bench_act_quant)
                 ("BT64 w4 prefetch", 64, True, dict(num_warps=4, num_stages=3))]
        if fmt_c:
            tiles += [("BT128 w8 maxnreg128", 128, False, dict(num_warps=8, num_stages=3, maxnreg=128)),
                      ("BT256 w8", 256, False, dict(num_warps=8, num_stages=3)),
                      ("BT128 w4", 128, False, dict(num_warps=4, num_stages=3))]
        for name, bt, pf, opts in tiles:
            out.append((f"act {f} lowrank+hadamard {name}", "act",
                        dict(BT=bt, GS=64, BKD=64, RC=64, HAS_SMOOTH=False, PROJ=True, HAS_ROT=False, HAS_HAD=True,
                             FMT_C=fmt_c, ASYM=False, PASS=int(fmt_c), STORE_A=False, DOT_DTYPE=bf, GB_MAX=256,
                             C_IN_KERNEL=False, RP=16, **{**ACT_RULE, "PREFETCH": pf}), opts))
        for asym in (False, True) if fmt_c else (False,):  # one launch per layer: c in the kernel, whole rows
            out.append((f"act {f} lowrank+hadamard one-launch r32{' asymmetric' if asym else ''} BT32", "act",
                        dict(BT=32, GS=64, BKD=64, RC=32, HAS_SMOOTH=False, PROJ=True, HAS_ROT=False, HAS_HAD=True,
                             FMT_C=fmt_c, ASYM=asym, PASS=2 if fmt_c else 0, STORE_A=False, DOT_DTYPE=bf, GB_MAX=256,
                             C_IN_KERNEL=True, RP=32, **ACT_RULE), dict(num_warps=4)))
        if fmt_c:  # GELU (tanh form) in the epilogue: the MLP up-projection of a fused model
            out.append(("gemm C 128x128 w8 s3 packed+lr simd-unpack gelu", "gemm",
                        dict(BO=128, BT=128, GS=64, R_BLK=32, GROUP_O=8, FMT_C=True, HAS_LR=True, HAS_BIAS=True,
                             DEBUG_INT=False, DOT_DTYPE=bf, W_INT8=False, SIMD=True, ATOMIC=False, ASYM=False, GC=32,
                             ACT=2), dict(num_warps=8, num_stages=3)))
            out.append(("gemm_tm C 128x128 w8 s3 packed+lr simd-unpack gelu", "gemm_tm",
                        dict(BT=128, BO=128, GS=64, R_BLK=32, GROUP_T=8, FMT_C=True, HAS_LR=True, HAS_BIAS=True,
                             DEBUG_INT=False, DOT_DTYPE=bf, W_INT8=False, SIMD=True, ASYM=False, GC=32, ACT=2),
                        dict(num_warps=8, num_stages=3)))
        out.append((f"w4a16 {f} 64x16 w4 s4", "w4a16",
                    dict(BO=64, BT=16, GS=64, R_BLK=16, GROUP_O=8, FMT_C=fmt_c, HAS_LR=False, HAS_BIAS=True,
                         DOT_DTYPE=bf), dict(num_warps=4, num_stages=4)))
        out.append((f"w8a16 {f} 64x16 w4 s4", "w4a16",  # the same kernel on INT8 codes
                    dict(BO=64, BT=16, GS=64, R_BLK=16, GROUP_O=8, FMT_C=fmt_c, HAS_LR=False, HAS_BIAS=True,
                         DOT_DTYPE=bf, W8=True), dict(num_warps=4, num_stages=4)))
    return out


@triton.jit
def _probe_gemm_kernel(a_ptr, b_ptr, y_ptr, K, stride_a, stride_b, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, ACC: tl.constexpr):
    """A plain GEMM (both operands K-major from memory, one dot per K step): the shape Triton's
    pipeliner turns into asynchronous wgmma when it can. Compiled for int8 and for FP8 to see which
    element types get ``wgmma.wait_group 1`` (an MMA left in flight while the next tile loads)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in tl.range(0, K, BK):
        a = tl.load(a_ptr + offs_m[:, None] * stride_a + (k0 + kk)[None, :])
        b = tl.load(b_ptr + offs_n[:, None] * stride_b + (k0 + kk)[None, :])
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=ACC)
    tl.store(y_ptr + offs_m[:, None] * BN + offs_n[None, :], acc)


# (name, constexprs, num_warps); prefetching at 128×128 with one warpgroup spills (28 bytes with Triton 3.6 and
# 3.9): the next group's raw operands do not fit beside the 128-register int32 accumulator
GLUON_VARIANTS = [
    ("gluon C core int32 128x128 nbuf2 w4", dict(BT=128, BO=128, NBUF=2, R_BLK=32, INT_OUT=True, HAS_LR=False,
                                                 HAS_BIAS=False), 4),
    ("gluon C gemm+lr+bias 128x128 nbuf2 w4", dict(BT=128, BO=128, NBUF=2, R_BLK=32, INT_OUT=False, HAS_LR=True,
                                                   HAS_BIAS=True), 4),
    ("gluon C gemm+lr+bias 128x128 nbuf3 w4", dict(BT=128, BO=128, NBUF=3, R_BLK=32, INT_OUT=False, HAS_LR=True,
                                                   HAS_BIAS=True), 4),
    ("gluon C gemm+lr+bias 256x128 nbuf2 w8", dict(BT=256, BO=128, NBUF=2, R_BLK=32, INT_OUT=False, HAS_LR=True,
                                                   HAS_BIAS=True), 8),
    ("gluon C gemm+lr+bias 256x128 nbuf2 w8 prefetch", dict(BT=256, BO=128, NBUF=2, R_BLK=32, INT_OUT=False,
                                                            HAS_LR=True, HAS_BIAS=True, PREFETCH=True), 8),
]


def _compile_gluon_kernel(fn, consts: dict, types: dict, num_warps: int, arch: int, maxnreg: int | None = None,
                          no_divisibility: tuple = ("stride_cr", "stride_ur", "r")):
    """``fn`` compiled for ``arch`` with constexprs ``consts`` (those it has) and the other arguments
    typed by ``types`` (i32 by default); every runtime argument but descriptors and ``no_divisibility``
    gets the launch's divisibility-by-16 specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as tcompile
    from triton.experimental.gluon._runtime import GluonASTSource

    if "ACT" in fn.arg_names:
        consts = {"ACT": 0, **consts}  # no epilogue activation unless the variant names one
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and not n.endswith("_desc") and n not in no_divisibility}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()
                                                           if k in fn.arg_names}, attrs=attrs)
    options = dict(num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}))
    return tcompile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_gluon(consts: dict, num_warps: int, arch: int = 90) -> dict:
    """The Gluon format C GEMM (``gluon_gemm.py``) for sm_90a: wait depths, registers, spills."""
    from . import gluon_gemm as gg

    consts = {"PREFETCH": False, **consts}
    types = {"w_ptr": "*u8", "wk_ptr": "*i8", "q_ptr": "*i8", "y_ptr": "*i32" if consts["INT_OUT"] else "*bf16",
             "ws_ptr": "*fp16", "xs_ptr": "*fp32", "c_ptr": "*bf16", "up_ptr": "*bf16", "bias_ptr": "*bf16"}
    k = _compile_gluon_kernel(gg.gluon_gemm_kernel, consts, types, num_warps, arch)
    return {"shared_bytes": k.metadata.shared, **_ptx_facts(k.asm["ptx"], arch)}


# (name, constexprs, num_warps) of the TMA-fed Gluon GEMM (``gluon_tma_gemm_kernel``)
GLUON_TMA_VARIANTS = [
    ("gluon-tma C core int32 128x128 ns6 nbu2 w4", dict(BT=128, BO=128, NS=6, NBU=2, R_BLK=32, INT_OUT=True,
                                                         HAS_LR=False, HAS_BIAS=False, W_INT8=False), 4),
    ("gluon-tma C gemm+lr+bias 128x128 ns6 nbu2 w4", dict(BT=128, BO=128, NS=6, NBU=2, R_BLK=32, INT_OUT=False,
                                                           HAS_LR=True, HAS_BIAS=True, W_INT8=False), 4),
    ("gluon-tma C gemm+lr+bias 128x128 ns8 nbu3 w4", dict(BT=128, BO=128, NS=8, NBU=3, R_BLK=32, INT_OUT=False,
                                                           HAS_LR=True, HAS_BIAS=True, W_INT8=False), 4),
    ("gluon-tma C gemm+lr+bias 256x128 ns6 nbu2 w8", dict(BT=256, BO=128, NS=6, NBU=2, R_BLK=32, INT_OUT=False,
                                                           HAS_LR=True, HAS_BIAS=True, W_INT8=False), 8),
    ("gluon-tma C gemm+lr+bias 128x128 ns6 nbu2 w4 int8-weights", dict(BT=128, BO=128, NS=6, NBU=2, R_BLK=32,
                                                                       INT_OUT=False, HAS_LR=True, HAS_BIAS=True,
                                                                       W_INT8=True), 4),
    ("gluon-tma C gemm+lr+bias 256x128 ns6 nbu2 w8 scalar-unpack", dict(BT=256, BO=128, NS=6, NBU=2, R_BLK=32,
                                                                        INT_OUT=False, HAS_LR=True, HAS_BIAS=True,
                                                                        W_INT8=False, SIMD=False), 8),
    # GELU (tanh form) in the epilogue: an MLP up-projection of a model with fused activations
    ("gluon-tma C gemm+lr+bias+gelu 128x128 ns6 nbu2 w4", dict(BT=128, BO=128, NS=6, NBU=2, R_BLK=32, INT_OUT=False,
                                                                HAS_LR=True, HAS_BIAS=True, W_INT8=False, ACT=2), 4),
]


def _loop_instructions(ptx: str) -> int | None:
    """PTX instructions per thread in the body of the first innermost loop (the K loop: one 64-group
    per trip), directives and labels left out; None if the PTX has no loop."""
    lines = ptx.splitlines()
    start = next((i for i, line in enumerate(lines) if "Inner Loop Header" in line), None)
    if start is None:
        return None
    while start > 0 and not lines[start].startswith("$"):  # the header comment may sit under its label
        start -= 1
    label = lines[start].split(":")[0].strip()
    end = next((i for i in range(start + 1, len(lines)) if re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};", lines[i])),
               None)
    if end is None:
        return None
    return sum(1 for line in lines[start + 1:end + 1]
               if line.strip() and not line.strip().startswith(("//", ".", "$", "{", "}")))


# (name, constexprs, num_warps, maxnreg) of its warp-specialized form (``gluon_ws_gemm_kernel``): the MMA
# warps plus a 1-warp TMA partition and a 4-warp unpack partition
GLUON_WS_VARIANTS = [
    ("gluon-ws C core int32 128x128 ns4", dict(BT=128, BO=128, NS=4, R_BLK=32, INT_OUT=True, HAS_LR=False,
                                               HAS_BIAS=False, UNPACK_REGS=80), 4, 168),
    ("gluon-ws C gemm+lr+bias 128x128 ns4", dict(BT=128, BO=128, NS=4, R_BLK=32, INT_OUT=False, HAS_LR=True,
                                                 HAS_BIAS=True, UNPACK_REGS=80), 4, 168),
    ("gluon-ws C gemm+lr+bias 256x128 ns4", dict(BT=256, BO=128, NS=4, R_BLK=32, INT_OUT=False, HAS_LR=True,
                                                 HAS_BIAS=True, UNPACK_REGS=80), 8, 128),
]


def compile_gluon_tma(consts: dict, num_warps: int, arch: int = 90, kernel: str = "gluon_tma_gemm_kernel",
                      maxnreg: int | None = None) -> dict:
    """The TMA-fed Gluon GEMM (``gluon_gemm.gluon_tma_gemm_kernel``) for sm_90a. Its descriptor
    arguments are typed as the host ``TensorDescriptor``s the launcher builds (made here over CPU
    tensors: only their type is used)."""
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from . import gluon_gemm as gg

    fn = getattr(gg, kernel)
    consts = {"SIMD": True, **consts}  # as launched on a GPU
    if kernel == "gluon_ws_gemm_kernel":
        consts.setdefault("W_INT8", False)  # packed weights only: only the descriptor type reads it
    sl = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2)
    x = torch.zeros(256, 512, dtype=torch.int8)
    w = torch.zeros(256, 512, dtype=torch.int8 if consts["W_INT8"] else torch.uint8)
    types = {"x_desc": mangle_type(TensorDescriptor.from_tensor(x, [consts["BT"], 32], sl)),
             "w_desc": mangle_type(TensorDescriptor.from_tensor(w, [consts["BO"], 32], sl)),
             "wk_ptr": "*i8", "y_ptr": "*i32" if consts["INT_OUT"] else "*bf16",
             "ws_ptr": "*fp16", "xs_ptr": "*fp32", "c_ptr": "*bf16", "up_ptr": "*bf16", "bias_ptr": "*bf16"}
    k = _compile_gluon_kernel(fn, consts, types, num_warps, arch, maxnreg)
    ptx = k.asm["ptx"]
    return {"shared_bytes": k.metadata.shared, "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "loop_instructions": _loop_instructions(ptx), "setmaxnreg": ptx.count("setmaxnreg"),
            "mbarrier_waits": len(re.findall(r"mbarrier\.try_wait", ptx)), **_ptx_facts(ptx, arch)}


def probe_async_mma(arch: int = 90) -> dict:
    """{element type: sorted wgmma wait depths} of ``_probe_gemm_kernel`` (128×128×128 tile, 8 warps,
    3 stages) for int8 and FP8 e4m3: [0] means every MMA is waited for before the next is issued."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile

    out = {}
    for name, elem, acc_ty, y_ty in (("int8", "*i8", tl.int32, "*i32"), ("fp8e4m3", "*fp8e4nv", tl.float32, "*fp32")):
        consts = dict(BM=128, BN=128, BK=128, ACC=acc_ty)
        fn = _probe_gemm_kernel
        sig = {n: "constexpr" if n in consts else {"a_ptr": elem, "b_ptr": elem, "y_ptr": y_ty}.get(n, "i32")
               for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                        attrs=attrs)
        ptx = tcompile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8, num_stages=3)).asm["ptx"]
        out[name] = sorted({int(d) for d in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)})
    return out


def _bundled_tool(*names: str) -> str | None:
    """The first of ``names`` that Triton's CUDA backend ships in its ``bin`` folder, or None."""
    import triton.backends.nvidia as nv

    base = os.path.join(os.path.dirname(nv.__file__), "bin")
    return next((p for p in (os.path.join(base, n) for n in names) if os.path.exists(p)), None)


def sass_loop_instructions(cubin: bytes) -> int | None:
    """SASS instructions in the kernel's largest loop body (the activation kernel's loop over its
    groups, nested loops counted once), from ``nvdisasm``; None without nvdisasm or a loop. What the
    SM issues per trip, after ptxas: the PTX count says less once the code is memory- or
    issue-bound."""
    tool = _bundled_tool("nvdisasm")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    labels, body = {}, []
    for line in text.splitlines():
        m = re.match(r"\s*(\.L\w+):", line)
        if m:
            labels[m.group(1)] = len(body)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            body.append(m.group(1))
    loops = [i - labels[m.group(1)] + 1 for i, ins in enumerate(body)
             if (m := re.search(r"\bBRA\s+(?:`\()?(\.L\w+)", ins)) and labels.get(m.group(1), i + 1) <= i]
    return max(loops) if loops else None


def _ptx_facts(ptx: str, arch: int) -> dict:
    """What the PTX says: int8 wgmma count and operand sources, wait depths, cp.async, libdevice
    calls, the SIMD unpack, fp32 FMAs, float64 instructions, and (with ptxas) registers and spill
    bytes."""
    int8_mma = [line.split("}", 1)[1].strip() for line in ptx.splitlines()
                if re.search(r"wgmma\.mma_async\S*s8\.s8", line) and "}" in line]
    res = {"int8_wgmma": len(re.findall(r"wgmma\.mma_async\S*s8\.s8", ptx)),
           # after the accumulator: "{%r…}" = the first operand in registers, "%rd…" = a shared-memory descriptor
           "int8_wgmma_a_from_registers": sum(op.startswith(", {") for op in int8_mma),
           "wgmma_wait_depths": sorted({int(d) for d in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)}),
           "cp_async": ptx.count("cp.async.cg"), "libdevice_calls": ptx.count("__nv_"),
           "simd_unpack_asm": "0x80808080" in ptx,
           # float32 FMAs: the activation kernel must have none (products round before they are added)
           "fma_f32": len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx)),
           # float64 instructions (arithmetic and conversions): format C's multiplier choice once took
           # four conversions and a float64 square-and-add per value and candidate; now a few per row
           "f64_instructions": len(re.findall(r"^\s*[a-z.]+\S*\.f64\b", ptx, re.M)),
           # float → integer conversions (an eighth of the add rate on Hopper): the activation kernel
           # writes its codes through the magic-number bits instead, one per row's k remains
           "f32_to_int": len(re.findall(r"\bcvt\.r[nzmp]i\.[su]\d+\.f32\b", ptx))}
    ptxas = _bundled_tool("ptxas-blackwell", "ptxas")  # the newer one reads the PTX version Triton emits
    if ptxas:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
        os.unlink(f.name)
        regs = re.search(r"Used (\d+) registers", out)
        spill = re.search(r"(\d+) bytes spill stores", out)
        res["registers"] = int(regs.group(1)) if regs else None
        res["spill_bytes"] = int(spill.group(1)) if spill else None
    return res


def compile_variant(kind: str, consts: dict, options: dict, arch: int = 90) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile

    from .act_quant import act_quant_kernel
    from .w4a16 import w4a16_kernel
    from .w4a4_gemm import w4a4_gemm_kernel, w4a4_gemm_tm_kernel

    fn = {"gemm": w4a4_gemm_kernel, "gemm_tm": w4a4_gemm_tm_kernel, "act": act_quant_kernel,
          "w4a16": w4a16_kernel}[kind]
    if kind != "act":
        consts = {"ACT": 0, **consts}  # no epilogue activation unless the variant names one
    else:
        from .act_quant import K_RULE_CODES
        from ..quantizers import activation_k_rule

        consts = {"K_RULE": K_RULE_CODES[activation_k_rule(not consts["ASYM"])], **consts}
    types = dict(PTR_TYPES["gemm" if kind == "gemm_tm" else kind])
    if (kind.startswith("gemm") and consts.get("W_INT8")) or (kind == "w4a16" and consts.get("W8")):
        types["w_ptr"] = "*i8"
    if kind == "gemm" and consts.get("ATOMIC"):
        types["y_ptr"] = "*fp32"  # K splits add fp32 partials
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    # the launch specialises integers divisible by 16, as real widths are (d, d_q, G·64 …), not the token count
    wide = {"d", "d_q", "r", "G", "N_KEY"} if kind == "act" else set()
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith("*") or n.startswith("stride") or n in wide)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    if kind == "act":  # as quantize_activations launches it
        options = {**options, "enable_fp_fusion": False}
    k = tcompile(src, target=GPUTarget("cuda", arch, 32), options=options)
    res = {"shared_bytes": k.metadata.shared, **_ptx_facts(k.asm["ptx"], arch)}
    if kind == "act":
        # per trip over one group, what each thread issues for its share of the (BT, 64) tile, and how
        # many programs fit an SM by registers (65,536 per SM): the kernel is issue- and latency-bound
        loop = sass_loop_instructions(k.asm["cubin"])
        threads = 32 * options["num_warps"]
        res["sass_loop_instructions"] = loop
        res["sass_instructions_per_value"] = (round(loop * threads / (consts["BT"] * consts["GS"]), 1)
                                              if loop else None)
        if res.get("registers"):
            res["programs_per_sm"] = 65536 // (res["registers"] * threads)
    return res


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    failed = 0
    for name, kind, consts, options in default_variants():
        try:
            res = compile_variant(kind, consts, options)
            res["ok"] = True
        except Exception as exc:  # report every failure, not only the first
            res = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            failed += 1
        print(json.dumps({"variant": name, **res}), flush=True)
    gluon_jobs = ([(name, lambda c=consts, w=warps: compile_gluon(c, w)) for name, consts, warps in GLUON_VARIANTS]
                  + [(name, lambda c=consts, w=warps: compile_gluon_tma(c, w))
                     for name, consts, warps in GLUON_TMA_VARIANTS]
                  + [(name, lambda c=consts, w=warps, m=maxnreg: compile_gluon_tma(c, w, kernel="gluon_ws_gemm_kernel",
                                                                                 maxnreg=m))
                     for name, consts, warps, maxnreg in GLUON_WS_VARIANTS])
    for name, compile_job in gluon_jobs:
        try:
            print(json.dumps({"variant": name, "ok": True, **compile_job()}), flush=True)
        except Exception as exc:  # Gluon is experimental in Triton: report, do not hide the other variants
            failed += 1
            print(json.dumps({"variant": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}),
                  flush=True)
    try:
        print(json.dumps({"probe": "async wgmma in a plain Triton GEMM", "wait_depths": probe_async_mma()}), flush=True)
    except Exception as exc:  # a report line, not a kernel of ours
        print(json.dumps({"probe": "async wgmma in a plain Triton GEMM", "error": f"{type(exc).__name__}: {exc}"}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
