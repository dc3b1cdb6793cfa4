"""Procedural captioned shapes data set: the world of the embedded tiny PixArt-Σ (its training data,
and the "real" images of the evaluation's Fréchet distance and judge ceiling).

Scenes of one to three shapes (circle, square, triangle, diamond, star) with colours, two sizes and a
3×3 position grid, on solid or vertical-gradient backgrounds; captions come from the same attributes
(dirotq/eval/shapes_grammar.py holds the grammar and its parser). Everything is generated on the fly and
is deterministic from an integer seed: ``example(seed)`` always returns the same image and caption.

Split rule: a scene that contains any held-out (colour, shape) pair (shapes_grammar.HELDOUT_PAIRS)
is never produced for ``split="train"``; ``split="heldout"`` produces only such scenes.

    python -m dirotq.eval.shapes_render --n 16 --out /tmp/shapes   # writes a few PNGs + captions
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw

from .shapes_grammar import (
    BACKGROUND_COLORS, COLORS, HELDOUT_PAIRS, OBJECT_COLORS, SHAPES, SIZES, Scene, ShapeObject, caption)

IMAGE_SIZE = 128
SIZE_RADIUS = {"small": 0.085, "large": 0.14}  # circumradius as a fraction of the image side
_SS = 2  # supersampling factor for anti-aliasing


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw a random scene. split: "train" (no held-out pair), "heldout" (≥ 1 held-out pair), "any"."""
    while True:
        n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
        cells = rng.choice(9, size=n, replace=False)
        if rng.random() < 0.3:
            bg, top = "gradient", rng.choice(BACKGROUND_COLORS, size=2, replace=False)
            bg_top, bg_bottom = str(top[0]), str(top[1])
        else:
            bg = "solid"
            bg_top = bg_bottom = str(rng.choice(BACKGROUND_COLORS))
        allowed = [c for c in OBJECT_COLORS if c not in (bg_top, bg_bottom)]
        objs = []
        for cell in cells:
            objs.append(ShapeObject(str(rng.choice(SHAPES)), str(rng.choice(allowed)), str(rng.choice(SIZES)),
                                    int(cell)))
        # jitter (fraction of the image) kept in meta: it is not part of the caption
        jit = rng.uniform(-0.035, 0.035, size=(n, 2)).round(4).tolist()
        rot = rng.uniform(-12, 12, size=n).round(2).tolist()
        shade = rng.integers(-12, 13, size=(n + 2, 3)).tolist()
        scene = Scene(tuple(objs), bg, bg_top, bg_bottom, {"jitter": jit, "rot": rot, "shade": shade})
        held = scene.is_heldout()
        if split == "any" or (split == "train" and not held) or (split == "heldout" and held):
            return scene


def _shade(rgb, delta):
    return tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(rgb, delta))


def _polygon(shape: str, cx: float, cy: float, r: float, rot_deg: float):
    a0 = math.radians(rot_deg)
    if shape == "square":
        k, base, rr = 4, math.pi / 4, r
    elif shape == "triangle":
        k, base, rr = 3, -math.pi / 2, r * 1.1
    elif shape == "diamond":
        return [(cx, cy - 1.15 * r), (cx + 0.75 * r, cy), (cx, cy + 1.15 * r), (cx - 0.75 * r, cy)]
    elif shape == "star":
        pts = []
        for i in range(10):
            ang = -math.pi / 2 + a0 + i * math.pi / 5
            rad = r * 1.1 if i % 2 == 0 else r * 0.45
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    else:
        raise ValueError(shape)
    return [(cx + rr * math.cos(base + a0 + 2 * math.pi * i / k), cy + rr * math.sin(base + a0 + 2 * math.pi * i / k))
            for i in range(k)]


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene to a uint8 (size, size, 3) array. Deterministic (jitter/rotation live in meta)."""
    S = size * _SS
    meta = scene.meta or {}
    n = len(scene.objects)
    shade = meta.get("shade", [[0, 0, 0]] * (n + 2))
    top = np.array(_shade(COLORS[scene.bg_top], shade[0]), np.float32)
    if scene.background == "gradient":
        bot = np.array(_shade(COLORS[scene.bg_bottom], shade[1]), np.float32)
        t = np.linspace(0, 1, S, dtype=np.float32)[:, None, None]
        bg = (1 - t) * top + t * bot
        arr = np.broadcast_to(bg, (S, S, 3)).astype(np.uint8)
    else:
        arr = np.broadcast_to(top, (S, S, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr))
    draw = ImageDraw.Draw(img)
    jit = meta.get("jitter", [[0.0, 0.0]] * n)
    rot = meta.get("rot", [0.0] * n)
    for i, o in enumerate(scene.objects):
        col, row = o.position % 3, o.position // 3
        cx = (col + 0.5) / 3 + jit[i][0]
        cy = (row + 0.5) / 3 + jit[i][1]
        r = SIZE_RADIUS[o.size]
        fill = _shade(COLORS[o.color], shade[i + 2])
        if o.shape == "circle":
            draw.ellipse([(cx - r) * S, (cy - r) * S, (cx + r) * S, (cy + r) * S], fill=fill)
        else:
            pts = _polygon(o.shape, cx * S, cy * S, r * S, rot[i] if o.shape != "diamond" else 0.0)
            draw.polygon(pts, fill=fill)
    if _SS != 1:
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img)


def object_mask(scene: Scene, size: int, margin: float = 1.0) -> np.ndarray:
    """Bool (size, size) mask of the cells within ``margin`` cells of an object's circumscribed disc.

    Cheap (geometry only, no rendering), for loss weighting on a latent grid of side ``size``.
    """
    meta = scene.meta or {}
    n = len(scene.objects)
    jit = meta.get("jitter", [[0.0, 0.0]] * n)
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    mask = np.zeros((size, size), bool)
    for i, o in enumerate(scene.objects):
        cx = (o.position % 3 + 0.5) / 3 + jit[i][0]
        cy = (o.position // 3 + 0.5) / 3 + jit[i][1]
        r = SIZE_RADIUS[o.size] + margin / size
        mask |= (c[None, :] - cx) ** 2 + (c[:, None] - cy) ** 2 <= r * r
    return mask


def scene_for(seed: int, split: str = "train") -> Scene:
    """The scene of ``example(seed, split)``, without rendering it."""
    rng = np.random.default_rng([int(seed), {"train": 0, "heldout": 1, "any": 2}[split]])
    return sample_scene(rng, split)


def example(seed: int, split: str = "train", size: int = IMAGE_SIZE) -> tuple[np.ndarray, str, Scene]:
    """(uint8 image (size, size, 3), caption, scene) — a pure function of (seed, split, size)."""
    scene = scene_for(seed, split)
    return render(scene, size), caption(scene), scene


def batch(seeds, split: str = "train", size: int = IMAGE_SIZE):
    """Float images (N, 3, size, size) in [0, 1] as a numpy array, captions, scenes."""
    imgs, caps, scenes = [], [], []
    for s in seeds:
        im, c, sc = example(int(s), split, size)
        imgs.append(im)
        caps.append(c)
        scenes.append(sc)
    x = np.stack(imgs).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return x, caps, scenes


CALIBRATION_SEEDS = 60_000_000
EVAL_SEEDS = 70_000_000


def prompt_sets(n_calib: int = 96, n_eval_train: int = 28, n_eval_heldout: int = 12, pool: int = 20000):
    """Calibration and eval prompt lists (disjoint; eval = unseen train-split scenes + held-out pairs).

    Neither set repeats a caption of the first `pool` training scenes (the DiT's training pool).
    """
    train_caps = {caption(sample_scene(np.random.default_rng([s, 0]), "train")) for s in range(pool)}
    calib, ev, seen = [], [], set(train_caps)
    s = CALIBRATION_SEEDS
    while len(calib) < n_calib:
        c = example_caption(s, "train")
        if c not in seen:
            calib.append(c)
            seen.add(c)
        s += 1
    for split, n in (("train", n_eval_train), ("heldout", n_eval_heldout)):
        s, k = EVAL_SEEDS, 0
        while k < n:
            c = example_caption(s, split)
            if c not in seen:
                ev.append(c)
                seen.add(c)
                k += 1
            s += 1
    return calib, ev


def example_caption(seed: int, split: str = "train") -> str:
    rng = np.random.default_rng([int(seed), {"train": 0, "heldout": 1, "any": 2}[split]])
    return caption(sample_scene(rng, split))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", default="/tmp/shapes")
    ap.add_argument("--write-prompts", action="store_true", help="write assets/prompts/{calibration,eval}.txt")
    a = ap.parse_args()
    if a.write_prompts:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "assets", "prompts")
        os.makedirs(root, exist_ok=True)
        calib, ev = prompt_sets()
        open(os.path.join(root, "calibration.txt"), "w").write("\n".join(calib) + "\n")
        open(os.path.join(root, "eval.txt"), "w").write("\n".join(ev) + "\n")
        print(f"wrote {len(calib)} calibration and {len(ev)} eval prompts to {root}")
        raise SystemExit(0)
    os.makedirs(a.out, exist_ok=True)
    for s in range(a.seed, a.seed + a.n):
        im, cap, _ = example(s, a.split)
        Image.fromarray(im).save(os.path.join(a.out, f"{s:05d}.png"))
        print(s, cap)
