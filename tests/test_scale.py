"""Claims about quantizing at FLUX scale (issue #19; docs/DESIGN.md "Memory and devices"), checked on
tiny models: QuantLinear tensors are built in the model's dtype, the float layers are gone once
``quantize_`` returns, statistics are read from disk one group at a time, and the linear algebra's
dtype and device settings change nothing but precision."""

import gc
import weakref

import pytest
import torch

from dirotq import DiRotQConfig, DiRotQLRConfig, QuantLinear, RTNConfig, quantize_
from dirotq import calibration
from dirotq.calibration import CalibrationStats, calibrate_transformer, combine_calibration_parts, part_folder
from dirotq.models import ADAPTERS
from dirotq.quantize import LinalgSettings

from conftest import calibrated_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BF16_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections")


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def flux_bf16_stats(tmp_path_factory):
    """(adapter, bf16 tiny FLUX state, stats folder): statistics saved in two parts by disjoint group
    sets (as two processes of a split calibration would) and combined into one folder."""
    adapter = ADAPTERS["flux"]
    model = adapter.build_tiny(0).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = [{k: v.to(torch.bfloat16) if k in BF16_INPUTS else v
               for k, v in adapter.example_inputs(model, 2, g).items()} for _ in range(2)]
    keys = list(dict.fromkeys(s.group for s in adapter.targets(model).values()))
    folder = tmp_path_factory.mktemp("flux-stats")
    for rank, part in enumerate((keys[::2], keys[1::2])):
        part_stats = calibrate_transformer(model, inputs, adapter=adapter, layers=part, sample_tokens=64)
        part_stats.save(part_folder(folder, rank))
    combine_calibration_parts(folder)
    return adapter, {k: v.clone() for k, v in model.state_dict().items()}, folder


def fresh_flux(adapter, state):
    model = adapter.build_tiny(0).to(torch.bfloat16)
    model.load_state_dict(state)
    return model


def test_bf16_flux_quantizes_in_bf16_frees_the_float_layers_and_reads_stats_lazily(flux_bf16_stats, monkeypatch):
    adapter, state, folder = flux_bf16_stats
    model = fresh_flux(adapter, state)
    targets = adapter.targets(model)
    block0 = [n for n, s in targets.items() if s.block == 0]  # a subset: the other groups are never needed
    originals = [weakref.ref(model.get_submodule(n)) for n in block0]
    reads = []
    real_read = calibration._read_group
    monkeypatch.setattr(calibration, "_read_group", lambda src, key: reads.append(key) or real_read(src, key))
    stats = CalibrationStats.load(folder)
    assert not reads and not any(stats.is_loaded(k) for k in stats.layers)  # load reads the index only

    report = quantize_(model, DiRotQLRConfig(rank=16, weights="gptq"), stats, targets=block0, progress=quiet,
                       rollback="disk")
    # only the groups of the quantized targets were read, each once, and none is left in memory
    needed = {stats.group_key(n) for n in block0}
    assert sorted(reads) == sorted(needed) and len(needed) < len(stats.layers)
    assert not any(stats.is_loaded(k) for k in stats.layers)
    gc.collect()
    assert all(ref() is None for ref in originals)  # nothing holds the float layers any more
    for name in block0:
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        for buf in ("down", "up", "bias", "hadamard_signs"):
            t = getattr(q, buf)
            assert t is None or t.dtype == torch.bfloat16, (name, buf, t.dtype)
        assert q.weight_packed.dtype == torch.uint8 and q.weight_scale.dtype == torch.float16
    assert all(report["layers"][n]["rel_mse"] < 0.05 for n in block0)


def test_a_float32_model_keeps_float32_quantized_tensors(flux_bf16_stats):
    adapter, state, folder = flux_bf16_stats
    model = adapter.build_tiny(0)
    name = "single_transformer_blocks.0.attn.to_q"
    quantize_(model, DiRotQLRConfig(rank=8), CalibrationStats.load(folder), targets=[name], progress=quiet)
    assert {model.get_submodule(name).down.dtype, model.get_submodule(name).up.dtype} == {torch.float32}


@pytest.fixture(scope="module")
def tiny():
    adapter, model, stats, _ = calibrated_tiny(batches=3, sample_tokens=256)
    return adapter, model, stats


@pytest.mark.parametrize("config,per_layer", [(DiRotQLRConfig(rank=16, weights="gptq"), True),
                                               (RTNConfig(weights="gptq", gptq_act_order=True), True),
                                               (DiRotQConfig(rank=16, weights="gptq"), False)],
                         ids=["dirotq-lr-gptq", "rtn-gptq-act-order", "dirotq-gptq"])
def test_float32_linear_algebra_gives_the_float64_layer_sqnr(tiny, config, per_layer):
    """LinalgSettings(dtype=float32) (eigh, bases and GPTQ in float32) changes each layer's output
    SQNR on held-out tokens by < 0.1 dB for DiRotQ-LR and GPTQ. The full rotation's tail basis spans
    nearly equal eigenvalues, so float32 picks another, equally random tail rotation: single layers
    move by up to ~0.5 dB either way (with RTN weights too) and only the mean over layers is bounded."""
    import copy

    adapter, model, stats = tiny
    reports = {}
    for dt in (torch.float64, torch.float32):
        reports[dt] = quantize_(copy.deepcopy(model), config, stats, progress=quiet, linalg=LinalgSettings(dtype=dt))
    assert reports[torch.float32]["linalg"]["dtype"] == "float32"
    diffs = [reports[torch.float32]["layers"][n]["sqnr_db"] - reports[torch.float64]["layers"][n]["sqnr_db"]
             for n in reports[torch.float64]["layers"]]
    if per_layer:
        assert max(abs(x) for x in diffs) < 0.1, diffs
    else:
        assert abs(sum(diffs) / len(diffs)) < 0.1 and max(abs(x) for x in diffs) < 1.0, diffs


def test_an_explicit_cpu_device_is_the_default_on_cpu(tiny):
    """The CUDA path is the same code with device="cuda" (the layer's device by default); on this
    machine an explicit device="cpu" must give exactly the default result."""
    import copy

    adapter, model, stats = tiny
    config = DiRotQLRConfig(rank=16, weights="gptq")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(a, config, stats, progress=quiet)
    quantize_(b, config, stats, progress=quiet, linalg=LinalgSettings(device="cpu"))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_linalg_settings_are_clear_errors():
    with pytest.raises(ValueError, match="dtype"):
        LinalgSettings(dtype=torch.float16)
    with pytest.raises(ValueError, match="eigensolver"):
        LinalgSettings(eigensolver="lanczos")
