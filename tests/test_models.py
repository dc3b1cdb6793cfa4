"""Model adapters: tiny models of every family build from configs, run, and expose the targets
and 16-bit layers docs/DESIGN.md §5 (and the paper preset) prescribe."""

import warnings

import pytest
import torch
from torch import nn

from dirotq.calibration import capture_inputs
from dirotq.models import ADAPTERS, GenericAdapter, PixArtAdapter, TargetSpec, get_adapter, target_report

FAMILIES = ["pixart", "dit", "sd3", "flux", "sana"]

# Linears that must stay 16-bit in each tiny model (embedders, adaLN, final projection).
MUST_KEEP = {
    "pixart": ["adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1", "caption_projection.linear_1",
               "proj_out", "transformer_blocks.0.attn2.to_k", "transformer_blocks.1.attn2.to_v"],
    "dit": ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
            "proj_out_1", "proj_out_2"],
    "sd3": ["transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear", "context_embedder",
            "time_text_embed.timestep_embedder.linear_1", "time_text_embed.text_embedder.linear_1",
            "norm_out.linear", "proj_out"],
    "flux": ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.guidance_embedder.linear_1", "norm_out.linear", "proj_out"],
    "sana": ["time_embed.linear", "time_embed.emb.timestep_embedder.linear_1", "caption_projection.linear_1",
             "proj_out"],
}
# Tiny-model target counts (2 blocks; FLUX 2 double + 2 single): (W4A4, W4A16).
COUNTS = {"pixart": (14, 2), "dit": (12, 0), "sd3": (25, 0), "flux": (34, 6), "sana": (16, 0)}


@pytest.fixture(scope="module")
def tiny():
    return {f: ADAPTERS[f].build_tiny(0) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_runs_and_targets_are_real_linears(tiny, family):
    adapter, model = ADAPTERS[family], tiny[family]
    assert get_adapter(model) is adapter and adapter.matches(model)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    kw = adapter.example_inputs(model, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    assert out.shape[0] == 2 and torch.isfinite(out).all()

    targets = adapter.targets(model)
    modules = dict(model.named_modules())
    assert targets and all(isinstance(modules[n], nn.Linear) for n in targets)
    for n, s in targets.items():
        assert isinstance(s, TargetSpec) and s.name == n and s.kind in ("w4a4", "w4a16")
        assert (s.in_features, s.out_features) == (modules[n].in_features, modules[n].out_features)
        assert n.endswith(s.layer_type.split(":")[-1]) and s.group in targets
    blocks = [s.block for s in targets.values()]
    assert blocks == sorted(blocks)  # ordered by block
    n44 = sum(s.kind == "w4a4" for s in targets.values())
    assert (n44, len(targets) - n44) == COUNTS[family]

    kept = adapter.kept_16bit(model)
    assert set(MUST_KEEP[family]) <= set(kept) and not set(kept) & set(targets)
    all_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(kept) | set(targets) == all_linears  # every linear is accounted for
    assert "no unknown names" in target_report(model, adapter)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_share_identical_inputs(tiny, family):
    """Every member of a shared-input group sees bit-identical input (so one calibration is right),
    and layers in different groups see different inputs."""
    adapter, model = ADAPTERS[family], tiny[family]
    targets = adapter.targets(model)
    kw = adapter.example_inputs(model, 1, torch.Generator().manual_seed(1))
    with capture_inputs(model, list(targets)) as seen, torch.no_grad():
        model(**kw)
    for n, s in targets.items():
        assert len(seen[n]) == 1, n
        assert torch.equal(seen[n][0], seen[s.group][0]), (n, s.group)
    keys = sorted({s.group for s in targets.values()})
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            xa, xb = seen[a][0], seen[b][0]
            assert xa.shape != xb.shape or not torch.equal(xa, xb), f"{a} and {b} read the same tensor: one group"


def test_family_specific_kinds(tiny):
    px = PixArtAdapter().targets(tiny["pixart"])
    assert px["transformer_blocks.0.ff.net.2"].kind == "w4a16"
    assert px["transformer_blocks.0.attn1.to_k"].group == "transformer_blocks.0.attn1.to_q"
    assert px["transformer_blocks.0.attn1.to_out.0"].head_dim == 32
    assert "transformer_blocks.0.attn2.to_k" not in px
    assert "text tokens" in PixArtAdapter().kept_16bit(tiny["pixart"])["transformer_blocks.0.attn2.to_k"]

    fl = ADAPTERS["flux"].targets(tiny["flux"])
    for n in ("transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear",
              "single_transformer_blocks.0.norm.linear"):
        assert fl[n].kind == "w4a16"
    assert all(s.kind == "w4a4" for n, s in fl.items() if not n.endswith("norm.linear") and "norm1" not in n)
    # every modulation linear reads silu(temb): one model-wide group
    assert {fl[n].group for n in fl if "norm" in n} == {"transformer_blocks.0.norm1.linear"}
    single = fl["single_transformer_blocks.1.attn.to_k"]
    assert single.layer_type == "single:attn.to_k" and single.block == 3
    assert single.group == "single_transformer_blocks.1.proj_mlp"  # proj_mlp reads the same tokens

    sd3 = ADAPTERS["sd3"].targets(tiny["sd3"])
    for lt in ("attn.add_q_proj", "attn.to_add_out", "ff_context.net.2", "attn2.to_q"):
        assert f"transformer_blocks.0.{lt}" in sd3
    assert sd3["transformer_blocks.0.attn.add_q_proj"].group == sd3["transformer_blocks.0.attn.add_v_proj"].group

    sana = ADAPTERS["sana"].targets(tiny["sana"])
    assert {s.layer_type for s in sana.values()} == {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    # caption tokens are the same tensor in every block: one model-wide K/V group
    assert {sana[f"transformer_blocks.{i}.attn2.to_{p}"].group for i in (0, 1) for p in "kv"} == {"transformer_blocks.0.attn2.to_k"}


def test_overrides_change_kinds(tiny):
    a = PixArtAdapter({"ff.net.2": "w4a4", "attn2.to_k": "w4a4", "attn1.to_q": None})
    t = a.targets(tiny["pixart"])
    assert t["transformer_blocks.0.ff.net.2"].kind == "w4a4" and "transformer_blocks.0.attn2.to_k" in t
    # to_q kept 16-bit: the q/k/v group is now named by its first *target*, to_k
    assert "transformer_blocks.0.attn1.to_q" not in t
    assert t["transformer_blocks.0.attn1.to_v"].group == "transformer_blocks.0.attn1.to_k"
    assert t["transformer_blocks.1.attn2.to_k"].group == "transformer_blocks.0.attn2.to_k"
    with pytest.raises(ValueError, match="kind"):
        PixArtAdapter({"ff.net.2": "w8a8"})


@pytest.mark.parametrize("family", ["pixart", "flux", "sd3", "sana"])
def test_conditioning_linears_outside_the_blocks_become_w4a16_targets_by_override(tiny, family, tmp_path):
    """The conditioning linears outside the blocks stay 16-bit by default; the alias
    ``conditioning`` (or a full name) makes them W4A16 targets outside every block, and a model
    quantized so runs, stores and loads them like any other target."""
    from dirotq.checkpoint import load_quantized, save_quantized
    from dirotq.methods import DiRotQLRConfig
    from dirotq.models.base import CONDITIONING, OUTSIDE_BLOCKS
    from dirotq.modules import QuantLinear
    from dirotq.quantize import quantize_

    model = tiny[family]
    base = ADAPTERS[family]
    conditioning = base.expand_conditioning(model, {CONDITIONING: "w4a16"})
    expected = {"pixart": {"adaln_single.linear", "caption_projection.linear_1", "caption_projection.linear_2",
                           "adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2"},
                "flux": {"context_embedder", "norm_out.linear", *(f"time_text_embed.{e}_embedder.linear_{i}"
                                                                  for e in ("timestep", "guidance", "text") for i in (1, 2))},
                "sd3": {"context_embedder", "norm_out.linear", *(f"time_text_embed.{e}_embedder.linear_{i}"
                                                                 for e in ("timestep", "text") for i in (1, 2))},
                "sana": {"time_embed.linear", "caption_projection.linear_1", "caption_projection.linear_2",
                         "time_embed.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_2"}}
    assert set(conditioning) == expected[family] and set(conditioning.values()) == {"w4a16"}
    assert not set(conditioning) & set(base.targets(model))  # 16-bit by default
    # an explicit name wins over the alias; the final projection is not a conditioning linear
    assert "proj_out" in base.outside_layers(model) and "proj_out" not in conditioning
    first = min(conditioning)
    assert base.expand_conditioning(model, {CONDITIONING: "w4a16", first: None})[first] is None
    adapter = type(base)(conditioning)
    targets = adapter.targets(model)
    outside = {n: s for n, s in targets.items() if s.block == OUTSIDE_BLOCKS}
    assert set(outside) == set(conditioning)
    assert all(s.kind == "w4a16" and s.layer_type == n and s.group == n for n, s in outside.items())
    assert not set(conditioning) & set(adapter.kept_16bit(model))
    assert sum(s.kind == "w4a4" for s in targets.values()) == COUNTS[family][0]  # the blocks unchanged
    assert "kept 16-bit by adapter override" in type(base)({first: None}).kept_16bit(model)[first]
    assert type(base)({first: "w8a16"}).targets(model)[first].kind == "w8a16"
    q = ADAPTERS[family].build_tiny(0)
    example = adapter.example_inputs(q, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = q(**example, return_dict=False)[0]
    quantize_(q, DiRotQLRConfig(rank=8), None, adapter=adapter, targets=list(outside), measure_error=False,
              progress=lambda *a: None)
    assert all(isinstance(q.get_submodule(n), QuantLinear) and q.get_submodule(n).act_bits is None for n in outside)
    with torch.no_grad():
        y = q(**example, return_dict=False)[0]
    err = float((y - ref).norm() / ref.norm())
    assert 0 < err < 0.2, err  # INT4 weights change the output, a little
    save_quantized(q, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "ckpt")(**example, return_dict=False)[0], y)


def test_conditioning_alias_names_the_family_when_it_has_none(tiny):
    """DiT's conditioning (adaLN, class and timestep embedders) lives inside its blocks: the alias has
    nothing to expand and says so instead of quantizing nothing."""
    from dirotq.models.base import CONDITIONING

    with pytest.raises(ValueError, match="dit adapter lists no conditioning linears"):
        ADAPTERS["dit"].expand_conditioning(tiny["dit"], {CONDITIONING: "w8a16"})
    assert ADAPTERS["dit"].expand_conditioning(tiny["dit"], {"proj_out_1": "w8a16"}) == {"proj_out_1": "w8a16"}


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 100), nn.GELU(), nn.Linear(100, 64)) for _ in range(2))
        self.head = nn.Linear(64, 8)


def test_generic_fallback_warns_and_reports_padding():
    m = _Unknown()
    with pytest.warns(UserWarning, match="_Unknown"):
        a = get_adapter(m)
    assert isinstance(a, GenericAdapter)
    t = a.targets(m)
    assert list(t) == ["layers.0.0", "layers.0.2", "layers.1.0", "layers.1.2"]
    assert [s.block for s in t.values()] == [0, 0, 1, 1]
    assert set(a.kept_16bit(m)) == {"embed", "head"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = target_report(m)
    assert rep.startswith("4 W4A4 targets, 0 W4A16, 2 kept 16-bit") and "padded" in rep and "[100]" in rep
