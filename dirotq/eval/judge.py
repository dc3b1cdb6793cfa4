"""Prompt-faithfulness judge for the embedded shapes model: our offline stand-in for CLIP score and FID.

A small CNN attribute classifier trained on the procedural shapes data (scripts/train_judge.py). It
reads a 72×72 RGB image and predicts, for each cell of the 3×3 position grid, whether it holds an
object and that object's shape, colour and size (one cell classifier shared by the nine cells), plus the
background (solid/gradient, top and bottom colour). Occupied cells in canonical order (left column
first, then top to bottom, see dirotq/eval/shapes_grammar.py) give the slot predictions (count, and per
slot shape, colour, size, position) that are compared with the parsed prompt.

- :func:`score_images` parses each prompt with the caption grammar and reports per-attribute accuracy
  of the judge's predictions against it (a CLIP-score analogue that is exact for this world).
- :func:`frechet_distance` is the Fréchet distance between Gaussian fits of the judge's penultimate
  features (256-d: mean cell feature ‖ background feature) of two image sets (an FID analogue). With fewer than ~1000 images it is noisy:
  compare values only at equal sample counts and report the count.

Images: float tensors (N, 3, H, W) in [0, 1] (any H, W; resized to 72×72 with antialiasing), a
uint8 numpy array (N, H, W, 3), or a list of PIL images.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .shapes_grammar import (BACKGROUND_KINDS, COLOR_NAMES, HEAD_SIZES, MAX_OBJECTS, SLOT_COLORS,
                             SLOT_POSITIONS, SLOT_SHAPES, SLOT_SIZES, parse_caption, scene_labels)
from .shapes_grammar import OBJECT_COLORS as OBJ_COLORS_
from .shapes_grammar import SHAPES as SHAPES_
from .shapes_grammar import SIZES as SIZES_

JUDGE_SIZE = 72  # 3 × 24: the 9×9 feature map splits exactly into the 3×3 position grid
DEFAULT_JUDGE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "assets", "judge")
N_CELLS = 9
CELL_SHAPES = SLOT_SHAPES   # shapes + "none" (empty cell)
CELL_COLORS = SLOT_COLORS
CELL_SIZES = SLOT_SIZES


class ShapesJudge(nn.Module):
    """CNN: 72×72×3 → 9×9×32 map → one 3×3×32 patch per grid cell → shared cell MLP → cell heads
    (shape or empty, colour, size); global pooling → background heads. Slot predictions (canonical
    order) are derived from the occupied cells, see :func:`cells_to_slots`.
    """

    def __init__(self, width: int = 32, feat: int = 128):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(3, w, 1), *block(w, w, 2), *block(w, 2 * w, 1), *block(2 * w, 2 * w, 2),
                                  *block(2 * w, 3 * w, 1), *block(3 * w, 3 * w, 2),
                                  nn.Conv2d(3 * w, 32, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.cell = nn.Sequential(nn.Linear(32 * 9 + N_CELLS, feat), nn.ReLU(inplace=True), nn.Linear(feat, feat),
                                  nn.ReLU(inplace=True))
        self.cell_heads = nn.ModuleDict({"shape": nn.Linear(feat, len(CELL_SHAPES)),
                                         "color": nn.Linear(feat, len(CELL_COLORS)),
                                         "size": nn.Linear(feat, len(CELL_SIZES))})
        self.bg = nn.Sequential(nn.Linear(2 * 3 * w, feat), nn.ReLU(inplace=True))
        self.bg_heads = nn.ModuleDict({"bg_kind": nn.Linear(feat, HEAD_SIZES["bg_kind"]),
                                       "bg_top": nn.Linear(feat, HEAD_SIZES["bg_top"]),
                                       "bg_bottom": nn.Linear(feat, HEAD_SIZES["bg_bottom"])})
        self.register_buffer("cell_id", torch.eye(N_CELLS), persistent=False)
        self.config = {"width": width, "feat": feat, "input": JUDGE_SIZE}

    def _trunk(self, x):
        h = self.body[:-3](x * 2 - 1)                      # (N, 3w, 9, 9)
        m = self.body[-3:](h)                               # (N, 32, 9, 9)
        n = x.shape[0]
        cells = m.unfold(2, 3, 3).unfold(3, 3, 3)           # (N, 32, 3, 3, 3, 3): rows, cols, 3×3 patch
        cells = cells.permute(0, 2, 3, 1, 4, 5).reshape(n, N_CELLS, 32 * 9)
        cells = torch.cat([cells, self.cell_id.expand(n, -1, -1)], -1)
        c = self.cell(cells)                                # (N, 9, feat)
        top, bot = h[:, :, :3].mean((2, 3)), h[:, :, -3:].mean((2, 3))
        b = self.bg(torch.cat([top, bot], -1))              # (N, feat)
        return c, b

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 72, 72) in [0, 1] → (N, 2·feat) features: mean cell feature ‖ background feature."""
        c, b = self._trunk(x)
        return torch.cat([c.mean(1), b], -1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: cell_shape/cell_color/cell_size (N, 9, K) and bg_kind/bg_top/bg_bottom (N, K)."""
        c, b = self._trunk(x)
        out = {f"cell_{k}": h(c) for k, h in self.cell_heads.items()}
        out.update({k: h(b) for k, h in self.bg_heads.items()})
        return out


def cell_labels(scene) -> dict[str, list[int]]:
    """Per-cell training labels of a scene: shape/colour/size index or the 'none' index."""
    sh, co, si = [len(SHAPES_)] * N_CELLS, [len(OBJ_COLORS_)] * N_CELLS, [len(SIZES_)] * N_CELLS
    for o in scene.objects:
        sh[o.position] = SHAPES_.index(o.shape)
        co[o.position] = OBJ_COLORS_.index(o.color)
        si[o.position] = SIZES_.index(o.size)
    return {"cell_shape": sh, "cell_color": co, "cell_size": si}


def cells_to_slots(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Arg-max cell predictions → slot predictions in canonical order (left column first, top→bottom).

    Keeps the (at most three) occupied cells with the highest occupancy confidence.
    """
    shape_p = out["cell_shape"].softmax(-1)
    occ = 1 - shape_p[..., -1]                                   # P(cell not empty), (N, 9)
    n = occ.shape[0]
    order = torch.tensor([r * 3 + c for c in range(3) for r in range(3)])  # canonical cell order
    res = {k: torch.full((n,), -1, dtype=torch.long) for k in HEAD_SIZES}
    for k in ("bg_kind", "bg_top", "bg_bottom"):
        res[k] = out[k].argmax(-1)
    shp = shape_p[..., :-1].argmax(-1)
    col = out["cell_color"][..., :-1].argmax(-1)
    siz = out["cell_size"][..., :-1].argmax(-1)
    for i in range(n):
        occupied = [int(c) for c in torch.nonzero(occ[i] > 0.5).flatten()]
        occupied = sorted(occupied, key=lambda c: -float(occ[i, c]))[:MAX_OBJECTS]
        occupied = sorted(occupied, key=lambda c: int((order == c).nonzero()))
        res["count"][i] = max(len(occupied), 1) - 1
        for k in range(MAX_OBJECTS):
            if k < len(occupied):
                c = occupied[k]
                res[f"shape{k}"][i], res[f"color{k}"][i] = shp[i, c], col[i, c]
                res[f"size{k}"][i], res[f"pos{k}"][i] = siz[i, c], c
            else:
                res[f"shape{k}"][i], res[f"color{k}"][i] = len(SLOT_SHAPES) - 1, len(SLOT_COLORS) - 1
                res[f"size{k}"][i], res[f"pos{k}"][i] = len(SLOT_SIZES) - 1, len(SLOT_POSITIONS) - 1
    return res


def to_judge_input(images) -> torch.Tensor:
    """Normalise any supported image container to float (N, 3, 72, 72) in [0, 1] on CPU."""
    if isinstance(images, (list, tuple)) and len(images) and not torch.is_tensor(images[0]) \
            and not isinstance(images[0], np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(im) for im in images])
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images))
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
    else:
        x = images.detach().float().cpu()
        if x.dim() == 3:
            x = x[None]
    if x.shape[-1] != JUDGE_SIZE or x.shape[-2] != JUDGE_SIZE:
        x = F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).contiguous()


def load_judge(path: str = DEFAULT_JUDGE_PATH) -> ShapesJudge:
    """Load the shipped judge (config.json + model.safetensors) in eval mode, float32, CPU."""
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(path, "config.json")))
    m = ShapesJudge(width=cfg["width"], feat=cfg["feat"])
    sd = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    m.load_state_dict(sd)
    return m.eval()


def save_judge(model: ShapesJudge, path: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(path, "model.safetensors"))
    json.dump({**model.config, **(extra or {})}, open(os.path.join(path, "config.json"), "w"), indent=1)


@torch.no_grad()
def predict(judge: ShapesJudge, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Slot predictions {head: LongTensor (N,)} with the heads of shapes_grammar.HEAD_SIZES."""
    x = to_judge_input(images)
    outs = [judge(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return cells_to_slots({k: torch.cat([o[k] for o in outs]) for k in outs[0]})


def labels_from_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
    """Parse prompts with the caption grammar → {head: LongTensor (N,)} (-1 = attribute not stated)."""
    labs = [scene_labels(parse_caption(p)) for p in prompts]
    return {k: torch.tensor([lab[k] for lab in labs]) for k in labs[0]}


def attribute_accuracy(pred: dict[str, torch.Tensor], lab: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy over the objects a prompt names (slots beyond its count are not scored).

    shape / color / size / position: fraction of named objects whose slot prediction matches;
    count: fraction of images with the right number of objects; background: kind and colour(s) all
    right (gradient: top and bottom; solid: the colour); object_all: all four attributes of an object
    right; image_all: every named attribute of the image right.
    """
    n = len(lab["count"])
    res = {}
    present = torch.stack([lab["count"] >= k for k in range(MAX_OBJECTS)], 1)  # (N, 3)
    per_obj_ok = torch.ones(n, MAX_OBJECTS, dtype=torch.bool)
    for attr, head in (("shape", "shape"), ("color", "color"), ("size", "size"), ("position", "pos")):
        ok = torch.stack([pred[f"{head}{k}"] == lab[f"{head}{k}"] for k in range(MAX_OBJECTS)], 1)
        known = torch.stack([lab[f"{head}{k}"] >= 0 for k in range(MAX_OBJECTS)], 1) & present
        res[attr] = float((ok & known).sum() / known.sum().clamp(min=1))
        per_obj_ok &= ok | ~known
    res["count"] = float((pred["count"] == lab["count"]).float().mean())
    kind_ok = pred["bg_kind"] == lab["bg_kind"]
    top_ok = (pred["bg_top"] == lab["bg_top"]) | (lab["bg_top"] < 0)
    bot_ok = (pred["bg_bottom"] == lab["bg_bottom"]) | (lab["bg_bottom"] < 0)
    bg_ok = kind_ok & top_ok & bot_ok
    res["background"] = float(bg_ok.float().mean())
    res["object_all"] = float((per_obj_ok & present).sum() / present.sum().clamp(min=1))
    res["image_all"] = float(((per_obj_ok | ~present).all(1) & bg_ok & (pred["count"] == lab["count"])).float().mean())
    res["n_images"] = n
    res["n_objects"] = int(present.sum())
    return res


def score_images(judge: ShapesJudge, images, prompts: list[str]) -> dict[str, float]:
    """Prompt faithfulness: per-attribute accuracy of `images` against what `prompts` say."""
    return attribute_accuracy(predict(judge, images), labels_from_prompts(prompts))


def describe(pred: dict[str, torch.Tensor], i: int) -> str:
    """Human-readable judge reading of image i (for the app)."""
    objs = []
    for k in range(MAX_OBJECTS):
        s = SLOT_SHAPES[pred[f"shape{k}"][i]]
        if s == "none":
            continue
        objs.append(f"{SLOT_SIZES[pred[f'size{k}'][i]]} {SLOT_COLORS[pred[f'color{k}'][i]]} {s} "
                    f"@ {SLOT_POSITIONS[pred[f'pos{k}'][i]]}")
    kind = BACKGROUND_KINDS[pred["bg_kind"][i]]
    bg = COLOR_NAMES[pred["bg_top"][i]] + ("" if kind == "solid" else f"→{COLOR_NAMES[pred['bg_bottom'][i]]}")
    return "; ".join(objs) + f" | {kind} {bg} background"


@torch.no_grad()
def judge_features(judge: ShapesJudge, images, batch_size: int = 256) -> np.ndarray:
    x = to_judge_input(images)
    return torch.cat([judge.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def frechet_distance(judge: ShapesJudge, images_a, images_b) -> float:
    """Fréchet distance between Gaussian fits of judge features of two image sets (FID analogue).

    d² = |μa − μb|² + Tr(Σa + Σb − 2 (Σa Σb)^{1/2}). Noisy below ~1000 images per set; say so.
    """
    fa, fb = judge_features(judge, images_a), judge_features(judge, images_b)
    return frechet_from_features(fa, fb)


def frechet_from_features(fa: np.ndarray, fb: np.ndarray) -> float:
    from scipy import linalg
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean, _ = linalg.sqrtm(sa @ sb, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(sa.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sa + off) @ (sb + off))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


class JudgeScorer:
    """The judge as the evaluation uses it, or the exact reason it does not apply.

    judge: "auto" / True (the shipped judge in assets/judge), a folder, a loaded ``ShapesJudge``, or
    None / False (disabled). It does not apply when disabled, when no weights are at the path, or
    when a prompt is outside the shapes grammar (it only reads that world): then ``model`` is None
    and ``reason`` says which. Any other failure (a broken weight file, a bug) raises.
    """

    def __init__(self, judge: Any, prompts: Sequence[str]):
        self.model, self.reason = None, None
        if judge is None or judge is False:
            self.reason = "unavailable: judge disabled"
            return
        if judge in ("auto", True):
            judge = DEFAULT_JUDGE_PATH
        if isinstance(judge, (str, os.PathLike)) and not os.path.isfile(os.path.join(judge, "config.json")):
            self.reason = f"unavailable: no judge weights at {judge}"
            return
        try:
            for p in set(prompts):
                parse_caption(p)
        except ValueError as e:
            self.reason = f"unavailable: prompts outside the shapes grammar ({e})"
            return
        self.model = load_judge(judge) if isinstance(judge, (str, os.PathLike)) else judge

    def per_image(self, images, prompts: Sequence[str]) -> dict:
        """Per-image object accuracy (fraction of named objects fully right) and all-correct flags,
        plus the pooled per-attribute accuracies."""
        pred = predict(self.model, images)
        lab = labels_from_prompts(list(prompts))
        pooled = attribute_accuracy(pred, lab)
        obj, img = [], []
        for i in range(len(prompts)):
            one = attribute_accuracy({k: v[i:i + 1] for k, v in pred.items()}, {k: v[i:i + 1] for k, v in lab.items()})
            obj.append(one["object_all"])
            img.append(one["image_all"])
        return {"pooled": pooled, "object_all": obj, "image_all": img}

    def features(self, images) -> np.ndarray:
        return judge_features(self.model, images)
