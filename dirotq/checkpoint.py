"""Quantized checkpoints (docs/DESIGN.md §8, nunchaku-lite): a folder with

- ``diffusion_pytorch_model.safetensors``: the whole state dict as plain tensors (QuantLinear
  buffers included: packed INT4 codes, scales, bases, rotations, 16-bit branches);
- ``config.json``: the transformer's diffusers config plus a ``quantization_config`` block
  (quant_method "dirotq", versions, the method config, group size, the explicit ``targets`` with
  their formats, buffer shapes and recipe meta, and a sha256 content hash of the tensors).

Loading builds the skeleton from the config, swaps exactly the listed targets for QuantLinear
shells of the recorded shapes, checks keys strictly, verifies the hash and loads: bit-exact.
Creating a checkpoint and preparing it for a runtime (kernels) are separate steps.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._files import default_mode
from .modules import QuantLinear
from .quantizers import QuantizedTensor

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
_BUFFERS = ("weight_packed", "weight_codes", "weight", "weight_scale", "weight_ratio", "bias", "smooth", "down",
            "up", "rotation", "hadamard_signs")


def recipe_name(config: Any, model_name: str) -> str:
    """Output folder name that says the recipe, e.g. ``dirotq-w4a4-g64-r64-tiny-pixart``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(model_name)).strip("-") or "model"
    return f"{config.tag()}-{safe}"


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, names sorted."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _target_info(name: str, q: QuantLinear, record: dict) -> dict:
    buffers = {n: {"shape": list(b.shape), "dtype": str(b.dtype).replace("torch.", "")}
               for n, b in q.named_buffers(recurse=False) if b is not None}
    return {"method": q.meta.get("method"), "rank": q.rank, "kind": record.get("kind", q.meta.get("kind", "w4a4")),
            "weight_bits": q.weight_bits, "act_bits": q.act_bits, "group_size": q.group_size,
            "act_symmetric": q.act_symmetric, "scale_format": q.scale_format, "in_features": q.in_features,
            "out_features": q.out_features, "quant_in_features": q.quant_in_features,
            "project_out": q.project_out, "weights_in_original_basis": q.weights_in_original_basis,
            "buffers": buffers, "meta": json.loads(json.dumps(q.meta, default=str))}


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (quantized by ``quantize_``) to folder ``path``; returns the folder."""
    from safetensors.torch import save_file

    from ._version import __version__

    record = getattr(model, "_dirotq_quantization", None)
    if not record:
        raise ValueError("save_quantized: this model was not quantized by dirotq.quantize_ (no _dirotq_quantization)")
    if not hasattr(model, "to_json_string"):
        raise TypeError(f"save_quantized needs a diffusers ModelMixin, got {type(model).__name__}")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    missing = sorted(set(record["targets"]) - set(quant))
    if missing:
        raise ValueError(f"save_quantized: targets recorded as quantized are not QuantLinear any more: {missing[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.data_ptr() in seen:  # safetensors refuses shared storage: copy tied tensors
            v = v.clone()
        if v.numel():
            seen.add(v.data_ptr())
        tensors[k] = v
    import diffusers

    cfg = json.loads(model.to_json_string())
    cfg["quantization_config"] = {
        "quant_method": "dirotq", "format_version": FORMAT_VERSION, "dirotq_version": __version__,
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
        "config": record["config"], "group_size": record["config"].get("group_size"),
        "targets": {n: _target_info(n, quant[n], record["targets"].get(n, {})) for n in quant},
        "content_hash": "sha256:" + content_hash(tensors),
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "quant_method": "dirotq"})
    default_mode(out / WEIGHTS_NAME)  # save_file writes 0600: give it the user's umask mode, as config.json has
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


def _shell(info: dict, dtype: torch.dtype) -> QuantLinear:
    """An empty QuantLinear with the buffers and shapes recorded in ``info`` (values loaded later)."""
    bufs = info["buffers"]
    shape = lambda n: tuple(bufs[n]["shape"])  # noqa: E731
    zeros = lambda n, dt=dtype: torch.zeros(shape(n), dtype=dt) if n in bufs else None  # noqa: E731
    bits, g = info["weight_bits"], info["group_size"]
    if bits == 16:
        weight: QuantizedTensor | torch.Tensor = torch.zeros(shape("weight"))
    else:
        o, cols = shape("weight_packed") if bits == 4 else shape("weight_codes")
        d_pad = cols * 2 if bits == 4 else cols
        ratio = zeros("weight_ratio", torch.int8)
        weight = QuantizedTensor(torch.zeros(o, d_pad, dtype=torch.int8), torch.zeros(shape("weight_scale")), None,
                                 ratio, bits, g, info["quant_in_features"],
                                 "int_ratio" if ratio is not None else "exact")
    meta = dict(info.get("meta") or {})
    method = meta.pop("method", info["method"])
    return QuantLinear(info["in_features"], info["out_features"], method=method, weight=weight,
                       act_bits=info["act_bits"], group_size=g, act_symmetric=info["act_symmetric"],
                       scale_format=info["scale_format"], bias=zeros("bias"), smooth=zeros("smooth"),
                       down=zeros("down"), up=zeros("up"), project_out=info["project_out"],
                       rotation=zeros("rotation"), hadamard_signs=zeros("hadamard_signs"),
                       weights_in_original_basis=info["weights_in_original_basis"], dtype=dtype, extra_meta=meta)


def _read_config(folder: Path) -> dict:
    if not folder.exists():
        raise FileNotFoundError(f"load_quantized: no such checkpoint folder: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"load_quantized: {folder} is not a folder (expected a checkpoint directory "
                                 f"with {CONFIG_NAME} and {WEIGHTS_NAME})")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"load_quantized: {folder} has no {name} (not a dirotq checkpoint, or incomplete)")
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_quantized: {folder / CONFIG_NAME} is not valid JSON: {err}") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "dirotq":
        raise ValueError(f"load_quantized: {folder / CONFIG_NAME} has no dirotq quantization_config "
                         "(a float diffusers model? load it with from_pretrained)")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {qc.get('format_version')} is newer than this dirotq "
                         f"(reads ≤ {FORMAT_VERSION}); upgrade dirotq")
    return cfg


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers / short files
        raise ValueError(f"load_quantized: {file} is corrupt or truncated (safetensors could not read it: {err})") from None


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
    except AttributeError:
        raise ValueError(f"checkpoint target {name!r} does not exist in the {type(model).__name__} skeleton") from None
    if not isinstance(old, nn.Linear):
        raise ValueError(f"checkpoint target {name!r} is a {type(old).__name__} in the skeleton, not an nn.Linear")
    if (old.in_features, old.out_features) != (new.in_features, new.out_features):
        raise ValueError(f"checkpoint target {name!r} is {new.in_features}->{new.out_features}, the skeleton's layer "
                         f"is {old.in_features}->{old.out_features}")
    setattr(parent, attr, new)


def _match_non_persistent(model: nn.Module) -> None:
    """Cast non-persistent float buffers (not in the file, rebuilt from the config, e.g. PixArt's
    pos_embed) to the dtype of the loaded parameters, as ``model.to(dtype)`` had cast them."""
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if not dtypes:
        return
    dtype = max(set(dtypes), key=dtypes.count)
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            continue
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            b = mod._buffers.get(name)
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = b.to(dtype)


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> nn.Module:
    """The quantized transformer saved by ``save_quantized`` at ``path`` (a diffusers ModelMixin).

    Raises FileNotFoundError / ValueError naming the problem: missing folder or files, a config
    without ``quantization_config``, corrupt or truncated safetensors, a missing or extra key
    (named), or a content-hash mismatch ("corrupt or modified checkpoint"). ``dtype`` casts the
    non-quantized parameters and the 16-bit QuantLinear tensors after loading (codes and scales
    keep their formats).
    """
    import diffusers

    folder = Path(path)
    cfg = _read_config(folder)
    qc = cfg.pop("quantization_config")
    cls_name = cfg.get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"load_quantized: unknown diffusers class {cls_name!r} in {folder / CONFIG_NAME}")
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    model = cls.from_config(cfg)
    store_dtype = next(iter(model.parameters())).dtype
    for name, info in qc["targets"].items():
        _swap(model, name, _shell(info, store_dtype))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"load_quantized: checkpoint is missing key {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise ValueError(f"load_quantized: checkpoint has unexpected key {extra[0]!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, v in tensors.items():
        # dtypes may differ from the float32 skeleton (a bf16 model); the stored tensors are assigned as is
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"load_quantized: key {k!r} has shape {tuple(v.shape)}, the skeleton expects "
                             f"{tuple(expected[k].shape)}")
    want = str(qc.get("content_hash", ""))
    got = "sha256:" + content_hash(tensors)
    if want != got:
        raise ValueError(f"load_quantized: corrupt or modified checkpoint at {folder}: content hash {got[:19]}… "
                         f"does not match the recorded {want[:19]}…")
    model.load_state_dict(tensors, strict=True, assign=True)
    _match_non_persistent(model)
    model._dirotq_quantization = {"config": qc["config"],
                                  "targets": {n: {k: info[k] for k in ("method", "rank", "kind", "in_features",
                                                                      "out_features")}
                                              for n, info in qc["targets"].items()}}
    if dtype is not None:
        for mod in model.modules():
            keep = {"weight_scale"} if isinstance(mod, QuantLinear) else set()
            for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t is not None and t.is_floating_point() and n not in keep:
                    t.data = t.data.to(dtype)
    return model.to(device).eval()


__all__ = ["save_quantized", "load_quantized", "recipe_name", "content_hash", "WEIGHTS_NAME", "CONFIG_NAME"]
