"""Claims about the per-layer methods (dirotq/methods): each turns (nn.Linear, LayerStats, config,
rank) into a QuantLinear filling its row of docs/ARCHITECTURE.md's table."""

import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from dirotq import (DiRotQConfig, DiRotQLRConfig, QuantLinear, QuaRotConfig, RTNConfig, SmoothQuantConfig,
                    SVDQuantConfig, W4A16Config)
from dirotq.calibration import LayerStats
from dirotq.config import QuantConfig, RankedConfig
from dirotq.methods import common
from dirotq.registry import spec_for
from dirotq.methods.common import quantize_weight, smooth_factors
from dirotq.methods.dirotq import per_head_order
from dirotq.models import TargetSpec
from dirotq.quantize import layer_error, quantize_layer
from dirotq.quantizers import fake_quantize


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_stats(x: torch.Tensor, sample_tokens: int = 512) -> LayerStats:
    st = LayerStats.empty(x.shape[1], sample_tokens, 0)
    st.update(x)
    return st


class Layer:
    """A random nn.Linear(d, o) with calibration stats and held-out tokens from one distribution."""

    def __init__(self, d=256, o=192, outliers=0, scale=50.0, seed=0, n_cal=4096, n_test=1024):
        g = torch.Generator().manual_seed(seed)
        mix = torch.randn(d, d, generator=g) / d**0.5

        def tokens(n):
            x = torch.randn(n, d, generator=g) @ mix * 2 + 0.3 * torch.randn(n, d, generator=g)
            x[:, :outliers] *= scale  # planted outlier channels
            return x

        torch.manual_seed(seed)
        self.linear = nn.Linear(d, o)
        self.stats = make_stats(tokens(n_cal))
        self.x = tokens(n_test)

    def error(self, config, **kw) -> float:
        return layer_error(self.linear, quantize_layer(self.linear, self.stats, config, **kw), self.x)["rel_mse"]


@pytest.fixture(scope="module")
def outlier_layer():
    return Layer(outliers=4)


@pytest.fixture(scope="module")
def plain_layer():
    return Layer(d=128, o=96, outliers=0, seed=1)


def _config_classes(cls=QuantConfig):
    for sub in cls.__subclasses__():
        yield sub
        yield from _config_classes(sub)


def test_every_config_class_has_a_registered_handler_that_builds_a_layer(plain_layer):
    """Every concrete config class in the library (not just a list of names) maps to a registered
    method whose handler turns a layer into a QuantLinear; a config with no handler fails here."""
    library = [c for c in _config_classes() if c.__module__.startswith("dirotq.") and c is not RankedConfig]
    assert len(library) >= 7
    for cls in library:
        spec = spec_for(cls())  # raises for a config class no method registered
        rank = 8 if spec.ranked else 0
        q = spec.handler(plain_layer.linear, plain_layer.stats, cls(), rank=rank)
        assert isinstance(q, QuantLinear) and q.meta["method"] == cls.method, cls


@pytest.mark.parametrize("config", [DiRotQConfig(), DiRotQConfig(tail_rotation="none", weights="gptq"),
                                    DiRotQConfig(per_head_out_proj=True), DiRotQLRConfig(), SVDQuantConfig()],
                         ids=["dirotq", "dirotq-gptq", "dirotq-perhead", "dirotq-lr", "svdquant"])
def test_rank_d_reproduces_the_float_layer(plain_layer, config):
    d = plain_layer.linear.in_features
    spec = TargetSpec("attn.to_out.0", "w4a4", "attn.to_out.0", 0, "attn.to_out.0", d, 96, head_dim=32)
    assert plain_layer.error(config, rank=d, spec=spec) < 1e-5


def test_rank0_identity_rotation_is_exactly_rtn(plain_layer):
    lin = plain_layer.linear
    d = lin.in_features
    rtn = quantize_layer(lin, None, RTNConfig())
    w = lin.weight.detach().double()
    eye = QuantLinear(d, lin.out_features, method="dirotq", weight=quantize_weight(w @ torch.eye(d, dtype=torch.float64),
                      None, RTNConfig()), bias=lin.bias.detach(), rotation=torch.eye(d))
    assert eye.rank == 0 and eye.down is None
    assert torch.equal(eye(plain_layer.x), rtn(plain_layer.x))


@pytest.mark.parametrize("rank", [0, 24, 128])
def test_folded_and_original_basis_agree_with_unquantized_weights(plain_layer, rank):
    folded = quantize_layer(plain_layer.linear, plain_layer.stats, DiRotQConfig(weight_bits=16), rank=rank)
    orig = quantize_layer(plain_layer.linear, plain_layer.stats, DiRotQConfig(weight_bits=16, weight_basis="original"),
                          rank=rank)
    assert orig.weights_in_original_basis and orig.up is None and not folded.weights_in_original_basis
    y1, y2 = folded(plain_layer.x), orig(plain_layer.x)
    assert float((y1 - y2).pow(2).sum() / y1.pow(2).sum()) < 1e-10


@pytest.mark.parametrize("config", [RTNConfig(act_bits=8), DiRotQConfig(rank=16, act_bits=8),
                                    DiRotQLRConfig(rank=16, act_bits=8), SmoothQuantConfig(act_bits=8)],
                         ids=["rtn", "dirotq", "dirotq-lr", "smoothquant"])
def test_gptq_beats_rtn_weights_on_correlated_inputs(plain_layer, config):
    # A8 so that weight error dominates the comparison; GPTQ's Hessian is the transformed input's
    e_rtn = plain_layer.error(config)
    e_gptq = plain_layer.error(replace(config, weights="gptq"))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_planted_outliers_dirotq_beats_rtn_by_5x_and_quarot(outlier_layer):
    """4 of 256 channels ×50: the 16-bit top-32 subspace absorbs them."""
    e = {name: outlier_layer.error(cfg) for name, cfg in {
        "rtn": RTNConfig(), "quarot": QuaRotConfig(), "smoothquant": SmoothQuantConfig(),
        "svdquant": SVDQuantConfig(rank=32), "dirotq": DiRotQConfig(rank=32), "dirotq-lr": DiRotQLRConfig(rank=32),
    }.items()}
    assert e["rtn"] / e["dirotq"] >= 5.0, e
    assert e["dirotq"] < e["quarot"], e
    assert e["dirotq"] < e["svdquant"], e
    assert e["rtn"] / e["dirotq-lr"] >= 5.0, e


def test_smoothquant_improves_on_rtn_on_planted_outliers(outlier_layer):
    assert outlier_layer.error(SmoothQuantConfig()) < 0.8 * outlier_layer.error(RTNConfig())


def test_smooth_factors_guard_dead_channels():
    w = torch.randn(8, 4, dtype=torch.float64)
    w[:, 1] = 0
    s = smooth_factors(torch.tensor([2.0, 3.0, 0.0, 4.0]), w, 0.5)
    assert torch.isfinite(s).all() and s[1] == 1 and s[2] == 1
    assert torch.allclose(s[0], 2.0**0.5 / w[:, 0].abs().max() ** 0.5)


def test_svdquant_branch_is_top_r_svd_of_smoothed_weight(outlier_layer):
    r = 16
    q = quantize_layer(outlier_layer.linear, outlier_layer.stats, SVDQuantConfig(rank=r))
    w = outlier_layer.linear.weight.detach().double()
    s = smooth_factors(outlier_layer.stats.abs_max, w, 0.5)
    assert torch.allclose(q.smooth.double(), s.float().double())
    u, sig, vh = torch.linalg.svd(w * s, full_matrices=False)
    best = (u[:, :r] * sig[:r]) @ vh[:r]
    assert torch.allclose(q.up.double() @ q.down.double().T, best, rtol=1e-4, atol=1e-4 * float(best.abs().max()))
    assert torch.allclose(q.down.double().abs(), vh[:r].T.abs(), atol=1e-4)  # V_r up to sign
    assert not q.project_out and q.rotation is None and q.hadamard_signs is None


def test_dirotq_lr_rank0_equals_quarot_block(plain_layer):
    lr = quantize_layer(plain_layer.linear, plain_layer.stats, DiRotQLRConfig(seed=3), rank=0)
    qr = quantize_layer(plain_layer.linear, None, QuaRotConfig(hadamard="block", seed=3))
    assert lr.down is None and torch.equal(lr.hadamard_signs, qr.hadamard_signs)
    assert torch.equal(lr.weight_packed, qr.weight_packed) and torch.equal(lr.weight_scale, qr.weight_scale)
    assert torch.equal(lr(plain_layer.x), qr(plain_layer.x))


def test_dirotq_lr_fields_per_basis(plain_layer):
    st, lin, r = plain_layer.stats, plain_layer.linear, 16
    for basis in ("pca", "wsvd"):
        q = quantize_layer(lin, st, DiRotQLRConfig(basis=basis), rank=r)
        assert q.project_out and q.hadamard_signs is not None and q.rotation is None
        assert torch.allclose(q.down.T @ q.down, torch.eye(r), atol=1e-5)  # orthonormal
        assert torch.allclose(q.up, lin.weight.detach() @ q.down, atol=1e-5)
    pca = quantize_layer(lin, st, DiRotQLRConfig(), rank=r)
    v = torch.linalg.eigh(st.second_moment)[1].flip(1)[:, :r].float()
    assert torch.allclose((pca.down.T @ v).abs().diagonal(), torch.ones(r), atol=1e-4)
    h = quantize_layer(lin, st, DiRotQLRConfig(basis="hsvd"), rank=r)
    assert not h.project_out and h.down.shape == (lin.in_features, r)
    # the 16-bit branch of hsvd minimises the activation-weighted error better than wsvd's
    x = plain_layer.x
    w = lin.weight.detach()
    res = lambda q: float((x @ (w - q.up @ q.down.T).T).pow(2).sum())  # noqa: E731
    assert res(h) < res(quantize_layer(lin, st, DiRotQLRConfig(basis="wsvd"), rank=r))


def test_dirotq_full_rotation_fields(plain_layer):
    d, r = plain_layer.linear.in_features, 24
    q = quantize_layer(plain_layer.linear, plain_layer.stats, DiRotQConfig(), rank=r)
    t = torch.cat([q.down, q.rotation], 1).double()
    assert torch.allclose(t.T @ t, torch.eye(d, dtype=torch.float64), atol=1e-5)  # T orthogonal
    assert torch.allclose(q.up, plain_layer.linear.weight.detach() @ q.down, atol=1e-5)
    assert q.quant_in_features == d - r and not q.project_out


def test_keep_head_weights_false_quantizes_the_head_columns(plain_layer):
    r = 32
    q = quantize_layer(plain_layer.linear, plain_layer.stats, DiRotQConfig(keep_head_weights=False), rank=r)
    exact = plain_layer.linear.weight.detach().double() @ q.down.double()
    assert torch.allclose(q.up, fake_quantize(exact.float()), atol=1e-6)
    assert not torch.allclose(q.up, exact.float(), atol=1e-4)


def test_per_head_basis_splits_the_rank_over_heads(plain_layer):
    ev = torch.tensor([5.0, 4, 1, 0, 9, 8, 7, 2])  # two heads of 4, each descending
    assert per_head_order(ev, 4, 2).tolist()[:2] == [0, 4]
    assert per_head_order(ev, 4, 3).tolist()[:3] == [0, 4, 5]  # remainder to the largest eigenvalue
    d, hd, r = 128, 32, 16
    spec = TargetSpec("a.to_out.0", "w4a4", "a.to_out.0", 0, "a.to_out.0", d, 96, head_dim=hd)
    q = quantize_layer(plain_layer.linear, plain_layer.stats, DiRotQConfig(per_head_out_proj=True), rank=r, spec=spec)
    heads_of_cols = (q.down.abs() > 1e-6).float().reshape(d // hd, hd, r).amax(1)  # (heads, r)
    assert torch.equal(heads_of_cols.sum(0), torch.ones(r))  # each 16-bit column lives in one head
    assert torch.equal(heads_of_cols.sum(1), torch.full((d // hd,), r / (d // hd)))


def test_w4a16_is_weight_only_and_kind_w4a16_forces_it(plain_layer):
    q = quantize_layer(plain_layer.linear, None, W4A16Config())
    assert q.act_bits is None and q.weight_bits == 4
    spec = TargetSpec("ff.net.2", "w4a16", "ff.net.2", 0, "ff.net.2", 128, 96)
    q2 = quantize_layer(plain_layer.linear, plain_layer.stats, DiRotQConfig(rank=32), spec=spec)
    assert q2.act_bits is None and q2.rank == 0 and q2.meta["method"] == "w4a16"
    assert torch.equal(q(plain_layer.x), q2(plain_layer.x))


def test_paper_preset_runs_and_beats_rtn(outlier_layer):
    cfg = DiRotQConfig.paper()  # rank d/8 → 64 at d=256, asymmetric acts, GPTQ + act-order
    q = quantize_layer(outlier_layer.linear, outlier_layer.stats, cfg)
    assert q.rank == 64 and not q.act_symmetric
    assert layer_error(outlier_layer.linear, q, outlier_layer.x)["rel_mse"] < outlier_layer.error(RTNConfig()) / 5


def test_int_ratio_format_runs_for_every_method(plain_layer):
    for cfg in (RTNConfig(), SmoothQuantConfig(), QuaRotConfig(), SVDQuantConfig(rank=8), DiRotQConfig(rank=8),
                DiRotQLRConfig(rank=8)):
        cfg = replace(cfg, scale_format="int_ratio")
        q = quantize_layer(plain_layer.linear, plain_layer.stats, cfg)
        assert q.weight_ratio is not None
        assert layer_error(plain_layer.linear, q, plain_layer.x)["rel_mse"] < 0.05


def test_bad_ranks_and_missing_stats_are_clear_errors(plain_layer):
    lin, st = plain_layer.linear, plain_layer.stats
    with pytest.raises(ValueError, match="rank"):
        quantize_layer(lin, st, DiRotQConfig(), rank=129)
    with pytest.raises(ValueError, match="rank"):
        quantize_layer(lin, st, DiRotQConfig(), rank=-1)
    with pytest.raises(ValueError, match="statistics"):
        quantize_layer(lin, None, DiRotQConfig())
    with pytest.raises(ValueError, match="statistics"):
        quantize_layer(lin, None, RTNConfig(weights="gptq"))
    with pytest.raises(ValueError, match="width"):
        quantize_layer(nn.Linear(64, 8), st, DiRotQConfig(), rank=4)
    spec = TargetSpec("blk.odd", "w4a4", "blk.odd", 0, "odd", 96, 8)
    with pytest.raises(ValueError, match="blk.odd.*multiple of the group size"):
        quantize_layer(nn.Linear(96, 8), make_stats(torch.randn(100, 96)), DiRotQLRConfig(), rank=4, spec=spec)


def test_error_vs_rank_sweep_reuses_one_eigendecomposition(plain_layer, monkeypatch):
    calls = []
    real = common.pca_basis
    monkeypatch.setattr(common, "pca_basis", lambda *a, **k: calls.append(1) or real(*a, **k))
    st = make_stats(plain_layer.x[:600])  # a fresh stats object: nothing cached yet
    t = time.perf_counter()
    errs = [layer_error(plain_layer.linear, quantize_layer(plain_layer.linear, st, DiRotQConfig(), rank=r),
                        plain_layer.x)["rel_mse"] for r in range(0, 129, 16)]
    assert len(calls) == 1
    assert errs[-1] < 1e-5 and errs[0] > errs[4] > errs[-1]
    assert time.perf_counter() - t < 10  # generous: shared CI cores
    st.update(plain_layer.x[:10])  # updated statistics are not served from the cache
    quantize_layer(plain_layer.linear, st, DiRotQConfig(), rank=8)
    assert len(calls) == 2


@pytest.mark.parametrize("config", [DiRotQConfig(rank=8), DiRotQConfig(rank=8, weight_basis="original"),
                                    SmoothQuantConfig(), DiRotQLRConfig(rank=8), SVDQuantConfig(rank=8)],
                         ids=["dirotq", "dirotq-original", "smoothquant", "dirotq-lr", "svdquant"])
def test_quantized_layer_cast_to_bf16_still_runs(plain_layer, config):
    q = quantize_layer(plain_layer.linear, plain_layer.stats, config)
    y32 = q(plain_layer.x[:64])
    y16 = q.to(torch.bfloat16)(plain_layer.x[:64].bfloat16())
    assert y16.dtype == torch.bfloat16 and float((y16.float() - y32).pow(2).sum() / y32.pow(2).sum()) < 1e-2


def test_smoothquant_in_format_c_warns_once():
    import logging

    from dirotq.methods import SmoothQuantConfig
    from dirotq.methods import smoothquant as sq

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    sq.logger.addHandler(handler)  # direct: the CLI's logging setup may stop propagation to the root
    sq._WARNED.clear()
    try:
        SmoothQuantConfig(scale_format="int_ratio")
        SmoothQuantConfig(scale_format="int_ratio")
        SmoothQuantConfig()
    finally:
        sq.logger.removeHandler(handler)
    assert len(seen) == 1 and "format A" in seen[0]
