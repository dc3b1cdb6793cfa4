"""DiRotQ Explorer: W4A4 post-training quantization of diffusion transformers (arXiv 2605.16732).

PCA-basis rotation of activations, top-r coefficients kept 16-bit, the rest INT4; GPTQ weights;
the baselines (RTN, SmoothQuant, QuaRot, SVDQuant, W4A16) on the same quantizer. torchao-like API:

    stats = calibrate(pipe, prompts, steps=20)
    quantize_(pipe.transformer, DiRotQConfig(rank=64, weights="gptq"), stats=stats)
    save_quantized(pipe.transformer, "out/dirotq-w4a4-g64-r64-tiny-pixart")
"""

from __future__ import annotations

from ._version import __version__
from .config import QuantConfig, RankPlan
from .methods import (DiRotQConfig, DiRotQLRConfig, QuaRotConfig, RTNConfig, SmoothQuantConfig, SVDQuantConfig,
                      W4A16Config)
from .modules import QuantLinear
from .registry import config_from_dict, make_config
from .quantize import layer_error, quantize_, quantize_layer, quantize_model
from .checkpoint import finalize_checkpoint, load_quantized, recipe_name, save_quantized, save_quantized_part
from . import diffusers_integration as _diffusers_integration
from . import lora as _lora

# ModelClass.from_pretrained(dirotq checkpoint) and PEFT LoRA on QuantLinear: registered when diffusers'
# quantizer registry / PEFT's LoRA module are first imported (post-import hooks: import dirotq stays light)
_diffusers_integration.install()
_lora.install()

_LAZY = {  # heavier imports (diffusers via the adapters) happen on first use
    "calibrate": ("calibration", "calibrate"),
    "calibrate_transformer": ("calibration", "calibrate_transformer"),
    "CalibrationStats": ("calibration", "CalibrationStats"),
    "LayerStats": ("calibration", "LayerStats"),
    "get_adapter": ("models", "get_adapter"),
    "target_report": ("models", "target_report"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dirotq' has no attribute {name!r}")


__all__ = [
    "__version__", "DiRotQConfig", "DiRotQLRConfig", "RTNConfig", "W4A16Config", "SmoothQuantConfig",
    "QuaRotConfig", "SVDQuantConfig", "QuantConfig", "RankPlan", "QuantLinear", "calibrate",
    "calibrate_transformer", "CalibrationStats", "LayerStats", "quantize_", "quantize_model", "quantize_layer",
    "layer_error", "save_quantized", "save_quantized_part", "finalize_checkpoint", "load_quantized", "recipe_name",
    "get_adapter", "target_report", "config_from_dict", "make_config",
]
