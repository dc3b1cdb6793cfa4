"""How much does the embedded model's DiT use its caption, and does its text encoder know the caption's structure?

Measurements 1–2 on training-pool latents (runs/latent_pool_*.pt, from scripts/train_tiny_pixart.py), 3 on the eval prompts:
1. x̂0 error per timestep with the true caption, the empty caption and another image's caption. At t ≈ 950
   the input is nearly pure noise, so the true-caption error says how much of the image the caption fixes.
2. A linear probe on the text encoder's outputs at colour words: background colour or object colour? A
   bag-of-words encoder can only answer from the word itself (some colours are object-only).
3. Render retention (SDEdit): real renders of the eval prompts are encoded, noised to a start timestep and
   denoised by the pipeline's scheduler from there; the judge scores the results. Starting at t = 999 is plain
   generation; a low start hands the model the right shapes and only asks it to keep them. If shapes are lost
   even from t = 400, the denoiser cannot render them, and no amount of text conditioning will help.

    python -m scripts.diagnose_text_conditioning --model assets/tiny-pixart --out result.json
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import torch

from dirotq.eval.shapes_grammar import COLOR_NAMES  # noqa: E402
from dirotq.eval.report import emit_json  # noqa: E402
from scripts.train_tiny_pixart import TRAIN_MAX_TOKENS, Diffusion, build_tokenizer  # noqa: E402


@torch.no_grad()
def x0_errors(transformer, text_encoder, x0, ids, mask, empty_ids, empty_mask, timesteps, seed=0):
    """Mean squared x̂0 error per timestep for the true, empty and rolled (wrong) captions.
    x0: (N, C, h, w) scaled latents; ids, mask: (N, L)."""
    d = Diffusion()
    g = torch.Generator().manual_seed(seed)
    emb = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    emb0 = text_encoder(input_ids=empty_ids, attention_mask=empty_mask).last_hidden_state
    wrong = torch.roll(torch.arange(len(x0)), 1)
    out = {}
    for tv in timesteps:
        t = torch.full((len(x0),), tv)
        noise = torch.randn(x0.shape, generator=g)
        xt = d._b(d.sqrt_ac, t) * x0 + d._b(d.sqrt_1mac, t) * noise
        row = {}
        for name, e, m in (("true", emb, mask), ("empty", emb0, empty_mask), ("wrong", emb[wrong], mask[wrong])):
            o = transformer(xt, encoder_hidden_states=e, encoder_attention_mask=m, timestep=t,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
            v = o[:, :x0.shape[1]]
            x0_hat = d._b(d.sqrt_ac, t) * xt - d._b(d.sqrt_1mac, t) * v  # v-prediction
            row[name] = round(float(((x0_hat - x0) ** 2).mean()), 4)
        out[str(tv)] = row
    return out


@torch.no_grad()
def colour_role_probe(text_encoder, tokenizer, captions):
    """Held-out accuracy of a logistic regression telling background from object colour words, on the
    encoder outputs and on the input embeddings, and the majority-class rate."""
    from sklearn.linear_model import LogisticRegression
    enc = tokenizer(captions, padding="max_length", max_length=TRAIN_MAX_TOKENS, truncation=True, return_tensors="pt")
    hidden = text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state.numpy()
    table = text_encoder.get_input_embeddings().weight.numpy()
    feats, embs, role = [], [], []
    for i in range(len(captions)):
        words = tokenizer.convert_ids_to_tokens(enc.input_ids[i])
        bg = words.index("background")
        for j, w in enumerate(words):
            if w in COLOR_NAMES:
                feats.append(hidden[i, j])
                embs.append(table[enc.input_ids[i, j]])
                role.append(int(j > bg))
    y = np.array(role)
    n = len(y) * 2 // 3
    res = {"n_colour_words": int(len(y)), "majority_rate": round(float(max(y[n:].mean(), 1 - y[n:].mean())), 4)}
    for name, f in (("encoder_output", np.array(feats)), ("input_embedding", np.array(embs))):
        clf = LogisticRegression(max_iter=2000).fit(f[:n], y[:n])
        res[f"{name}_accuracy"] = round(float(clf.score(f[n:], y[n:])), 4)
    return res


@torch.no_grad()
def render_retention(pipe, judge, prompts: list[str], start_steps=(0, 4, 8, 12, 15), steps: int = 20,
                     guidance: float = 4.5, seed: int = 0) -> dict[str, dict]:
    """Judge scores of images denoised from noised real renders, keyed by the start timestep.

    start_steps: indices into the scheduler's ``steps`` timesteps (0 = from pure noise, i.e. plain generation).
    Returns {"999": scores, "799": scores, ...} with dirotq.eval.judge.score_images dicts.
    """
    from dirotq.eval.judge import score_images
    from dirotq.eval.shapes_grammar import parse_caption
    from dirotq.eval.shapes_render import render
    vae, sch, dit = pipe.vae, pipe.scheduler, pipe.transformer
    sf = vae.config.scaling_factor
    size = dit.config.sample_size * pipe.vae_scale_factor  # the pipeline's native image side
    real = np.stack([render(parse_caption(p), size) for p in prompts])
    x = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255
    lat0 = vae.encode(x * 2 - 1).latent_dist.mean * sf
    pe, pm, ne, nm = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, max_sequence_length=48,
                                        clean_caption=False)
    emb, mask = torch.cat([ne, pe]), torch.cat([nm, pm])
    out = {}
    for k in start_steps:
        sch.set_timesteps(steps)
        ts = sch.timesteps
        noise = torch.randn(lat0.shape, generator=torch.Generator().manual_seed(seed))
        lat = sch.add_noise(lat0, noise, ts[k:k + 1].repeat(len(prompts))) if k > 0 else noise * sch.init_noise_sigma
        for t in ts[k:]:
            o = dit(torch.cat([lat, lat]), encoder_hidden_states=emb, encoder_attention_mask=mask,
                    timestep=t.expand(2 * len(lat)), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0][:, :lat.shape[1]]  # drop the learned-sigma channels
            uncond, cond = o.chunk(2)
            lat = sch.step(uncond + guidance * (cond - uncond), t, lat).prev_sample
        img = ((vae.decode(lat / sf).sample + 1) / 2).clamp(0, 1)
        out[str(int(ts[k]))] = {name: round(v, 4) for name, v in score_images(judge, img, prompts).items()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/tiny-pixart")
    ap.add_argument("--pool", default="", help="latent pool .pt (default: the newest runs/latent_pool_*.pt)")
    ap.add_argument("--n", type=int, default=64, help="latents for the x̂0 errors")
    ap.add_argument("--probe-captions", type=int, default=3000)
    ap.add_argument("--eval-prompts", default="assets/prompts/eval.txt", help="prompts for the render retention")
    ap.add_argument("--judge", default="assets/judge")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5EncoderModel
    pools = [a.pool] if a.pool else sorted(glob.glob("runs/latent_pool_*.pt"), key=os.path.getmtime)
    if not pools or not os.path.exists(pools[-1]):
        raise SystemExit("no latent pool: run scripts/train_tiny_pixart.py once, or pass --pool")
    pool = torch.load(pools[-1], weights_only=False)
    transformer = PixArtTransformer2DModel.from_pretrained(os.path.join(a.model, "transformer"),
                                                           torch_dtype=torch.float32).eval()
    text_encoder = T5EncoderModel.from_pretrained(os.path.join(a.model, "text_encoder"), dtype=torch.float32).eval()
    sf = AutoencoderKL.load_config(os.path.join(a.model, "vae"))["scaling_factor"]
    tok = build_tokenizer()
    caps = pool["captions"][:a.n]
    enc = tok(caps, padding="max_length", max_length=TRAIN_MAX_TOKENS, truncation=True, return_tensors="pt")
    empty = tok([""] * a.n, padding="max_length", max_length=TRAIN_MAX_TOKENS, return_tensors="pt")
    x0 = pool["mean"][:a.n].float() * sf
    res = {"model": a.model, "pool": pools[-1], "n_latents": a.n, "x0_variance": round(float(x0.var()), 4),
           "x0_error_by_t": x0_errors(transformer, text_encoder, x0, enc.input_ids, enc.attention_mask,
                                      empty.input_ids, empty.attention_mask, (50, 200, 400, 600, 800, 950)),
           "colour_role_probe": colour_role_probe(text_encoder, tok, pool["captions"][:a.probe_captions])}
    from diffusers import PixArtSigmaPipeline
    from dirotq.eval.judge import load_judge
    from dirotq.eval.protocol import read_prompts
    pipe = PixArtSigmaPipeline.from_pretrained(a.model, torch_dtype=torch.float32)
    res["render_retention_by_start_t"] = render_retention(pipe, load_judge(a.judge), read_prompts(a.eval_prompts))
    emit_json(res, a.out)


if __name__ == "__main__":
    main()
