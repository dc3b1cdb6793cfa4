"""LoRA on quantized transformers (PEFT): a LoRA on a ``QuantLinear`` target computes

    y = QuantLinear(x) + scale · B(A(dropout(x)))        A: (r, d), B: (o, r), scale = alpha / r

with the quantized layer frozen and A, B trainable (in the dtype of the layer's 16-bit tensors).
Merging is refused: B·A cannot be folded into INT4 codes without re-quantizing (a new error), and
the 16-bit branch of the low-rank methods sees only its own subspace.

PEFT's extension point for layer types it does not know is
``LoraConfig._register_custom_module({QuantLinear: QuantLoraLinear})`` (peft 0.21: the dispatcher
built in ``LoraModel._create_new_module``). diffusers' ``load_lora_adapter`` / ``pipe.load_lora_weights``
build their own LoraConfig, so once ``dirotq`` is imported every new ``LoraConfig`` gets that
mapping (its ``__post_init__`` is wrapped, when PEFT is first imported). A QuantLinear holds buffers
only, while PEFT's ``LoraModel._replace_module`` takes the adapter's device from the base layer's
first parameter; the wrapped ``_replace_module`` lets ``QuantLoraLinear`` place itself instead.
Both wraps live here, are idempotent, and fail with a clear message if PEFT's internals change.

FLUX's ``pipe.load_lora_weights`` first checks each LoRA against the base layer's float ``weight``
(to expand Control LoRAs), which a QuantLinear does not have; a third wrap
(``FluxLoraLoaderMixin._maybe_expand_lora_state_dict``) passes the entries of QuantLinear targets
around that check, after checking their input width itself.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ._import_hooks import when_imported
from .fusion import SharedInputSlice, release_activation
from .modules import QuantLinear

logger = logging.getLogger(__name__)

_PEFT_LORA = "peft.tuners.lora.model"
_CLASSES: dict[str, type] = {}
MERGE_ERROR = ("cannot merge a LoRA into a QuantLinear ({name}): its weight is INT4 codes, and B·A cannot be folded "
               "into them without re-quantizing. Keep the adapter unmerged, or merge into the float model and "
               "quantize the result")


def _device_and_dtype(layer: QuantLinear | SharedInputSlice) -> tuple[torch.device, torch.dtype]:
    """Where a LoRA on ``layer`` lives: its buffers' device, its 16-bit tensors' dtype (float32 if none);
    a member of a fused shared-input layer: those of the fused layer."""
    layer = layer.fused if isinstance(layer, SharedInputSlice) else layer
    return layer._device(), layer.float_dtype()


def _build() -> dict[str, type]:
    """The PEFT layer class (built on first use: it subclasses PEFT's LoRA ``Linear``)."""
    if _CLASSES:
        return _CLASSES
    from peft.tuners.lora.layer import Linear

    class QuantLoraLinear(Linear):
        """A LoRA adapter around a ``QuantLinear`` (PEFT custom module): plain LoRA only (no DoRA or
        other variants, which need the float weight), no merging."""

        def _get_in_out_features(self, module: Any) -> tuple[int, int]:
            if release_activation(module):
                # the LoRA term belongs before the activation the layer applied in its GEMM epilogue: the
                # module where the activation was (dirotq.fusion) applies it again, after the LoRA
                logger.info("a LoRA on %s: its activation runs after the LoRA, outside the GEMM epilogue",
                            getattr(self, "kwargs", {}).get("target_name") or type(module).__name__)
            return module.in_features, module.out_features  # PEFT's lookup warns on layer types it does not know

        def _get_base_layer_device_and_dtype(self, base_layer: Any) -> tuple[torch.device, torch.dtype]:
            # PEFT places adapters by the base layer's `weight`, which a QuantLinear (buffers only) lacks
            return _device_and_dtype(base_layer)

        @property
        def lora_variants(self) -> dict:
            return {(): None}

        def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Any:
            try:
                return super().resolve_lora_variant(config=config, **kwargs)
            except ValueError:
                raise ValueError("only plain LoRA runs on a QuantLinear: DoRA and the other LoRA variants need the "
                                 "layer's float weight, which a quantized layer no longer has") from None

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise ValueError(MERGE_ERROR.format(name=self.kwargs.get("target_name") or "this layer"))

        def unmerge(self) -> None:
            if self.merged:  # never true: merge refuses
                raise ValueError(MERGE_ERROR.format(name=self.kwargs.get("target_name") or "this layer"))
            super().unmerge()  # PEFT's "Already unmerged" warning

        def __repr__(self) -> str:
            return "dirotq." + super().__repr__()

    _CLASSES["QuantLoraLinear"] = QuantLoraLinear
    return _CLASSES


def register_custom_module(config: Any) -> Any:
    """Add ``{QuantLinear: QuantLoraLinear}`` to a ``peft.LoraConfig`` (what every LoraConfig gets
    once dirotq is imported); returns the config."""
    if not hasattr(config, "_register_custom_module"):
        raise RuntimeError(f"dirotq: {type(config).__name__} has no _register_custom_module (peft too old or changed): "
                           "LoRA on QuantLinear needs peft's custom-module API (peft ≥ 0.14)")
    known = getattr(config, "_custom_modules", None) or {}
    if QuantLinear not in known or SharedInputSlice not in known:
        # a member of a fused shared-input layer takes a LoRA as the layer it stands for
        config._register_custom_module({QuantLinear: _build()["QuantLoraLinear"],
                                        SharedInputSlice: _build()["QuantLoraLinear"]})
    return config


def _patch(model_module: Any) -> None:
    """Wrap ``LoraConfig.__post_init__`` and ``LoraModel._replace_module`` (see the module docstring)."""
    from peft.tuners.lora.config import LoraConfig

    lora_model = getattr(model_module, "LoraModel", None)
    needed = (("LoraConfig._register_custom_module", LoraConfig, "_register_custom_module"),
              ("LoraConfig.__post_init__", LoraConfig, "__post_init__"),
              ("LoraModel._replace_module", lora_model, "_replace_module"))
    missing = [what for what, owner, attr in needed if not hasattr(owner, attr)]
    if missing:
        raise RuntimeError(f"dirotq: this peft has no {', '.join(missing)}: LoRA on QuantLinear is unavailable "
                           "(dirotq was tested with the peft version pinned in pyproject.toml)")
    if getattr(LoraConfig, "_dirotq_patched", False):
        return
    post_init = LoraConfig.__post_init__
    replace_module = lora_model._replace_module
    quant_lora = _build()["QuantLoraLinear"]

    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        post_init(self, *args, **kwargs)
        register_custom_module(self)

    def _replace_module(self: Any, parent: Any, child_name: str, new_module: Any, child: Any) -> None:
        if isinstance(new_module, quant_lora):
            setattr(parent, child_name, new_module)  # it placed its adapters on the QuantLinear's device itself
            return
        replace_module(self, parent, child_name, new_module, child)

    LoraConfig.__post_init__ = __post_init__
    lora_model._replace_module = _replace_module
    LoraConfig._dirotq_patched = True


_DIFFUSERS_LORA = "diffusers.loaders.lora_pipeline"


def _quant_targets(transformer: Any) -> dict[str, QuantLinear]:
    """QuantLinear modules by the name a LoRA state dict uses (a PEFT-wrapped one sits at ``….base_layer``)."""
    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, (QuantLinear, SharedInputSlice)):
            out[name[: -len(".base_layer")] if name.endswith(".base_layer") else name] = m
    return out


def _patch_flux_loader(module: Any) -> None:
    """Wrap ``FluxLoraLoaderMixin._maybe_expand_lora_state_dict`` (see the module docstring)."""
    mixin = getattr(module, "FluxLoraLoaderMixin", None)
    if mixin is None or getattr(mixin, "_dirotq_patched", False):
        return
    original = mixin.__dict__.get("_maybe_expand_lora_state_dict")
    if not isinstance(original, classmethod):
        raise RuntimeError("dirotq: diffusers' FluxLoraLoaderMixin changed (no _maybe_expand_lora_state_dict "
                           "classmethod): pipe.load_lora_weights on a quantized FLUX transformer is unavailable; "
                           "use pipe.transformer.load_lora_adapter")
    expand = original.__func__

    def _maybe_expand_lora_state_dict(cls: Any, transformer: Any, lora_state_dict: dict) -> dict:
        quant = _quant_targets(transformer)
        if not quant:
            return expand(cls, transformer, lora_state_dict)
        prefix = f"{cls.transformer_name}."
        ours, rest = {}, {}
        for key, value in lora_state_dict.items():
            bare = key[len(prefix):] if key.startswith(prefix) else key
            target = bare.split(".lora_", 1)[0]
            if target in quant:
                if key.endswith(".lora_A.weight") and value.shape[1] != quant[target].in_features:
                    raise ValueError(f"LoRA {key}: input width {value.shape[1]} does not match the quantized layer "
                                     f"{target} ({quant[target].in_features} inputs); a quantized layer cannot be "
                                     "expanded like a float one")
                ours[key] = value
            else:
                rest[key] = value
        out = expand(cls, transformer, rest) if rest else {}
        return {**out, **ours}

    mixin._maybe_expand_lora_state_dict = classmethod(_maybe_expand_lora_state_dict)
    mixin._dirotq_patched = True


def enable() -> None:
    """Install the PEFT integration now (imports peft); raises a clear error if it cannot."""
    import importlib

    try:
        module = importlib.import_module(_PEFT_LORA)
    except ImportError as err:
        raise ImportError(f"LoRA on quantized layers needs peft ({err}): pip install 'dirotq-explorer[lora]'") from None
    _patch(module)


def install() -> None:
    """Install the PEFT integration as soon as PEFT's LoRA model module is imported (now, if it is),
    and the FLUX LoRA loader's as soon as diffusers' LoRA pipelines module is."""
    when_imported(_PEFT_LORA, _patch)
    when_imported(_DIFFUSERS_LORA, _patch_flux_loader)


def __getattr__(name: str) -> Any:
    if name == "QuantLoraLinear":
        enable()
        return _build()["QuantLoraLinear"]
    raise AttributeError(f"module 'dirotq.lora' has no attribute {name!r}")


# QuantLoraLinear is resolved lazily (module __getattr__: it subclasses a PEFT class)
__all__ = ["MERGE_ERROR", "enable", "install", "register_custom_module"]
