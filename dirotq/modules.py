"""The W4A4 linear module every method produces (docs/ARCHITECTURE.md "One quantized layer").

    x_s = x / smooth;  c = x_s · down;  a = rotate(x_s);  y = c · upᵀ + Q_a(a) · Q_w(W_q)ᵀ + bias

The reference path below is plain PyTorch and runs anywhere; a kernel backend (``dirotq.kernels``)
can take over on CUDA tensors. ``DIROTQ_BACKEND=reference|triton`` forces one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from . import compile_ops
from .activations import ActivationSpec, apply_activation, check_spec
from .bases import hadamard
from .quantizers import QuantizedTensor, activation_k_rule, fake_quantize, pack_int4, quantize, unpack_int4

BACKENDS = ("auto", "reference", "triton")


def block_hadamard_transform(a: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """(a · signs) multiplied blockwise by a normalised ``block``×``block`` Hadamard.

    a: (n, d) with d % block == 0; signs: (d,). Equals a @ diag(signs) @ block_hadamard(d, block).
    """
    n, d = a.shape
    h = hadamard(block, dtype=a.dtype).to(a.device)
    return ((a * signs).reshape(n, d // block, block) @ h).reshape(n, d)


def selected_backend() -> str:
    backend = os.environ.get("DIROTQ_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"DIROTQ_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def _drop_dequantized(module: "QuantLinear", *args: Any, **kwargs: Any) -> None:
    """load_state_dict pre-hook: new weights invalidate the cached dequantized weight."""
    module._dequantized = None


class QuantLinear(nn.Module):
    """A quantized ``nn.Linear(in_features, out_features)``.

    Buffers (all plain tensors, so a state dict is safetensors-ready):
      weight_packed (o, d_q_pad/2) uint8 INT4 [bits 4] | weight_codes (o, d_q_pad) int8 [bits 8] |
      weight (o, d_q) [bits 16, unquantized]
      weight_scale  (o, d_q_pad/g) float16 group steps [exact] or (o, 1) row scale [int_ratio]
      weight_ratio  (o, d_q_pad/g) int8 multipliers [int_ratio]
      smooth (d,), down (d, r), up (o, r), rotation (d, d_q), hadamard_signs (d_q,), bias (o,)
    ``meta`` holds the non-tensor recipe (method, rank, formats) and is saved as JSON.
    ``epilogue_activation``: None, or ``(kind, start, stop)``, an activation applied to output columns
    [start, stop) before the output is rounded (``dirotq.activations``; set by ``dirotq.fusion``'s
    activation fusion at inference, never saved: checkpoints hold the unfused form).
    """

    def __init__(self, in_features: int, out_features: int, *, method: str, weight: QuantizedTensor | torch.Tensor,
                 act_bits: int | None = 4, group_size: int = 64, act_symmetric: bool = True,
                 scale_format: str = "exact", bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, down: torch.Tensor | None = None,
                 up: torch.Tensor | None = None, project_out: bool = False,
                 rotation: torch.Tensor | None = None, hadamard_signs: torch.Tensor | None = None,
                 weights_in_original_basis: bool = False, dtype: torch.dtype = torch.float32,
                 extra_meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_bits, self.group_size = act_bits, group_size
        self.act_symmetric, self.scale_format = act_symmetric, scale_format
        self.project_out = project_out
        self.weights_in_original_basis = weights_in_original_basis
        if isinstance(weight, QuantizedTensor):
            self.weight_bits = weight.bits
            self.quant_in_features = weight.in_features
            if weight.bits == 4:
                self.register_buffer("weight_packed", pack_int4(weight.q, weight.group_size))
            else:
                self.register_buffer("weight_codes", weight.q.clone())
            self.register_buffer("weight_scale", weight.scale.to(torch.float16))
            if weight.ratio is not None:
                self.register_buffer("weight_ratio", weight.ratio.clone())
        else:
            self.weight_bits = 16
            self.quant_in_features = weight.shape[1]
            self.register_buffer("weight", weight.to(dtype).clone())
        for name, t in (("bias", bias), ("smooth", smooth), ("down", down), ("up", up), ("rotation", rotation),
                        ("hadamard_signs", hadamard_signs)):
            self.register_buffer(name, None if t is None else t.detach().to(dtype).clone())
        self.rank = 0 if down is None else down.shape[1]
        self.meta = {"method": method, **(extra_meta or {})}
        self.backend = "auto"
        self._epilogue_activation: ActivationSpec = None
        self._dequantized: torch.Tensor | None = None
        # with_module: the hook gets the module as an argument; a closure over self would make every
        # layer a reference cycle, freed only by the garbage collector (late, for large layers)
        self._register_load_state_dict_pre_hook(_drop_dequantized, with_module=True)
        compile_ops.register(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        compile_ops.register(self)  # a deep copy or an unpickled layer: its compiled op must find it

    def stored_weight(self) -> torch.Tensor:
        """The buffer holding the weight: ``weight_packed`` (INT4), ``weight_codes`` (INT8) or ``weight``
        (16-bit). The layer's key in a compiled graph (dirotq/compile_ops.py)."""
        if self.weight_bits == 16:
            return self.weight
        return self.weight_packed if self.weight_bits == 4 else self.weight_codes

    # --- weights ---------------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedTensor:
        """The stored weight as a ``QuantizedTensor`` (codes unpacked)."""
        if self.weight_bits == 16:
            raise ValueError("this layer keeps 16-bit weights")
        if self.weight_bits == 4:
            codes = unpack_int4(self.weight_packed, self.group_size, signed=True)
        else:
            codes = self.weight_codes
        ratio = getattr(self, "weight_ratio", None)
        return QuantizedTensor(codes, self.weight_scale.float(), None, ratio, self.weight_bits, self.group_size,
                               self.quant_in_features, "int_ratio" if ratio is not None else "exact")

    def set_quantized_weight(self, weight: QuantizedTensor) -> None:
        """Replace the stored codes and scales by ``weight`` of the same bits, format and shapes
        (a deferred GPTQ filling the placeholder this layer was built with)."""
        if self.weight_bits == 16 or weight.bits != self.weight_bits or weight.in_features != self.quant_in_features:
            raise ValueError(f"set_quantized_weight: a {weight.bits}-bit weight of width {weight.in_features} does "
                             f"not fit this {self.weight_bits}-bit layer of width {self.quant_in_features}")
        ratio = getattr(self, "weight_ratio", None)
        if (weight.ratio is None) != (ratio is None) or tuple(weight.scale.shape) != tuple(self.weight_scale.shape):
            raise ValueError("set_quantized_weight: scale format or scale shape differs from the layer's")
        dev = self.weight_scale.device
        if self.weight_bits == 4:
            self.weight_packed = pack_int4(weight.q, weight.group_size).to(dev)
        else:
            self.weight_codes = weight.q.clone().to(dev)
        self.weight_scale = weight.scale.to(device=dev, dtype=self.weight_scale.dtype)
        if ratio is not None:
            self.weight_ratio = weight.ratio.clone().to(dev)
        self._dequantized = None

    def dequantized_weight(self) -> torch.Tensor:
        """W_q as real numbers, (o, d_q) float32. Kept on the layer on the CPU, where the reference
        path is the forward (the explorer's, every step); rebuilt per call elsewhere, where the
        reference path is a fallback and a float32 copy of every layer would hold twice the 16-bit
        model's weights, the memory the quantization was for."""
        device = self._device()
        if self._dequantized is not None and self._dequantized.device == device:
            return self._dequantized
        w = self.weight.float() if self.weight_bits == 16 else self.quantized_weight().dequantize()
        self._dequantized = w if keeps_dequantized_weight(device) else None
        return w

    @property
    def epilogue_activation(self) -> ActivationSpec:
        return self._epilogue_activation

    @epilogue_activation.setter
    def epilogue_activation(self, spec: ActivationSpec) -> None:
        if spec is not None:
            spec = (str(spec[0]), int(spec[1]), int(spec[2]))
        check_spec(spec, self.out_features)
        self._epilogue_activation = spec

    def _apply(self, fn, recurse: bool = True):
        # Weight scales are a storage format (16-bit float, what the kernels read), not compute
        # precision: a model-wide .to(bfloat16) must not re-round them to bf16's 8-bit mantissa.
        scale = getattr(self, "weight_scale", None)
        super()._apply(fn, recurse)
        if scale is not None and self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        self._dequantized = None  # device or dtype may have changed
        return self

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def float_dtype(self) -> torch.dtype:
        """The dtype of the layer's 16-bit tensors (branch, bias, 16-bit weight, smoothing, rotation,
        signs; float32 if it has none): what a LoRA on it or a layer fused from it is built in."""
        for name in ("up", "down", "bias", "weight", "smooth", "rotation", "hadamard_signs"):
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.dtype
        return torch.float32

    # --- forward ---------------------------------------------------------------------------------
    def quantize_input(self, a: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return a
        # format C's multiplier rule for activations (what the activation kernel computes)
        return fake_quantize(a, self.act_bits, self.group_size, self.act_symmetric, self.scale_format,
                             k_rule=activation_k_rule(self.act_symmetric))

    def transform_input(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x: (n, d) float32 -> (c (n, r) or None, a (n, d_q)), the two operands before quantization."""
        # buffers are read as float32: a model cast with .to(bfloat16) after quantization still runs
        down = self.down.float() if self.down is not None else None
        x_s = x / self.smooth.float() if self.smooth is not None else x
        c = x_s @ down if down is not None else None
        a = x_s
        if self.project_out and c is not None:
            a = a - c @ down.T
        if self.rotation is not None:
            a = a @ self.rotation.float()
        if self.hadamard_signs is not None:
            a = block_hadamard_transform(a, self.hadamard_signs.float(), self.group_size)
        return c, a

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pure-PyTorch forward in float32; x: (n, d) -> (n, o)."""
        x = x.float()
        c, a = self.transform_input(x)
        a_q = self.quantize_input(a)
        w = self.dequantized_weight()
        if self.weights_in_original_basis:
            # the paper's reference code: rotate the mixed-precision activations back, then W_q
            x_mixed = a_q @ self.rotation.T.float()
            if c is not None:
                x_mixed = x_mixed + c @ self.down.float().T
            y = x_mixed @ w.T
        else:
            y = a_q @ w.T
            if c is not None:
                y = y + c @ self.up.float().T
        if self.bias is not None:
            y = y + self.bias.float()
        return apply_activation(y, self.epilogue_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # one opaque op in a compiled graph (dirotq/compile_ops.py): no graph break on the kernels
            return compile_ops.quant_linear(x, self.stored_weight(), self.out_features)
        return self.eager_forward(x)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` outside ``torch.compile``: the Triton kernels on CUDA (or when forced), else the
        reference path; x: (..., d) -> (..., o) in x's dtype."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        backend = self.backend if self.backend != "auto" else selected_backend()
        if backend == "triton" or (backend == "auto" and x2.is_cuda):
            from .kernels import kernel_forward  # imported lazily: triton is optional on CPU

            y = kernel_forward(self, x2)
        else:
            y = self.reference_forward(x2)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    # --- bookkeeping -----------------------------------------------------------------------------
    def storage_bits(self) -> dict[str, float]:
        """Bits held by this layer, by part: 4-bit codes, 16-bit scales and every 16-bit tensor
        (branch, smoothing, rotation, bias) counted at 16 bits; compare with 16·o·d for BF16. Format
        C's per-group ratio (1…15) counts 4 bits, what it needs; the buffer and today's checkpoints
        hold it as int8, 4 bits more per group of 64 weights."""
        parts: dict[str, float] = {}
        if self.weight_bits == 16:
            parts["weight"] = 16.0 * self.weight.numel()
        elif self.weight_bits == 4:
            parts["weight"] = 8.0 * self.weight_packed.numel()
        else:
            parts["weight"] = 8.0 * self.weight_codes.numel()
        if self.weight_bits != 16:
            parts["scales"] = 16.0 * self.weight_scale.numel()
            if getattr(self, "weight_ratio", None) is not None:
                parts["scales"] += 4.0 * self.weight_ratio.numel()
        for name in ("smooth", "down", "up", "rotation", "hadamard_signs", "bias"):
            t = getattr(self, name)
            if t is not None:
                parts[name] = (1.0 if name == "hadamard_signs" else 16.0) * t.numel()
        return parts

    def extra_repr(self) -> str:
        a = f"a{self.act_bits}" if self.act_bits else "a16"
        act = self.epilogue_activation
        then = "" if act is None else f", then {act[0]} on [{act[1]}, {act[2]})"
        return (f"{self.in_features}->{self.out_features}, {self.meta['method']} w{self.weight_bits}{a} "
                f"g{self.group_size} r={self.rank} {self.scale_format}{then}")


def keeps_dequantized_weight(device: torch.device) -> bool:
    """Whether a layer on ``device`` keeps its float32 dequantized weight between reference forwards:
    on the CPU only (see ``QuantLinear.dequantized_weight``)."""
    return torch.device(device).type == "cpu"


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, scale_format: str) -> QuantizedTensor | torch.Tensor:
    """RTN weight quantization in the module's storage format (bits 16: the weight itself)."""
    if bits == 16:
        return w.float()
    return quantize(w.float(), bits, group_size, True, scale_format, row_search=scale_format == "int_ratio")


# --- which backend runs (app / CLI) ---------------------------------------------------------------
_FORMAT_NAMES = {"exact": "format A (exact)", "int_ratio": "format C (int_ratio)"}


def layer_backend(module: Any, device: torch.device | str | None = None) -> tuple[str, str]:
    """``(backend, kind)`` a forward of this layer runs now on inputs on ``device`` (default: the
    layer's own device): backend "triton" | "reference"; kind e.g. "W4A4 format C (int_ratio)",
    "W4A16 format A (exact)", or the reference kind plus why the kernels do not cover it.

    Derived from the same inputs as the dispatch (``module.backend`` / ``DIROTQ_BACKEND``, device,
    Triton availability, ``layout.unsupported_reason``), so it is exact for the current settings;
    ``module._kernel_backend_used`` (what the last call ran) is kept for debugging only, since it
    goes stale when the settings change between calls."""
    from .kernels import kernels_available
    from .kernels.layout import unsupported_reason

    fmt = "int_ratio" if getattr(module, "weight_ratio", None) is not None else "exact"
    if device is None:
        device = module._device() if hasattr(module, "_device") else "cpu"
    device = torch.device(device)
    choice = module.backend if getattr(module, "backend", "auto") != "auto" else selected_backend()
    wants = choice == "triton" or (choice == "auto" and device.type == "cuda")
    reason = unsupported_reason(module)
    used = "triton" if wants and kernels_available(device) and not reason else "reference"
    acts = f"W{module.weight_bits}A{module.act_bits or 16}"
    if used == "reference":
        kind = f"{acts} {_FORMAT_NAMES.get(module.scale_format, module.scale_format)}"
        if wants and reason:
            kind += f" [not covered by kernels: {reason}]"
        elif wants:
            kind += " [Triton unavailable on this device]"
        return "reference", kind
    asym = " asymmetric" if module.act_bits is not None and not module.act_symmetric else ""
    return "triton", f"{acts} {_FORMAT_NAMES[fmt]}{asym}"


def backend_summary(module_or_model: Any, device: torch.device | str | None = None) -> dict[str, int]:
    """Counts of QuantLinear layers per "backend: kind"."""
    mods = [module_or_model] if isinstance(module_or_model, QuantLinear) else [
        m for m in module_or_model.modules() if isinstance(m, QuantLinear)]
    out: dict[str, int] = {}
    for m in mods:
        b, k = layer_backend(m, device)
        key = f"{b}: {k}"
        out[key] = out.get(key, 0) + 1
    return out


def backend_description(module_or_model: Any, device: torch.device | str | None = None) -> str:
    """One line for the app/CLI, e.g. "triton: 96× W4A4 format C (int_ratio), 8× W4A16 format A (exact)"."""
    summary = backend_summary(module_or_model, device)
    if not summary:
        return "no quantized layers (16-bit model)"
    by_backend: dict[str, list[str]] = {}
    for key, count in sorted(summary.items(), key=lambda kv: -kv[1]):
        b, k = key.split(": ", 1)
        by_backend.setdefault(b, []).append(f"{count}× {k}")
    line = "; ".join(f"{b}: {', '.join(parts)}" for b, parts in by_backend.items())
    # fused shared-input layers (dirotq.fusion) count once each above; say what they stand for
    fused = [] if isinstance(module_or_model, QuantLinear) else [
        m for m in module_or_model.modules() if isinstance(getattr(m, "splits", None), list)
        and isinstance(m, QuantLinear)]
    if fused:
        line += f" ({len(fused)} of them fused from {sum(len(m.splits) for m in fused)} layers that share an input)"
    mods = [module_or_model] if isinstance(module_or_model, QuantLinear) else list(module_or_model.modules())
    activated = [m for m in mods if isinstance(m, QuantLinear) and m.epilogue_activation is not None]
    if activated:
        kinds = sorted({m.epilogue_activation[0] for m in activated})
        line += f"; {len(activated)} apply their {'/'.join(kinds)} in the GEMM epilogue"
    return line
