"""What the kernels read, derived from a ``QuantLinear``'s buffers (no copies of the weights).

The stored INT4 layout of ``quantizers.pack_int4`` is already the kernel layout: within each
64-group, byte j holds value j (low nibble) and value j + 32 (high nibble), so a (BO, 32) byte tile
gives the group's two halves for two K = 32 int8 dots, no reshape. Format C needs k·q as the int8
operand; the GEMM forms it in registers from the packed codes and the int8 multipliers
(``weight_ratio``), so the weights stay at ≈ 4.07 bits in memory (an unpacked k·q copy would cost
8 bits/weight). The plan (flags, sizes, the Hadamard tile, a dummy pointer) is cached on the module
as the plain attribute ``_kernel_plan`` (not a buffer: never saved), keyed by the buffers' device,
identity and the activation dtype, so ``module.to(...)`` invalidates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..bases import hadamard, is_power_of_two

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class KernelPlan:
    kind: str  # "w4a4" | "w4a16" (weight-only, INT4 or INT8 weights) | "reference"
    reason: str = ""  # why "reference" (the one-time warning)
    fmt: str = "exact"  # "exact" (A) or "int_ratio" (C)
    asym: bool = False  # asymmetric activation codes (format C only): zero points, corrected in the GEMM epilogue
    d: int = 0  # in_features
    d_q: int = 0  # width of the quantized operand
    o: int = 0
    r: int = 0
    group_size: int = 64
    weight_bits: int = 4  # 4 (packed) or 8 (int8 codes; weight-only layers)
    groups: int = 0  # G = ceil(d_q / g)
    has_smooth: bool = False
    has_down: bool = False
    project_out: bool = False
    has_rotation: bool = False
    has_hadamard: bool = False
    has_bias: bool = False
    had: torch.Tensor | None = None  # (g, g) normalised Hadamard, fp32
    dummy: torch.Tensor | None = None
    w_int8: torch.Tensor | None = None  # weight_mode "int8": the unpacked operand (o, G·g) int8 (q or k·q)
    weight_mode: str = "packed"
    key: tuple = field(default_factory=tuple)

    @property
    def format_letter(self) -> str:
        return "C" if self.fmt == "int_ratio" else "A"


def _weight_format(module: Any) -> str:
    return "int_ratio" if getattr(module, "weight_ratio", None) is not None else "exact"


def unsupported_reason(module: Any) -> str:
    """Why the kernels cannot run this layer ("" when they can); the caller falls back to the
    reference path with a one-time warning."""
    if module.weight_bits == 8 and module.act_bits is not None:
        return "8-bit weights with quantized activations (the kernels run W4A4, W4A16 and W8A16)"
    if module.weight_bits not in (4, 8):
        return f"{module.weight_bits}-bit weights (kernels take INT4 or INT8 weights)"
    if getattr(module, "weights_in_original_basis", False):
        return "weights_in_original_basis (the paper's rotate-back form has no kernel)"
    if module.act_bits is not None:
        if module.act_bits != 4:
            return f"{module.act_bits}-bit activations (kernels quantize to INT4)"
        if not module.act_symmetric and _weight_format(module) != "int_ratio":
            return ("asymmetric activations in format A (a zero point per group needs a correction inside the "
                    "K loop; format C runs them)")
        if module.scale_format != _weight_format(module):
            return (f"activation scale format {module.scale_format!r} differs from the weights' "
                    f"{_weight_format(module)!r}")
    g = module.group_size
    if not is_power_of_two(g) or g < 32:
        return f"group size {g} (kernels need a power of two ≥ 32: two K = g/2 dots per group)"
    if module.quant_in_features <= 0:
        return "empty quantized operand (rank = d)"
    if module.hadamard_signs is not None and module.hadamard_signs.numel() % g:
        return "block Hadamard over a width that is not a multiple of the group size"
    if module.rotation is None and module.quant_in_features != module.in_features:
        return "quantized width differs from the input width without a rotation"
    if module.project_out and module.down is None:
        return "project_out without down"
    return ""


WEIGHT_MODES = ("packed", "int8")


def weight_mode(module: Any) -> str:
    """How the W4A4 GEMM reads weights: "packed" (default; the stored INT4 bytes, unpacked in
    registers, ≈ 4.07/4.25 bits per weight in memory) or "int8" (an unpacked int8 copy of the
    operand, q or k·q, cached on the module: 8 bits per weight more, no unpack in the K loop).
    ``module.kernel_weights`` or ``DIROTQ_KERNEL_WEIGHTS`` chooses."""
    import os

    mode = getattr(module, "kernel_weights", None) or os.environ.get("DIROTQ_KERNEL_WEIGHTS", "packed")
    if mode not in WEIGHT_MODES:
        raise ValueError(f"kernel weight mode must be one of {WEIGHT_MODES}, got {mode!r}")
    return mode


def get_plan(module: Any, x: torch.Tensor) -> KernelPlan:
    """The (cached) plan for running ``module`` on activations like ``x``."""
    ref = getattr(module, "weight_packed", None)
    key = (x.device, x.dtype, None if ref is None else (ref.data_ptr(), ref.device),
           module.act_bits, module.scale_format, module.act_symmetric, weight_mode(module))
    plan = getattr(module, "_kernel_plan", None)
    if plan is not None and plan.key == key:
        return plan
    plan = build_plan(module, x.device)
    plan.key = key
    module._kernel_plan = plan
    return plan


def build_plan(module: Any, device: torch.device) -> KernelPlan:
    reason = unsupported_reason(module)
    if reason:
        return KernelPlan(kind="reference", reason=reason)
    g = module.group_size
    d_q = module.quant_in_features
    plan = KernelPlan(
        kind="w4a4" if module.act_bits is not None else "w4a16",
        fmt=_weight_format(module), asym=module.act_bits is not None and not module.act_symmetric,
        d=module.in_features, d_q=d_q, o=module.out_features,
        r=0 if module.down is None else module.down.shape[1], group_size=g, weight_bits=module.weight_bits,
        groups=-(-d_q // g),
        has_smooth=module.smooth is not None, has_down=module.down is not None and module.down.shape[1] > 0,
        project_out=bool(module.project_out), has_rotation=module.rotation is not None,
        has_hadamard=module.hadamard_signs is not None, has_bias=module.bias is not None,
    )
    if plan.has_hadamard:
        plan.had = hadamard(g, dtype=torch.float32).to(device)
    plan.dummy = torch.zeros(1, dtype=torch.float32, device=device)
    plan.weight_mode = weight_mode(module)
    if plan.kind == "w4a4" and device.type == "cuda":
        from .w4a4_gemm import simd_self_check

        simd_self_check(module)
    if plan.weight_mode == "int8" and plan.kind == "w4a4":
        plan.w_int8 = kernel_weight_codes(module)  # built once by the unpack kernel, then cached here
    return plan


def kernel_weight_codes(module: Any) -> torch.Tensor:
    """What the GEMM's register operand holds, (o, d_pad) int8, computed by the unpack kernel:
    q for format A, k·q for format C (test hook for "packed weights byte-exact")."""
    from .w4a4_gemm import unpack_weights

    return unpack_weights(module)
