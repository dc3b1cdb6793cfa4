"""Quantized checkpoints (docs/DESIGN.md §8, nunchaku-lite): a folder in diffusers' own layout,

- ``diffusion_pytorch_model.safetensors`` (one file), or shards
  ``diffusion_pytorch_model-00001-of-0000N.safetensors`` + ``diffusion_pytorch_model.safetensors.index.json``
  (``weight_map``) when the tensors exceed ``max_shard_size``: the whole state dict as plain tensors
  (QuantLinear buffers included: packed INT4 codes, scales, bases, rotations, 16-bit branches);
- ``config.json``: the transformer's diffusers config plus a ``quantization_config`` block
  (quant_method "dirotq", versions, the method config, group size, the explicit ``targets`` with
  their formats, buffer shapes and recipe meta, the model dtype, and a sha256 content hash).

Content hash (format 2): sha256 over the sorted lines ``name|dtype|shape|sha256(bytes)``, one per
tensor, so it does not depend on how the tensors are split into files (format 1, one file: sha256
over name, dtype, shape and bytes in sorted order; still read). A checkpoint can be written in parts
(``save_quantized_part`` per process, ``finalize_checkpoint`` once: distributed quantization).

Loading builds the skeleton on the meta device (no random init: memory ~ the checkpoint), swaps
exactly the listed targets for QuantLinear shells of the recorded shapes, checks keys strictly,
verifies the hash and assigns the stored tensors: bit-exact. ``ModelClass.from_pretrained`` loads
the same folders once ``dirotq`` is imported (``dirotq/diffusers_integration.py``).
Creating a checkpoint and preparing it for a runtime (kernels) are separate steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import fusion
from ._files import default_mode
from .modules import QuantLinear
from .quantizers import QuantizedTensor

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 2  # 2: shards + index, split-independent hash, model dtype recorded; 1: one file
MANIFEST_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = "10GB"
_SHARD_RE = re.compile(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors")
_PART_RE = re.compile(r"dirotq-part-\d{5}-of-\d{5}-\d{5}\.safetensors")
# decimal, as diffusers' max_shard_size, and binary
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_BUFFERS = ("weight_packed", "weight_codes", "weight", "weight_scale", "weight_ratio", "bias", "smooth", "down",
            "up", "rotation", "hadamard_signs")


def recipe_name(config: Any, model_name: str) -> str:
    """Output folder name that says the recipe, e.g. ``dirotq-w4a4-g64-r64-tiny-pixart``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(model_name)).strip("-") or "model"
    return f"{config.tag()}-{safe}"


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: a positive int, or a string like ``"5GB"`` / ``"500MB"`` (units KB, MB, GB, TB,
    decimal, as diffusers' ``max_shard_size``; KiB, MiB, GiB, TiB binary; digits alone are bytes)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)?\s*", size, flags=re.IGNORECASE)
        if m:
            unit = (m.group(2) or "").upper().replace("IB", "iB")
            value = float(m.group(1)) * (_SIZE_UNITS.get(unit, 1) if unit else 1)
            if value >= 1:
                return int(value)
    raise ValueError(f"a size must be a positive number of bytes or a string like '5GB' or '40GiB' "
                     f"(units KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {size!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _raw_bytes(t: torch.Tensor):
    """The bytes of ``t`` as stored, as a uint8 numpy view (no copy for a contiguous CPU tensor)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_digest(t: torch.Tensor) -> dict:
    """``{"dtype", "shape", "sha256", "nbytes"}`` of one tensor's stored bytes (JSON-serialisable)."""
    raw = _raw_bytes(t)
    return {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest(),
            "nbytes": int(raw.nbytes)}


def combine_digests(digests: Mapping[str, Mapping[str, Any]]) -> str:
    """The format-2 content hash from per-tensor digests: sha256 over the lines
    ``name|dtype|shape|sha256`` in sorted name order, whatever files the tensors are in."""
    h = hashlib.sha256()
    for name in sorted(digests):
        d = digests[name]
        h.update(f"{name}|{d['dtype']}|{tuple(d['shape'])}|{d['sha256']}\n".encode())
    return h.hexdigest()


def _content_hash_v1(tensors: Mapping[str, torch.Tensor]) -> str:
    """Format 1: sha256 over (name, dtype, shape, raw bytes) of every tensor, names sorted."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype!s}|{tuple(t.shape)}|".encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def content_hash(tensors: Mapping[str, torch.Tensor], *, version: int = FORMAT_VERSION) -> str:
    """sha256 content hash of a state dict as checkpoint format ``version`` records it (hex, no prefix)."""
    if version < 2:
        return _content_hash_v1(tensors)
    return combine_digests({n: tensor_digest(t) for n, t in tensors.items()})


def _target_info(name: str, q: QuantLinear, record: dict) -> dict:
    buffers = {n: {"shape": list(b.shape), "dtype": str(b.dtype).replace("torch.", "")}
               for n, b in q.named_buffers(recurse=False) if b is not None}
    return {"method": q.meta.get("method"), "rank": q.rank, "kind": record.get("kind", q.meta.get("kind", "w4a4")),
            "weight_bits": q.weight_bits, "act_bits": q.act_bits, "group_size": q.group_size,
            "act_symmetric": q.act_symmetric, "scale_format": q.scale_format, "in_features": q.in_features,
            "out_features": q.out_features, "quant_in_features": q.quant_in_features,
            "project_out": q.project_out, "weights_in_original_basis": q.weights_in_original_basis,
            "buffers": buffers, "meta": json.loads(json.dumps(q.meta, default=str))}


def _float_config(model_or_config: Any) -> dict:
    """The diffusers config (``_class_name`` and the constructor arguments) of a model or config dict,
    without any quantization block."""
    if hasattr(model_or_config, "to_json_string"):
        cfg = json.loads(model_or_config.to_json_string())
    elif isinstance(model_or_config, Mapping):
        cfg = json.loads(json.dumps(dict(model_or_config), default=str))
    else:
        raise TypeError(f"expected a diffusers ModelMixin or its config dict, got {type(model_or_config).__name__}")
    cfg.pop("quantization_config", None)
    cfg.pop("_pre_quantization_dtype", None)
    if "_class_name" not in cfg:
        raise ValueError("the model config has no _class_name: pass the model, or json.loads(model.to_json_string())")
    return cfg


def _model_dtype(model: nn.Module) -> str | None:
    """The most common floating dtype of the parameters (what ``from_pretrained`` defaults ``torch_dtype`` to)."""
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return _dtype_name(max(set(dtypes), key=dtypes.count)) if dtypes else None


def _split(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names in state-dict order, cut into files of at most ``max_bytes`` (a bigger tensor gets
    a file of its own), as diffusers' ``save_pretrained(max_shard_size=...)`` does."""
    files: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if files[-1] and used + n > max_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += n
    return [f for f in files if f] or [[]]


def save_quantized_part(model: nn.Module, folder: str | Path, *, targets: Iterable[str] | None = None,
                        include_rest: bool = False, part: int = 0, parts: int = 1,
                        quantized_elsewhere: Iterable[str] = (), max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
                        ) -> dict:
    """Write one part of a checkpoint into ``folder`` and return its manifest (a JSON-serialisable dict
    that ``torch.distributed.all_gather_object`` can gather) for ``finalize_checkpoint``.

    The part holds the tensors of ``targets`` (QuantLinear layers of ``model``; None: every
    QuantLinear in it) and, with ``include_rest``, every tensor of no quantized layer: not of a
    QuantLinear of ``model``, nor of a layer named in ``quantized_elsewhere`` (the targets other
    processes quantized, still ``nn.Linear`` here; their float weights are not written). Files get
    temporary names ``dirotq-part-<part>-of-<parts>-<i>.safetensors`` until ``finalize_checkpoint``
    renames them. Distributed use: every process quantizes a disjoint subset of the targets and calls
    this with its rank as ``part`` and the world size as ``parts``; exactly one passes
    ``include_rest=True`` with ``quantized_elsewhere`` = the others' targets.
    """
    from safetensors.torch import save_file

    if fusion.has_fused_layers(model):  # the per-layer form is what checkpoints hold
        with fusion.unfused(model):
            return save_quantized_part(model, folder, targets=targets, include_rest=include_rest, part=part,
                                       parts=parts, quantized_elsewhere=quantized_elsewhere,
                                       max_shard_size=max_shard_size)
    if not hasattr(model, "to_json_string"):
        raise TypeError(f"save_quantized needs a diffusers ModelMixin, got {type(model).__name__}")
    if not (isinstance(part, int) and isinstance(parts, int) and 0 <= part < parts):
        raise ValueError(f"save_quantized_part: part must be in 0..parts-1, got part={part!r}, parts={parts!r}")
    max_bytes = parse_size(max_shard_size)
    record = getattr(model, "_dirotq_quantization", None) or {}
    recorded = dict(record.get("targets", {}))
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    missing = sorted(set(recorded) - set(quant))
    if missing:
        raise ValueError(f"save_quantized: targets recorded as quantized are not QuantLinear any more: {missing[:5]}")
    names = list(quant) if targets is None else list(targets)
    if names and not record:
        raise ValueError("save_quantized: this model was not quantized by dirotq.quantize_ (no _dirotq_quantization)")
    unknown = [n for n in names if n not in quant]
    if unknown:
        raise ValueError(f"save_quantized_part: targets are not QuantLinear layers of this model: {unknown[:5]}")
    elsewhere = set(quantized_elsewhere)
    clash = sorted(elsewhere & set(quant))
    if clash:
        raise ValueError(f"save_quantized_part: quantized_elsewhere names layers quantized in this model: {clash[:5]}")
    mine, skip = set(names), set(quant) | elsewhere
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]  # a target's tensors are its direct parameters/buffers
        if not (owner in mine or (include_rest and owner not in skip)):
            continue
        v = v.detach().cpu().contiguous()
        if v.numel() and v.data_ptr() in seen:  # safetensors refuses shared storage: copy tied tensors
            v = v.clone()
        if v.numel():
            seen.add(v.data_ptr())
        tensors[k] = v
    digests = {k: tensor_digest(v) for k, v in tensors.items()}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    chunks = _split({k: d["nbytes"] for k, d in digests.items()}, max_bytes) if tensors else []
    for i, chunk in enumerate(chunks):
        name = f"dirotq-part-{part:05d}-of-{parts:05d}-{i:05d}.safetensors"
        save_file({k: tensors[k] for k in chunk}, str(out / name), metadata={"format": "pt", "quant_method": "dirotq"})
        default_mode(out / name)  # save_file writes 0600: give it the user's umask mode, as config.json has
        files.append({"file": name, "tensors": chunk})
    return {"dirotq_manifest": MANIFEST_VERSION, "part": part, "parts": parts, "include_rest": bool(include_rest),
            "config": record.get("config"), "dtype": _model_dtype(model) if include_rest else None,
            "targets": {n: _target_info(n, quant[n], recorded.get(n, {})) for n in names},
            "files": files, "tensors": digests}


def _merge_manifests(manifests: list[dict]) -> tuple[dict, dict, dict, list[dict], str | None]:
    """(method config, targets, tensor digests, files in order, model dtype) of a complete set of parts;
    raises ValueError naming the inconsistency."""
    if not manifests:
        raise ValueError("finalize_checkpoint: no manifests")
    for m in manifests:
        if not isinstance(m, dict) or m.get("dirotq_manifest") != MANIFEST_VERSION:
            raise ValueError("finalize_checkpoint: a manifest is not one save_quantized_part returned")
    parts = {m["parts"] for m in manifests}
    got = sorted(m["part"] for m in manifests)
    if len(parts) != 1 or got != list(range(len(manifests))) or parts != {len(manifests)}:
        raise ValueError(f"finalize_checkpoint: expected parts 0..{max(parts) - 1} once each, got parts {got}")
    rest = [m["part"] for m in manifests if m["include_rest"]]
    if len(rest) != 1:
        raise ValueError(f"finalize_checkpoint: exactly one part must include the rest (include_rest=True), got {rest}")
    configs = [m["config"] for m in manifests if m["config"] is not None]
    if not configs:
        raise ValueError("finalize_checkpoint: no part holds a quantized layer")
    for m in manifests:
        if m["config"] is not None and m["config"] != configs[0]:
            raise ValueError(f"finalize_checkpoint: part {m['part']} was quantized with another config "
                             f"({m['config'].get('method')!r} vs {configs[0].get('method')!r})")
    targets: dict = {}
    digests: dict = {}
    files: list[dict] = []
    for m in sorted(manifests, key=lambda m: m["part"]):
        for name in m["targets"]:
            if name in targets:
                raise ValueError(f"finalize_checkpoint: target {name!r} is in more than one part")
        targets.update(m["targets"])
        for name in m["tensors"]:
            if name in digests:
                raise ValueError(f"finalize_checkpoint: tensor {name!r} is in more than one part")
        digests.update(m["tensors"])
        files.extend(m["files"])
    dtype = next(m["dtype"] for m in manifests if m["include_rest"])
    return configs[0], targets, digests, files, dtype


def finalize_checkpoint(model_or_config: Any, folder: str | Path, manifests: list[dict]) -> Path:
    """Complete a checkpoint written in parts: check that the parts' manifests (from
    ``save_quantized_part``, any order) hold exactly the model's tensors, rename the part files to
    ``diffusion_pytorch_model.safetensors`` (one file) or ``diffusion_pytorch_model-0000i-of-0000N.safetensors``,
    write the index and ``config.json`` (written last: a folder without it is no checkpoint), remove
    stale shards of an earlier save; returns the folder. ``model_or_config``: any process's model, or
    its diffusers config dict. Run it on one process, after every part is written.
    """
    import diffusers

    from ._version import __version__

    out = Path(folder)
    cfg = _float_config(model_or_config)
    config, targets, digests, files, dtype = _merge_manifests(list(manifests))
    skeleton = _skeleton(cfg, targets)
    _check_keys({k: tuple(v.shape) for k, v in skeleton.state_dict().items()},
                {k: tuple(d["shape"]) for k, d in digests.items()}, "finalize_checkpoint")
    absent = [f["file"] for f in files if not (out / f["file"]).is_file()]
    if absent:
        raise FileNotFoundError(f"finalize_checkpoint: {out} has no part file {absent[0]} (written on another "
                                "machine? the folder must be shared by every process)")
    n = len(files)
    finals = [WEIGHTS_NAME] if n == 1 else [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
                                            for i in range(n)]
    for f, final in zip(files, finals):
        os.replace(out / f["file"], out / final)
    for stale in out.iterdir():  # an earlier save's shards, index or unfinished parts
        if stale.name not in finals and (stale.name == WEIGHTS_NAME or stale.name == INDEX_NAME and n == 1
                                         or _SHARD_RE.fullmatch(stale.name) or _PART_RE.fullmatch(stale.name)):
            stale.unlink()
    if n > 1:
        index = {"metadata": {"total_size": sum(d["nbytes"] for d in digests.values())},
                 "weight_map": {k: final for f, final in zip(files, finals) for k in f["tensors"]}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    cfg["quantization_config"] = {
        "quant_method": "dirotq", "format_version": FORMAT_VERSION, "dirotq_version": __version__,
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
        "config": config, "group_size": config.get("group_size"), "targets": targets, "torch_dtype": dtype,
        "content_hash": "sha256:" + combine_digests(digests),
    }
    tmp = out / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    os.replace(tmp, out / CONFIG_NAME)
    return out


def save_quantized(model: nn.Module, path: str | Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
                   ) -> Path:
    """Write ``model`` (quantized by ``quantize_``) to folder ``path``; returns the folder. One
    safetensors file when the tensors fit in ``max_shard_size`` (bytes, or "5GB"-style), else shards
    and an index, as diffusers' ``save_pretrained`` writes them."""
    if not getattr(model, "_dirotq_quantization", None):
        raise ValueError("save_quantized: this model was not quantized by dirotq.quantize_ (no _dirotq_quantization)")
    with fusion.unfused(model):  # checkpoints hold the per-layer form, which loads fused or not
        manifest = save_quantized_part(model, path, include_rest=True, max_shard_size=max_shard_size)
        return finalize_checkpoint(model, path, [manifest])


def _shell(info: dict) -> QuantLinear:
    """A QuantLinear with the buffers, shapes and dtypes recorded in ``info``, all on the meta device
    (no memory; the stored tensors are assigned later)."""
    bufs = info["buffers"]
    meta = torch.device("meta")

    def empty(n: str) -> torch.Tensor:
        return torch.empty(bufs[n]["shape"], dtype=getattr(torch, bufs[n]["dtype"]), device=meta)

    def opt(n: str) -> torch.Tensor | None:
        return empty(n) if n in bufs else None

    bits, g = info["weight_bits"], info["group_size"]
    if bits == 16:
        weight: QuantizedTensor | torch.Tensor = empty("weight")
    else:
        # zero-width codes: the constructor packs them without reading values; every buffer is replaced below
        codes = torch.empty(info["out_features"], 0, dtype=torch.int8, device=meta)
        ratio = opt("weight_ratio")
        weight = QuantizedTensor(codes, empty("weight_scale"), None, ratio, bits, g, info["quant_in_features"],
                                 "int_ratio" if ratio is not None else "exact")
    meta_info = dict(info.get("meta") or {})
    method = meta_info.pop("method", info["method"])
    q = QuantLinear(info["in_features"], info["out_features"], method=method, weight=weight,
                    act_bits=info["act_bits"], group_size=g, act_symmetric=info["act_symmetric"],
                    scale_format=info["scale_format"], bias=opt("bias"), smooth=opt("smooth"),
                    down=opt("down"), up=opt("up"), project_out=info["project_out"],
                    rotation=opt("rotation"), hadamard_signs=opt("hadamard_signs"),
                    weights_in_original_basis=info["weights_in_original_basis"], extra_meta=meta_info)
    have = {n for n, b in q._buffers.items() if b is not None}
    if have != set(bufs):
        raise ValueError(f"checkpoint layer with buffers {sorted(bufs)} does not match this dirotq's QuantLinear "
                         f"({sorted(have)}): saved by another dirotq version?")
    for n in bufs:
        q._buffers[n] = empty(n)
    return q


def _skeleton(cfg: Mapping[str, Any], targets: Mapping[str, dict]) -> nn.Module:
    """The diffusers model of ``cfg`` with its parameters on the meta device (no random init, no
    memory) and QuantLinear shells (meta) at ``targets``; buffers the config builds (e.g. PixArt's
    non-persistent pos_embed) are real."""
    import diffusers
    from accelerate import init_empty_weights

    cls_name = cfg.get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown diffusers class {cls_name!r} in the checkpoint config")
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(dict(cfg))
    for name, info in targets.items():
        _swap(model, name, _shell(info))
    return model


def _check_keys(expected: Mapping[str, tuple], got: Mapping[str, tuple], where: str) -> None:
    """Strict key and shape check of a checkpoint's tensors against the skeleton's state dict."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        raise ValueError(f"{where}: checkpoint is missing key {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise ValueError(f"{where}: checkpoint has unexpected key {extra[0]!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, shape in got.items():
        if tuple(shape) != tuple(expected[k]):
            raise ValueError(f"{where}: key {k!r} has shape {tuple(shape)}, the skeleton expects {tuple(expected[k])}")


def _read_config(folder: Path) -> dict:
    if not folder.exists():
        raise FileNotFoundError(f"load_quantized: no such checkpoint folder: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"load_quantized: {folder} is not a folder (expected a checkpoint directory "
                                 f"with {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"load_quantized: {folder} has no {CONFIG_NAME} (not a dirotq checkpoint, "
                                "or incomplete)")
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_quantized: {folder / CONFIG_NAME} is not valid JSON: {err}") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "dirotq":
        raise ValueError(f"load_quantized: {folder / CONFIG_NAME} has no dirotq quantization_config "
                         "(a float diffusers model? load it with from_pretrained)")
    check_format(qc)
    return cfg


def check_format(qc: Mapping[str, Any]) -> None:
    """Raise ValueError if a ``quantization_config`` block is not one this dirotq reads."""
    version = qc.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version!r} is newer than this dirotq "
                         f"(reads ≤ {FORMAT_VERSION}); upgrade dirotq")
    if not isinstance(qc.get("targets"), dict):
        raise ValueError("the dirotq quantization_config has no targets (corrupt config.json?)")


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The checkpoint's safetensors files and, when sharded, the index's ``weight_map``."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"load_quantized: {index} is not a valid index: {err}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"load_quantized: {index} has no weight_map")
        names = sorted(set(map(str, weight_map.values())))
        bad = [n for n in names if Path(n).name != n]
        if bad:
            raise ValueError(f"load_quantized: {index} names a file outside the folder: {bad[0]!r}")
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise FileNotFoundError(f"load_quantized: {folder} is missing shard {absent[0]} listed in {INDEX_NAME} "
                                    "(incomplete copy or download)")
        return [folder / n for n in names], weight_map
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"load_quantized: {folder} has no {WEIGHTS_NAME} (nor {INDEX_NAME}): not a dirotq "
                                "checkpoint, or incomplete")
    return [folder / WEIGHTS_NAME], None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        # as diffusers' from_pretrained reads it (same tensors, same CPU alignment: the same results)
        return load_file(str(file), device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers / short files
        raise ValueError(f"load_quantized: {file} is corrupt or truncated (safetensors could not read it: {err})") from None


def verify_content_hash(qc: Mapping[str, Any], got: str, where: str) -> None:
    """Raise ValueError if ``got`` (hex) is not the content hash recorded in ``qc``."""
    want = str(qc.get("content_hash", ""))
    if want != "sha256:" + got:
        raise ValueError(f"{where}: corrupt or modified checkpoint: content hash sha256:{got[:12]}… "
                         f"does not match the recorded {want[:19]}…")


def quantization_record(qc: Mapping[str, Any]) -> dict:
    """The ``model._dirotq_quantization`` record of a loaded checkpoint (as ``quantize_`` leaves it)."""
    return {"config": qc["config"],
            "targets": {n: {k: info[k] for k in ("method", "rank", "kind", "in_features", "out_features")}
                        for n, info in qc["targets"].items()}}


def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters and buffers to ``dtype``, except QuantLinear weight scales (a
    16-bit storage format the kernels read, not compute precision)."""
    for mod in model.modules():
        keep = {"weight_scale"} if isinstance(mod, QuantLinear) else set()
        for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point() and n not in keep:
                t.data = t.data.to(dtype)


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


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   verify: bool = True, fuse_shared_inputs: bool = False, fuse_activations: bool = False) -> nn.Module:
    """The quantized transformer saved by ``save_quantized`` at ``path`` (a diffusers ModelMixin).

    One file or shards with an index; format 1 and 2. The skeleton is built on the meta device and
    the stored tensors are assigned, so peak memory is about the checkpoint's size. Raises
    FileNotFoundError / ValueError naming the problem: missing folder, files or shards, a config
    without ``quantization_config``, corrupt or truncated safetensors, a missing or extra key
    (named), or a content-hash mismatch ("corrupt or modified checkpoint"; ``verify=False`` skips
    the hash). ``dtype`` casts the non-quantized parameters and the 16-bit QuantLinear tensors after
    loading (codes and scales keep their formats). ``fuse_shared_inputs``: layers that read one
    input run as one layer (``dirotq.fusion``; the deployment form of the GPU kernels).
    ``fuse_activations``: GELUs that follow a quantized projection run in its GEMM epilogue
    (``dirotq.fusion.fuse_activations``).
    """
    folder = Path(path)
    cfg = _read_config(folder)
    qc = cfg.pop("quantization_config")
    files, weight_map = weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        part = _read_tensors(file)
        if weight_map is not None:
            stray = sorted(k for k in part if weight_map.get(k) != file.name)
            if stray:
                raise ValueError(f"load_quantized: {file.name} holds {stray[0]!r}, which {INDEX_NAME} does not map "
                                 "to it (files from different saves?)")
        tensors.update(part)
    try:
        model = _skeleton(cfg, qc["targets"])
    except ValueError as err:
        raise ValueError(f"load_quantized: {folder / CONFIG_NAME}: {err}") from None
    # dtypes may differ from the skeleton's (a bf16 model): the stored tensors are assigned as they are
    _check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()},
                {k: tuple(v.shape) for k, v in tensors.items()}, "load_quantized")
    if verify:
        verify_content_hash(qc, content_hash(tensors, version=qc.get("format_version", 1)),
                            f"load_quantized: {folder}")
    model.load_state_dict(tensors, strict=True, assign=True)
    _match_non_persistent(model)
    model._dirotq_quantization = quantization_record(qc)
    if dtype is not None:
        cast_floats(model, dtype)
    model = model.to(device).eval()
    if fuse_shared_inputs:
        fusion.fuse_shared_inputs(model)
    if fuse_activations:
        fusion.fuse_activations(model)
    return model


__all__ = ["save_quantized", "save_quantized_part", "finalize_checkpoint", "load_quantized", "recipe_name",
           "content_hash", "parse_size", "WEIGHTS_NAME", "INDEX_NAME", "CONFIG_NAME", "FORMAT_VERSION"]
