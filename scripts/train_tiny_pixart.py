"""Train the embedded tiny PixArt-Σ (DiT + T5 text encoder) on procedural shapes (issue #3, steps 3–5).

Architecture (same family as PixArt-Σ, diffusers classes, loadable by PixArtSigmaPipeline):
- transformer: PixArtTransformer2DModel, norm_type="ada_norm_single" (adaLN-single), self-attention,
  cross-attention to the text tokens, GELU-tanh feed-forward, learned sigma (out_channels = 2 × latent channels),
  sample_size = latent size (32 for the shipped f4 VAE: 32×32×8 latents of 128×128 images), patch size so
  that the image is 8×8 = 64 tokens (4 here), head dim 64, PixArt's initialisation (zero cross-attention
  output and final layer). Call the pipeline with use_resolution_binning=False (binning maps 128 px to 256 px).
- text encoder: transformers T5EncoderModel from a small config, word-level tokenizer over the caption
  vocabulary (tokenizers WordLevel, saved as a PreTrainedTokenizerFast folder; <unk> for unknown words).
- vae: the tiny AutoencoderKL from scripts/train_tiny_vae.py (frozen here; its latent shape sets the DiT's).
- scheduler: DPMSolverMultistepScheduler with PixArt-Σ's settings (linear betas 1e-4…0.02, 1000 steps,
  dpmsolver++ order 2) with v-prediction (default; ε is available with --prediction-type epsilon).
Objective: DDPM v- (or ε-) MSE + the IDDPM variational bound term for the learned variance (PixArt-Σ recipe:
learn_sigma=True, uniform t; --t-power > 1 samples more high-noise steps), 10 % caption dropout for classifier-free guidance. Optimiser AdamW,
lr 1e-3, no weight decay (the recipe that grew outlier
channels fastest: assets/tiny-pixart/README.md), warmup 200,
cosine decay to 10 % over --max-steps (or the time budget), grad clip 1, EMA of weights (the EMA is what is saved).
--object-weight W multiplies the MSE on latent positions covered by an object (masks from the scene geometry,
dirotq.eval.shapes_render.object_mask): objects are ~13 % of the positions, and with a plain MSE the model learns
backgrounds and local denoising long before it binds the caption's objects to image positions.

Latents are pre-encoded once with the trained VAE (posterior means of a fixed, seeded pool of
procedural training-split images, cached under runs/).

    python -m scripts.train_tiny_pixart --vae runs/vae/vae --out runs/dit --minutes 1e9 --max-steps 4600 \
        --seed 0 --threads 2 --hidden 256 --depth 6 --batch 32 --lr 1e-3 --pool 10000
    python -m scripts.train_tiny_pixart --vae runs/vae/vae --init runs/dit/pipeline --out runs/dit_obj \
        --minutes 1e9 --max-steps 4800 --seed 1 --threads 2 --hidden 256 --depth 6 --batch 32 --lr 5e-4 \
        --pool 10000 --object-weight 4
(scripts/build_tiny_pixart.sh runs the whole recipe.)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time

import numpy as np
import torch

torch.set_flush_denormal(True)
import torch.nn.functional as F

from dirotq.eval.shapes_grammar import vocabulary  # noqa: E402
from scripts.caption_structure import StructureHeads, label_batch  # noqa: E402
from dirotq.eval.shapes_render import batch, object_mask, scene_for  # noqa: E402

POOL_SEED_BASE = 0  # training images: example(POOL_SEED_BASE + i, "train")
TRAIN_MAX_TOKENS = 48


# ---------------------------------------------------------------- tokenizer / text encoder
def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "</s>", "<unk>"]  # T5 ids: pad 0, eos 1, unk 2
    vocab = {w: i for i, w in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=300, padding_side="right")


def make_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=vocab_size, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    return T5EncoderModel(cfg)


def make_transformer(hidden: int, depth: int, caption_channels: int, latent_channels: int = 8,
                     latent_size: int = 32, patch_size: int = 4):
    """latent_size / patch_size = 8 gives 8×8 = 64 image tokens."""
    from diffusers import PixArtTransformer2DModel
    return PixArtTransformer2DModel(
        num_attention_heads=hidden // 64, attention_head_dim=64, in_channels=latent_channels,
        out_channels=2 * latent_channels,  # learned sigma: ε/v and the variance interpolation
        num_layers=depth, dropout=0.0, norm_num_groups=32, cross_attention_dim=hidden, attention_bias=True,
        sample_size=latent_size, patch_size=patch_size, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        upcast_attention=False, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        interpolation_scale=None, use_additional_conditions=False, caption_channels=caption_channels)


def pixart_init_(transformer) -> None:
    """PixArt's initialisation (after DiT's adaLN-Zero): xavier-uniform linears with zero bias, normal(0.02)
    timestep and caption embedders, and zero cross-attention output projections and final layer, so every
    block starts as the identity and the model's first output is 0 (DiT reports faster convergence)."""
    import torch.nn as nn
    for m in transformer.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = transformer.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    emb = transformer.adaln_single.emb.timestep_embedder
    for lin in (emb.linear_1, emb.linear_2, transformer.adaln_single.linear,
                transformer.caption_projection.linear_1, transformer.caption_projection.linear_2):
        nn.init.normal_(lin.weight, std=0.02)
    for block in transformer.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(transformer.proj_out.weight)
    nn.init.zeros_(transformer.proj_out.bias)


def make_scheduler(prediction_type: str = "v_prediction"):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type=prediction_type, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, timestep_spacing="linspace", steps_offset=0, thresholding=False,
        use_karras_sigmas=False, variance_type=None)


# ---------------------------------------------------------------- latent pool
def build_pool(vae, n: int, cache: str, dev: str, chunk: int = 32, size: int = 128):
    if os.path.exists(cache):
        d = torch.load(cache)
        if d["mean"].shape[0] >= n:
            return d
    means, stds, caps = [], [], []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, n, chunk):
            x, c, _ = batch(range(POOL_SEED_BASE + i, POOL_SEED_BASE + min(n, i + chunk)), "train", size)
            post = vae.encode(torch.from_numpy(x).to(dev) * 2 - 1).latent_dist
            means.append(post.mean.half().cpu())
            stds.append(post.std.half().cpu())
            caps += c
            if (i // chunk) % 20 == 0:
                print(f"pool {i + chunk}/{n} {time.time() - t0:.0f}s", flush=True)
    d = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": caps}
    torch.save(d, cache)
    return d


# ---------------------------------------------------------------- diffusion math
class Diffusion:
    def __init__(self, T=1000, dev="cpu"):
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.T = T
        self.sqrt_ac = ac.sqrt().float().to(dev)
        self.sqrt_1mac = (1 - ac).sqrt().float().to(dev)
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])).float().to(dev)
        self.log_betas = torch.log(betas).float().to(dev)
        self.coef1 = (betas * ac_prev.sqrt() / (1 - ac)).float().to(dev)
        self.coef2 = ((1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)).float().to(dev)

    @staticmethod
    def _b(v, t):
        return v[t][:, None, None, None]

    def loss(self, model_out, x0, xt, t, noise, prediction_type="epsilon", weight=None):
        """Prediction MSE (ε or v) + IDDPM L_vlb for the learned variance (mean term stop-gradient,
        t = 0 term dropped). weight: optional (B, 1, h, w) per-position weight of the MSE."""
        pred, v = model_out.chunk(2, dim=1)
        b = self._b
        if prediction_type == "epsilon":
            eps = pred
            err = (pred - noise) ** 2
        else:  # v = α ε − σ x0  ⇒  ε = α v + σ x_t
            target = b(self.sqrt_ac, t) * noise - b(self.sqrt_1mac, t) * x0
            err = (pred - target) ** 2
            eps = b(self.sqrt_ac, t) * pred + b(self.sqrt_1mac, t) * xt
        mse = (err if weight is None else err * weight).mean(dim=(1, 2, 3))
        # true posterior q(x_{t-1} | x_t, x_0)
        true_mean = b(self.coef1, t) * x0 + b(self.coef2, t) * xt
        true_logvar = b(self.post_logvar, t)
        # model: mean from the (detached) ε, log-variance interpolated between β̃_t and β_t
        x0_pred = (xt - b(self.sqrt_1mac, t) * eps.detach()) / b(self.sqrt_ac, t)
        mean = b(self.coef1, t) * x0_pred + b(self.coef2, t) * xt
        frac = (v + 1) / 2
        logvar = frac * b(self.log_betas, t) + (1 - frac) * true_logvar
        kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                    + (true_mean - mean) ** 2 * torch.exp(-logvar))
        vlb = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        vlb = torch.where(t > 0, vlb, torch.zeros_like(vlb))
        return mse.mean(), vlb.mean()


def sample_timesteps(n: int, power: float, generator: torch.Generator, T: int = 1000) -> torch.Tensor:
    """n training timesteps in [0, T): t = floor(T · u^(1/power)), u ~ U(0, 1).

    power 1 is the uniform DDPM sampling; power p > 1 gives density ∝ t^(p-1), i.e. more steps at high noise,
    where the caption decides the layout (the model's x̂0 error with and without the caption differs mostly
    for t > 600; below that it denoises local detail the text barely affects)."""
    if power <= 0:
        raise ValueError(f"timestep power must be > 0, got {power}")
    if power == 1.0:  # the draw the earlier stages of scripts/build_tiny_pixart.sh were trained with
        return torch.randint(0, T, (n,), generator=generator)
    u = torch.rand(n, generator=generator)
    return (T * u.pow(1.0 / power)).long().clamp_(0, T - 1)


def pretrain_text_encoder(text_encoder, heads, ids, mask, labels, steps: int, g: torch.Generator,
                          batch: int = 128, lr: float = 1e-3, log_path: str = "") -> dict[str, float]:
    """Train the text encoder (and the structure heads) alone on the per-token structure loss.

    ids, mask: (N, L) tokenized captions; labels: (N, L, n_heads) from caption_structure.label_batch.
    Returns the last logged per-head token accuracies."""
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    log = open(log_path, "a") if log_path else None
    acc = {}
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 100)
        idx = torch.randint(0, ids.shape[0], (batch,), generator=g).to(ids.device)
        hidden = text_encoder(input_ids=ids[idx], attention_mask=mask[idx]).last_hidden_state
        loss, acc = heads.loss(hidden, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            rec = {"text_step": step + 1, "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in acc.items()}}
            print(json.dumps(rec), flush=True)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
    return acc


# ---------------------------------------------------------------- save
def save_pipeline(out_dir, tokenizer, text_encoder, vae, transformer, prediction_type="v_prediction"):
    from diffusers import PixArtSigmaPipeline
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=copy.deepcopy(text_encoder).half(),
                               vae=copy.deepcopy(vae).half(), transformer=copy.deepcopy(transformer).half(),
                               scheduler=make_scheduler(prediction_type))
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", default="runs/tiny_vae/vae")
    ap.add_argument("--out", default="runs/tiny_pixart")
    ap.add_argument("--minutes", type=float, default=80.0)
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after N steps; the lr schedule then follows the step count (reproducible)")
    ap.add_argument("--pool", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--patch", type=int, default=0, help="patch size (default: latent size / 8 → 64 tokens)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--save-every-min", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prediction-type", default="v_prediction", choices=["epsilon", "v_prediction"])
    ap.add_argument("--init", default="", help="pipeline folder to continue from (transformer + text encoder)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--object-weight", type=float, default=1.0,
                    help="MSE weight on latent positions covered by an object (1 = plain MSE); objects are a few %% "
                         "of the pixels, so a plain loss learns backgrounds long before text-to-object binding")
    ap.add_argument("--t-power", type=float, default=1.0,
                    help="timestep sampling t = 1000·u^(1/p): 1 = uniform; 2 = density ∝ t (more high-noise steps, "
                         "where text-to-layout binding is learned)")
    ap.add_argument("--text-pretrain-steps", type=int, default=0,
                    help="first train the text encoder alone for N steps to predict, at every token, the attributes "
                         "of the entity it belongs to (scripts/caption_structure.py); 0 = off")
    ap.add_argument("--fresh-text-encoder", action="store_true",
                    help="with --init: keep the transformer but start a new text encoder (the old one had learned a "
                         "bag of words and relearned structure ~3× slower than a fresh one)")
    ap.add_argument("--text-aux-weight", type=float, default=0.0,
                    help="weight of that structure loss added to the diffusion loss during DiT training (0 = off)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(a.out, exist_ok=True)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(a.vae).to(dev).eval().requires_grad_(False)
    sf = vae.config.scaling_factor
    # the cache name carries the encoder's identity: a pool from another VAE must never be reused
    import hashlib
    enc_id = hashlib.sha1(b"".join(p.detach().cpu().float().numpy().tobytes() for p in vae.encoder.parameters())).hexdigest()[:10]
    image_size = vae.config.sample_size
    pool = build_pool(vae, a.pool, os.path.join(os.path.dirname(a.out.rstrip("/")) or ".",
                                                f"latent_pool_{a.pool}_{image_size}px_{enc_id}.pt"), dev, size=image_size)
    pmean, pstd = pool["mean"][:a.pool].to(dev), pool["std"][:a.pool].to(dev)
    caps = pool["captions"][:a.pool]
    lat_size = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    wmap = None
    scenes = [scene_for(POOL_SEED_BASE + i, "train") for i in range(a.pool)]  # the pool's images are example(i)
    if a.object_weight != 1.0:  # scene geometry → latent-grid masks
        masks = np.stack([object_mask(sc, lat_size) for sc in scenes])
        wmap = (1.0 + (a.object_weight - 1.0) * torch.from_numpy(masks).float())[:, None].to(dev)
        print(f"object weight {a.object_weight}: objects cover {masks.mean() * 100:.1f} % of latent positions", flush=True)
    tokenizer = build_tokenizer()
    enc = tokenizer(caps, padding="max_length", max_length=TRAIN_MAX_TOKENS, truncation=True, return_tensors="pt")
    assert int(enc.attention_mask.sum(1).max()) < TRAIN_MAX_TOKENS, "captions longer than TRAIN_MAX_TOKENS"
    ids_all, mask_all = enc.input_ids.to(dev), enc.attention_mask.to(dev)
    empty = tokenizer([""], padding="max_length", max_length=TRAIN_MAX_TOKENS, return_tensors="pt")
    e_ids, e_mask = empty.input_ids.to(dev), empty.attention_mask.to(dev)

    text_encoder = make_text_encoder(len(tokenizer)).to(dev).train()
    lat_ch = vae.config.latent_channels
    transformer = make_transformer(a.hidden, a.depth, text_encoder.config.d_model, lat_ch, lat_size,
                                   a.patch or lat_size // 8).to(dev).train()
    pixart_init_(transformer)
    if a.init:
        from diffusers import PixArtTransformer2DModel
        from transformers import T5EncoderModel
        transformer = PixArtTransformer2DModel.from_pretrained(os.path.join(a.init, "transformer"),
                                                               torch_dtype=torch.float32).to(dev).train()
        if not a.fresh_text_encoder:
            text_encoder = T5EncoderModel.from_pretrained(os.path.join(a.init, "text_encoder"),
                                                          dtype=torch.float32).to(dev).train()
    n_dit = sum(p.numel() for p in transformer.parameters())
    n_te = sum(p.numel() for p in text_encoder.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    print(json.dumps({"params_transformer": n_dit, "params_text_encoder": n_te, "params_vae": n_vae,
                      "fp16_MB": 2 * (n_dit + n_te + n_vae) / 2**20}), flush=True)
    heads, struct_labels = None, None
    if a.text_pretrain_steps or a.text_aux_weight:
        heads = StructureHeads(text_encoder.config.d_model).to(dev)
        struct_labels = label_batch(scenes, TRAIN_MAX_TOKENS).to(dev)
    if a.text_pretrain_steps:
        pretrain_text_encoder(text_encoder, heads, ids_all, mask_all, struct_labels, a.text_pretrain_steps,
                              torch.Generator().manual_seed(a.seed + 1000), log_path=os.path.join(a.out, "text_log.jsonl"))
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params + ([] if heads is None else list(heads.parameters())), lr=a.lr,
                            weight_decay=a.wd, betas=(0.9, 0.999))
    ema_t, ema_te = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_t.parameters()) + list(ema_te.parameters())
    diff = Diffusion(dev=dev)
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    log = open(os.path.join(a.out, "log.jsonl"), "a")
    t0 = time.time()
    budget = a.minutes * 60
    last_save = t0
    step, acc = 0, []
    while (a.max_steps is None or step < a.max_steps) and time.time() - t0 < budget:
        frac = min(1.0, step / a.max_steps if a.max_steps else (time.time() - t0) / budget)
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(0, a.pool, (a.batch,), generator=g).to(dev)
        x0 = pmean[idx].float() * sf  # posterior mean: the VAE decoder was trained on means
        ids, mask = ids_all[idx], mask_all[idx]
        drop = (torch.rand(a.batch, generator=g) < a.cfg_drop).to(dev)
        ids = torch.where(drop[:, None], e_ids.expand_as(ids), ids)
        mask = torch.where(drop[:, None], e_mask.expand_as(mask), mask)
        t = sample_timesteps(a.batch, a.t_power, g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        xt = diff._b(diff.sqrt_ac, t) * x0 + diff._b(diff.sqrt_1mac, t) * noise
        emb = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out = transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        mse, vlb = diff.loss(out, x0, xt, t, noise, a.prediction_type, None if wmap is None else wmap[idx])
        loss = mse + vlb
        if a.text_aux_weight:  # keep the encoder's per-token structure while the diffusion loss trains it
            aux, _ = heads.loss(emb[~drop], struct_labels[idx][~drop])
            loss = loss + a.text_aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - d)
        acc.append((mse.item(), vlb.item(), gn.item()))
        step += 1
        if step % 25 == 0:
            m = np.mean(acc, 0)
            acc = []
            rec = {"step": step, "t": round(time.time() - t0, 1), "lr": round(lr, 6), "mse": round(float(m[0]), 5),
                   "vlb": round(float(m[1]), 5), "grad_norm": round(float(m[2]), 3)}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if time.time() - last_save > a.save_every_min * 60:
            save_pipeline(os.path.join(a.out, "pipeline"), tokenizer, ema_te, vae, ema_t, a.prediction_type)
            json.dump({"steps": step, "train_seconds": round(time.time() - t0, 1)},
                      open(os.path.join(a.out, "pipeline", "train_state.json"), "w"))
            last_save = time.time()
            print(f"saved checkpoint at step {step}", flush=True)
    train_s = time.time() - t0
    save_pipeline(os.path.join(a.out, "pipeline"), tokenizer, ema_te, vae, ema_t, a.prediction_type)
    info = {"steps": step, "train_seconds": round(train_s, 1), "device": dev, "threads": a.threads,
            "batch": a.batch, "pool": a.pool, "hidden": a.hidden, "depth": a.depth, "lr": a.lr, "wd": a.wd,
            "ema": a.ema, "object_weight": a.object_weight, "t_power": a.t_power, "text_pretrain_steps": a.text_pretrain_steps,
            "text_aux_weight": a.text_aux_weight,
            "fresh_text_encoder": a.fresh_text_encoder, "warmup": a.warmup, "max_steps": a.max_steps, "seed": a.seed, "prediction_type": a.prediction_type, "init": a.init, "params_transformer": n_dit, "params_text_encoder": n_te,
            "params_vae": n_vae, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    json.dump(info, open(os.path.join(a.out, "pipeline", "train_state.json"), "w"), indent=1)
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
