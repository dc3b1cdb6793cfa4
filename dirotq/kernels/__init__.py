"""Triton kernel backend for ``QuantLinear`` (docs/KERNELS.md).

``QuantLinear.forward`` calls :func:`kernel_forward` on CUDA tensors (or whenever
``DIROTQ_BACKEND=triton`` / ``module.backend = "triton"``); the pure-PyTorch reference path stays
the fallback and the oracle. The kernels are ops: they read a layer's buffers and never import
``dirotq.modules`` (which reports per layer which backend runs: ``modules.layer_backend``).
Triton is imported lazily (only when a kernel runs), so importing this
package never pulls it in and ``TRITON_INTERPRET=1`` can still be set first by a test session.

Covered: INT4 weights (packed) with symmetric INT4 activations in format A ("exact") or C
("int_ratio"), asymmetric ones in format C, for every method structure (smoothing, 16-bit low-rank
branch with or without project-out, dense rotation, block Hadamard), and weight-only W4A16 and
W8A16 layers (``act_bits=None``). Everything else (asymmetric activations in format A as in the
``paper`` preset, ``weights_in_original_basis``, 16-bit weights, 8-bit weights with quantized
activations, mixed scale formats) runs the reference path after a one-time warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

__all__ = ["kernel_forward", "kernels_available"]

_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_available(device: torch.device | str | None = None) -> bool:
    """True when Triton is importable and can run on ``device`` (CUDA, or any device under
    ``TRITON_INTERPRET=1``). ``device=None``: CUDA available or interpreting."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing
        return False
    if _interpreting():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _fallback(module: Any, x: torch.Tensor, why: str) -> torch.Tensor:
    _warn_once(f"dirotq kernels: {why}; using the reference path")
    module._kernel_backend_used = "reference"
    return module.reference_forward(x)


def kernel_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """y = module(x) through the Triton kernels; ``x: (n, d)`` -> ``(n, o)`` in x's dtype
    (fp32/fp16/bf16; other dtypes run in fp32). No host synchronisation (CUDA-graph safe once the
    first call has built the per-layer plan and compiled/autotuned the kernels)."""
    if not kernels_available(x.device):
        return _fallback(module, x, f"Triton cannot run on {x.device.type} tensors here "
                                    "(no CUDA; set TRITON_INTERPRET=1 to interpret on CPU)")
    from .layout import SUPPORTED_DTYPES, get_plan

    if x.dtype not in SUPPORTED_DTYPES:
        x = x.float()
    x = x.contiguous()
    plan = get_plan(module, x)
    if plan.kind == "reference":
        return _fallback(module, x, f"layer kind not covered: {plan.reason}").to(x.dtype)
    if plan.kind == "w4a16":
        from .w4a16 import w4a16_gemm

        c = None
        a = x
        if plan.has_smooth or plan.has_down or plan.has_rotation or plan.has_hadamard:
            c32, a32 = module.transform_input(x.float())  # rare: transforms on a 16-bit-activation layer
            a = a32.to(x.dtype).contiguous()
            c = None if c32 is None else c32.to(x.dtype).contiguous()
        y = w4a16_gemm(module, plan, a, c, x.dtype, activation=getattr(module, "epilogue_activation", None))
        module._kernel_backend_used = "triton"
        return y
    from .act_quant import quantize_activations
    from .w4a4_gemm import w4a4_gemm

    act = quantize_activations(module, plan, x)
    y = w4a4_gemm(module, plan, act, x.dtype, activation=getattr(module, "epilogue_activation", None))
    module._kernel_backend_used = "triton"
    return y
