"""DiRotQ Explorer: W4A4 post-training quantization of diffusion transformers (arXiv 2605.16732).

PCA-basis rotation of activations, top-r coefficients kept 16-bit, the rest INT4; GPTQ weights;
the baselines (RTN, SmoothQuant, QuaRot, SVDQuant, W4A16) on the same quantizer. torchao-like API:

    stats = calibrate(pipe, prompts, steps=20)
    quantize_(pipe.transformer, DiRotQConfig(rank=64, weights="gptq"), stats=stats)
    save_quantized(pipe.transformer, "out/dirotq-w4a4-g64-r64-tiny-pixart")
"""

from __future__ import annotations

import sys as _sys

if _sys.argv[:1] == ["-m"]:
    # `python -m dirotq …` is starting (argv[0] is "-m" while the package imports): torch takes ~2 s to
    # import, and a Ctrl-C then would print a traceback through it. One line and status 130 instead,
    # as inside a verb; dirotq.cli.main puts Python's own handler back.
    import signal as _signal

    def _interrupted_while_starting(signum, frame):  # noqa: ARG001
        _sys.stderr.write(("\n" if _sys.stderr.isatty() else "") + "dirotq: interrupted (Ctrl-C)\n")
        _sys.stderr.flush()
        # nothing is written yet, so nothing to clean up; an exception here could be swallowed by
        # whichever import is running (some catch BaseException), os._exit cannot
        import os as _os

        _os._exit(130)

    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # not when started with SIGINT ignored
        _signal.signal(_signal.SIGINT, _interrupted_while_starting)

import logging as _logging

from ._version import __version__

# the library logs through dirotq.* loggers and leaves output to the application (the CLI's -v shows it)
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
from .config import QuantConfig, RankPlan
from .methods import (DiRotQConfig, DiRotQLRConfig, QuaRotConfig, RTNConfig, SmoothQuantConfig, SVDQuantConfig,
                      W4A16Config)
from .modules import QuantLinear
from .registry import config_from_dict, make_config
from .quantize import layer_error, quantize_, quantize_layer, quantize_model
from .checkpoint import finalize_checkpoint, load_quantized, recipe_name, save_quantized, save_quantized_part
from .fusion import fuse_activations, fuse_for_inference, fuse_shared_inputs, unfuse_activations, unfuse_shared_inputs
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
    "compile_transformer": ("compiling", "compile_transformer"),
    "graph_transformer": ("cuda_graphs", "graph_transformer"),
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
    "layer_error", "compile_transformer", "graph_transformer", "save_quantized", "save_quantized_part", "finalize_checkpoint", "load_quantized", "recipe_name",
    "get_adapter", "target_report", "config_from_dict", "make_config", "fuse_shared_inputs", "unfuse_shared_inputs",
    "fuse_activations", "unfuse_activations", "fuse_for_inference",
]
