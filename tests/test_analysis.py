"""analysis/: statistics, figures and costs hold the numbers they claim (issue #4, "Tests")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from analysis import costs, figures, stats as S
from dirotq.allocate import candidate_ranks
from dirotq.calibration import LayerStats
from dirotq.methods import DiRotQConfig
from dirotq.quantize import layer_error
from dirotq.registry import get_method, method_names


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(d: int = 128, o: int = 96, n: int = 4096, outliers=(3, 37), scale: float = 40.0, seed: int = 0):
    """A linear layer and statistics of inputs with a few planted outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, list(outliers)] *= scale
    st = LayerStats.empty(d, sample_tokens=512, seed=seed)
    st.update(x)
    torch.manual_seed(seed)
    lin = nn.Linear(d, o)
    return lin, st


def test_spectrum_figure_holds_the_eigenvalues():
    _, st = planted()
    sp = S.spectrum(st)
    ev = torch.linalg.eigvalsh(st.second_moment / st.count).flip(0).clamp(min=0).numpy()
    np.testing.assert_allclose(sp["eigenvalues"], ev, rtol=1e-9, atol=1e-9)
    assert sp["explained"][0] == 0 and abs(sp["explained"][-1] - 1) < 1e-12
    fig = figures.spectrum_figure(sp["eigenvalues"], sp["explained"], 2, "layer")
    np.testing.assert_array_equal(np.asarray(fig.data[0].y), sp["eigenvalues"])
    np.testing.assert_array_equal(np.asarray(fig.data[1].y), sp["explained"])
    # two planted outlier channels carry most of the energy: rank 2 keeps > 90 %
    assert S.energy_at(sp["explained"], 2) > 0.9
    assert f"{100 * sp['explained'][2]:.1f} %" in fig.layout.title.text


def test_outlier_views_rotation_removes_outliers_from_the_quantized_tail():
    lin, st = planted()
    v = S.outlier_views(st, 2, lin.weight)
    assert set(v) == set(S.VIEWS)
    np.testing.assert_allclose(v["original"]["abs_max"], st.sample.double().abs().amax(0).numpy())
    orig, rot = v["original"], v["dirotq"]
    assert rot["n16"] == 2 and orig["n16"] == 0
    # the tail after DiRotQ has no outlier channel: its abs-max is far below the planted ones
    assert rot["abs_max"][2:].max() < 0.25 * orig["abs_max"].max()
    assert rot["act_err"] < 0.1 * orig["act_err"]
    assert v["hadamard"]["act_err"] < orig["act_err"]
    fig = figures.outliers_figure(v, 2, "layer")
    # first column: original abs-max (quantized channels = all of them)
    np.testing.assert_array_equal(np.asarray(fig.data[0].y), orig["abs_max"])
    # same y scale before and after: rows share their y axis
    assert fig.layout.yaxis2.matches == "y"


def test_error_curves_claims():
    lin, st = planted(d=64, o=64)
    cur = S.error_curves(lin, st, ranks=[0, 2, 8, 64])
    assert cur["ranks"] == [0, 2, 8, 64]
    dq = cur["curves"]["dirotq"]["rel_mse"]
    assert dq[-1] < 1e-10  # rank = d: exactly the 16-bit layer
    assert dq[1] < 0.2 * cur["references"]["rtn"]["rel_mse"]  # two outlier directions kept 16-bit
    # RTN reference equals a direct measurement
    from dirotq.methods import RTNConfig

    q = get_method("rtn").handler(lin, st, RTNConfig(), rank=0)
    assert math.isclose(layer_error(lin, q, st.sample)["rel_mse"], cur["references"]["rtn"]["rel_mse"], rel_tol=1e-9)
    fig = figures.error_vs_rank_figure(cur, 8, "sqnr_db", "layer")
    assert list(fig.data[0].x) == cur["ranks"]
    np.testing.assert_allclose([y for y in fig.data[0].y[:-1]], cur["curves"]["dirotq"]["sqnr_db"][:-1])
    # one curve per ranked method, one line per unranked W4A4 method, in registry order, with their labels
    drawn = method_names(ranked=True) + method_names(ranked=False, activations=True)
    assert [t.name for t in fig.data][:len(drawn)] == [figures.label(m) for m in drawn]
    assert "dirotq-lr" in cur["curves"] and "w4a16" not in cur["references"]
    with pytest.raises(ValueError):
        figures.error_vs_rank_figure(cur, 8, "psnr")


def test_rank_grid_spans_zero_to_d():
    for d in (16, 64, 256, 1152):
        g = S.rank_grid(d)
        assert g[0] == 0 and g[-1] == d and g == sorted(set(g)) and len(g) <= 24
        assert {1, 2, 4, 8} <= set(g)  # where curves bend most, and ranks plans use
        assert set(candidate_ranks(d)) <= set(g)  # the explorer's plans read these curves


def test_all_layers_figure_bars_are_the_rows():
    rows = [{"name": f"transformer_blocks.{b}.{t}", "block": b, "layer_type": t, "sqnr_db": 10.0 + b + i,
             "rel_mse": 0.1} for b in range(3) for i, t in enumerate(["attn1.to_q", "ff.net.0.proj"])]
    fig = figures.all_layers_figure(rows)
    heat = fig.data[0]
    assert heat.z[2][1] == 13.0  # block 2, ff.net.0.proj
    bars = {t.name: list(t.y) for t in fig.data[1:]}
    assert bars["attn1.to_q"] == [10.0, 11.0, 12.0]
    # with sensitivities the bars are the predicted model-output error, the heat map stays the layer error
    for r in rows:
        r["gain"] = 0.1 if r["layer_type"] == "ff.net.0.proj" else 0.002
        r["output_error"] = r["gain"] * r["rel_mse"]
    fig = figures.all_layers_figure(rows)
    assert fig.data[0].z[2][1] == 13.0
    bars = {t.name: list(t.y) for t in fig.data[1:]}
    assert bars["ff.net.0.proj"] == [0.1 * 0.1] * 3 and fig.layout.yaxis2.type == "log"


@pytest.mark.parametrize("fmt", ["exact", "int_ratio"])
@pytest.mark.parametrize("method,rank", [("rtn", 0), ("smoothquant", 0), ("quarot", 0), ("svdquant", 16),
                                         ("dirotq", 16), ("dirotq", 0), ("dirotq-lr", 16), ("w4a16", 0)])
def test_layer_cost_matches_module_storage(method, rank, fmt):
    """Format A stores a scale per group, format C one per row and a ratio per group: the cost model
    counts each as the module stores it."""
    from dataclasses import replace

    lin, st = planted(d=128, o=96)
    cfg = replace(S.method_config(method, {}, rank), scale_format=fmt)
    q = get_method(method).handler(lin, st, cfg, rank=rank)
    got = costs.layer_cost(128, 96, method, rank, config=cfg)
    want = q.storage_bits()
    assert got["bits"] == pytest.approx(want), (got["bits"], want)
    assert got["total_bits"] == pytest.approx(sum(want.values()))


def test_plan_cost_totals_and_extra_flops():
    from dirotq.models.base import TargetSpec

    targets = {f"b{i}": TargetSpec(f"b{i}", "w4a4", f"b{i}", i, "x", 256, 256) for i in range(2)}
    pc = costs.plan_cost(targets, {"b0": 32, "b1": 0}, "dirotq-lr")
    t = pc["total"]
    assert t["sum_rank"] == 32
    assert t["extra_params16"] == 32 * (256 + 256)
    zero = costs.plan_cost(targets, {}, "rtn")["total"]
    assert zero["memory_vs_w4a4"] == 1.0 and zero["flops_extra_vs_w4a4"] == 0.0
    full = costs.plan_cost(targets, {"b0": 32}, "dirotq")["total"]
    # the full rotation is a d×d GEMM online: ≥ 100 % extra FLOPs for a square layer
    assert full["flops_extra_vs_w4a4"] >= 0.5
    fig = figures.cost_figure(pc["layers"])
    assert list(fig.data[0].y) == [32 * 512, 0]
    assert "×" in costs.cost_summary_text(t)


def test_image_report_and_difference():
    a = np.zeros((32, 32, 3), np.uint8)
    b = a.copy()
    b[:4] = 255
    r = S.image_report(a, a)
    assert r["psnr_db"] == math.inf and r["ssim"] == pytest.approx(1.0)
    r2 = S.image_report(a, b)
    assert 0 < r2["psnr_db"] < 20 and r2["ssim"] < 1
    diff = S.difference_image(a, b)
    assert diff.dtype == np.uint8 and diff[:4].min() == 255 and diff[4:].max() == 0


def test_dirotq_transform_is_the_method_rotation():
    lin, st = planted(d=64, o=32)
    t = S.dirotq_transform(st, 8)
    assert torch.allclose(t.T @ t, torch.eye(64, dtype=torch.float64), atol=1e-10)
    q = get_method("dirotq").handler(lin, st, DiRotQConfig(rank=8), rank=8)
    assert torch.allclose(q.down.double(), t[:, :8].float().double(), atol=1e-6)
    assert torch.allclose(q.rotation.double(), t[:, 8:].float().double(), atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_weight_only_cost_follows_the_weight_bits(bits):
    """The cost model counts a weight-only layer's codes at its config's bits (W8A16 conditioning
    layers, 16-bit studies), as the module stores them."""
    from analysis import costs
    from dirotq.methods import W4A16Config
    from dirotq.quantize import quantize_layer
    from dirotq.registry import make_config

    lin = torch.nn.Linear(100, 48)  # a padded width: codes over 128 columns
    q = quantize_layer(lin, None, W4A16Config(weight_bits=bits))
    for method in ("w4a16", "dirotq-lr"):  # a W4A16 target under any method (rank 0: no branch)
        cost = costs.layer_cost(100, 48, method, 0, config=W4A16Config(weight_bits=bits), kind="w4a16")
        assert cost["bits"] == pytest.approx(q.storage_bits()), method
    # a W8A16 target under a 4-bit config: 8-bit weights (16 under an activation-only study's config)
    q8 = quantize_layer(lin, None, W4A16Config(weight_bits=16 if bits == 16 else 8))
    cost = costs.layer_cost(100, 48, "dirotq-lr", 0, config=make_config("dirotq-lr", weight_bits=4 if bits != 16 else 16),
                            kind="w8a16")
    assert cost["bits"] == pytest.approx(q8.storage_bits()) and cost["rank"] == 0
