"""The evaluation's images: one item per (prompt, seed), generated once and cached as PNGs.

Every image is a PNG under ``<out_dir>/images/<recipe>-<hash>/<prompt hash>-s<seed>.png``: the hash
covers the model weights, the sampling settings, the method config and the calibration, so a rerun
generates only what is missing (resumable) and a changed setting never reuses stale images. Also
here: the procedural renders of the prompts (the "real" images of the shapes world) and the
labelled contact sheet.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..generate import generate


def config_hash(data: Any) -> str:
    """12 hex digits of the JSON of ``data``: names an image folder by everything its images depend on."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Item:
    """One evaluation image: prompt ``index`` with replicate ``rep`` and its seed."""

    index: int
    prompt: str
    seed: int
    rep: int = 0

    @property
    def filename(self) -> str:
        return f"{prompt_hash(self.prompt)}-s{self.seed}.png"


def make_items(prompts: Sequence[str], seeds_per_prompt: int = 2, seed: int = 0) -> list[Item]:
    """Prompt i, replicate j -> seed ``seed + 1000·j + i`` (stable when prompts are appended)."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be ≥ 1, got {seeds_per_prompt}")
    return [Item(i, p, seed + 1000 * j + i, j) for j in range(seeds_per_prompt) for i, p in enumerate(prompts)]


@dataclass
class ImageSet:
    """Images of one variant (reference or method) for the evaluation items, cached as PNGs."""

    label: str
    folder: Path
    images: list = field(default_factory=list)
    generated: int = 0
    seconds: float = 0.0


def _load_png(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def ensure_images(pipe, items: Sequence[Item], folder: Path, label: str, *, transformer_fn: Callable[[], Any] | None,
                   gen_kw: dict, batch_size: int, bar=None, counter: dict | None = None) -> ImageSet:
    """Load cached PNGs of ``items`` from ``folder``; generate the missing ones (``transformer_fn()``
    builds the transformer lazily, so a fully cached method is never quantized)."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [it for it in items if not (folder / it.filename).is_file()]
    out = ImageSet(label, folder)
    if missing:
        transformer = transformer_fn() if transformer_fn is not None else None
        t0 = time.perf_counter()
        for b in range(0, len(missing), batch_size):
            chunk = missing[b:b + batch_size]
            imgs = generate(pipe, [it.prompt for it in chunk], [it.seed for it in chunk], transformer=transformer,
                            batch_size=batch_size, **gen_kw)
            for it, im in zip(chunk, imgs):
                tmp = folder / (it.filename + ".tmp.png")
                im.save(tmp)
                os.replace(tmp, folder / it.filename)  # atomic: an interrupted run leaves no half image
            if bar is not None:
                bar.update(len(chunk))
        out.seconds = time.perf_counter() - t0
        out.generated = len(missing)
        if counter is not None:
            counter["images"] = counter.get("images", 0) + len(missing)
    out.images = [_load_png(folder / it.filename) for it in items]
    if bar is not None and not missing:
        bar.update(0)
    return out


def real_images(items: Sequence[Item], size: tuple[int, int]) -> list:
    """Procedural renders of the scenes the prompts describe (the "real" side of the Fréchet
    distance), with per-seed jitter/rotation/shade drawn like the training data."""
    from PIL import Image

    from .shapes_grammar import Scene, parse_caption
    from .shapes_render import render

    out = []
    for it in items:
        sc = parse_caption(it.prompt)
        n = len(sc.objects)
        rng = np.random.default_rng([it.seed, 7])
        meta = {"jitter": rng.uniform(-0.035, 0.035, size=(n, 2)).round(4).tolist(),
                "rot": rng.uniform(-12, 12, size=n).round(2).tolist(),
                "shade": rng.integers(-12, 13, size=(n + 2, 3)).tolist()}
        arr = render(Scene(sc.objects, sc.background, sc.bg_top, sc.bg_bottom, meta), size=max(size))
        out.append(Image.fromarray(arr).resize(size, Image.BICUBIC))
    return out


def write_contact_sheet(ref: ImageSet, sets: Mapping[str, ImageSet], items: Sequence[Item], path: Path,
                        rows: int = 16, thumb: int = 128) -> Path:
    """Rows = prompts (first seed of each), columns = reference then methods; labelled."""
    from PIL import Image, ImageDraw

    idx = [k for k, it in enumerate(items) if it.rep == 0][:rows]
    cols = [("reference", ref)] + list(sets.items())
    label_w, head_h, pad = 40, 16, 2
    W = label_w + len(cols) * (thumb + pad) + pad
    H = head_h + len(idx) * (thumb + pad) + pad
    sheet = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(sheet)
    for c, (name, s) in enumerate(cols):
        x = label_w + pad + c * (thumb + pad)
        d.text((x + 2, 2), name[: thumb // 6], fill="black")
        for r, k in enumerate(idx):
            y = head_h + pad + r * (thumb + pad)
            sheet.paste(s.images[k].resize((thumb, thumb), Image.LANCZOS), (x, y))
    for r, k in enumerate(idx):
        y = head_h + pad + r * (thumb + pad)
        d.text((3, y + thumb // 2 - 6), f"p{items[k].index}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the committed sheets small (~4× smaller) at no visible cost
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


__all__ = ["Item", "make_items", "ImageSet", "ensure_images", "real_images", "write_contact_sheet", "prompt_hash",
           "config_hash"]
