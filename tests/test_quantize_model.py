"""Claims about ``quantize_`` on a tiny random PixArt transformer (built from its adapter's config,
no downloads): every method runs, stays close to float, keeps the model a diffusers model that the
stock pipeline runs, and bad input is rejected before anything is modified."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dirotq import (DiRotQConfig, DiRotQLRConfig, QuantLinear, QuaRotConfig, RankPlan, RTNConfig, SmoothQuantConfig,
                    SVDQuantConfig, W4A16Config, quantize_)
from dirotq import registry

from conftest import calibrated_tiny

ALL_CONFIGS = {
    "rtn": RTNConfig(), "w4a16": W4A16Config(), "smoothquant": SmoothQuantConfig(), "quarot": QuaRotConfig(),
    "quarot-block-gptq": QuaRotConfig(hadamard="block", weights="gptq"), "svdquant": SVDQuantConfig(rank=32),
    "dirotq": DiRotQConfig(rank=32), "dirotq-gptq": DiRotQConfig(rank=32, weights="gptq"),
    "dirotq-paper": DiRotQConfig.paper(), "dirotq-original": DiRotQConfig(rank=32, weight_basis="original"),
    "dirotq-perhead": DiRotQConfig(rank=32, per_head_out_proj=True), "dirotq-lr": DiRotQLRConfig(rank=32),
    "dirotq-lr-hsvd": DiRotQLRConfig(rank=32, basis="hsvd"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    """(adapter, float model, calibration stats, test inputs, float output)."""
    adapter, model, stats, test = calibrated_tiny(batches=3, sample_tokens=256)
    with torch.no_grad():
        ref = model(**test).sample
    return adapter, model, stats, test, ref


def quiet(*_):
    pass


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unmodified(model, before):
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not getattr(model, "_dirotq_quantization", None)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def rel(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def test_configs_cover_every_registered_method():
    assert {c.method for c in ALL_CONFIGS.values()} == set(registry.method_names())


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_every_method_quantizes_the_tiny_model_and_stays_close(tiny, name):
    adapter, model, stats, test, ref = tiny
    m = copy.deepcopy(model)
    report = quantize_(m, ALL_CONFIGS[name], stats, progress=quiet)
    targets = adapter.targets(model)
    assert set(report["layers"]) == set(targets)
    for tname, spec in targets.items():
        q = m.get_submodule(tname)
        assert isinstance(q, QuantLinear)
        assert (q.act_bits is None) == (spec.kind == "w4a16" or name == "w4a16")
        assert report["layers"][tname]["rel_mse"] < 0.05
    with torch.no_grad():
        out = m(**test).sample
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel(out, ref) < 2e-3
    assert m._dirotq_quantization["config"]["method"] == ALL_CONFIGS[name].method


def test_generous_rank_dirotq_is_much_closer_than_rtn(tiny):
    adapter, model, stats, test, ref = tiny
    errs = {}
    for name, cfg in {"rtn": RTNConfig(), "dirotq": DiRotQConfig(rank=48, weights="gptq")}.items():
        m = copy.deepcopy(model)
        rep = quantize_(m, cfg, stats, progress=quiet)
        errs[name] = rep["summary"]["mean_rel_mse"]
    assert errs["dirotq"] < errs["rtn"] / 10, errs


def test_per_layer_rank_plan_and_progress(tiny):
    adapter, model, stats, _, _ = tiny
    m = copy.deepcopy(model)
    calls = []
    plan = RankPlan({"_default": 8, "transformer_blocks.0.attn1.to_q": 40})
    rep = quantize_(m, DiRotQLRConfig(rank=plan), stats, progress=lambda f, msg: calls.append((f, msg)))
    assert rep["layers"]["transformer_blocks.0.attn1.to_q"]["rank"] == 40
    assert rep["layers"]["transformer_blocks.1.attn1.to_q"]["rank"] == 8
    assert rep["layers"]["transformer_blocks.0.ff.net.2"]["rank"] == 0  # w4a16 target: weight-only
    fracs = [f for f, _ in calls]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and any("attn1.to_q" in msg for _, msg in calls)


def test_rtn_and_quarot_need_no_statistics(tiny):
    _, model, _, test, ref = tiny
    for cfg in (RTNConfig(), QuaRotConfig(), W4A16Config()):
        m = copy.deepcopy(model)
        rep = quantize_(m, cfg, progress=quiet)
        assert "rel_mse" not in next(iter(rep["layers"].values()))
        with torch.no_grad():
            assert rel(m(**test).sample, ref) < 2e-3


@pytest.mark.parametrize("bad", [
    lambda: (DiRotQConfig(rank=65), ValueError, "exceeds its input width"),
    lambda: (DiRotQConfig(rank=RankPlan({"_default": 8, "transformer_blocks.7.attn1.to_q": 4})), ValueError,
             "does not have"),
    lambda: (DiRotQConfig(rank=8), ValueError, "needs calibration statistics"),  # stats withheld below
    lambda: ({"method": "rtn"}, TypeError, "QuantConfig"),
], ids=["rank>d", "unknown-layer", "missing-stats", "not-a-config"])
def test_bad_input_is_rejected_and_the_model_is_left_unmodified(tiny, bad):
    _, model, stats, _, _ = tiny
    cfg, exc, match = bad()
    m = copy.deepcopy(model)
    before = snapshot(m)
    with pytest.raises(exc, match=match):
        quantize_(m, cfg, None if match.startswith("needs") else stats, progress=quiet)
    assert_unmodified(m, before)


def test_rank_plan_input_errors():
    with pytest.raises(ValueError, match="≥ 0"):
        DiRotQConfig(rank=-1)
    with pytest.raises(ValueError, match="not valid JSON"):
        RankPlan.from_json('{"_default": 8,')
    with pytest.raises(TypeError, match="int or 'paper'"):
        RankPlan.from_json('{"_default": "eight"}')


def test_failure_half_way_restores_the_swapped_layers(tiny, monkeypatch):
    _, model, stats, _, _ = tiny
    m = copy.deepcopy(model)
    before = snapshot(m)
    spec, seen = registry.get_method("dirotq"), []

    def flaky(*a, **k):
        seen.append(1)
        if len(seen) == 5:
            raise RuntimeError("boom on the fifth layer")
        return spec.handler(*a, **k)

    monkeypatch.setitem(registry._METHODS, "dirotq", dataclasses.replace(spec, handler=flaky))
    with pytest.raises(RuntimeError, match="fifth"):
        quantize_(m, DiRotQConfig(rank=8), stats, progress=quiet)
    assert_unmodified(m, before)


@pytest.mark.parametrize("rollback", ["disk", "memory"])
def test_failure_half_way_restores_the_model_bit_for_bit(tiny, monkeypatch, tmp_path, rollback):
    """With "disk" each replaced float layer is spilled to a temporary safetensors file and its
    storage freed at once; a failure reads every one back into the same module objects."""
    _, model, stats, test, _ = tiny
    m = copy.deepcopy(model)
    before = snapshot(m)
    modules = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    spec, seen = registry.get_method("dirotq-lr"), []

    def flaky(linear, *a, **k):
        seen.append(linear)
        if len(seen) == 9:
            if rollback == "disk":  # the layers already swapped hold no weights any more
                swapped = [mod for n, mod in modules.items() if m.get_submodule(n) is not mod]
                assert swapped and all(lin.weight.numel() == 0 for lin in swapped)
                assert len(list(tmp_path.glob("dirotq-rollback-*/*.safetensors"))) == len(swapped)
            raise RuntimeError("boom on the ninth layer")
        return spec.handler(linear, *a, **k)

    monkeypatch.setitem(registry._METHODS, "dirotq-lr", dataclasses.replace(spec, handler=flaky))
    with pytest.raises(RuntimeError, match="ninth"):
        quantize_(m, DiRotQLRConfig(rank=8, weights="gptq"), stats, progress=quiet, rollback=rollback,
                  spill_dir=tmp_path)
    assert_unmodified(m, before)
    assert all(m.get_submodule(n) is mod for n, mod in modules.items())  # the same objects, hooks and all
    assert not list(tmp_path.iterdir())  # the spill folder is gone
    with pytest.raises(ValueError, match="rollback"):
        quantize_(m, RTNConfig(), progress=quiet, rollback="never")


@pytest.mark.parametrize("config", [DiRotQLRConfig(rank=16, weights="gptq"),
                                    RTNConfig(weights="gptq", scale_format="int_ratio", gptq_act_order=True),
                                    QuaRotConfig(hadamard="block", weights="gptq"),
                                    DiRotQConfig(rank=16, weights="gptq")],
                         ids=["dirotq-lr", "rtn-int-ratio-act-order", "quarot-block", "dirotq"])
def test_gptq_batched_per_group_equals_layer_by_layer(tiny, monkeypatch, config):
    """quantize_ runs GPTQ once for the layers of an input group that meet the same Hessian (q/k/v
    of one attention); every layer's codes and scales equal quantize_layer on that layer alone."""
    from dirotq.methods import common
    from dirotq.quantize import quantize_layer

    adapter, model, stats, _, _ = tiny
    calls = []
    real = common.gptq_quantize_batch
    monkeypatch.setattr(common, "gptq_quantize_batch", lambda ws, *a, **k: calls.append(len(ws)) or real(ws, *a, **k))
    m = copy.deepcopy(model)
    quantize_(m, config, stats, progress=quiet)
    targets = adapter.targets(model)
    assert max(calls) >= 3 and sum(calls) == len(targets) and len(calls) < len(targets)
    for name, spec in targets.items():
        alone = quantize_layer(model.get_submodule(name), stats.for_layer(name), config, spec=spec)
        q = m.get_submodule(name)
        for buf, t in alone.state_dict().items():
            assert torch.equal(t, q.state_dict()[buf]), (name, buf)


def test_stats_of_another_model_are_rejected(tiny):
    _, model, stats, _, _ = tiny
    m = copy.deepcopy(model)
    before = snapshot(m)
    wrong = copy.deepcopy(stats)
    key = wrong.groups["transformer_blocks.1.attn2.to_q"]
    wrong.layers[key] = type(wrong.layers[key]).empty(32)
    with pytest.raises(ValueError, match="width"):
        quantize_(m, DiRotQConfig(rank=8), wrong, progress=quiet)
    assert_unmodified(m, before)


def test_stock_pipeline_generates_with_the_quantized_transformer(tiny):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline

    adapter, model, stats, _, _ = tiny
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 32), latent_channels=4, norm_num_groups=32, sample_size=16)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=copy.deepcopy(model),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    emb = torch.randn(1, 8, model.config.caption_channels, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 8)
    kw = dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None,
              negative_prompt_embeds=torch.zeros_like(emb), negative_prompt_attention_mask=mask,
              num_inference_steps=2, output_type="pt", use_resolution_binning=False)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    quantize_(pipe.transformer, DiRotQConfig(rank=32), stats, progress=quiet)
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert float((out - ref).abs().max()) < 0.05


def test_package_exports_the_public_api():
    import dirotq
    from dirotq import (DiRotQConfig, DiRotQLRConfig, QuantLinear, QuaRotConfig, RankPlan, RTNConfig,  # noqa: F401
                        SmoothQuantConfig, SVDQuantConfig, W4A16Config, calibrate, get_adapter, load_quantized,
                        quantize_, save_quantized)
    from dirotq.calibration import calibrate as calibrate_impl
    from dirotq.models import get_adapter as get_adapter_impl

    assert dirotq.__version__ == "0.1.0"
    assert calibrate is calibrate_impl and get_adapter is get_adapter_impl
    assert all(hasattr(dirotq, n) for n in dirotq.__all__)


@pytest.mark.parametrize("config", [DiRotQConfig(rank=8), DiRotQLRConfig(rank=8)], ids=["dirotq", "dirotq-lr"])
def test_a_weight_only_layer_named_in_the_plan_gets_a_16bit_branch(tiny, config, tmp_path):
    """A rank plan that names a weight-only target gives it DiRotQ-LR's 16-bit low-rank branch with
    16-bit activations (``_default`` leaves it alone): its error falls, its activations stay 16-bit,
    the cost model counts (d + o) per rank, and the checkpoint loads back to the same outputs."""
    from analysis.costs import layer_cost
    from dirotq import load_quantized, save_quantized

    adapter, model, stats, test, _ = tiny
    ff2 = "transformer_blocks.0.ff.net.2"
    spec = adapter.targets(model)[ff2]
    assert spec.kind == "w4a16"
    plain = copy.deepcopy(model)
    rep0 = quantize_(plain, config, stats, progress=quiet)
    assert rep0["layers"][ff2]["rank"] == 0
    branched = copy.deepcopy(model)
    rep = quantize_(branched, dataclasses.replace(config, rank=RankPlan({"_default": 8, ff2: 32})), stats,
                    progress=quiet)
    layer = branched.get_submodule(ff2)
    assert rep["layers"][ff2]["rank"] == 32 and layer.rank == 32 and layer.act_bits is None
    assert layer.meta["method"] == "dirotq-lr" and layer.meta["kind"] == "w4a16"
    assert rep["layers"][ff2]["rel_mse"] < rep0["layers"][ff2]["rel_mse"] / 2, (rep["layers"][ff2], rep0["layers"][ff2])
    # every other layer is the plain plan's, byte for byte
    other = "transformer_blocks.1.ff.net.2"
    assert torch.equal(branched.get_submodule(other).weight_packed, plain.get_submodule(other).weight_packed)
    d, o = spec.in_features, spec.out_features
    cost = layer_cost(d, o, config.method, 32, config=config, kind="w4a16")
    assert cost["extra_params16"] == (d + o) * 32 and cost["activations_16bit"] and cost["method"] == "dirotq-lr"
    assert layer_cost(d, o, "svdquant", 32, kind="w4a16")["extra_params16"] == 0  # no branch outside the PCA methods
    assert layer.storage_bits()["down"] == 16 * d * 32 and layer.storage_bits()["up"] == 16 * o * 32
    save_quantized(branched, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    again = loaded.get_submodule(ff2)
    assert again.rank == 32 and again.act_bits is None
    with torch.no_grad():
        assert torch.equal(loaded(**test).sample, branched(**test).sample)


def test_a_weight_only_branch_needs_a_pca_method(tiny):
    _, model, stats, _, _ = tiny
    before = snapshot(model)
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="needs a PCA method"):
        quantize_(m, SVDQuantConfig(rank=RankPlan({"_default": 8, "transformer_blocks.0.ff.net.2": 8})), stats,
                  progress=quiet)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    assert_unmodified(model, before)
