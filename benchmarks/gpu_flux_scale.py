"""FLUX.1-dev at full size on one GPU: calibrate + quantize + save, time and peak memory per stage.

Random bf16 weights at the published FLUX.1-dev config (nothing to download), synthetic transformer
inputs at the real shapes of a 1024² image (4096 image tokens, 512 T5 tokens, pooled CLIP 768,
guidance 3.5), ``--prompts`` × ``--steps`` forwards. The float64 statistics of all 229 input groups
(123 GiB) fit neither the GPU nor a 64 GiB disk, so the run streams: calibration passes of at most
``--budget-gib`` of statistics each (``dirotq.distributed.split_by_memory``), and after each pass
its layers are quantized with ``quantize_layer`` and kept aside (the float model stays untouched,
so every pass sees the 16-bit activations, as a one-pass calibration would); once every pass is
done the QuantLinears replace the float layers and the checkpoint is written.

    python -m benchmarks.gpu_flux_scale --out $OUT/flux_scale.json            # on the GPU machine
    python -m benchmarks.gpu_flux_scale --device cpu --double 1 --single 1 --heads 2 --tokens 64 \\
        --text-tokens 16 --prompts 1 --steps 1 --out /tmp/flux_scale_smoke.json   # a CPU smoke test

The JSON is rewritten after every stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import time
from pathlib import Path

import torch

from benchmarks.bench_e2e import FLUX_DEV


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Recorder:
    """Stage timings and peak memories, written to ``path`` after every stage."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.doc = path, {**meta, "stages": []}
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        os.replace(tmp, self.path)

    def stage(self, name: str, device: torch.device):
        rec = self

        class _Stage:
            def __enter__(self):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                self.t0 = time.perf_counter()
                self.row = {"stage": name}
                return self.row

            def __exit__(self, *exc):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    self.row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                self.row["seconds"] = round(time.perf_counter() - self.t0, 2)
                self.row["peak_rss_gib_so_far"] = round(_peak_rss_gib(), 2)
                self.row["ok"] = exc[0] is None
                if exc[0] is not None:
                    self.row["error"] = f"{exc[0].__name__}: {exc[1]}"
                rec.doc["stages"].append(self.row)
                rec.write()
                return False

        return _Stage()


@torch.no_grad()
def random_flux(double: int, single: int, device: torch.device, dtype: torch.dtype, seed: int = 0, heads: int = 24):
    """FluxTransformer2DModel at FLUX.1-dev widths, ``double`` + ``single`` blocks, random weights
    (normal, std 0.02; norms 1, biases 0) created on ``device`` without a CPU copy."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": double, "num_single_layers": single,
                                                    "num_attention_heads": heads})
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    for mod in model.modules():  # non-persistent buffers (rope frequencies) are rebuilt by their modules
        if hasattr(mod, "reset_parameters") and not any(True for _ in mod.parameters(recurse=False)):
            mod.reset_parameters()
    return model.eval()


def synthetic_inputs(model, prompts: int, steps: int, tokens: int, text_tokens: int, device, dtype, seed: int = 1):
    """One forward's keyword arguments per (prompt, step): packed latents (1, tokens, 64), T5 states
    (1, text_tokens, 4096), pooled CLIP (1, 768), timestep in (0, 1], guidance 3.5, position ids."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    side = int(round(tokens ** 0.5))
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    img_ids, txt_ids = ids.reshape(-1, 3).to(device), torch.zeros(text_tokens, 3, device=device)
    for p in range(prompts):
        text = torch.randn(1, text_tokens, 4096, generator=g).to(device, dtype)
        pooled = torch.randn(1, 768, generator=g).to(device, dtype)
        latents = torch.randn(1, side * side, 64, generator=g).to(device, dtype)
        for s in range(steps):
            t = 1.0 - s / steps
            yield dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                       timestep=torch.full((1,), t, device=device, dtype=dtype), img_ids=img_ids, txt_ids=txt_ids,
                       guidance=torch.full((1,), 3.5, device=device, dtype=dtype), return_dict=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--double", type=int, default=19, help="double-stream blocks (FLUX.1-dev: 19)")
    ap.add_argument("--single", type=int, default=38, help="single-stream blocks (FLUX.1-dev: 38)")
    ap.add_argument("--heads", type=int, default=24, help="attention heads of 128 (FLUX.1-dev: 24, width 3072)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens (1024²: 4096)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--method", default="dirotq-lr")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--weights", choices=("rtn", "gptq"), default="rtn")
    ap.add_argument("--eigensolver", choices=("eigh", "top"), default="top",
                    help="PCA bases: top-r subspace iteration (default, what the real-model commands use) or full eigh")
    ap.add_argument("--budget-gib", type=float, default=30.0, help="float64 statistics per calibration pass")
    ap.add_argument("--work", type=Path, default=Path("/tmp/flux_scale"), help="checkpoint folder parent")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    import diffusers

    from dirotq.calibration import calibrate_transformer
    from dirotq.checkpoint import save_quantized
    from dirotq.distributed import split_by_memory
    from dirotq.models import get_adapter
    from dirotq.quantize import LinalgSettings, layer_record, quantize_layer, set_quantization_record
    from dirotq.registry import make_config

    device = torch.device(a.device)
    dtype = torch.bfloat16
    rec = Recorder(a.out, {
        "what": "FLUX.1-dev widths, random bf16 weights: streaming calibrate + quantize + save on one device",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "args": {k: str(v) for k, v in vars(a).items()}})

    with rec.stage("build model", device) as row:
        model = random_flux(a.double, a.single, device, dtype, heads=a.heads)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["bf16_gib"] = 2 * row["params"] / 2**30
    adapter = get_adapter(model)
    targets = adapter.targets(model)
    widths = {s.group: s.in_features for s in targets.values()}
    passes = split_by_memory(widths, a.budget_gib * 2**30)
    rec.doc["groups"], rec.doc["passes"] = len(widths), len(passes)
    config = make_config(a.method, rank=a.rank, weights=a.weights)
    ranks = config.rank_plan().resolve(targets)
    inputs = list(synthetic_inputs(model, a.prompts, a.steps, a.tokens, a.text_tokens, device, dtype))
    aside: dict[str, torch.nn.Module] = {}
    for k, groups in enumerate(passes):
        with rec.stage(f"calibrate pass {k + 1}/{len(passes)}", device) as row:
            stats = calibrate_transformer(model, inputs, adapter=adapter, layers=groups)
            row["groups"] = len(groups)
        with rec.stage(f"quantize pass {k + 1}/{len(passes)}", device) as row:
            names = [n for n, s in targets.items() if s.group in set(groups)]
            for n in names:
                lin = model.get_submodule(n)
                aside[n] = quantize_layer(lin, stats.for_layer(n), config, rank=ranks[n], spec=targets[n],
                                          linalg=LinalgSettings(eigensolver=a.eigensolver)).to(device)
            row["layers"] = len(names)
            del stats
    with rec.stage("swap in", device) as row:
        for n, q in aside.items():
            parent_name, _, attr = n.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
        set_quantization_record(model, config, {n: layer_record(q, targets[n]) for n, q in aside.items()})
        aside.clear()
    with rec.stage("save", device) as row:
        path = save_quantized(model, a.work / f"{config.tag()}-flux-random", max_shard_size="5GB")
        row["checkpoint_gib"] = sum(f.stat().st_size for f in path.iterdir()) / 2**30
        row["path"] = str(path)
    rec.doc["complete"] = True
    rec.write()
    print(json.dumps(rec.doc["stages"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
