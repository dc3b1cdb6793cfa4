"""Claims about the shipped tiny PixArt-Σ (assets/tiny-pixart) and the judge (assets/judge), issue #3.

- it loads offline through the stock PixArtSigmaPipeline.from_pretrained code path, fp16 weights ≤ 40 MB;
- the tokenizer is word-level with pad/eos/unk and maps unknown words to <unk>;
- a fixed seed gives the stored reference image (float32, CPU; tolerance for BLAS differences);
- the judge reads that image as it did when the reference was stored, and is accurate on real
  procedural images.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "assets", "tiny-pixart")
JUDGE = os.path.join(ROOT, "assets", "judge")
REF = os.path.join(ROOT, "tests", "data", "tiny_pixart_ref.npz")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(MODEL, "model_index.json")),
                                reason="assets/tiny-pixart not built")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import PixArtSigmaPipeline
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    p = PixArtSigmaPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


REF_SETTINGS = os.path.join(ROOT, "tests", "data", "tiny_pixart_ref.json")


def generate_reference_image(pipe, ref: dict) -> np.ndarray:
    """The reference generation from its settings (prompt, seed, steps, …): float32, CPU → uint8 (H, W, 3)
    at the pipeline's native size."""
    img = pipe(ref["prompt"], num_inference_steps=ref["steps"], guidance_scale=ref["guidance_scale"],
               generator=torch.Generator().manual_seed(ref["seed"]),
               use_resolution_binning=False, max_sequence_length=ref["max_sequence_length"],
               clean_caption=False, output_type="np").images[0]
    return (img * 255).round().clip(0, 255).astype(np.uint8)


def test_shipped_folder_is_fp16_safetensors_under_40mb():
    total, n_st = 0, 0
    for dp, _, fs in os.walk(MODEL):
        for f in fs:
            total += os.path.getsize(os.path.join(dp, f))
            n_st += f.endswith(".safetensors")
            assert not f.endswith((".bin", ".pt", ".pkl")), f
    assert n_st == 3 and total <= 40 * 2**20
    from safetensors import safe_open
    with safe_open(os.path.join(MODEL, "transformer", "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


def test_loads_offline_with_pixart_sigma_architecture(pipe):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5EncoderModel
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert pipe.transformer.config.norm_type == "ada_norm_single"
    assert pipe.transformer.config.out_channels == 2 * pipe.transformer.config.in_channels  # learned sigma
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim % 64 == 0
    assert 6 <= pipe.transformer.config.num_layers <= 12
    assert isinstance(pipe.text_encoder, T5EncoderModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)


def test_tokenizer_word_level_with_unknown_words(pipe):
    tok = pipe.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1) and tok.unk_token is not None
    ids = tok("a Large RED circle, on a zebra background").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks == ["a", "large", "red", "circle", ",", "on", "a", "<unk>", "background", "</s>"]
    assert tok.unk_token_id in ids
    # the pipeline's default padding (max_sequence_length=300) works and is masked
    enc = tok(["a red circle"], padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (1, 300) and int(enc.attention_mask.sum()) == 4


def test_fixed_seed_reproduces_reference_image_and_judge_agrees(pipe):
    ref = json.load(open(REF_SETTINGS))
    img = generate_reference_image(pipe, ref)
    stored = np.load(REF)["image"]
    diff = np.abs(img.astype(np.float32) - stored.astype(np.float32)).mean() / 255
    assert diff < 2 / 255, f"mean abs diff {diff * 255:.2f}/255 vs stored reference"
    from dirotq.eval.judge import describe, load_judge, predict, score_images
    judge = load_judge(JUDGE)
    s = score_images(judge, img[None], [ref["prompt"]])
    # the judge reads the image exactly as it did when the reference was stored
    assert s["n_objects"] == 1
    for k in ("shape", "color", "size", "position", "count", "background"):
        assert s[k] == ref["judge_score"][k], (k, s, ref["judge_score"])
    assert describe(predict(judge, img[None]), 0) == ref["judge_reading"]
    # and that reading is the prompt, every attribute right (the reference seed was searched for one)
    assert s["image_all"] == 1.0, s


@pytest.mark.parametrize("size", [64, 128])  # the judge resizes to 72×72: accurate from below and above
def test_judge_is_accurate_on_real_images(size):
    from dirotq.eval.judge import load_judge, score_images
    from dirotq.eval.shapes_render import batch
    x, caps, _ = batch(range(90_000_000, 90_000_200), "any", size)
    s = score_images(load_judge(JUDGE), torch.from_numpy(x), caps)
    assert s["color"] >= 0.95 and s["shape"] >= 0.95 and s["position"] >= 0.95 and s["background"] >= 0.95, s


def test_render_retention_from_a_low_start_keeps_the_real_shapes(pipe):
    """The SDEdit diagnostic (scripts/diagnose_text_conditioning.py): noising real renders only to t ≈ 100 and
    denoising must hand the judge back what it reads on the real images; a wrong latent scale, a dropped
    guidance branch or a misplaced timestep would wreck it."""
    from dirotq.eval.judge import load_judge
    from scripts.diagnose_text_conditioning import render_retention
    from dirotq.eval.protocol import read_prompts
    prompts = read_prompts(os.path.join(ROOT, "assets", "prompts", "eval.txt"), limit=8)
    res = render_retention(pipe, load_judge(JUDGE), prompts, start_steps=(18,))
    (start, scores), = res.items()
    assert int(start) <= 150
    assert scores["n_images"] == 8 and scores["color"] >= 0.9 and scores["position"] >= 0.9 and scores["shape"] >= 0.8
