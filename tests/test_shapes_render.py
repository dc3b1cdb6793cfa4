"""Claims about the procedural shapes data set and its caption grammar (issue #3, step 1)."""
import os
import sys
from dataclasses import replace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dirotq.eval.shapes_grammar import (HELDOUT_PAIRS, SHAPES, caption, parse_caption,  # noqa: E402
                                     scene_labels, tokenize_words, vocabulary)
from dirotq.eval.shapes_render import example, object_mask, render, sample_scene, scene_for  # noqa: E402


def test_same_seed_same_image_and_caption():
    a, ca, _ = example(123)
    b, cb, _ = example(123)
    c, cc, _ = example(124)
    assert ca == cb and np.array_equal(a, b)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert ca != cc or not np.array_equal(a, c)


def test_caption_parses_back_to_the_same_scene():
    for s in range(300):
        _, cap, scene = example(s, "any")
        assert parse_caption(cap) == scene.canonical(), cap
        assert all(w in vocabulary() for w in tokenize_words(cap)), cap


def test_train_split_never_contains_heldout_pairs_and_heldout_split_always_does():
    for s in range(500):
        sc = sample_scene(np.random.default_rng([s, 0]), "train")
        assert not any((o.color, o.shape) in HELDOUT_PAIRS for o in sc.objects)
        sh = sample_scene(np.random.default_rng([s, 1]), "heldout")
        assert any((o.color, o.shape) in HELDOUT_PAIRS for o in sh.objects)


def test_scenes_cover_all_shapes_counts_and_backgrounds():
    seen_shapes, counts, kinds = set(), set(), set()
    for s in range(300):
        _, _, sc = example(s)
        seen_shapes |= {o.shape for o in sc.objects}
        counts.add(len(sc.objects))
        kinds.add(sc.background)
    assert seen_shapes == set(SHAPES) and counts == {1, 2, 3} and kinds == {"solid", "gradient"}


def test_caption_example_and_labels():
    sc = parse_caption("A large red circle on the left and a small blue square on the right, on a white background")
    assert caption(sc) == ("a large red circle on the left and a small blue square on the right, "
                           "on a white background")
    lab = scene_labels(sc)
    assert lab["count"] == 1 and lab["pos0"] == 3 and lab["pos1"] == 5
    # synonyms and unknown words are tolerated by the parser
    sc2 = parse_caption("a big grey fluffy circle in the centre, on a black background")
    assert sc2.objects[0].color == "gray" and sc2.objects[0].size == "large" and sc2.objects[0].position == 4


def test_prompt_sets_are_disjoint_and_include_heldout():
    root = os.path.join(ROOT, "assets", "prompts")
    calib = [l for l in open(os.path.join(root, "calibration.txt")).read().splitlines() if l.strip()]
    ev = [l for l in open(os.path.join(root, "eval.txt")).read().splitlines() if l.strip()]
    assert len(calib) >= 64 and len(ev) >= 32
    assert not set(calib) & set(ev)
    assert any(parse_caption(p).is_heldout() for p in ev)
    assert not any(parse_caption(p).is_heldout() for p in calib)


def test_object_mask_covers_every_object_pixel_and_little_else():
    """The loss-weighting mask (latent grid) contains all pixels that differ from the background."""
    for seed in range(40):
        img, _, scene = example(seed, "train", 64)
        assert scene_for(seed, "train") == scene
        empty = render(replace(scene, objects=()), 64)
        drawn = np.abs(img.astype(int) - empty.astype(int)).max(-1) > 8  # (64, 64)
        mask = object_mask(scene, 16)  # a 16×16 grid: 4×4 pixels per cell
        covered = np.repeat(np.repeat(mask, 4, 0), 4, 1)
        assert not (drawn & ~covered).any(), seed
        assert covered.sum() <= 4 * max(drawn.sum(), 1) + 64, seed  # a disc plus a one-cell margin, not the image
    assert not object_mask(replace(scene, objects=()), 16).any()
