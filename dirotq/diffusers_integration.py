"""diffusers-native loading of dirotq checkpoints: once ``dirotq`` is imported,

    transformer = PixArtTransformer2DModel.from_pretrained("out/dirotq-w4a4-g64-r64-tiny-pixart")

(any diffusers model class; also a pipeline's ``transformer`` subfolder) loads a folder written by
``save_quantized``, one file or sharded. diffusers has no public registry for third-party
quantizers, so this module adds ``"dirotq"`` to the two mappings in ``diffusers.quantizers.auto``
(``AUTO_QUANTIZER_MAPPING``, ``AUTO_QUANTIZATION_CONFIG_MAPPING``); all of it lives here, so an
upstream integration can replace it. The registration runs when diffusers' quantizer module is
imported (``dirotq._import_hooks``), so ``import dirotq`` stays light.

What ``from_pretrained`` does with a dirotq checkpoint (``low_cpu_mem_usage``, the default):
the skeleton on the meta device (accelerate's ``init_empty_weights``), QuantLinear shells (meta)
swapped in before any weight is read, a strict key check against the checkpoint's keys, each
stored tensor assigned in the dtype ``load_quantized`` gives it, and the content hash verified over
the stored bytes (always). ``torch_dtype`` defaults to the dtype the model was saved in; a given
``torch_dtype`` casts the non-quantized parameters and the QuantLinear 16-bit tensors (never the
codes, nor the float16 weight scales), as ``load_quantized(dtype=...)`` does. ``device_map`` with
a device, a dict or "auto" without offload is supported (tested on CPU); disk offload is refused
(QuantLinear holds buffers, which accelerate's offload does not stream). Saving goes through
``dirotq.save_quantized``: ``save_pretrained`` refuses (diffusers' own message).
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import torch

from . import checkpoint
from ._import_hooks import when_imported
from .modules import QuantLinear

logger = logging.getLogger(__name__)

QUANT_METHOD = "dirotq"
_AUTO = "diffusers.quantizers.auto"
_CLASSES: dict[str, type] = {}


class DiRotQMethod(str, enum.Enum):
    """diffusers reads ``quantization_config.quant_method.value``: a str enum like its own."""

    DIROTQ = QUANT_METHOD

    def __str__(self) -> str:  # diffusers' messages print it: "quantized with dirotq"
        return self.value


def _build_classes() -> dict[str, type]:
    """The config and quantizer classes (built on first use: they subclass diffusers' bases)."""
    if _CLASSES:
        return _CLASSES
    try:
        from diffusers.quantizers.base import DiffusersQuantizer
        from diffusers.quantizers.quantization_config import QuantizationConfigMixin
    except ImportError as err:
        raise ImportError(f"dirotq: this diffusers has no quantizer base classes ({err}); from_pretrained cannot "
                          "load dirotq checkpoints here: use dirotq.load_quantized(folder)") from None

    class DiRotQQuantizationConfig(QuantizationConfigMixin):
        """The ``quantization_config`` block of a dirotq checkpoint's config.json, every field kept."""

        def __init__(self, **fields: Any) -> None:
            fields.pop("quant_method", None)
            self.quant_method = DiRotQMethod.DIROTQ
            for key, value in fields.items():
                setattr(self, key, value)

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

        def block(self) -> dict[str, Any]:
            """The block as config.json holds it (plain JSON types)."""
            out = self.to_dict()
            out["quant_method"] = QUANT_METHOD
            return out

    class DiRotQQuantizer(DiffusersQuantizer):
        """Loads pre-quantized dirotq checkpoints (quantizing a float model on load is not offered:
        dirotq needs calibration, ``dirotq.quantize_``)."""

        requires_calibration = True
        use_keep_in_fp32_modules = False  # the checkpoint's dtypes are the quantized model's: keep them

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.block = quantization_config.block()
            self.loaded_keys: list[str] | None = None
            self.digests: dict[str, dict] = {}
            self.v1_hash: str | None = None

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            checkpoint.check_format(self.block)
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in {str(d) for d in device_map.values()}:
                raise ValueError("dirotq checkpoints cannot be offloaded to disk (QuantLinear holds buffers, which "
                                 "accelerate's disk offload does not stream): use a device_map without 'disk'")

        def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
            if torch_dtype is not None:
                return torch_dtype
            saved = self.block.get("torch_dtype") or _dtype_of_targets(self.block["targets"])
            return getattr(torch, saved) if saved else None

        def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
            self.loaded_keys = list(loaded_keys)
            return loaded_keys

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
            for name, info in self.block["targets"].items():
                checkpoint._swap(model, name, checkpoint._shell(info))
            if self.loaded_keys is not None:
                # diffusers only warns about missing/unexpected keys; a quantized checkpoint is exact
                expected = {k: () for k in model.state_dict()}
                checkpoint._check_keys(expected, {k: () for k in self.loaded_keys}, "from_pretrained (dirotq)")

        def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
            # one call per file, with the tensors as stored: hash them before any dtype cast
            if self.block.get("format_version", 1) < 2:
                self.v1_hash = checkpoint.content_hash(state_dict, version=1)  # format 1: one file
            else:
                self.digests.update({k: checkpoint.tensor_digest(v) for k, v in state_dict.items()})
            return state_dict

        def _quant_module(self, model: Any, name: str) -> tuple[QuantLinear | None, str]:
            owner, _, attr = name.rpartition(".")
            try:
                mod = model.get_submodule(owner)
            except AttributeError:
                return None, attr
            return (mod, attr) if isinstance(mod, QuantLinear) else (None, attr)

        def check_if_quantized_param(self, model: Any, param_value: torch.Tensor, param_name: str,
                                     state_dict: dict[str, Any], **kwargs: Any) -> bool:
            return self._quant_module(model, param_name)[0] is not None

        def check_quantized_param_shape(self, param_name: str, current_param: torch.Tensor,
                                        loaded_param: torch.Tensor) -> bool:
            if tuple(current_param.shape) != tuple(loaded_param.shape):
                raise ValueError(f"from_pretrained (dirotq): key {param_name!r} has shape {tuple(loaded_param.shape)}, "
                                 f"config.json records {tuple(current_param.shape)}")
            return True

        def create_quantized_param(self, model: Any, param_value: torch.Tensor, param_name: str,
                                   target_device: Any, state_dict: dict[str, Any], unexpected_keys: Any = None,
                                   **kwargs: Any) -> None:
            mod, attr = self._quant_module(model, param_name)
            value = state_dict[param_name]  # as stored: diffusers has already cast param_value to torch_dtype
            dtype = kwargs.get("dtype")
            if dtype is not None and value.is_floating_point() and attr != "weight_scale":
                value = value.to(dtype)  # weight scales are a float16 storage format, as in load_quantized
            mod._buffers[attr] = value.to(target_device)

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
            if left:
                raise ValueError(f"from_pretrained (dirotq): the checkpoint files hold no tensor {left[0]!r} "
                                 "(an index that does not match its shards?)")
            if self.block.get("format_version", 1) < 2:
                got = self.v1_hash or ""
            else:
                got = checkpoint.combine_digests(self.digests)
            checkpoint.verify_content_hash(self.block, got, "from_pretrained (dirotq)")
            checkpoint._match_non_persistent(model)
            model._dirotq_quantization = checkpoint.quantization_record(self.block)
            return model

        @property
        def is_serializable(self) -> bool:
            logger.warning("a dirotq model is saved with dirotq.save_quantized(model, folder), not save_pretrained")
            return False

        @property
        def is_trainable(self) -> bool:
            return True  # LoRA adapters on QuantLinear (dirotq.lora); the quantized weights stay frozen

    _CLASSES.update(config=DiRotQQuantizationConfig, quantizer=DiRotQQuantizer)
    return _CLASSES


def _dtype_of_targets(targets: dict) -> str | None:
    """Format-1 checkpoints record no model dtype: take the QuantLinear 16-bit tensors' (they are
    built in the model's dtype)."""
    names = [b["dtype"] for info in targets.values() for n, b in info["buffers"].items()
             if n in ("bias", "up", "down") and b["dtype"] in ("float32", "float16", "bfloat16")]
    return max(set(names), key=names.count) if names else None


def _register_into(auto: Any) -> None:
    quantizers = getattr(auto, "AUTO_QUANTIZER_MAPPING", None)
    configs = getattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", None)
    if not isinstance(quantizers, dict) or not isinstance(configs, dict):
        raise RuntimeError("dirotq: diffusers.quantizers.auto has no AUTO_QUANTIZER_MAPPING / "
                           "AUTO_QUANTIZATION_CONFIG_MAPPING (changed diffusers internals): from_pretrained cannot "
                           "load dirotq checkpoints here; use dirotq.load_quantized(folder)")
    classes = _build_classes()
    configs[QUANT_METHOD] = classes["config"]
    quantizers[QUANT_METHOD] = classes["quantizer"]


def register() -> None:
    """Register the dirotq quantizer with diffusers now (imports diffusers); raises a clear error if
    the diffusers internals it needs are missing. Idempotent."""
    import importlib

    _register_into(importlib.import_module(_AUTO))


def is_registered() -> bool:
    """Whether diffusers (if imported) knows quant_method "dirotq"."""
    import sys

    auto = sys.modules.get(_AUTO)
    return auto is not None and QUANT_METHOD in getattr(auto, "AUTO_QUANTIZER_MAPPING", {})


def install() -> None:
    """Register with diffusers as soon as its quantizer registry is imported (now, if it is)."""
    when_imported(_AUTO, _register_into)


__all__ = ["register", "install", "is_registered", "QUANT_METHOD", "DiRotQMethod"]
