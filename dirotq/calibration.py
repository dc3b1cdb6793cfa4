"""Calibration: streaming input statistics of the target linears (docs/DESIGN.md §2).

The BF16 pipeline runs on calibration prompts; forward pre-hooks on the target linears (one hook per
shared-input group, q/k/v of one attention are calibrated once) accumulate, in float64:

- C = Σ xᵀx (uncentered second moment, what the quantizer sees; PCA basis of DiRotQ),
- token count, per-channel abs-max, Σx, Σx², Σx⁴ (mean, variance, kurtosis for outlier views),
- a bounded, seeded reservoir of input tokens (held-out tokens for error measurements).

Memory is O(Σ d²) over groups plus the reservoirs: raw activations are never kept. Statistics are
saved as ``stats.safetensors`` + ``meta.json`` and cached on disk under a content hash of what
produced them (model, prompts, steps, guidance, seed, dtype), so the same calibration never runs
twice. ``CalibrationStats.load`` reads only the index: a group's tensors are memory-mapped when
that group is first used (``LazyGroups``), so FLUX's 120 GiB of float64 statistics never need to be
resident at once. Statistics calibrated in separate processes (one part per rank, each a disjoint
set of groups) become one loadable folder with ``combine_calibration_parts``, without copying a
tensor.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._files import default_mode
from .ondisk import OnDiskMatrix

if TYPE_CHECKING:  # the process-group helpers import nothing of this module: no cycle at run time
    from .distributed import DistInfo

Progress = Callable[[float, str], object]
log = logging.getLogger(__name__)

_CHUNK = 8192  # rows per float64 matmul: bounds the transient float64 copy of a large batch
_FORMAT = 1  # on-disk format version (meta.json "format") of a folder written by CalibrationStats.save
_INDEX_FORMAT = 2  # a folder whose meta.json indexes groups stored in part subfolders (combine_calibration_parts)
_FILE = "stats.safetensors"


def _reservoir_seed(seed: int, count: int) -> int:
    """Seed of the key stream for the tokens after ``count`` seen tokens.

    A pure function of (seed, count) instead of a live generator: no RNG state to save, so a loaded
    LayerStats continues exactly as the unsaved one would have.
    """
    return (seed * 1_000_003 + count * 7_919 + 0x9E3779B9) % (2**63 - 1)


@dataclass
class LayerStats:
    """float64 accumulators for one shared-input group of width d.

    - ``second_moment``: (d, d) C = Σ xᵀx over all tokens (uncentered).
    - ``count``: tokens seen. ``abs_max``, ``sum``, ``sum_sq``, ``sum_4th``: (d,) per channel.
    - ``sample``: (m, d) float32, m ≤ ``sample_tokens``: a uniform sample without replacement of
      the tokens offered to it (bottom-m of i.i.d. uniform keys, ``sample_keys`` (m,) float64 — the
      vectorised equivalent of Algorithm R), deterministic for a seed and the update sequence.
    - ``sample_seen``: tokens offered to the sample. Equal to ``count`` unless the sample was fed
      held-out tokens that never entered the moments (``calibrate(holdout_prompts=k)``): then the
      error measurements on ``sample`` are out-of-sample for bases and GPTQ built from C.
    """

    second_moment: Tensor
    count: int
    abs_max: Tensor
    sum: Tensor
    sum_sq: Tensor
    sum_4th: Tensor
    sample: Tensor
    sample_keys: Tensor
    sample_tokens: int = 512
    seed: int = 0
    sample_seen: int | None = None

    def __post_init__(self) -> None:
        if self.sample_seen is None:
            self.sample_seen = self.count

    @classmethod
    def empty(cls, d: int, sample_tokens: int = 512, seed: int = 0, device: torch.device | str = "cpu") -> "LayerStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(
            second_moment=z(d, d), count=0, abs_max=z(d), sum=z(d), sum_sq=z(d), sum_4th=z(d),
            sample=torch.zeros(0, d, dtype=torch.float32), sample_keys=torch.zeros(0, dtype=torch.float64),
            sample_tokens=int(sample_tokens), seed=int(seed),
        )

    @property
    def dim(self) -> int:
        return self.second_moment.shape[0]

    def _to(self, device: torch.device) -> None:
        for f in ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th"):
            setattr(self, f, getattr(self, f).to(device))

    @torch.no_grad()
    def update(self, x: Tensor, *, moments: bool = True, sample: bool = True) -> None:
        """Accumulate ``x: (..., d)`` (any float dtype) as tokens of width d, in float64.

        ``moments=False`` offers the tokens to the sample only (held-out tokens); ``sample=False``
        adds them to the moments only.
        """
        d = self.dim
        if x.shape[-1] != d:
            raise ValueError(f"LayerStats.update: input width {x.shape[-1]} != stats width {d}")
        x = x.detach().reshape(-1, d)
        n = x.shape[0]
        if n == 0:
            return
        if self.second_moment.device != x.device:
            # accumulate where the activations live (a GPU calibration stays on the GPU)
            self._to(x.device)
        for chunk in (x.split(_CHUNK) if moments else ()):
            x64 = chunk.to(torch.float64)
            self.second_moment.addmm_(x64.T, x64)
            sq = x64 * x64
            self.sum += x64.sum(0)
            self.sum_sq += sq.sum(0)
            self.sum_4th += (sq * sq).sum(0)
            torch.maximum(self.abs_max, x64.abs().amax(0), out=self.abs_max)
        if sample and self.sample_tokens > 0:
            g = torch.Generator().manual_seed(_reservoir_seed(self.seed, self.sample_seen))
            keys = torch.rand(n, generator=g, dtype=torch.float64)
            self._keep_smallest(keys, x)
        if sample:
            self.sample_seen += n
        if moments:
            self.count += n

    def _keep_smallest(self, keys: Tensor, rows: Tensor) -> None:
        """Reservoir step: keep the ``sample_tokens`` smallest keys of (old ∪ new)."""
        k_old = self.sample_keys.numel()
        all_keys = torch.cat([self.sample_keys, keys])
        m = min(self.sample_tokens, all_keys.numel())
        sel = torch.topk(all_keys, m, largest=False).indices.sort().values
        old, new = sel[sel < k_old], sel[sel >= k_old] - k_old
        picked = rows[new.to(rows.device)].to(torch.float32).cpu()
        self.sample = torch.cat([self.sample[old], picked])
        self.sample_keys = torch.cat([self.sample_keys[old], keys[new]])

    def merge(self, other: "LayerStats") -> "LayerStats":
        """Statistics of the union of both token sets (a new object; inputs unchanged).

        Moments are exact sums. The merged sample is the bottom-m of the union of keys; it is a
        uniform sample of the union when the two key streams are independent (different seeds).
        """
        if other.dim != self.dim:
            raise ValueError(f"LayerStats.merge: widths differ ({self.dim} vs {other.dim})")
        dev = self.second_moment.device
        o = {f: getattr(other, f).to(dev) for f in ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th")}
        out = LayerStats(
            second_moment=self.second_moment + o["second_moment"], count=self.count + other.count,
            abs_max=torch.maximum(self.abs_max, o["abs_max"]), sum=self.sum + o["sum"],
            sum_sq=self.sum_sq + o["sum_sq"], sum_4th=self.sum_4th + o["sum_4th"],
            sample=self.sample.clone(), sample_keys=self.sample_keys.clone(),
            sample_tokens=max(self.sample_tokens, other.sample_tokens), seed=self.seed,
            sample_seen=self.sample_seen + other.sample_seen,
        )
        if other.sample_keys.numel():
            out._keep_smallest(other.sample_keys, other.sample)
        return out

    def _require_tokens(self) -> None:
        if self.count == 0:
            raise ValueError("LayerStats: no tokens recorded (was the layer ever called during calibration?)")

    def mean(self) -> Tensor:
        """Per-channel mean E[x], (d,) float64."""
        self._require_tokens()
        return self.sum / self.count

    def second_moment_mean(self) -> Tensor:
        """C / count = E[xᵀx], (d, d) float64 (the paper preset's normalised C)."""
        self._require_tokens()
        return self.second_moment / self.count

    def covariance(self) -> Tensor:
        """Centered population covariance E[xᵀx] − E[x]ᵀE[x], (d, d) float64."""
        mu = self.mean()
        return self.second_moment_mean() - torch.outer(mu, mu)

    def kurtosis(self) -> Tensor:
        """Per-channel kurtosis about zero, E[x⁴] / E[x²]², (d,) float64.

        Uncentered (what a symmetric quantizer sees: outliers measured from 0); 3 for a zero-mean
        Gaussian, 1.8 for a uniform, large for heavy-tailed outlier channels. Dead channels
        (E[x²] = 0) give 0.
        """
        self._require_tokens()
        m2 = self.sum_sq / self.count
        m4 = self.sum_4th / self.count
        return torch.where(m2 > 0, m4 / m2.clamp_min(1e-300) ** 2, torch.zeros_like(m2))

    def to(self, device: torch.device | str) -> "LayerStats":
        self._to(torch.device(device))
        return self


_FIELDS = ("second_moment", "abs_max", "sum", "sum_sq", "sum_4th", "sample", "sample_keys")


@dataclass(frozen=True)
class _GroupSource:
    """Where one group's tensors live on disk: ``file`` holds ``{prefix}{field}`` for every field."""

    file: Path
    prefix: str
    count: int
    sample_tokens: int
    seed: int
    sample_seen: int
    width: int


def _read_group(src: _GroupSource, key: str) -> LayerStats:
    from safetensors import safe_open

    try:
        with safe_open(str(src.file), framework="pt") as f:  # memory-mapped: pages are read when used
            fields = {name: f.get_tensor(f"{src.prefix}{name}") for name in _FIELDS}
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration statistics incomplete: {src.file} (group {key!r}) is missing") from None
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"corrupt calibration tensors {src.file} (group {key!r}): {e}; "
                         "delete the folder to recalibrate") from e
    st = LayerStats(count=src.count, sample_tokens=src.sample_tokens, seed=src.seed, sample_seen=src.sample_seen,
                    **fields)
    # where C lies in the file: the top-r eigensolver reads it in row blocks instead of through the
    # mapping, whose touched pages would all stay resident (dirotq/ondisk.py)
    st.second_moment_file = OnDiskMatrix.in_safetensors(src.file, f"{src.prefix}second_moment")
    return st


class LazyGroups(MutableMapping):
    """group key -> ``LayerStats``, as ``CalibrationStats.layers`` of loaded statistics.

    A group read from disk is materialised (memory-mapped with safetensors ``safe_open``) the first
    time it is accessed and kept until ``release(key)``, after which the next access reads it
    again; groups set in memory (``layers[key] = st``) behave as in a dict and are never released.
    ``in``, ``len``, iteration over keys and ``width(key)`` never read tensors; ``values()`` and
    ``items()`` read every group, as they would have to."""

    def __init__(self, sources: Mapping[str, _GroupSource] | None = None) -> None:
        self._sources: dict[str, _GroupSource] = dict(sources or {})
        self._loaded: dict[str, LayerStats] = {}
        self._keys: dict[str, None] = dict.fromkeys(self._sources)

    def __getitem__(self, key: str) -> LayerStats:
        st = self._loaded.get(key)
        if st is None:
            src = self._sources.get(key)
            if src is None:
                raise KeyError(key)
            st = self._loaded[key] = _read_group(src, key)
        return st

    def __setitem__(self, key: str, value: LayerStats) -> None:
        self._loaded[key] = value
        self._sources.pop(key, None)
        self._keys[key] = None

    def __delitem__(self, key: str) -> None:
        if key not in self._keys:
            raise KeyError(key)
        del self._keys[key]
        self._loaded.pop(key, None)
        self._sources.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __repr__(self) -> str:
        return f"LazyGroups({len(self._keys)} groups, {len(self._loaded)} in memory)"

    def is_loaded(self, key: str) -> bool:
        """True when the group's tensors are in memory (set in memory, or read and not released)."""
        return key in self._loaded

    def release(self, key: str) -> bool:
        """Drop a disk-backed group's tensors (the next access reads them again); True if dropped.
        Groups that exist only in memory are kept: dropping them would lose them."""
        if key in self._sources and key in self._loaded:
            del self._loaded[key]
            return True
        return False

    def count(self, key: str) -> int:
        """Tokens the group's moments saw, from the metadata when not loaded."""
        if key in self._loaded:
            return self._loaded[key].count
        if key not in self._sources:
            raise KeyError(key)
        return self._sources[key].count

    def width(self, key: str) -> int:
        """The group's input width d, from the file header when not loaded."""
        if key in self._loaded:
            return self._loaded[key].dim
        if key not in self._sources:
            raise KeyError(key)
        return self._sources[key].width

    def copy(self) -> "LazyGroups":
        """A shallow copy: the same disk sources and the same in-memory LayerStats objects."""
        out = LazyGroups()
        out._sources, out._loaded, out._keys = dict(self._sources), dict(self._loaded), dict(self._keys)
        return out

    def adopt(self, key: str, other: Mapping[str, LayerStats]) -> None:
        """Take ``other[key]`` without reading it when ``other`` is a LazyGroups that has not."""
        if isinstance(other, LazyGroups) and key in other._sources and key not in other._loaded:
            self._loaded.pop(key, None)
            self._sources[key] = other._sources[key]
            self._keys[key] = None
        else:
            self[key] = other[key]


@dataclass
class CalibrationStats:
    """Statistics of every shared-input group of one model.

    - ``layers``: group key -> LayerStats (the group key is the group's first target's name): a dict,
      or for loaded statistics a ``LazyGroups`` that reads a group from disk when it is first used.
    - ``groups``: every target layer name -> its group key.
    - ``meta``: model id, family, prompts sha256, number of prompts, recorded step indices,
      num_inference_steps, guidance_scale, dtype, versions (torch, diffusers, dirotq).
    """

    layers: MutableMapping[str, LayerStats]
    groups: dict[str, str]
    meta: dict = field(default_factory=dict)

    def group_key(self, name: str) -> str:
        """The key of ``name``'s input group (``name`` a target layer or a group key), without
        reading any tensor; ``KeyError`` (with close names) when there is none."""
        key = self.groups.get(name, name)
        if key in self.layers:
            return key
        close = difflib.get_close_matches(name, list(self.groups) + list(self.layers), n=5, cutoff=0.5)
        hint = f"; close names: {close}" if close else ""
        raise KeyError(f"no calibration statistics for layer {name!r} ({len(self.groups)} layers calibrated){hint}")

    def for_layer(self, name: str) -> LayerStats:
        """The statistics of ``name``'s input group (``name`` a target layer or a group key)."""
        return self.layers[self.group_key(name)]

    def group_width(self, key: str) -> int:
        """Input width d of group ``key``, without reading its tensors when they are on disk."""
        if isinstance(self.layers, LazyGroups):
            return self.layers.width(key)
        return self.layers[key].dim

    def is_loaded(self, key: str) -> bool:
        """True when group ``key``'s tensors are in memory."""
        return self.layers.is_loaded(key) if isinstance(self.layers, LazyGroups) else key in self.layers

    def release(self, key: str) -> bool:
        """Drop group ``key``'s tensors when they can be read again from disk (``quantize_`` does
        once the group is quantized); True if dropped. In-memory statistics are never dropped."""
        return self.layers.release(key) if isinstance(self.layers, LazyGroups) else False

    def merge(self, other: "CalibrationStats") -> "CalibrationStats":
        """Combine two calibrations: groups present in both are ``LayerStats.merge`` d (more
        prompts), the others are taken as they are (layer-subset passes; groups still on disk are
        not read). ``meta`` is this one's, with the other's under ``"merged"``."""
        if isinstance(self.layers, LazyGroups):
            layers: MutableMapping[str, LayerStats] = self.layers.copy()
        elif isinstance(other.layers, LazyGroups):
            layers = LazyGroups()
            for key, st in self.layers.items():
                layers[key] = st
        else:
            layers = dict(self.layers)
        for key in other.layers:
            if key in layers:
                layers[key] = layers[key].merge(other.layers[key])
            elif isinstance(layers, LazyGroups):
                layers.adopt(key, other.layers)
            else:
                layers[key] = other.layers[key]
        meta = {**self.meta, "merged": [*self.meta.get("merged", []), other.meta]}
        return CalibrationStats(layers=layers, groups={**self.groups, **other.groups}, meta=meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/stats.safetensors`` + ``path/meta.json`` (atomically: a temp folder renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tensors: dict[str, Tensor] = {}
            layers_meta = {}
            for i, key in enumerate(self.layers):
                was_loaded = self.is_loaded(key)
                st = self.layers[key]
                for f in _FIELDS:
                    tensors[f"{i}.{f}"] = getattr(st, f).detach().cpu().contiguous()
                layers_meta[key] = {"index": i, "count": st.count, "sample_tokens": st.sample_tokens, "seed": st.seed,
                                    "sample_seen": st.sample_seen}
                if not was_loaded:  # saving loaded statistics does not leave every group in memory
                    self.release(key)
            save_file(tensors, str(tmp / "stats.safetensors"))
            doc = {"format": _FORMAT, "layers": layers_meta, "groups": self.groups, "meta": self.meta}
            (tmp / "meta.json").write_text(json.dumps(doc, indent=1, sort_keys=False, default=str))
            # mkdtemp makes the folder 0700 and save_file the tensors 0600: the user's umask modes instead
            default_mode(tmp, tmp / "stats.safetensors")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationStats":
        """Open a folder written by ``save`` or indexed by ``combine_calibration_parts``.

        Only ``meta.json`` and the safetensors headers are read here (every file, key and shape is
        checked); a group's tensors are memory-mapped when the group is first used (``layers`` is
        a ``LazyGroups``). Missing or corrupt files raise ``FileNotFoundError`` / ``ValueError``
        naming the file."""
        path = Path(path)
        doc, meta_p = _read_index(path)
        sources = _group_sources(path, doc, meta_p)
        return cls(layers=LazyGroups(sources), groups=dict(doc["groups"]), meta=doc.get("meta", {}))


def _read_index(path: Path) -> tuple[dict, Path]:
    """``(meta.json document, its path)`` of a stats folder (format 1 or 2), checked."""
    meta_p = path / "meta.json"
    if not meta_p.is_file():
        raise FileNotFoundError(f"calibration statistics incomplete: {meta_p} is missing")
    try:
        doc = json.loads(meta_p.read_text())
        if not isinstance(doc["layers"], dict) or not isinstance(doc["groups"], dict):
            raise TypeError("'layers' and 'groups' must be objects")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt calibration metadata {meta_p}: {e}; delete the folder to recalibrate") from e
    if doc.get("format") not in (_FORMAT, _INDEX_FORMAT):
        raise ValueError(f"{meta_p}: unsupported stats format {doc.get('format')!r} "
                         f"(expected {_FORMAT}, or {_INDEX_FORMAT} for combined parts)")
    return doc, meta_p


def _group_sources(path: Path, doc: dict, meta_p: Path) -> dict[str, _GroupSource]:
    """Every group's file, key prefix and metadata, checked against the safetensors headers."""
    from safetensors import safe_open

    headers: dict[Path, dict[str, list[int]]] = {}
    sources = {}
    for key, lm in doc["layers"].items():
        try:
            rel = lm.get("file", _FILE) if doc["format"] == _INDEX_FORMAT else _FILE
            file = (path / rel).resolve() if doc["format"] == _INDEX_FORMAT else path / _FILE
            prefix = f"{int(lm['index'])}."
            info = dict(count=int(lm["count"]), sample_tokens=int(lm["sample_tokens"]), seed=int(lm["seed"]),
                        sample_seen=int(lm.get("sample_seen", lm["count"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt calibration metadata {meta_p}: group {key!r}: {e}") from e
        if file not in headers:
            if not file.is_file():
                raise FileNotFoundError(f"calibration statistics incomplete: {file} is missing")
            try:
                with safe_open(str(file), framework="pt") as f:
                    headers[file] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
                raise ValueError(f"corrupt calibration tensors {file}: {e}; delete the folder to recalibrate") from e
        shapes = headers[file]
        missing = [f for f in _FIELDS if f"{prefix}{f}" not in shapes]
        if missing:
            raise ValueError(f"corrupt calibration tensors {file}: missing {missing} for group {key!r}")
        sources[key] = _GroupSource(file=file, prefix=prefix, width=shapes[f"{prefix}second_moment"][0], **info)
    return sources


def part_folder(folder: str | os.PathLike, rank: int) -> Path:
    """Where process ``rank`` of a split calibration saves its part: ``folder/part-<rank:05d>``
    (``stats.save(part_folder(out, rank))`` on every rank, then ``combine_calibration_parts(out)``
    on rank 0)."""
    return Path(folder) / f"part-{int(rank):05d}"


def combine_calibration_parts(folder: str | os.PathLike, parts: Sequence[str | os.PathLike] | None = None,
                              meta: Mapping[str, Any] | None = None) -> Path:
    """Make ``folder`` one loadable statistics folder out of parts saved in its subfolders.

    Each part is a folder written by ``CalibrationStats.save`` (or itself combined) holding a
    disjoint set of groups, e.g. one per rank of a distributed calibration (``part_folder``).
    ``parts`` default: every ``folder/part-*``. Writes ``folder/meta.json`` (format 2) whose groups
    point to the parts' safetensors files; no tensor is copied or read. The folder's ``meta`` is
    ``meta`` when given (the whole calibration's), else the first part's, with every part's under
    ``"parts"``. A group in two parts, a layer mapped to two
    groups, a part outside ``folder`` or an existing single-file statistics folder at ``folder``
    is a ``ValueError``; ``CalibrationStats.merge`` is the tool for overlapping calibrations.
    Returns ``folder``."""
    folder = Path(folder)
    if (folder / _FILE).exists():
        raise ValueError(f"{folder} holds single-file statistics ({_FILE}); combine parts into a new folder")
    if parts is None:
        parts = sorted(p for p in folder.glob("part-*") if p.is_dir())
    parts = [Path(p) if Path(p).is_absolute() else folder / p for p in parts]
    if not parts:
        raise ValueError(f"no parts to combine in {folder} (expected part-* subfolders, see part_folder)")
    root = folder.resolve()
    layers: dict[str, dict] = {}
    groups: dict[str, str] = {}
    owner: dict[str, str] = {}
    metas = []
    for part in parts:
        try:
            rel = part.resolve().relative_to(root)
        except ValueError:
            raise ValueError(f"part {part} is not inside {folder}: save each part to a subfolder "
                             "(part_folder(folder, rank))") from None
        doc, meta_p = _read_index(part)
        _group_sources(part, doc, meta_p)  # every file and key is there before anything is written
        for key, lm in doc["layers"].items():
            if key in layers:
                raise ValueError(f"group {key!r} is in both {owner[key]} and {rel}: parts must hold disjoint "
                                 "groups (CalibrationStats.merge combines overlapping calibrations)")
            file = lm.get("file", _FILE) if doc["format"] == _INDEX_FORMAT else _FILE
            layers[key] = {**lm, "file": (rel / file).as_posix()}
            owner[key] = rel.as_posix()
        for name, key in doc["groups"].items():
            if groups.setdefault(name, key) != key:
                raise ValueError(f"layer {name!r} belongs to group {groups[name]!r} in one part and {key!r} in "
                                 f"{rel}: the parts come from different adapters")
        metas.append({"folder": rel.as_posix(), "groups": len(doc["layers"]), "meta": doc.get("meta", {})})
    doc = {"format": _INDEX_FORMAT, "layers": layers, "groups": groups,
           "meta": {**(metas[0]["meta"] if meta is None else meta), "parts": metas}}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".meta.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, folder / "meta.json")
    return folder


# ------------------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, list[Tensor]]]:
    """Record the inputs of the named submodules during forwards inside the ``with`` block.

    Yields ``{name: [x (..., d_in), ...]}`` (detached clones, one per call). For tests and analysis
    on small models: it keeps raw activations, unlike ``calibrate``.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"capture_inputs: no such modules {missing}")
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_pre_hook(lambda mod, args, n=n: out[n].append(args[0].detach().clone()))
        for n in names
    ]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _group_seed(seed: int, key: str) -> int:
    # a different key stream per group: reservoirs of different layers are independent samples
    return (seed * 2_654_435_761 + zlib.crc32(key.encode())) % (2**31)


class _Recorder:
    """Forward pre-hooks, one per shared-input group (on the group's first member).

    ``active`` gates recording, so a pipeline run can record only chosen denoising steps.
    """

    def __init__(self, model: nn.Module, adapter, sample_tokens: int, seed: int, layers: list[str] | None = None):
        self.targets = adapter.targets(model)
        if not self.targets:
            raise ValueError(f"{type(model).__name__}: the {adapter.family} adapter found no target layers")
        if layers is not None:
            # a subset (names or group keys): whole groups are kept, so for_layer stays consistent
            unknown = [n for n in layers if n not in self.targets and n not in {s.group for s in self.targets.values()}]
            if unknown:
                raise KeyError(f"calibration layers {unknown[:5]} are not targets of the {adapter.family} adapter")
            keep = {self.targets[n].group if n in self.targets else n for n in layers}
            self.targets = {n: s for n, s in self.targets.items() if s.group in keep}
        self.groups = {n: s.group for n, s in self.targets.items()}
        modules = dict(model.named_modules())
        self.layers: dict[str, LayerStats] = {}
        self.handles = []
        self.active = True
        self.moments, self.sampling = True, True  # what the current prompts feed (held-out: sample only)
        for key in dict.fromkeys(self.groups.values()):
            lin = modules[key]
            self.layers[key] = LayerStats.empty(lin.in_features, sample_tokens, _group_seed(seed, key))
            self.handles.append(lin.register_forward_pre_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(mod, args):
            if self.active:
                self.layers[key].update(args[0], moments=self.moments, sample=self.sampling)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def result(self, meta: dict) -> CalibrationStats:
        for st in self.layers.values():
            st.to("cpu")
        return CalibrationStats(layers=self.layers, groups=self.groups, meta=meta)


def _versions() -> dict:
    import diffusers

    from ._version import __version__

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "dirotq": __version__}


def _tqdm_progress(desc: str, total: int, unit: str) -> tuple[Progress, Callable[[], None]]:
    """A ``progress(fraction, message)`` drawing a tqdm bar of ``total`` ``unit``s: with a real
    total (denoising steps, not per mille) the bar's rate and ETA read in those units."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def progress(frac: float, msg: str) -> None:
        bar.n = int(round(total * min(max(frac, 0.0), 1.0)))
        bar.set_postfix_str(msg, refresh=False)
        bar.refresh()

    return progress, bar.close


@torch.no_grad()
def calibrate_transformer(
    transformer: nn.Module,
    inputs: Iterable[dict],
    *,
    adapter=None,
    sample_tokens: int = 512,
    seed: int = 0,
    progress: Progress | None = None,
    layers: list[str] | None = None,
) -> CalibrationStats:
    """Statistics of every target group over ``transformer(**kw)`` for each ``kw`` in ``inputs``.

    Use when the inputs are at hand (tests, tiny models, custom loops); ``calibrate`` runs a
    pipeline instead. ``progress(fraction, message)`` is called after each input when the
    iterable has a length. ``layers``: record only the groups of these targets (see ``calibrate``).
    """
    from .models import get_adapter

    adapter = adapter or get_adapter(transformer)
    rec = _Recorder(transformer, adapter, sample_tokens, seed, layers)
    total = len(inputs) if hasattr(inputs, "__len__") else None
    n = 0
    try:
        for kw in inputs:
            transformer(**kw)
            n += 1
            if progress is not None:
                progress(n / total if total else 0.0, f"calibrating: forward {n}" + (f"/{total}" if total else ""))
    finally:
        rec.remove()
    meta = {"family": adapter.family, "forwards": n, "sample_tokens": sample_tokens, "seed": seed,
            "dtype": str(next(transformer.parameters()).dtype), "versions": _versions()}
    return rec.result(meta)


# --------------------------------------------------------------------------- pipeline calibration
def _json_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stats_cache_key(
    model_id: str,
    prompts: list[str],
    num_inference_steps: int,
    steps: list[int] | None,
    guidance_scale: float | None,
    seed: int,
    dtype,
    **extra,
) -> str:
    """sha256 hex of everything that determines the statistics (the cache folder name).

    ``extra``: further determinants (sample size, adapter family, pipeline kwargs), JSON-able.
    """
    return _json_hash({
        "model": model_id, "prompts": list(prompts), "num_inference_steps": int(num_inference_steps),
        "steps": None if steps is None else sorted(int(s) for s in steps),
        "guidance_scale": guidance_scale, "seed": int(seed), "dtype": str(dtype), "extra": extra,
    })


def model_fingerprint(model: nn.Module) -> str:
    """Cheap content hash of a model: names, shapes, dtypes and a few values of every parameter.

    Part of the cache key, so two different weight sets behind the same path (a retrained tiny
    model, random inits) never share cached statistics; hashing every byte of a 12B model would
    cost more than it saves.
    """
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        if flat.numel() and not flat.is_meta:  # offloaded (meta) weights: shapes only
            idx = torch.linspace(0, flat.numel() - 1, steps=min(16, flat.numel())).long()
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _model_id(pipe) -> str:
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return f"{name or type(pipe).__name__}#{model_fingerprint(pipe.transformer)}"


def calibrate(
    pipe,
    prompts: list[str],
    *,
    num_inference_steps: int = 20,
    steps: list[int] | int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    sample_tokens: int = 512,
    adapter=None,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    pipe_kwargs: dict | None = None,
    layers: list[str] | None = None,
    holdout_prompts: int = 0,
    max_stats_bytes: int | None = None,
    dist=None,
    data_parallel: bool = False,
) -> CalibrationStats:
    """Run the diffusers ``pipe`` on ``prompts`` and return the target groups' statistics.

    - Denoising step ``i`` (0-based, the i-th call of ``pipe.scheduler.step``) is recorded when
      ``i in steps`` (``None``: all steps; an int ``n``: all steps of an ``n``-step schedule). Every transformer forward during a recorded step is
      pooled, so CFG's conditional and unconditional branches both count (PixArt batches them in
      one forward; pipelines with separate forwards are covered the same way).
    - Prompt ``j`` gets its own generator seeded ``seed + j``: results do not depend on
      ``batch_size``. Latents only (``output_type="latent"``): the VAE never runs.
    - ``guidance_scale=None`` keeps the pipeline's default. ``pipe_kwargs`` go to ``pipe(...)``
      (e.g. ``height``, ``width``, ``max_sequence_length``).
    - ``cache_dir``: statistics are looked up in / saved to ``cache_dir/<stats_cache_key>/``.
    - ``progress(fraction, message)``: Gradio's ``gr.Progress`` fits; a tqdm bar when ``None``.
    - ``layers``: only the groups of these target names are recorded (default: all). Memory is
      Σ d² · 8 bytes over recorded groups: 5.8 GiB for PixArt-Σ, 16 GiB SD3-medium, 120 GiB for
      FLUX.1 (its 12288- and 15360-wide down-projections dominate), so FLUX calibrates in passes:
    - ``max_stats_bytes``: run the pipeline once per pass, each pass recording groups whose
      statistics fit this many bytes; each pass is saved as a part of the cache folder as it ends
      (so ``cache_dir`` is required) and the result loads group by group from disk. The numbers
      equal a single pass bit for bit.
    - ``dist`` (a ``dirotq.distributed.DistInfo``, under torchrun): every process runs the same
      prompts but records only its cost-balanced share of the groups (in passes if
      ``max_stats_bytes``), into parts of the same cache folder (``cache_dir`` on a file system every
      process sees); bit for bit the single-process result. With ``data_parallel=True`` the
      prompts are split instead (prompt j keeps seed ``seed + j``) and the moments all-reduced:
      equal up to float64 summation order, with a token sample drawn from every process's tokens.
    - ``holdout_prompts=k``: the last k prompts are held out: their tokens fill only the token
      sample (used for error measurements), never the moments that bases and GPTQ are built from;
      the other prompts feed only the moments. 0 (default): the sample is drawn from the same
      tokens as the moments (in-sample).
    """
    from .models import get_adapter
    from .pipelines import call_kwargs

    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibrate: no prompts given")
    if not isinstance(holdout_prompts, int) or not 0 <= holdout_prompts < len(prompts):
        raise ValueError(f"calibrate: holdout_prompts must be an int in [0, {len(prompts) - 1}] "
                         f"(at least one prompt must feed the statistics), got {holdout_prompts!r}")
    if isinstance(steps, int):  # calibrate(pipe, prompts, steps=20): every step of a 20-step schedule
        num_inference_steps, steps = steps, None
    if steps is not None:
        steps = sorted({int(s) for s in steps})
        bad = [s for s in steps if not 0 <= s < num_inference_steps]
        if bad:
            raise ValueError(f"calibrate: steps {bad} outside [0, {num_inference_steps})")
    transformer = pipe.transformer
    adapter = adapter or get_adapter(transformer)
    pipe_kwargs = call_kwargs(pipe, pipe_kwargs)
    if guidance_scale is not None:
        pipe_kwargs["guidance_scale"] = guidance_scale
    dtype = next(transformer.parameters()).dtype
    model_id = _model_id(pipe)
    key = stats_cache_key(model_id, prompts, num_inference_steps, steps, guidance_scale, seed, dtype,
                          sample_tokens=sample_tokens, family=adapter.family,
                          overrides=getattr(adapter, "overrides", {}), pipe_kwargs=pipe_kwargs,
                          layers=None if layers is None else sorted(layers), holdout_prompts=holdout_prompts,
                          # data-parallel sums in another order and samples other tokens: its own entry
                          **({"data_parallel": dist.world_size} if data_parallel and dist is not None
                             and dist.distributed else {}))
    cache_path = Path(cache_dir) / key if cache_dir is not None else None
    if cache_path is not None and (cache_path / "meta.json").is_file():
        log.info("calibration statistics from the cache: %s", cache_path)
        if progress is not None:
            progress(1.0, "calibration statistics loaded from cache")
        return CalibrationStats.load(cache_path)

    record = set(range(num_inference_steps)) if steps is None else set(steps)
    meta = {
        "model_id": model_id, "family": adapter.family, "cache_key": key,
        "prompts_sha256": _json_hash(prompts), "num_prompts": len(prompts), "holdout_prompts": holdout_prompts,
        "steps": sorted(record), "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "seed": seed, "sample_tokens": sample_tokens,
        "dtype": str(dtype), "pipe_kwargs": {k: v for k, v in pipe_kwargs.items() if isinstance(v, (int, float, str, bool))},
        "versions": _versions(),
    }
    if max_stats_bytes is not None or data_parallel or (dist is not None and dist.distributed):
        again = dict(num_inference_steps=num_inference_steps, steps=steps, guidance_scale=guidance_scale,
                     batch_size=batch_size, sample_tokens=sample_tokens, adapter=adapter, progress=progress,
                     pipe_kwargs=pipe_kwargs, holdout_prompts=holdout_prompts)
        return _calibrate_split(pipe, prompts, seed, layers, cache_path, meta, again, max_stats_bytes, dist,
                                data_parallel)

    rec = _Recorder(transformer, adapter, sample_tokens, seed, layers)
    state = {"step": 0, "batch": 0}
    # batches never mix calibration and held-out prompts: each batch feeds one kind of accumulator
    n_cal = len(prompts) - holdout_prompts
    batches = [(b, min(b + batch_size, n_cal)) for b in range(0, n_cal, batch_size)]
    batches += [(b, min(b + batch_size, len(prompts))) for b in range(n_cal, len(prompts), batch_size)]
    n_batches = len(batches)
    total = n_batches * num_inference_steps
    done = {"n": 0}
    close_bar = None
    if progress is None:
        progress, close_bar = _tqdm_progress("calibrating", total, "step")
    sched = pipe.scheduler
    orig_step = sched.step

    def counting_step(*a, **kw):
        # one scheduler.step per denoising step in every diffusers pipeline: the step counter
        out = orig_step(*a, **kw)
        state["step"] += 1
        rec.active = state["step"] in record
        done["n"] += 1
        progress(min(done["n"] / total, 1.0),
                 f"calibrating: batch {state['batch'] + 1}/{n_batches}, step {state['step']}/{num_inference_steps}")
        return out

    sched.step = counting_step  # instance attribute shadows the method; deleted below
    try:
        for b, (lo, hi) in enumerate(batches):
            batch = prompts[lo:hi]
            gens = [torch.Generator(device="cpu").manual_seed(seed + j) for j in range(lo, hi)]
            rec.moments = rec.sampling = True
            if holdout_prompts:
                rec.moments, rec.sampling = (hi <= n_cal), (lo >= n_cal)
            state["step"], state["batch"] = 0, b
            rec.active = 0 in record
            pipe(prompt=batch, num_inference_steps=num_inference_steps, generator=gens,
                 output_type="latent", **pipe_kwargs)
    finally:
        del sched.step
        rec.remove()
        if close_bar is not None:
            close_bar()
    stats = rec.result(meta)
    if cache_path is not None:
        stats.save(cache_path)
    return stats


def calibrate_in_parts(run_pass, targets: Mapping[str, Any], folder: str | os.PathLike, info: DistInfo, *,
                       max_stats_bytes: float | None = None, layers: Sequence[str] | None = None,
                       sample_tokens: int = 512, meta: Mapping[str, Any] | None = None,
                       data_parallel: bool = False) -> Path:
    """Calibrate in passes (and over ranks) into one statistics folder; returns ``folder``.

    run_pass(group_keys) -> CalibrationStats: one full run of the pipeline recording only these
    groups. This rank runs ``plan_calibration``'s passes, saves each as a part under ``folder``,
    and rank 0 combines the parts (no tensor copied) once every rank is done. ``meta`` replaces
    the combined folder's ``meta`` (the parts' own stay under ``meta["parts"]``). Peak memory per
    process: one pass's statistics (≤ ``max_stats_bytes``). ``data_parallel``: every rank runs
    every pass (``run_pass`` all-reduces across ranks), rank 0 alone saves.
    """
    from .distributed import DistInfo, barrier, gather_objects, plan_calibration

    folder = Path(folder)
    passes = plan_calibration(targets, DistInfo() if data_parallel else info, max_stats_bytes=max_stats_bytes,
                              layers=layers, sample_tokens=sample_tokens)
    if info.is_main and folder.exists():
        shutil.rmtree(folder)  # a cut-short earlier run: its parts would mix with these
    barrier(info)
    names = []
    for k, groups in enumerate(passes):
        log.info("calibration pass %d/%d on rank %d: %d groups", k + 1, len(passes), info.rank, len(groups))
        stats = run_pass(groups)
        if info.is_main or not data_parallel:
            name = f"part-{info.rank:05d}-{k:03d}"
            stats.save(folder / name)
            names.append(name)
        del stats
    everyone = gather_objects(names, info)
    if info.is_main:
        combine_calibration_parts(folder, [n for ns in everyone for n in ns], meta=meta)
    barrier(info)
    return folder


def _calibrate_split(pipe, prompts: list[str], seed: int, layers, cache_path: Path | None, meta: dict, again: dict,
                     max_stats_bytes: int | None, dist, data_parallel: bool) -> CalibrationStats:
    """``calibrate`` in passes and/or over torchrun processes (see its docstring): parts saved
    under ``<cache_path>.partial``, combined by rank 0 and renamed into place when complete."""
    from .distributed import DistInfo, allreduce_stats, barrier, prompt_slice

    info = dist if dist is not None else DistInfo()
    if cache_path is None:
        raise ValueError("calibrate: max_stats_bytes / dist / data_parallel save each pass as it ends: pass "
                         "cache_dir (under torchrun a folder every process can reach)")
    data_parallel = data_parallel and info.distributed
    if data_parallel:
        if meta["holdout_prompts"]:
            raise ValueError("calibrate: data_parallel does not split held-out prompts: use holdout_prompts=0")
        if len(prompts) < info.world_size:
            raise ValueError(f"calibrate: data_parallel needs at least one prompt per process, got {len(prompts)} "
                             f"prompts for {info.world_size} processes")
        lo, hi = prompt_slice(len(prompts), info)

    def run_pass(groups: list[str]) -> CalibrationStats:
        if data_parallel:
            st = calibrate(pipe, prompts[lo:hi], seed=seed + lo, layers=groups, **again)
            return allreduce_stats(st, info)
        return calibrate(pipe, prompts, seed=seed, layers=groups, **again)

    adapter = again["adapter"]
    targets = adapter.targets(pipe.transformer)
    partial = cache_path.with_name(cache_path.name + ".partial")
    calibrate_in_parts(run_pass, targets, partial, info, max_stats_bytes=max_stats_bytes, layers=layers,
                       sample_tokens=again["sample_tokens"], meta=meta, data_parallel=data_parallel)
    if info.is_main:
        if cache_path.exists():
            shutil.rmtree(cache_path)
        os.replace(partial, cache_path)  # complete: only now does the cache hold it
    barrier(info)
    return CalibrationStats.load(cache_path)
