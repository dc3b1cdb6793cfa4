"""Caption grammar of the procedural shapes world (embedded tiny model;
its card: assets/tiny-pixart/README.md).

One scene = a background plus one to three objects. Each object has a shape, a colour, a size and
a cell of a 3×3 position grid. Objects are listed in *canonical slot order*: left column first,
then top to bottom inside a column (``sorted by (col, row)``). The same order is used by the
caption, by the parser and by the judge's per-slot heads, so caption ↔ labels is a bijection.

Caption form (English, generated from the attributes and parsed back by :func:`parse_caption`):

    "a large red circle on the left and a small blue square in the top right, on a white background"
    "a small green star in the center, on a gradient background from black to blue"

This module is pure Python (no torch): the library imports it at runtime to score prompts; the
renderer (dirotq/eval/shapes_render.py) imports it to draw data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

SHAPES = ("circle", "square", "triangle", "diamond", "star")
# Object colours. RGB values are the rendering targets (a small jitter is added when rendering).
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (35, 70, 215),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOR_NAMES = tuple(COLORS)
OBJECT_COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black")
BACKGROUND_COLORS = ("white", "black", "gray", "blue", "yellow", "green", "pink")
SIZES = ("small", "large")
# 3×3 grid, index = row * 3 + col. Phrase used in captions for each cell.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
BACKGROUND_KINDS = ("solid", "gradient")
MAX_OBJECTS = 3

# (colour, shape) pairs never seen in training: eval prompts use them to test composition.
HELDOUT_PAIRS = frozenset({("green", "triangle"), ("purple", "circle"), ("yellow", "square"),
                           ("orange", "star"), ("cyan", "diamond")})

_SYNONYMS = {"grey": "gray", "centre": "center", "middle": "center", "big": "large", "tiny": "small",
             "violet": "purple"}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    position: int  # grid cell, row * 3 + col

    @property
    def slot_key(self) -> tuple[int, int]:
        return (self.position % 3, self.position // 3)  # (col, row): left→right, then top→bottom


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str = "solid"          # "solid" | "gradient"
    bg_top: str = "white"              # solid colour, or gradient start (top)
    bg_bottom: str = "white"           # == bg_top for solid backgrounds
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def canonical(self) -> "Scene":
        objs = tuple(sorted(self.objects, key=lambda o: o.slot_key))
        return Scene(objs, self.background, self.bg_top, self.bg_bottom, dict(self.meta))

    def is_heldout(self) -> bool:
        return any((o.color, o.shape) in HELDOUT_PAIRS for o in self.objects)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(o: ShapeObject) -> str:
    return f"{_article(o.size)} {o.size} {o.color} {o.shape} {POSITION_PHRASES[o.position]}"


def caption(scene: Scene) -> str:
    """English caption of a scene (objects in canonical slot order)."""
    parts = [object_phrase(o) for o in scene.canonical().objects]
    if len(parts) == 1:
        objs = parts[0]
    elif len(parts) == 2:
        objs = f"{parts[0]} and {parts[1]}"
    else:
        objs = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    if scene.background == "solid":
        bg = f"on {_article(scene.bg_top)} {scene.bg_top} background"
    else:
        bg = f"on a gradient background from {scene.bg_top} to {scene.bg_bottom}"
    return f"{objs}, {bg}"


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce (plus accepted synonyms), sorted."""
    words = set(SHAPES) | set(COLOR_NAMES) | set(SIZES) | set(_SYNONYMS)
    for p in POSITION_PHRASES:
        words.update(p.split())
    words.update(["a", "an", "and", "on", "background", "gradient", "from", "to", ",", "with"])
    return sorted(words)


def tokenize_words(text: str) -> list[str]:
    """Lower-case word split with punctuation as separate tokens (same rule as the tokenizer)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


_POS_LOOKUP = {tuple(p.split()[1:]): i for i, p in enumerate(POSITION_PHRASES)}  # drop in/on/at


def parse_caption(text: str) -> Scene:
    """Parse a caption of the grammar back into a canonical Scene.

    Tolerant: synonyms (grey, centre, big…) are accepted, unknown words are ignored, missing
    attributes are left as None-like defaults ("?"), and the background defaults to unknown ("?").
    Raises ValueError when no object can be found.
    """
    words = [_SYNONYMS.get(w, w) for w in tokenize_words(text)]
    # split off the background clause
    bg_kind, bg_top, bg_bottom = "?", "?", "?"
    if "background" in words:
        bi = words.index("background")
        # clause starts at the last "on" before "background"
        start = max((i for i in range(bi) if words[i] == "on"), default=bi)
        clause = words[start:]
        words = words[:start]
        if "gradient" in clause:
            bg_kind = "gradient"
            cols = [w for w in clause if w in COLORS]
            if len(cols) >= 2:
                bg_top, bg_bottom = cols[0], cols[1]
            elif cols:
                bg_top = cols[0]
        else:
            bg_kind = "solid"
            cols = [w for w in clause if w in COLORS]
            if cols:
                bg_top = bg_bottom = cols[0]
    # objects: split at object nouns
    objects = []
    cur: dict = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w in SIZES:
            cur["size"] = w
        elif w in COLORS:
            cur["color"] = w
        elif w in SHAPES:
            cur["shape"] = w
            # position phrase follows the noun: (in|on|at) [the] <pos words>
            j = i + 1
            if j < len(words) and words[j] in ("in", "on", "at"):
                j += 1
                if j < len(words) and words[j] == "the":
                    j += 1
                pw = []
                while j < len(words) and words[j] in ("top", "bottom", "left", "right", "center") and len(pw) < 2:
                    pw.append(words[j])
                    j += 1
                key = tuple(["the"] + pw) if tuple(["the"] + pw) in _POS_LOOKUP else tuple(pw)
                cur["position"] = _POS_LOOKUP.get(key, _POS_LOOKUP.get(("the",) + tuple(pw), -1))
                i = j - 1
            objects.append(ShapeObject(cur.get("shape", "?"), cur.get("color", "?"), cur.get("size", "?"),
                                       cur.get("position", -1)))
            cur = {}
        i += 1
    if not objects:
        raise ValueError(f"no object found in caption: {text!r}")
    return Scene(tuple(objects[:MAX_OBJECTS]), bg_kind, bg_top, bg_bottom).canonical()


# ---- label encoding shared by the judge -------------------------------------------------------
NONE = "none"
SLOT_SHAPES = SHAPES + (NONE,)
SLOT_COLORS = OBJECT_COLORS + (NONE,)
SLOT_POSITIONS = POSITIONS + (NONE,)
SLOT_SIZES = SIZES + (NONE,)


def scene_labels(scene: Scene) -> dict[str, int]:
    """Integer labels of a scene for the judge heads; -1 marks an unknown (unparsed) attribute."""
    sc = scene.canonical()

    def idx(seq, v):
        return seq.index(v) if v in seq else -1

    lab = {"count": len(sc.objects) - 1,
           "bg_kind": idx(BACKGROUND_KINDS, sc.background),
           "bg_top": idx(COLOR_NAMES, sc.bg_top),
           "bg_bottom": idx(COLOR_NAMES, sc.bg_bottom)}
    for k in range(MAX_OBJECTS):
        if k < len(sc.objects):
            o = sc.objects[k]
            lab[f"shape{k}"] = idx(SLOT_SHAPES, o.shape)
            lab[f"color{k}"] = idx(SLOT_COLORS, o.color)
            lab[f"pos{k}"] = o.position if 0 <= o.position < 9 else -1
            lab[f"size{k}"] = idx(SLOT_SIZES, o.size)
        else:
            lab[f"shape{k}"] = len(SHAPES)
            lab[f"color{k}"] = len(OBJECT_COLORS)
            lab[f"pos{k}"] = 9
            lab[f"size{k}"] = len(SIZES)
    return lab


HEAD_SIZES = {"count": MAX_OBJECTS, "bg_kind": len(BACKGROUND_KINDS), "bg_top": len(COLOR_NAMES),
              "bg_bottom": len(COLOR_NAMES)}
for _k in range(MAX_OBJECTS):
    HEAD_SIZES.update({f"shape{_k}": len(SLOT_SHAPES), f"color{_k}": len(SLOT_COLORS),
                       f"pos{_k}": len(SLOT_POSITIONS), f"size{_k}": len(SLOT_SIZES)})
