"""Loading the models that DiRotQ calibrates and quantizes (docs/DESIGN.md §6), offline only.

``load_pipeline`` / ``load_transformer`` accept a local diffusers folder or a hub repo id that is
already in the local Hugging Face cache. Nothing is ever downloaded: repo ids resolve with
``local_files_only=True`` (and ``HF_HUB_OFFLINE=1`` is set for this process if unset), and a miss is a
clear error naming what was looked for. ``DEFAULT_MODEL`` is the embedded tiny PixArt-Σ pipeline.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "assets" / "tiny-pixart")


def _looks_like_path(model: str) -> bool:
    # a hub repo id is "owner/name": exactly one slash, no leading / . ~; anything else is a path
    return model.startswith(("/", ".", "~")) or model.count("/") != 1 or "\\" in model


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local folder for ``model``: the folder itself, or the cached snapshot of a hub repo id.

    Raises ``FileNotFoundError`` naming the path / repo id and the cache searched.
    """
    model = str(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(model):
        raise FileNotFoundError(
            f"model folder {path} does not exist (local paths only; nothing is downloaded)"
            + (" — the embedded tiny model is built by scripts/ (see README)" if model == DEFAULT_MODEL else "")
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, or an offline-mode error from the hub client
        raise FileNotFoundError(
            f"{model!r} is neither a local folder nor in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); nothing is downloaded: copy the model there or pass a folder"
        ) from e


def load_pipeline(model: str | os.PathLike = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, **kwargs):
    """A diffusers pipeline from a local folder or the local HF cache (``DiffusionPipeline``).

    ``kwargs`` go to ``from_pretrained`` (e.g. ``transformer=`` a quantized transformer).
    """
    from diffusers import DiffusionPipeline

    folder = resolve_model_path(model)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: not a diffusers pipeline folder "
                                "(for a transformer alone use load_transformer)")
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)  # calibrate() shows its own progress
    return pipe.to(device)


def load_transformer(model: str | os.PathLike = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, subfolder: str = "transformer"):
    """The denoiser alone: ``<folder>/<subfolder>`` of a pipeline, or a transformer folder itself.

    The class comes from the folder's ``config.json`` ``_class_name`` (any diffusers model).
    """
    import diffusers

    folder = resolve_model_path(model)
    sub = folder / subfolder if (folder / subfolder / "config.json").is_file() else folder
    cfg_path = sub / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no transformer config at {folder / subfolder / 'config.json'} nor {folder / 'config.json'}")
    try:
        cls_name = json.loads(cfg_path.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{cfg_path}: not a diffusers model config ({e})") from e
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"{cfg_path}: class {cls_name!r} not found in diffusers {diffusers.__version__}")
    model_ = cls.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True)
    return model_.to(device).eval()


def call_kwargs(pipe: Any, overrides: Mapping[str, Any] | None = None) -> dict:
    """The keyword arguments every call of ``pipe`` shares (calibration, generation, evaluation and
    the app all start from this one rule), updated with ``overrides``:

    - ``use_resolution_binning=False``: we ask for the model's native size, and tiny models have no
      aspect-ratio bin table;
    - ``clean_caption=False``: PixArt's caption cleaning needs bs4 + ftfy and turns itself off (with
      a warning per call) without them, so calibration and generation would differ by machine;
    - ``max_sequence_length``: the tokenizer's own limit when it is below the pipeline's default
      (the embedded model was trained with 48 text tokens and says so in tokenizer_config.json
      ``max_length``; padding it to PixArt's 300 would only make the 16-bit cross-attention K/V
      dominate CPU time).
    """
    kw: dict[str, Any] = {}
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic callables
        params = {}
    if "use_resolution_binning" in params:
        kw["use_resolution_binning"] = False
    if "clean_caption" in params:
        kw["clean_caption"] = False
    tok = getattr(pipe, "tokenizer", None)
    limits = [getattr(tok, "model_max_length", None), (getattr(tok, "init_kwargs", None) or {}).get("max_length")]
    limits = [v for v in limits if isinstance(v, int) and 0 < v < 10_000]
    if "max_sequence_length" in params and limits:
        default = params["max_sequence_length"].default
        if isinstance(default, int) and min(limits) < default:
            kw["max_sequence_length"] = min(limits)
    kw.update(overrides or {})
    return kw
