"""End-to-end denoising step and transformer weight memory (issue #6 "Benchmarks").

Full-size transformers from the published configs, random weights (speed does not depend on the
values), bf16, 1024×1024:
- PixArt-Σ XL-2-1024 (28 blocks, width 1152): 4096 image tokens, 300 caption tokens, batch 2 (CFG);
- FLUX.1-dev (19 double + 38 single blocks, width 3072): 4096 image + 512 text tokens, batch 1,
  guidance-distilled (``--flux-single-blocks`` / ``--flux-double-blocks`` reduce the depth if memory
  requires; the JSON says so).
Variants: ``bf16`` (the model as built) and W4A4 format A / C: every adapter target replaced by a
``QuantLinear`` of the DiRotQ-LR structure at rank ``--rank`` (c = xV_r, residual, block Hadamard,
INT4 weights of the actual random W, fused 16-bit branch), adapter W4A16 targets (PixArt ff.net.2,
FLUX adaLN modulation) weight-only INT4; what the adapter keeps 16-bit stays bf16. The basis is a
random orthonormal V_r (no calibration statistics exist for random weights); structure, sizes and
kernels are those of a calibrated model.
Timing: one transformer forward (= one denoising step), eager (``do_bench`` median) and inside a
CUDA graph (the deployment mode: no Python launch overhead). Memory: bytes of every parameter and
buffer the transformer holds (packed weights, scales, multipliers, 16-bit branches, bases, signs,
bias, the unquantized layers), and the ``storage_bits`` accounting of the QuantLinear layers.

    python -m benchmarks.bench_e2e --model pixart [--formats exact int_ratio] [--rank 32]
    python -m benchmarks.bench_e2e --model flux
    python -m benchmarks.bench_e2e --dry-run      # CPU, TRITON_INTERPRET=1, tiny configs: code path only
    python -m benchmarks.bench_e2e --model flux --compile default   # also each variant under torch.compile

``--compile MODE`` adds, for every variant, the step of ``torch.compile(model, mode=MODE)`` (what a
user compares against: BF16 + compile): compile seconds, graph count and graph breaks (a quantized
linear is one custom op, ``dirotq/compile_ops.py``), and the compiled step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DIROTQ_BACKEND", "triton")  # exercise the kernels on CPU tensors

import torch  # noqa: E402

from benchmarks._bench_common import ROOT, bench, bench_graph, environment, make_quant_linear  # noqa: E402

PIXART_SIGMA_1024 = dict(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, attention_type="default",
    caption_channels=4096, cross_attention_dim=1152, double_self_attention=False, dropout=0.0, in_channels=4,
    interpolation_scale=2, norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32,
    norm_type="ada_norm_single", num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28,
    only_cross_attention=False, out_channels=8, patch_size=2, sample_size=128, upcast_attention=False,
    use_additional_conditions=False, use_linear_projection=False,
)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
    num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)


def published_config(cls, config: dict) -> tuple[dict, list[str]]:
    """The published config minus keys the installed diffusers no longer accepts (e.g. PixArt's
    ``double_self_attention``, dropped from ``PixArtTransformer2DModel``): (kwargs, dropped keys)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    kept = {k: v for k, v in config.items() if k in accepted}
    return kept, sorted(set(config) - set(kept))


def build(model: str, args, dry: bool, seed: int = 0):
    """(transformer, inputs dict, description) on the benchmark device, bf16 (fp32 in the dry run)."""
    from dirotq.models import ADAPTERS

    dev = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    adapter = ADAPTERS["pixart" if model == "pixart" else "flux"]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if dry:
        m = adapter.build_tiny(seed).to(dev, dt)
        kw = adapter.example_inputs(m, 2 if model == "pixart" else 1, gen)
        return m, _to(kw, dev, dt), {"config": "tiny (dry run)"}
    import diffusers

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # initialise directly in bf16 on the GPU (FLUX: 24 GB, not 48)
    try:
        with torch.device(dev):
            if model == "pixart":
                cls = diffusers.PixArtTransformer2DModel
                cfg, dropped = published_config(cls, PIXART_SIGMA_1024)
            else:
                cls = diffusers.FluxTransformer2DModel
                cfg, dropped = published_config(cls, FLUX_DEV)
                if args.flux_double_blocks is not None:
                    cfg["num_layers"] = args.flux_double_blocks
                if args.flux_single_blocks is not None:
                    cfg["num_single_layers"] = args.flux_single_blocks
            m = cls(**cfg)
    finally:
        torch.set_default_dtype(prev)
    m = m.eval().to(dev, dt)
    if model == "pixart":
        b, s, L = 2, 128, 300
        kw = dict(hidden_states=torch.randn(b, 4, s, s, generator=gen),
                  encoder_hidden_states=torch.randn(b, L, 4096, generator=gen),
                  timestep=torch.full((b,), 500, dtype=torch.long), encoder_attention_mask=torch.ones(b, L),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        desc = {"config": "PixArt-Sigma-XL-2-1024-MS", "batch": b, "image_tokens": (s // 2) ** 2, "text_tokens": L,
                "config_keys_dropped": dropped}
    else:
        h = w = 64
        L = 512
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        kw = dict(hidden_states=torch.randn(1, h * w, 64, generator=gen),
                  encoder_hidden_states=torch.randn(1, L, 4096, generator=gen),
                  pooled_projections=torch.randn(1, 768, generator=gen), timestep=torch.full((1,), 0.5),
                  img_ids=ids.reshape(h * w, 3), txt_ids=torch.zeros(L, 3), guidance=torch.full((1,), 3.5))
        desc = {"config": "FLUX.1-dev", "batch": 1, "image_tokens": h * w, "text_tokens": L,
                "double_blocks": cfg["num_layers"], "single_blocks": cfg["num_single_layers"],
                "reduced_depth": cfg["num_layers"] != 19 or cfg["num_single_layers"] != 38,
                "config_keys_dropped": dropped}
    return m, _to(kw, dev, dt), desc


def _to(kw, dev, dt):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(dev, dt if v.is_floating_point() else v.dtype)
        elif isinstance(v, dict):
            out[k] = _to(v, dev, dt)
        else:
            out[k] = v
    return out


@torch.no_grad()
def quantize_model(model, fmt: str, rank: int) -> dict:
    """Replace every adapter target by a QuantLinear in place; returns counts."""
    from dirotq.models import get_adapter

    specs = get_adapter(model).targets(model)
    counts = {"w4a4": 0, "w4a16": 0}
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        w4a16 = spec.kind == "w4a16"
        structure = "rtn" if (w4a16 or lin.in_features % 64) else "dirotq-lr"
        q = make_quant_linear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), structure, fmt,
                              0 if structure == "rtn" else min(rank, lin.in_features), act_bits=None if w4a16 else 4)
        # float buffers (branch, bias, signs) are already in the model dtype; no .to(dtype) here, which
        # would also cast the fp16 weight scales to bf16
        setattr(parent, child, q)
        counts[spec.kind] += 1
        del lin
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counts


def weight_bytes(model) -> dict:
    from dirotq.modules import QuantLinear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    q_bits = sum(sum(m.storage_bits().values()) for m in model.modules() if isinstance(m, QuantLinear))
    q_params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return {"bytes": int(total), "quant_layers_storage_bytes": int(q_bits / 8), "quant_layers_weights": int(q_params)}


def time_step(model, kw, graphs: bool) -> dict:
    def step():
        return model(**kw, return_dict=False)[0]

    out = {}
    with torch.no_grad():
        for _ in range(2):  # compile / autotune / plan caches before timing or capture
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out["eager_ms"] = bench(step, rep_ms=1000, warmup_ms=100)
        if graphs:
            out["cuda_graph_ms"] = bench_graph(step, calls=1, replays=10)
    return out


def compiled_step(model, kw, mode: str) -> dict:
    """The step under ``torch.compile(model, mode=mode)``: compile (first call) seconds, graphs and
    graph breaks as dynamo counts them, and the compiled step's median time."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode=mode)
    t0 = time.time()
    with torch.no_grad():
        compiled(**kw, return_dict=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = {"mode": mode, "compile_s": round(time.time() - t0, 1),
           "graphs": int(counters["stats"]["unique_graphs"]),
           "graph_breaks": int(sum(counters["graph_break"].values()))}
    out.update({k: v for k, v in time_step(compiled, kw, graphs=False).items()})
    torch._dynamo.reset()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["pixart", "flux"], default="pixart")
    ap.add_argument("--formats", nargs="+", default=["exact", "int_ratio"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--flux-double-blocks", type=int, default=None)
    ap.add_argument("--flux-single-blocks", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--compile", default="none",
                    choices=["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    help="also time each variant under torch.compile with this mode (default none)")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("bench_e2e.py needs a CUDA GPU (or --dry-run to check the code path on CPU)")
    from dirotq.modules import backend_description

    env = environment()
    res: dict = {"benchmark": "bench_e2e", "model": args.model, "environment": env, "dry_run": dry,
                 "rank": args.rank, "variants": {}}
    t0 = time.time()
    gpu = (env.get("gpu") or "cpu-dry-run").replace(" ", "_")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_e2e_{args.model}_{gpu}.json"
    if dry and not args.out:
        out = Path("/tmp") / f"bench_e2e_{args.model}_dry_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for variant in ["bf16", *args.formats]:
        print(f"{args.model} {variant}: building", flush=True)
        model, kw, desc = build(args.model, args, dry)
        res["setup"] = desc
        entry: dict = {}
        if variant != "bf16":
            entry["layers"] = quantize_model(model, variant, args.rank)
        entry["memory"] = weight_bytes(model)
        entry.update(time_step(model, kw, graphs=not args.no_graphs and not dry))
        entry["backend"] = backend_description(model) if variant != "bf16" else "torch bf16"
        if args.compile != "none":
            entry["compiled"] = compiled_step(model, kw, args.compile)
        if torch.cuda.is_available() and not dry:
            entry["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        res["variants"][variant] = entry
        print("  " + json.dumps(entry), flush=True)
        out.write_text(json.dumps(res, indent=1))  # after every variant: a killed run keeps what it measured
        del model, kw
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = res["variants"]["bf16"]
    for v, e in res["variants"].items():
        if v == "bf16":
            continue
        e["memory_ratio_vs_bf16"] = round(e["memory"]["bytes"] / base["memory"]["bytes"], 4)
        e["eager_speedup_vs_bf16"] = round(base["eager_ms"] / e["eager_ms"], 3)
        if e.get("cuda_graph_ms") and base.get("cuda_graph_ms"):
            e["graph_speedup_vs_bf16"] = round(base["cuda_graph_ms"] / e["cuda_graph_ms"], 3)
        if e.get("compiled") and base.get("compiled"):
            e["compiled_speedup_vs_bf16_compiled"] = round(base["compiled"]["eager_ms"] / e["compiled"]["eager_ms"], 3)
    res["seconds"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
