"""Claims about the embedded model's training recipe helpers (scripts/train_tiny_pixart.py, issue #3)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from scripts.train_tiny_pixart import sample_timesteps  # noqa: E402


def test_power_one_is_the_uniform_draw_of_the_earlier_stages():
    a = sample_timesteps(64, 1.0, torch.Generator().manual_seed(5))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_power_two_puts_more_steps_at_high_noise_with_density_proportional_to_t():
    t = sample_timesteps(200_000, 2.0, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    # density ∝ t ⇒ P(t ≥ 600) = 1 − 0.6² = 0.64 (uniform: 0.40), P(t < 200) = 0.04
    assert abs(float((t >= 600).float().mean()) - 0.64) < 0.01
    assert abs(float((t < 200).float().mean()) - 0.04) < 0.005


def test_non_positive_power_is_refused():
    with pytest.raises(ValueError, match="power"):
        sample_timesteps(4, 0.0, torch.Generator())


def test_every_word_of_the_caption_gets_the_attributes_of_its_entity():
    from dirotq.eval.shapes_grammar import (BACKGROUND_KINDS, COLOR_NAMES, POSITIONS, SHAPES, SIZES, Scene,
                                         ShapeObject, caption, tokenize_words)
    from scripts.caption_structure import HEADS, IGNORE, token_labels
    scene = Scene((ShapeObject("star", "blue", "small", 1), ShapeObject("circle", "red", "large", 4)),
                  "gradient", "black", "yellow")
    words, lab = token_labels(scene)
    assert words == tokenize_words(caption(scene))
    col = {k: i for i, k in enumerate(HEADS)}
    star = [SHAPES.index("star"), COLOR_NAMES.index("blue"), SIZES.index("small"), POSITIONS.index("top")]
    obj_cols = [col["shape"], col["color"], col["size"], col["position"]]
    # "a small blue star at the top" → every one of its 7 words carries (star, blue, small, top)
    assert words[:7] == "a small blue star at the top".split()
    assert (lab[:7, obj_cols] == star).all() and (lab[:7, col["entity"]] == 0).all()
    assert words[7] == "and" and lab[7, col["entity"]] == 2 and (lab[7, 1:] == IGNORE).all()
    # the background phrase: "on a gradient background from black to yellow"
    bg = [i for i, w in enumerate(words) if i > words.index(",")]
    assert [words[i] for i in bg] == "on a gradient background from black to yellow".split()
    assert (lab[bg, col["bg_kind"]] == BACKGROUND_KINDS.index("gradient")).all()
    assert (lab[bg, col["bg_top"]] == COLOR_NAMES.index("black")).all()
    assert (lab[bg, col["bg_bottom"]] == COLOR_NAMES.index("yellow")).all()
    assert (lab[bg][:, obj_cols] == IGNORE).all()


def test_labels_align_with_the_tokenizer_for_generated_scenes():
    from scripts.caption_structure import IGNORE, label_batch
    from dirotq.eval.shapes_render import scene_for
    from scripts.train_tiny_pixart import TRAIN_MAX_TOKENS, build_tokenizer
    from dirotq.eval.shapes_grammar import caption
    scenes = [scene_for(i) for i in range(50)]
    lab = label_batch(scenes, TRAIN_MAX_TOKENS)
    enc = build_tokenizer()([caption(s) for s in scenes], padding="max_length", max_length=TRAIN_MAX_TOKENS)
    n_words = torch.tensor(enc["attention_mask"]).sum(1) - 1  # minus </s>
    labelled = (lab[..., 0] != IGNORE).sum(1)
    assert torch.equal(labelled, n_words)


def test_structure_heads_learn_a_batch_and_report_accuracy():
    from scripts.caption_structure import HEADS, StructureHeads, label_batch
    from dirotq.eval.shapes_render import scene_for
    torch.manual_seed(0)
    labels = label_batch([scene_for(i) for i in range(4)], 48)
    hidden = torch.randn(4, 48, 32, requires_grad=True)
    heads = StructureHeads(32)
    opt = torch.optim.Adam(list(heads.parameters()) + [hidden], lr=0.05)
    first = None
    for _ in range(60):
        loss, acc = heads.loss(hidden, labels)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(acc) == set(HEADS) and float(loss) < 0.1 * first and min(acc.values()) == 1.0


@pytest.mark.slow  # 104 s alone on 2 CPU cores (issue #21); run with python3 -m pytest -m slow
def test_text_pretraining_teaches_a_fresh_encoder_the_caption_structure(tmp_path):
    from dirotq.eval.shapes_grammar import caption
    from scripts.caption_structure import StructureHeads, label_batch
    from dirotq.eval.shapes_render import scene_for
    from scripts.train_tiny_pixart import (TRAIN_MAX_TOKENS, build_tokenizer, make_text_encoder,
                                           pretrain_text_encoder)
    import json
    torch.manual_seed(0)
    scenes = [scene_for(i) for i in range(200)]
    tok = build_tokenizer()
    enc = tok([caption(s) for s in scenes], padding="max_length", max_length=TRAIN_MAX_TOKENS, return_tensors="pt")
    te = make_text_encoder(len(tok))
    heads = StructureHeads(te.config.d_model)
    log = tmp_path / "text_log.jsonl"
    acc = pretrain_text_encoder(te, heads, enc.input_ids, enc.attention_mask, label_batch(scenes, TRAIN_MAX_TOKENS),
                                100, torch.Generator().manual_seed(0), batch=32, log_path=str(log))
    recs = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r["text_step"] for r in recs] == [100]
    assert acc["bg_kind"] > 0.95 and acc["entity"] > 0.8, acc  # chance: 0.5 and ~0.6
