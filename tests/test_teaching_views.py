"""Issue #21, items 1–3: one token group made visible (analysis.stats.token_group and its figure), error
against cost (stats.cost_axis, error_vs_rank_figure's x axes and "exact" markers), and the app's redraw
handlers drawing every view from one selection, only for the visible tab."""

from __future__ import annotations

import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from torch import nn

import app
from analysis import costs, figures, stats as S
from analysis.session import CalibSettings, ExplorerSession, register_session
from dirotq.calibration import LayerStats
from dirotq.methods.common import smooth_factors
from dirotq.quantizers import fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gaussian_layer(d: int = 256, o: int = 128, n: int = 2048, outliers=(), scale: float = 40.0, seed: int = 0):
    """A linear layer and statistics of Gaussian inputs, optionally with outlier channels in every token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if outliers:
        x[:, list(outliers)] *= scale
    st = LayerStats.empty(d, sample_tokens=256, seed=seed)
    st.update(x)
    torch.manual_seed(seed)
    return nn.Linear(d, o), st


# ----------------------------------------------------------------------------- one token group
def test_token_group_original_view_is_the_int4_quantizer():
    lin, st = gaussian_layer(outliers=(70,))
    tg = S.token_group(st, 8, lin.weight, token=5, group=1)
    g = tg["views"]["original"]
    x = st.sample[5].float()
    np.testing.assert_array_equal(g["values"], x[64:128].double().numpy())
    np.testing.assert_allclose(g["dequant"], fake_quantize(x[None])[0, 64:128].double().numpy(), rtol=0, atol=1e-6)
    # symmetric INT4: scale = group abs-max / 7, 16 levels from −8 to 7 steps
    assert g["scale"] == pytest.approx(float(x[64:128].abs().max()) / 7, rel=1e-6)
    np.testing.assert_allclose(g["levels"], g["scale"] * np.arange(-8, 8))
    np.testing.assert_allclose(g["error"], g["dequant"] - g["values"])
    assert np.abs(g["error"]).max() <= g["scale"] / 2 + 1e-6
    # SmoothQuant's view is x / s with s from the calibration abs-max
    s = smooth_factors(st.abs_max, lin.weight.detach().double(), 0.5)
    np.testing.assert_allclose(tg["views"]["smoothquant"]["values"],
                               (st.sample[5].double() / s)[64:128].float().double().numpy(), rtol=1e-6)
    # DiRotQ quantizes only the d − r tail: 248 coefficients, its group 1 starts at coefficient 8 + 64
    dq = tg["views"]["dirotq"]
    assert dq["n16"] == 8 and dq["n_groups"] == 4 and dq["offset"] == 64


@pytest.mark.parametrize("rank", [0, 8, 100, 256])
def test_dirotq_view_is_x_times_the_method_rotation(rank):
    """The One group and Outliers views rotate without forming T; the result is x·T all the same."""
    _, st = gaussian_layer(outliers=(70,))
    x = st.sample.double()
    t = S.dirotq_transform(st, rank)
    np.testing.assert_allclose(S.dirotq_rotate(x, st, rank).numpy(), (x @ t).numpy(), atol=1e-10)
    np.testing.assert_allclose(S.dirotq_rotate(x[5], st, rank).numpy(), (x[5] @ t).numpy(), atol=1e-10)
    a, n16 = S.view_input("dirotq", x[5], st, rank, None)
    assert n16 == rank and a.shape == (256,)


def test_token_group_defaults_pick_the_largest_outlier_and_its_group():
    _, st = gaussian_layer(d=128)
    st.sample[17, 100] = 60.0  # one token with one huge value
    tg = S.token_group(st, 0)
    assert tg["token"] == 17 == S.outlier_token(st.sample)
    assert tg["group"] == 1  # channel 100 lies in the second group of 64
    assert "smoothquant" not in tg["views"]  # no weight given: that view needs max|W|
    with pytest.raises(ValueError, match="token 999"):
        S.token_group(st, 0, token=999)
    with pytest.raises(ValueError, match="group 2"):
        S.token_group(st, 0, group=2)


def test_planted_outlier_collapses_the_group_scale_and_the_rotations_spread_it():
    """One value of 100 × RMS in a Gaussian token: in the original basis it sets the group's scale and
    rounds every other value of the group to 0 (their error is minus themselves); after a Hadamard or
    DiRotQ's rotation it is spread over the token and almost nothing rounds to 0."""
    lin, st = gaussian_layer()
    tg = S.token_group(st, 8, lin.weight, token=3, group=2, plant=100)
    c = tg["planted"]["channel"]
    assert 128 <= c < 192 and tg["planted"]["value"] == pytest.approx(100 * tg["rms"])
    orig = tg["views"]["original"]
    assert orig["scale"] == pytest.approx(100 * tg["rms"] / 7, rel=1e-5)
    others = np.arange(64) != c - 128
    assert orig["zeroed"] == 63 and (orig["codes"][others] == 0).all()
    np.testing.assert_allclose(orig["error"][others], -orig["values"][others], atol=1e-7)
    for view in ("hadamard", "dirotq"):
        assert tg["views"][view]["zeroed"] <= 16, (view, tg["views"][view]["zeroed"])  # a Gaussian group: ~9
    # without the planted value the same group is quantized fine
    calm = S.token_group(st, 8, lin.weight, token=3, group=2)
    assert calm["planted"] is None and calm["views"]["original"]["zeroed"] <= 16
    # the group follows a planted channel when no group is given
    assert S.token_group(st, 8, lin.weight, token=3, plant=50, plant_channel=200)["group"] == 3


def test_token_group_figure_holds_the_group():
    lin, st = gaussian_layer()
    tg = S.token_group(st, 8, lin.weight, token=3, group=2, plant=100)
    fig = figures.token_group_figure(tg, "transformer_blocks.0.attn1.to_q")
    assert len(fig.data) == 5 * len(tg["views"])
    for j, view in enumerate(tg["views"]):
        g = tg["views"][view]
        values, levels, deq, err, zero = fig.data[5 * j: 5 * j + 5]
        np.testing.assert_array_equal(np.asarray(values.y), g["values"])
        np.testing.assert_allclose(sorted({v for v in levels.y if v is not None}), g["levels"])
        np.testing.assert_array_equal(np.asarray(deq.y), g["dequant"])
        # the error: one vertical stroke per value, from 0 to the error at x = its index, NaN between
        strokes_x, strokes_y = (np.asarray(a, dtype=float).reshape(-1, 3) for a in (err.x, err.y))
        np.testing.assert_array_equal(strokes_y[:, 1], g["error"])
        assert (strokes_y[:, 0] == 0).all() and np.isnan(strokes_y[:, 2]).all()
        np.testing.assert_array_equal(strokes_x[:, 0], np.arange(len(g["error"])))
        np.testing.assert_array_equal(strokes_x[:, 1], strokes_x[:, 0])
        np.testing.assert_array_equal(np.asarray(values.customdata), np.stack([g["dequant"], g["error"]], 1))
        assert len(zero.x) == g["zeroed"]
    assert "token 3" in fig.layout.title.text and "group 2" in fig.layout.title.text
    assert "100× the token's RMS" in fig.layout.title.text
    texts = [a.text for a in fig.layout.annotations]
    assert any("63 of 64 → 0" in t for t in texts), texts
    # r = d: DiRotQ quantizes nothing; the panel says so instead of failing
    full = S.token_group(st, 256, lin.weight, token=3)
    assert len(full["views"]["dirotq"]["values"]) == 0
    assert any("nothing quantized" in a.text for a in figures.token_group_figure(full).layout.annotations)


# ------------------------------------------------------------------------------ error vs cost
def test_cost_axis_is_the_rank_plan_cost_model():
    ranks = [0, 8, 32, 256]
    assert S.cost_axis("dirotq", ranks, 256, 128, "rank") == [0.0, 8.0, 32.0, 256.0]
    for m in ("dirotq", "dirotq-lr", "svdquant"):
        for axis, key in (("params16", "extra_params16"), ("flops16", "flops16_extra")):
            assert S.cost_axis(m, ranks, 256, 128, axis) == [costs.layer_cost(256, 128, m, r)[key] for r in ranks]
    # the full rotation's d×d matrix and GEMM are paid at r = 0 already; the low-rank forms start near 0
    assert S.cost_axis("dirotq", [0], 256, 128, "params16")[0] >= 256 * 256
    assert S.cost_axis("svdquant", [0], 256, 128, "params16")[0] < 256 * 256 / 100
    with pytest.raises(ValueError, match="x axis"):
        S.cost_axis("dirotq", [0], 256, 128, "bits")


def _curves(exact_at_d: bool = True) -> dict:
    ranks = [0, 8, 64]
    inf = math.inf if exact_at_d else 150.0
    return {"ranks": ranks,
            "curves": {"dirotq": {"sqnr_db": [20.0, 30.0, 140.0], "rel_mse": [1e-2, 1e-3, 1e-14]},
                       "svdquant": {"sqnr_db": [19.0, 25.0, inf],
                                    "rel_mse": [1.2e-2, 3e-3, 0.0 if exact_at_d else 1e-15]}},
            "references": {"rtn": {"sqnr_db": 18.0, "rel_mse": 1.6e-2}}}


def test_error_figure_on_a_cost_axis_holds_the_costs():
    cur = _curves()
    fig = figures.error_vs_rank_figure(cur, 8, "sqnr_db", "layer", x_axis="params16", shape=(64, 32),
                                       highlight="svdquant")
    for i, m in enumerate(cur["curves"]):
        assert list(fig.data[i].x) == S.cost_axis(m, cur["ranks"], 64, 32, "params16")
        assert list(fig.data[i].customdata) == cur["ranks"]
    assert fig.data[1].line.width > fig.data[0].line.width  # the chosen method stands out
    # the dashed line is the chosen method's cost at the chosen rank
    assert fig.layout.shapes[0].x0 == S.cost_axis("svdquant", [8], 64, 32, "params16")[0]
    assert "16-bit parameters" in fig.layout.xaxis.title.text
    with pytest.raises(ValueError, match="shape"):
        figures.error_vs_rank_figure(cur, 8, x_axis="flops16")


@pytest.mark.parametrize("metric", ["sqnr_db", "rel_mse"])
def test_exact_points_are_drawn_at_the_edge_not_off_the_chart(metric):
    cur = _curves()
    fig = figures.error_vs_rank_figure(cur, 8, metric, "layer")
    # the curve itself has no value where the layer is exact ...
    assert fig.data[1].y[-1] is None
    # ... a star labelled "exact" marks it, inside the axis range, beyond every finite point
    edge = [t for t in fig.data if t.text is not None and "exact" in t.text]
    assert len(edge) == 1 and list(edge[0].x) == [64]
    lo, hi = fig.layout.yaxis.range
    y = edge[0].y[0]
    if metric == "sqnr_db":
        # the 140 dB point is above the capped axis (RTN + 40 dB): a ▲ at the same edge
        assert hi > y > 18 + 40 and "exact" in fig.layout.title.text and "capped" in fig.layout.title.text
        above = [t for t in fig.data if t.marker.symbol is not None and "triangle-up-open" in t.marker.symbol]
        assert len(above) == 1 and list(above[0].x) == [64] and list(above[0].y) == [y]
    else:
        assert 10 ** lo < y < 1e-14
    # no exact point, no capping: no edge markers, nothing added to the title
    plain = figures.error_vs_rank_figure({**cur, "curves": {"dirotq": {"sqnr_db": [20.0, 30.0, 40.0],
                                                                       "rel_mse": [1e-2, 1e-3, 1e-4]}}}, 8, metric)
    assert all(t.text is None for t in plain.data) and "<br>" not in plain.layout.title.text


# -------------------------------------------------------------------------------- the handlers
MODEL = "tiny-random-teaching-views"
VIEWS = ["smoothquant", "hadamard"]


@pytest.fixture(scope="module")
def sess(tmp_path_factory):
    from tiny_pipelines import build_tiny_pixart_pipeline

    s = register_session(MODEL, ExplorerSession(
        MODEL, pipe=build_tiny_pixart_pipeline(), cache_dir=tmp_path_factory.mktemp("cache"),
        calib=CalibSettings(num_prompts=4, num_inference_steps=3, steps=None, batch_size=4, sample_tokens=128)))
    out = app.on_calibrate(MODEL, 0, "attn1.to_q", 16, VIEWS, "sqnr_db", tab="spectrum", progress=None)
    assert out[0].startswith("✓"), out[0]
    yield s
    s.stop_warm_up()


def figs(out) -> dict:
    return {i: o for i, o in enumerate(out) if isinstance(o, go.Figure)}


def test_calibrate_selects_the_controls_layer_and_draws_only_the_visible_tab(sess):
    out = app.on_calibrate(MODEL, 1, "attn1.to_k", 16, VIEWS, "sqnr_db", tab="outliers", progress=None)
    status, energy, f_spec, f_out, f_err, label, df, slider, f_group, sel, drawn, type_dd = out
    assert sel == {"model": MODEL, "layer": "transformer_blocks.1.attn1.to_k", "rank": 16}
    assert set(figs(out)) == {3} and f_out.layout.title.text.startswith("b1.attn1.to_k")
    assert set(drawn) == {"outliers"} and slider["value"] == 16 and type_dd["value"] == "attn1.to_k"


def test_block_switch_keeping_the_type_selects_the_new_block(sess):
    sel = {"model": MODEL, "layer": "transformer_blocks.0.attn1.to_q", "rank": 16}
    out = app.on_layer(MODEL, 1, "attn1.to_q", 16, VIEWS, "sqnr_db", "spectrum", sel, {})
    status, label, slider, energy, f_spec, f_out, f_err, f_group, new_sel, drawn, type_dd = out
    assert status.startswith("✓"), status
    assert new_sel["layer"] == "transformer_blocks.1.attn1.to_q" and "transformer_blocks.1.attn1.to_q" in label
    assert f_spec.layout.title.text.startswith("b1.attn1.to_q: r = 16")
    assert set(figs(out)) == {4}  # hidden tabs are not drawn
    # a type the block lacks falls back to the block's first, and the dropdown is told so
    out = app.on_layer(MODEL, 1, "no-such-type", 16, VIEWS, "sqnr_db", "spectrum", sel, {})
    assert out[8]["layer"] == "transformer_blocks.1." + out[10]["value"] and out[10]["choices"]


def test_out_of_range_rank_is_refused_and_the_box_put_back(sess):
    sel = {"model": MODEL, "layer": "transformer_blocks.0.attn1.to_q", "rank": 16}
    out = app.on_rank(MODEL, 0, "attn1.to_q", 300, VIEWS, "sqnr_db", "spectrum", sel, {})
    assert out[0] == "⚠ rank 300 is outside 0…64 for this layer: kept r = 16"
    assert out[6] == {"__type__": "update", "value": 16}
    assert not figs(out) and out[8] == gr_skip()  # the plots and the selection stay
    # an in-range rank redraws the visible tab and becomes the selection
    out = app.on_rank(MODEL, 0, "attn1.to_q", 40, VIEWS, "sqnr_db", "spectrum", sel, {})
    assert out[2].layout.title.text.startswith("b0.attn1.to_q: r = 40") and out[8]["rank"] == 40
    # the selection, not a stale control, names the layer
    out = app.on_rank(MODEL, 1, "attn1.to_v", 8, VIEWS, "sqnr_db", "spectrum", sel, {})
    assert out[2].layout.title.text.startswith("b0.attn1.to_q: r = 8")


def gr_skip():
    import gradio as gr

    return gr.skip()


def test_a_selected_tab_is_drawn_from_the_selection_once(sess):
    sel = {"model": MODEL, "layer": "transformer_blocks.1.attn1.to_out.0", "rank": 24}
    # the controls say block 0 / attn1.to_q: the selection wins
    out = app.on_tab("error", MODEL, 0, "attn1.to_q", 3, VIEWS, "sqnr_db", "spectrum", sel, {}, "dirotq", "flops16")
    tab, status, f_spec, f_out, f_err, f_group, drawn = out
    assert tab == "error" and set(figs(out)) == {4}
    assert f_err.layout.title.text.startswith("b1.attn1.to_out.0: output error vs 16-bit FLOPs/token (r = 24)")
    # selected again with nothing changed: nothing is redrawn
    again = app.on_tab("error", MODEL, 0, "attn1.to_q", 3, VIEWS, "sqnr_db", "spectrum", sel, drawn, "dirotq",
                       "flops16")
    assert not figs(again)
    # a view option that changes the error plot redraws it; one that does not, skips it
    assert figs(app.on_view(MODEL, 0, "x", 3, VIEWS, "rel_mse", "error", sel, drawn, "dirotq", "flops16"))
    assert not figs(app.on_view(MODEL, 0, "x", 3, ["hadamard"], "sqnr_db", "error", sel, drawn, "dirotq", "flops16"))
    assert app.on_tab("plan", MODEL, 0, "x", 3, VIEWS, "sqnr_db", "error", sel, drawn)[0] == "plan"


def test_one_group_tab_draws_the_planted_outlier(sess):
    sel = {"model": MODEL, "layer": "transformer_blocks.0.attn1.to_q", "rank": 8}
    out = app.on_view(MODEL, 0, "attn1.to_q", 8, VIEWS, "sqnr_db", "group", sel, {}, "dirotq", "rank", 2, -1, 50, -1)
    status, *_, f_group, drawn = out
    assert status.startswith("✓") and isinstance(f_group, go.Figure)
    assert "token 2 of" in f_group.layout.title.text and "50× the token's RMS" in f_group.layout.title.text
    assert json.loads(drawn["group"])[-4:] == [2, -1, 50, -1]
    bad = app.on_view(MODEL, 0, "attn1.to_q", 8, VIEWS, "sqnr_db", "group", sel, {}, "dirotq", "rank", 10**6)
    assert bad[0].startswith("⚠ token 1000000 is outside")


def test_plan_edit_recomputes_the_energy_column(sess):
    df = app._plan_df(sess, sess.default_plan(8))
    name = df.loc[0, "layer"]
    df.loc[0, "rank"] = 40
    out = app.on_plan_edit(MODEL, df, "dirotq")
    assert out[4].loc[0, "energy %"] == round(100 * sess.energy(name, 40), 1)
    assert out[4].loc[0, "energy %"] > df.loc[0, "energy %"]


def test_a_view_that_cannot_be_drawn_refuses_the_rank_too(sess):
    """The One group tab with a token the sample does not hold: a rank change is refused (the box goes
    back) rather than leaving the box at a rank the plot does not show."""
    sel = {"model": MODEL, "layer": "transformer_blocks.0.attn1.to_q", "rank": 8}
    out = app.on_rank(MODEL, 0, "attn1.to_q", 12, VIEWS, "sqnr_db", "group", sel, {}, "dirotq", "rank", 10**6)
    assert out[0].startswith("⚠ token 1000000 is outside") and out[0].endswith("kept r = 8")
    assert out[6] == {"__type__": "update", "value": 8}


def test_model_load_redraws_without_hiding_the_load_message(sess):
    out = app.on_model_loaded(MODEL, 1, "attn1.to_q", 16, VIEWS, "sqnr_db", "spectrum", None, {})
    assert out[0] == gr_skip()  # the status line keeps on_load_model's message
    assert out[8]["layer"] == "transformer_blocks.1.attn1.to_q" and isinstance(out[4], go.Figure)
