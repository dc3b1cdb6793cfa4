"""Claims about quantizing at FLUX scale (issue #19; docs/DESIGN.md "Memory and devices"), checked on
tiny models: QuantLinear tensors are built in the model's dtype, the float layers are gone once
``quantize_`` returns, statistics are read from disk one group at a time (C itself in row blocks),
large layers are quantized a block of rows at a time with the same result, and the linear algebra's
dtype and device settings change nothing but precision."""

import gc
import weakref

import pytest
import torch
from conftest import calibrated_tiny
from torch import nn

import dirotq.quantize as quantize_module
from dirotq import DiRotQConfig, DiRotQLRConfig, QuantLinear, QuaRotConfig, RTNConfig, calibration, quantize_
from dirotq.bases import pca_top_basis
from dirotq.calibration import (
    CalibrationStats,
    LayerStats,
    calibrate_transformer,
    combine_calibration_parts,
    part_folder,
)
from dirotq.fusion import concat_rows
from dirotq.methods import common
from dirotq.models import ADAPTERS
from dirotq.ondisk import OnDiskMatrix
from dirotq.quantize import LinalgSettings
from dirotq.registry import get_method, make_config, method_names

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


# --- row-blocked quantization, statistics read from disk, no reference cycles (quantize_'s peak) ---
quantize_module_spec = quantize_module.spec_for


class _Spec:
    def __init__(self, kind="w4a4"):
        self.name, self.kind, self.head_dim = "layer", kind, None


@pytest.fixture(scope="module")
def wide_layer():
    """A bf16 (640 → 448) layer with statistics of a decaying spectrum."""
    torch.manual_seed(0)
    d, o = 640, 448
    linear = nn.Linear(d, o).to(torch.bfloat16)
    st = LayerStats.empty(d, sample_tokens=96)
    st.update(torch.randn(2048, d) * torch.linspace(4.0, 0.1, d))
    return linear, st


@pytest.mark.parametrize("config,kind", [
    (DiRotQLRConfig(rank=16), "w4a4"), (DiRotQLRConfig(rank=16, scale_format="int_ratio"), "w4a4"),
    (DiRotQLRConfig(rank=16, act_symmetric=False), "w4a4"), (RTNConfig(), "w4a4"),
    (QuaRotConfig(hadamard="block"), "w4a4"), (DiRotQLRConfig(rank=16), "w4a16"), (DiRotQConfig(rank=16), "w4a4"),
    (DiRotQConfig(rank=16, keep_head_weights=False, tail_rotation="hadamard"), "w4a4")])
def test_a_layer_quantized_in_blocks_of_rows_is_the_whole_layer_bit_for_bit(wide_layer, config, kind, monkeypatch):
    linear, st = wide_layer
    whole = quantize_module.quantize_layer(linear, st, config, spec=_Spec(kind))
    calls = []
    monkeypatch.setattr(quantize_module, "_ROW_BLOCK_BYTES", 8 * 640 * 100)  # blocks of 100 rows: 5 blocks
    monkeypatch.setattr(quantize_module, "spec_for", lambda c: _Counting(quantize_module_spec(c), calls))
    blocked, sums = quantize_module._quantize_layer(linear, st, config, None, _Spec(kind), None, None, st.sample)
    assert calls == [100, 100, 100, 100, 48]  # the handler saw row blocks
    a, b = whole.state_dict(), blocked.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (blocked.in_features, blocked.out_features, blocked.rank, blocked.meta) == \
           (whole.in_features, whole.out_features, whole.rank, whole.meta)
    x = st.sample[:32]
    assert torch.equal(blocked(x.to(torch.bfloat16)), whole(x.to(torch.bfloat16)))
    # the error measured block by block is the whole layer's error
    measured = quantize_module.error_report(*sums)
    assert measured["rel_mse"] == pytest.approx(quantize_module.layer_error(linear, whole, st.sample)["rel_mse"],
                                                rel=1e-6)


class _Counting:
    """A MethodSpec whose handler records the row count of every call."""

    def __init__(self, spec, calls):
        self._spec, self._calls = spec, calls

    def __getattr__(self, name):
        return getattr(self._spec, name)

    def handler(self, linear, *args, **kw):
        self._calls.append(linear.out_features)
        return self._spec.handler(linear, *args, **kw)


def test_methods_that_read_the_whole_weight_are_never_split(wide_layer, monkeypatch):
    """SmoothQuant's smoothing factors, SVDQuant's SVD, DiRotQ-LR's weight-based bases and GPTQ see all
    rows at once: they say so, and are then quantized whole whatever the layer's size."""
    independent = {name for name in method_names() if get_method(name).rows_independent(make_config(name))}
    assert independent == {"rtn", "w4a16", "quarot", "dirotq-lr", "dirotq"}
    for config in (DiRotQLRConfig(rank=16, basis="hsvd"), DiRotQLRConfig(rank=16, basis="wsvd"),
                   DiRotQLRConfig(rank=16, weights="gptq"), RTNConfig(weights="gptq"), DiRotQConfig(weights="gptq")):
        assert not get_method(config.method).rows_independent(config)
    linear, st = wide_layer
    calls = []
    monkeypatch.setattr(quantize_module, "_ROW_BLOCK_BYTES", 8 * 640 * 100)
    monkeypatch.setattr(quantize_module, "spec_for", lambda c: _Counting(quantize_module_spec(c), calls))
    quantize_module.quantize_layer(linear, st, DiRotQLRConfig(rank=16, basis="wsvd"), spec=_Spec())
    assert calls == [448]


def test_concat_rows_refuses_parts_of_different_layers(wide_layer):
    linear, st = wide_layer
    a = quantize_module.quantize_layer(linear, st, DiRotQLRConfig(rank=16), spec=_Spec())
    b = quantize_module.quantize_layer(linear, st, DiRotQLRConfig(rank=8), spec=_Spec())
    with pytest.raises(ValueError, match="activation side"):
        concat_rows([a, b])
    assert concat_rows([a]) is a


def test_a_quantlinear_is_freed_without_the_garbage_collector(wide_layer):
    """No reference cycle: a replaced or discarded layer's memory goes back at once (a large layer
    waiting for the collector held 0.1–0.2 GiB beyond quantize_'s working set)."""
    linear, st = wide_layer
    gc.collect()
    gc.disable()
    try:
        q = quantize_module.quantize_layer(linear, st, DiRotQLRConfig(rank=16), spec=_Spec())
        q(st.sample[:4].to(torch.bfloat16))  # a forward caches the dequantized weight
        ref = weakref.ref(q)
        del q
        assert ref() is None
    finally:
        gc.enable()


def test_the_loaded_second_moment_is_read_from_its_file_in_row_blocks(tmp_path, wide_layer, monkeypatch):
    """Loaded statistics locate C in their file; the top-r eigensolver reads it there, a block of
    rows at a time (never through the memory map, whose pages would stay resident), and finds the
    same basis, bit for bit, as from C in memory."""
    _, st = wide_layer
    stats = CalibrationStats(layers={"layer": st}, groups={"layer": "layer"}, meta={})
    stats.save(tmp_path / "stats")
    loaded = CalibrationStats.load(tmp_path / "stats").for_layer("layer")
    disk = loaded.second_moment_file
    assert isinstance(disk, OnDiskMatrix) and disk.shape == (640, 640) and disk.dtype == torch.float64
    assert torch.equal(disk.read_rows(100, 230), st.second_moment[100:230])
    seen = []
    real = common.pca_top_basis
    monkeypatch.setattr(common, "pca_top_basis", lambda c, *a, **k: seen.append(type(c)) or real(c, *a, **k))
    with common.use_linalg(LinalgSettings(eigensolver="top")):
        from_disk = common.stats_top_basis(loaded, 16, cache=common.BasisCache())
        in_memory = common.stats_top_basis(st, 16, cache=common.BasisCache())
    assert seen == [OnDiskMatrix, torch.Tensor]
    assert torch.equal(from_disk, in_memory)
    assert torch.equal(pca_top_basis(disk, 16)[1], pca_top_basis(st.second_moment, 16)[1])
    # GPTQ's Hessian (and the full eigh) read C from the file the same way
    reads = []
    real_read = OnDiskMatrix.read_rows
    monkeypatch.setattr(OnDiskMatrix, "read_rows", lambda self, *a, **k: reads.append(a) or real_read(self, *a, **k))
    assert torch.equal(common.hessian(loaded), common.hessian(st)) and reads


def test_on_disk_matrix_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "m.safetensors"
    save_file({"m": torch.randn(6, 4, dtype=torch.float64), "v": torch.zeros(3)}, str(f))
    with pytest.raises(KeyError, match="no tensor 'x'"):
        OnDiskMatrix.in_safetensors(f, "x")
    with pytest.raises(ValueError, match="2-D float matrix"):
        OnDiskMatrix.in_safetensors(f, "v")
    m = OnDiskMatrix.in_safetensors(f, "m")
    with pytest.raises(IndexError):
        m.read_rows(4, 7)
    f.write_bytes(f.read_bytes()[:-40])  # truncated
    with pytest.raises(EOFError, match="truncated"):
        m.read_rows(0, 6)


def test_rtn_layers_are_swapped_in_as_soon_as_they_are_built(flux_bf16_stats):
    """With nothing waiting for GPTQ, each float layer is replaced (and freed) before the next
    target of its group is quantized, so the model shrinks as quantize_ goes."""
    adapter, state, folder = flux_bf16_stats
    model = fresh_flux(adapter, state)
    names = [n for n, s in adapter.targets(model).items() if s.block == 0]
    seen = []

    def progress(frac, msg):
        seen.append(sum(isinstance(model.get_submodule(n), QuantLinear) for n in names))

    quantize_(model, DiRotQLRConfig(rank=8), CalibrationStats.load(folder), targets=names, progress=progress)
    assert seen[:len(names)] == list(range(len(names)))


@pytest.mark.parametrize("config", [DiRotQLRConfig(rank=16), DiRotQLRConfig(rank=16, scale_format="int_ratio")])
def test_a_model_quantized_in_row_blocks_is_the_same_model(tiny, config, monkeypatch):
    """quantize_ on a whole model (W4A4 and W4A16 targets, shared-input groups) with every layer split
    into blocks of at most 24 rows gives the same tensors and, within rounding, the same reported errors."""
    import copy

    adapter, model, stats = tiny
    whole, blocked = copy.deepcopy(model), copy.deepcopy(model)
    report_whole = quantize_(whole, config, stats, adapter=adapter, progress=quiet)
    width = min(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(quantize_module, "_ROW_BLOCK_BYTES", 8 * width * 24)
    import dirotq.fusion

    joined = []
    real_concat = dirotq.fusion.concat_rows
    monkeypatch.setattr(dirotq.fusion, "concat_rows", lambda parts: joined.append(len(parts)) or real_concat(parts))
    report_blocked = quantize_(blocked, config, stats, adapter=adapter, progress=quiet)
    assert len(joined) == len(report_whole["layers"]) and min(joined) >= 2  # every layer was split
    a, b = whole.state_dict(), blocked.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, row in report_whole["layers"].items():
        assert report_blocked["layers"][name]["rel_mse"] == pytest.approx(row["rel_mse"], rel=1e-5), name
