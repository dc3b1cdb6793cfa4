"""Loading the models that DiRotQ calibrates and quantizes (docs/DESIGN.md §6), offline only.

``load_pipeline`` / ``load_transformer`` accept a local diffusers folder or a hub repo id that is
already in the local Hugging Face cache. Nothing is ever downloaded: repo ids resolve with
``local_files_only=True`` (and ``HF_HUB_OFFLINE=1`` is set for this process if unset), and a miss is a
clear error naming what was looked for. A weight file that cannot be read (truncated, corrupted) is a
``ValueError`` naming the folder and the reason, not a traceback through diffusers' loaders.
``DEFAULT_MODEL`` is the embedded tiny PixArt-Σ pipeline.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "assets" / "tiny-pixart")


def _unreadable(folder: Path, err: BaseException) -> ValueError:
    """The one-line error for weights that do not load, naming the file and, for safetensors, the
    reader's reason. diffusers wraps the reader's error in ``OSError("Unable to load weights from
    checkpoint file …")`` and loses it (its fallback re-reads the file as text)."""
    m = re.search(r"'([^']+\.(?:safetensors|bin|pt|pth|ckpt))'", str(err))
    file = Path(m.group(1)) if m else None
    if file is None:  # transformers' loaders raise the reader's error without the file name: find it
        file = next((f for f in sorted(folder.rglob("*.safetensors")) if _safetensors_problem(f)), None)
    why = _safetensors_problem(file) if file is not None and file.suffix == ".safetensors" else None
    why = why or " ".join(str(err).split())
    if file is None:
        return ValueError(f"cannot load the model in {folder}: {why}")
    name = file.relative_to(folder) if file.is_relative_to(folder) else file
    return ValueError(f"cannot load the model in {folder}: {name} is truncated or corrupted ({why})")


def _safetensors_problem(file: Path) -> str | None:
    """Why safetensors cannot read ``file``'s header (None when it can): a truncated file or a
    damaged header. The header check reads no tensor, so it is cheap on any model size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 - any reader error is the answer we want
        return " ".join(str(err).split())
    return None


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading bars off while loading (restored after): they tick per
    component or per tensor, not per byte, so they time little, and they would stand above a one-line
    error as a second line."""
    from diffusers.utils import logging as d_log
    from transformers.utils import logging as t_log

    was = [(m, m.is_progress_bar_enabled()) for m in (d_log, t_log)]
    for m, _ in was:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in was:
            if on:
                m.enable_progress_bar()


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a bad weight file raises: OSError from diffusers / transformers, safetensors' own
    error, and RuntimeError from torch (a tensor of the wrong size)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


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
    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **kwargs)
    except _load_errors() as err:
        raise _unreadable(folder, err) from err
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
    try:
        with _quiet_loading():
            model_ = cls.from_pretrained(str(sub), dtype=dtype, local_files_only=True)
    except _load_errors() as err:
        raise _unreadable(sub, err) from err
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
