"""DiRotQ Explorer: the Gradio app (issue #4). Thin: widgets -> analysis (session, figures, costs) -> dirotq.

    python app.py                       # the embedded tiny PixArt-Σ model, CPU, http://127.0.0.1:7860
    python app.py --model PATH_OR_CACHED_ID --device cuda --port 7861

Controls on the left (model, calibration, layer, rank, method), one tab per view on the right, a
short explanation beside every plot. Handlers are plain functions (tests call them directly); each
returns a status line first and never raises into the server: errors become a readable message.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from analysis import costs, figures, plans  # noqa: E402
from analysis import stats as astats  # noqa: E402
from analysis.session import DEFAULT_POLICY, POLICIES, get_session, methods  # noqa: E402
from dirotq.registry import DEFAULT_METHOD  # noqa: E402

PAPER = "arXiv:2605.16732"
OUTLIER_EXTRA = ["smoothquant", "hadamard"]
PLAN_COLUMNS = ["layer", "d_in", "d_out", "rank", "energy %", "kind"]
# the layer names are long: the rank column must stay in view without a horizontal scroll
PLAN_COLUMN_WIDTHS = ["48%", "8%", "10%", "8%", "14%", "12%"]
METHOD_CHOICES = [(figures.label(m), m) for m in methods()]
_SESSION_KW: dict = {}  # device / cache_dir / dtype, set by build_demo


# ------------------------------------------------------------------------------------ helpers
def session(model: str):
    return get_session(model, **_SESSION_KW)


def _ok(msg: str) -> str:
    return f"✓ {msg}"


FORMAT_LABELS = {"exact": "format A", "int_ratio": "format C", "int_ratio+asym": "format C, asymmetric activations"}
FORMAT_CHOICES = [("A: one 16-bit scale per group (reference)", "exact"),
                  ("C: row scale × 4-bit multiplier (fast GPU kernel)", "int_ratio"),
                  ("C with asymmetric activation codes (a zero point per group)", "int_ratio+asym")]


def _scale_format(value) -> str:
    """The format radio's value, checked (a stale or empty value means format A)."""
    if value in (None, ""):
        return "exact"
    if value not in FORMAT_LABELS:
        raise ValueError(f"unknown scale format {value!r}: choose exact (format A), int_ratio (format C) or "
                         "int_ratio+asym (format C, asymmetric activations)")
    return value


def safe(n_outputs: int):
    """Run a handler; on any error return a readable status first and leave other outputs as they are."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the server must survive any bad input
                msg = str(e).strip("'\"") or type(e).__name__
                if not isinstance(e, (ValueError, KeyError, FileNotFoundError, TypeError)):
                    traceback.print_exc()
                    msg = f"{type(e).__name__}: {msg}"
                status = f"⚠ {msg}"
                if n_outputs == 1:
                    return status
                return (status,) + tuple(gr.skip() for _ in range(n_outputs - 1))

        return wrapper

    return deco


def _noop_progress(*a, **k):
    return None


def _prog(progress):
    """gr.Progress outside an event is inert; tests pass a plain callable or nothing."""
    return progress if callable(progress) else _noop_progress


def _rank(rank, d: int) -> int:
    try:
        r = int(round(float(rank)))
    except (TypeError, ValueError):
        raise ValueError(f"rank must be a whole number, got {rank!r}") from None
    if not 0 <= r <= d:
        raise ValueError(f"rank {r} is outside 0…{d} for this layer")
    return r


def _views(extra) -> tuple[str, ...]:
    extra = [v for v in (extra or []) if v in OUTLIER_EXTRA]
    return ("original", "dirotq", *extra)


def _layer(s, block, ltype) -> str:
    if block is None or ltype is None:
        raise ValueError("pick a block and a layer type")
    return s.layer_name(int(block), str(ltype))


def _energy_text(s, name: str, rank: int) -> str:
    d = s.layer_spec(name).in_features
    return (f"**energy kept** by the top {rank} of {d} PCA directions: **{100 * s.energy(name, rank):.1f} %** "
            f"(the INT4 part carries the other {100 * (1 - s.energy(name, rank)):.1f} %)")


def _fmt(v: float, unit: str = "") -> str:
    return "∞" if not math.isfinite(v) else f"{v:.2f}{unit}"


# ---------------------------------------------------------------------------- layer views
# The selected layer and rank live in one per-user gr.State, ``sel`` = {"model", "layer", "rank"}: every
# handler that changes them (block, layer type, rank slider or box, Calibrate, page load, model load)
# writes it and sets the controls to it, and every view is drawn from it. Only the visible tab's plot
# is drawn (``tab`` state, set by the tabs' select events); a hidden tab is drawn when it is selected.
# ``drawn`` = {tab: what its plot shows} lets a select or a control that does not change a tab's
# plot skip it: the browser then re-renders nothing.
LAYER_TABS = ("spectrum", "outliers", "error", "group")
X_AXES = [("rank", "rank"), ("extra 16-bit parameters", "params16"), ("extra 16-bit FLOPs / token", "flops16")]


def _opt_int(v) -> int | None:
    """A "−1 or empty means automatic" number box: None for automatic, else the whole number."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    f = float(v)
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"expected a whole number, got {v!r}")
    return None if f < 0 else int(f)


def _view_key(model: str, name: str, r: int, tab: str, extra_views, metric, method, xaxis, group_opts) -> str:
    """What ``tab``'s plot shows: equal keys draw equal figures."""
    parts = {"spectrum": (), "outliers": (_views(extra_views),), "error": (metric, method, xaxis or "rank"),
             "group": tuple(group_opts)}[tab]
    return json.dumps([model, name, r, tab, *parts], default=str)


def _figure(s, name: str, r: int, tab: str, extra_views, metric, method, xaxis, group_opts):
    if tab == "spectrum":
        sp = s.spectrum(name)
        return figures.spectrum_figure(sp["eigenvalues"], sp["explained"], r, name)
    if tab == "outliers":
        return figures.outliers_figure(s.outliers(name, r, _views(extra_views)), r, name)
    if tab == "error":
        spec = s.layer_spec(name)
        return figures.error_vs_rank_figure(s.curves(name), r, metric, name, current=s.error_at(name, r),
                                            x_axis=xaxis or "rank", shape=(spec.in_features, spec.out_features),
                                            highlight=method)
    token, group, plant, channel = (list(group_opts) + [None] * 4)[:4]
    plant = float(plant or 0)
    if not 0 <= plant <= 1e4:
        raise ValueError(f"the planted outlier must be between 0 and 10000 × the token's RMS, got {plant}")
    tg = astats.token_group(s.require_stats().for_layer(name), r, s.linear(name).weight, token=_opt_int(token),
                            group=_opt_int(group), plant=plant, plant_channel=_opt_int(channel))
    return figures.token_group_figure(tg, name)


def _plots(s, model, name, r, tab, drawn, extra_views, metric, method, xaxis, group_opts):
    """({tab: figure or gr.skip()}, new ``drawn``): ``tab``'s plot (every layer tab when None, as the
    handler tests call them), skipped when it already shows this; the hidden tabs skipped."""
    drawn = dict(drawn or {})
    out = {k: gr.skip() for k in LAYER_TABS}
    for k in (LAYER_TABS if tab is None else [t for t in LAYER_TABS if t == tab]):
        key = _view_key(model, name, r, k, extra_views, metric, method, xaxis, group_opts)
        if tab is not None and drawn.get(k) == key:
            continue
        out[k] = _figure(s, name, r, k, extra_views, metric, method, xaxis, group_opts)
        drawn[k] = key
    return out, drawn


def _sel_layer(s, model, sel) -> str | None:
    """The selected layer of ``sel`` when it belongs to this model, else None."""
    if isinstance(sel, dict) and sel.get("model") == model and sel.get("layer") in s.targets:
        return sel["layer"]
    return None


def _clamped_rank(rank, d: int, fallback: int) -> int:
    """A layer changed under the rank: keep it, clamped to the new width (``fallback`` when unreadable)."""
    try:
        r = int(round(float(rank)))
    except (TypeError, ValueError):
        r = fallback
    return min(max(r, 0), d)


def _select(s, model, block, ltype, rank, sel):
    """(layer, its types, rank, status note) for a block/type change: a type the block lacks falls back
    to the block's first; the rank is clamped to the layer's width."""
    if block is None:
        raise ValueError("pick a block and a layer type")
    types = s.layer_types(int(block))
    if not types:
        raise KeyError(f"block {block} has no quantization target")
    ltype = str(ltype) if ltype in types else types[0]
    name = s.layer_name(int(block), ltype)
    d = s.layer_spec(name).in_features
    prev = sel.get("rank", 0) if isinstance(sel, dict) else 0
    r = _clamped_rank(rank, d, int(prev or 0))
    try:
        asked = int(round(float(rank)))
    except (TypeError, ValueError):
        asked = r
    note = f" (rank {asked} clamped to this layer's width {d})" if asked != r else ""
    return name, types, r, note


@safe(10)
def on_rank(model, block, ltype, rank, extra_views, metric, tab=None, sel=None, drawn=None, method="dirotq",
            xaxis="rank", token=-1, group=-1, plant=0, channel=-1):
    """Rank slider released or its box left: redraw at the new rank, or refuse a rank outside the
    layer and put the box back to the rank the plots show.

    -> (status, energy, spectrum, outliers, error, layer label, rank slider, group, sel, drawn)."""
    s = session(model)
    s.require_stats()
    name = _sel_layer(s, model, sel) or _layer(s, block, ltype)
    d = s.layer_spec(name).in_features
    keep = sel.get("rank") if _sel_layer(s, model, sel) == name else None
    t = time.perf_counter()
    try:
        r = _rank(rank, d)
        plots, drawn = _plots(s, model, name, r, tab, drawn, extra_views, metric, method, xaxis,
                              (token, group, plant, channel))
    except (ValueError, KeyError) as e:  # refused: the box goes back to the rank the plots show
        if keep is None:
            raise
        msg = str(e).strip("'\"")
        return (f"⚠ {msg}: kept r = {keep}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                gr.update(value=keep), gr.skip(), gr.skip(), gr.skip())
    # the label names the layer, which a rank change keeps: not re-rendered (each markdown costs the browser)
    label = gr.skip() if _sel_layer(s, model, sel) == name else s.layer_label(name)
    return (_ok(f"redrawn in {time.perf_counter() - t:.2f} s"), _energy_text(s, name, r), plots["spectrum"],
            plots["outliers"], plots["error"], label, gr.skip(), plots["group"],
            {"model": model, "layer": name, "rank": r}, drawn)


@safe(11)
def on_layer(model, block, ltype, rank, extra_views, metric, tab=None, sel=None, drawn=None, method="dirotq",
             xaxis="rank", token=-1, group=-1, plant=0, channel=-1):
    """A block or layer type picked: select that layer (a type the block lacks becomes its first),
    clamp the rank slider to its width, redraw.

    -> (status, layer label, rank slider, energy, spectrum, outliers, error, group, sel, drawn, layer type)."""
    s = session(model)
    name, types, r, note = _select(s, model, block, ltype, rank, sel)
    d = s.layer_spec(name).in_features
    slider = gr.update(maximum=d, value=r)
    type_dd = gr.update(choices=types, value=s.layer_spec(name).layer_type)
    new_sel = {"model": model, "layer": name, "rank": r}
    if not s.calibrated:
        return ("ℹ press “Calibrate” to see this layer", s.layer_label(name), slider, "", gr.skip(), gr.skip(),
                gr.skip(), gr.skip(), new_sel, gr.skip(), type_dd)
    t = time.perf_counter()
    plots, drawn = _plots(s, model, name, r, tab, drawn, extra_views, metric, method, xaxis,
                          (token, group, plant, channel))
    return (_ok(f"redrawn in {time.perf_counter() - t:.2f} s{note}"), s.layer_label(name), slider,
            _energy_text(s, name, r), plots["spectrum"], plots["outliers"], plots["error"], plots["group"], new_sel,
            drawn, type_dd)


@safe(6)
def on_view(model, block, ltype, rank, extra_views, metric, tab=None, sel=None, drawn=None, method="dirotq",
            xaxis="rank", token=-1, group=-1, plant=0, channel=-1):
    """A view option changed (outlier views, error measure, method, x axis, the group's token, group
    or planted outlier): redraw the visible tab from the selection when what it shows changed.

    -> (status, spectrum, outliers, error, group, drawn)."""
    s = session(model)
    if not s.calibrated:
        return (gr.skip(),) * 6
    name = _sel_layer(s, model, sel) or _layer(s, block, ltype)
    r = sel["rank"] if _sel_layer(s, model, sel) else _rank(rank, s.layer_spec(name).in_features)
    t = time.perf_counter()
    plots, drawn = _plots(s, model, name, r, tab, drawn, extra_views, metric, method, xaxis,
                          (token, group, plant, channel))
    # nothing redrawn (the option does not change the visible plot): the status keeps what it says
    status = (_ok(f"redrawn in {time.perf_counter() - t:.2f} s")
              if any(isinstance(f, go.Figure) for f in plots.values()) else gr.skip())
    return status, plots["spectrum"], plots["outliers"], plots["error"], plots["group"], drawn


def on_model_loaded(model, block, ltype, rank, extra_views, metric, tab=None, sel=None, drawn=None, method="dirotq",
                    xaxis="rank", token=-1, group=-1, plant=0, channel=-1):
    """After "Load model": select the new model's first layer and draw it (``on_layer``), leaving the
    status line to the load's own message (or error)."""
    out = on_layer(model, block, ltype, rank, extra_views, metric, tab, sel, drawn, method, xaxis, token, group,
                   plant, channel)
    return (gr.skip(),) + tuple(out[1:])


def on_tab_select(evt: gr.SelectData, model, block, ltype, rank, extra_views, metric, old_tab=None, sel=None,
                  drawn=None, method="dirotq", xaxis="rank", token=-1, group=-1, plant=0, channel=-1):
    """gr.Tabs.select: the selected tab's id is ``evt.id``."""
    return on_tab(evt.id, model, block, ltype, rank, extra_views, metric, old_tab, sel, drawn, method, xaxis, token,
                  group, plant, channel)


def on_tab(tab, model, block, ltype, rank, extra_views, metric, old_tab=None, sel=None, drawn=None,
           method="dirotq", xaxis="rank", token=-1, group=-1, plant=0, channel=-1):
    """A tab was selected: remember it and draw it if it is a layer tab that is not up to date.

    -> (tab, status, spectrum, outliers, error, group, drawn)."""
    if tab not in LAYER_TABS:
        return (tab,) + (gr.skip(),) * 6
    return (tab,) + tuple(on_view(model, block, ltype, rank, extra_views, metric, tab, sel, drawn, method, xaxis,
                                  token, group, plant, channel))


# ---------------------------------------------------------------------------- calibration
def _plan_df(s, ranks: dict) -> pd.DataFrame:
    rows = []
    for n, spec in s.plan_targets().items():
        r = int(ranks.get(n, 0))
        e = 100 * s.energy(n, r) if s.calibrated else float("nan")
        # the kind column: the table's label says that a W4A16 layer's rank is a 16-bit branch
        rows.append([n, spec.in_features, spec.out_features, r, round(e, 1), spec.kind.upper()])
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def _ranks_from_df(s, df) -> dict[str, int]:
    if df is None:
        raise ValueError("the rank plan table is empty")
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(df, columns=PLAN_COLUMNS)
    if "layer" not in df or "rank" not in df:
        raise ValueError("the rank plan table needs the columns 'layer' and 'rank'")
    ranks = {}
    for name, r in zip(df["layer"], df["rank"]):
        try:
            rf = float(r)
        except (TypeError, ValueError):
            raise ValueError(f"rank of {name} must be a whole number, got {r!r}") from None
        if not math.isfinite(rf) or rf != int(rf):
            raise ValueError(f"rank of {name} must be a whole number, got {r!r}")
        if str(name) in ranks:  # a row renamed to another row's layer: one of the two ranks would be lost
            raise ValueError(f"layer {name} is in the table twice")
        ranks[str(name)] = int(rf)
    # RankPlan.resolve: the one range check of a plan (unknown names, ranks above the width)
    return s.validate_plan(ranks)


def _selection_outputs(s, model, block, ltype, rank, sel, tab, drawn, extra_views, metric, method, xaxis,
                       group_opts):
    """(energy, spectrum, outliers, error, layer label, rank slider, group, sel, drawn, layer type) after
    calibration or a page load: the controls' layer and rank become the selection."""
    name, types, r, _ = _select(s, model, block, ltype, rank, sel)
    plots, drawn = _plots(s, model, name, r, tab, drawn, extra_views, metric, method, xaxis, group_opts)
    return (_energy_text(s, name, r), plots["spectrum"], plots["outliers"], plots["error"], s.layer_label(name),
            gr.update(maximum=s.layer_spec(name).in_features, value=r), plots["group"],
            {"model": model, "layer": name, "rank": r}, drawn,
            gr.update(choices=types, value=s.layer_spec(name).layer_type))


@safe(12)
def on_calibrate(model, block, ltype, rank, extra_views, metric, tab=None, sel=None, drawn=None, method="dirotq",
                 xaxis="rank", token=-1, group=-1, plant=0, channel=-1, progress=gr.Progress()):
    """Calibrate (or load cached statistics), start the background curve sweep, draw.

    -> (status, energy, spectrum, outliers, error, layer label, plan table, rank slider, group, sel, drawn,
    layer type)."""
    s = session(model)
    p = _prog(progress)
    t = time.perf_counter()
    was = s.calibrated or s.load_cached()
    s.calibrate(progress=lambda f, m: p(f, desc=m))
    dt = time.perf_counter() - t
    name = _select(s, model, block, ltype, rank, sel)[0]
    p(0.99, desc=f"error vs rank: {name}")
    s.curves(name)
    s.warm_up()
    energy, f1, f2, f3, label, slider, fg, new_sel, drawn, type_dd = _selection_outputs(
        s, model, block, ltype, rank, sel, tab, {}, extra_views, metric, method, xaxis, (token, group, plant, channel))
    how = "loaded from the on-disk cache" if was else f"calibrated in {dt:.1f} s"
    c = s.calib
    steps = (f"{len(c.steps)} of {c.num_inference_steps} steps" if c.steps is not None
             else f"{c.num_inference_steps} steps")
    return (_ok(f"statistics {how}: {len(s.prompts) - c.holdout_prompts} prompts × {steps} "
                f"(+ {c.holdout_prompts} held out for the error sample), "
                f"{len(s.stats.layers)} input groups"), energy, f1, f2, f3, label,
            _plan_df(s, s.default_plan()), slider, fg, new_sel, drawn, type_dd)


@safe(12)
def on_start(model, block, ltype, rank, extra_views, metric, tab=None, sel=None, drawn=None, method="dirotq",
             xaxis="rank", token=-1, group=-1, plant=0, channel=-1):
    """Page load: draw at once when statistics are cached on disk, else ask for calibration.

    -> as ``on_calibrate``."""
    s = session(model)
    if not (s.calibrated or s.load_cached()):
        return ((f"ℹ not calibrated yet: press **Calibrate** ({len(s.prompts)} prompts × a "
                 f"{s.calib.num_inference_steps}-step schedule)", "") + (gr.skip(),) * 10)
    s.warm_up()
    energy, f1, f2, f3, label, slider, fg, new_sel, drawn, type_dd = _selection_outputs(
        s, model, block, ltype, rank, sel, tab, {}, extra_views, metric, method, xaxis, (token, group, plant, channel))
    return (_ok("statistics loaded from the on-disk cache"), energy, f1, f2, f3, label, _plan_df(s, s.default_plan()),
            slider, fg, new_sel, drawn, type_dd)


# ------------------------------------------------------------------------------ all layers
@safe(3)
def on_all_layers(model, method, plan_df, metric, with_sensitivity=False, scale_format="exact",
                  progress=gr.Progress()):
    """Quantize every target with (method, rank plan, scale format) and chart each layer's error;
    with ``with_sensitivity``, also what each layer's error does to the model output."""
    s = session(model)
    s.require_stats()
    p = _prog(progress)
    ranks = _ranks_from_df(s, plan_df)
    t = time.perf_counter()
    fmt = _scale_format(scale_format)
    rows = s.all_layer_errors(method, ranks, progress=lambda f, m: p(f, desc=m), sensitivity=bool(with_sensitivity),
                              scale_format=fmt)
    dt = time.perf_counter() - t
    note = s.ignored_note(ranks, method)
    fig = figures.all_layers_figure(rows, metric,
                                    f"{figures.label(method)}, {FORMAT_LABELS[fmt]}: per-layer output error")
    if with_sensitivity:
        measured = [r for r in rows if math.isfinite(r["output_error"])]
        worst = sorted(measured, key=lambda r: -r["output_error"])[:5]
        total = sum(r["output_error"] for r in measured) or 1.0
        table = "\n".join(f"| `{r['name']}` | {r['rank']} | {_fmt(r['sqnr_db'], ' dB')} | {r['gain']:.3g} | "
                          f"{r['output_error']:.2e} ({100 * r['output_error'] / total:.0f} %) |" for r in worst)
        md = ("**the 5 layers that move the model output most** (predicted: sensitivity × layer error; the "
              "sensitivity is the output error with only that layer quantized over its own error)\n\n"
              "| layer | rank | layer SQNR | sensitivity | predicted output error (share) |\n|---|---|---|---|---|\n"
              + table)
    else:
        worst = sorted(rows, key=lambda r: r["sqnr_db"])[:5]
        table = "\n".join(f"| `{r['name']}` | {_kind_cell(r['kind'])} | {r['rank']} | "
                          f"{_fmt(r['sqnr_db'], ' dB')} | {r['rel_mse']:.2e} |" for r in worst)
        md = ("**worst 5 layers** (lowest SQNR)\n\n| layer | kind | rank | SQNR | relative MSE |\n"
              "|---|---|---|---|---|\n" + table)
    weight_only = {k: sum(r["kind"] == k for r in rows) for k in ("w4a16", "w8a16")}
    if any(weight_only.values()):
        counts = " and ".join(f"{n} {k.upper()}" for k, n in weight_only.items() if n)
        branch = ("a rank in the Rank plan tab gives one a 16-bit branch (DiRotQ, DiRotQ-LR)" if s.has_branches(method)
                  else f"{method} gives them no 16-bit branch")
        md += (f"\n\n{counts} layers (weight-only: 16-bit activations): their error is the weights' alone; {branch}")
    status = _ok(f"{len(rows)} layers quantized with {method} ({FORMAT_LABELS[fmt]}) in {dt:.1f} s")
    return (status + f" · ⚠ {note}" if note else status), fig, md


def _kind_cell(kind: str) -> str:
    """The kind column of a layer list: weight-only layers say so (their rank is a 16-bit branch)."""
    return f"{kind.upper()} (weight-only)" if kind != "w4a4" else kind.upper()


# ------------------------------------------------------------------------------- rank plan
def _plan_outputs(s, ranks: dict, method: str):
    pc = s.plan_cost(ranks, method)
    return (_plan_df(s, ranks), costs.cost_summary_text(pc["total"]), figures.cost_figure(pc["layers"]),
            json.dumps(ranks, indent=1))


@safe(5)
def on_fill(model, policy, value, method, progress=gr.Progress()):
    """Fill the plan table by a policy, for the chosen method (its costs and curves)."""
    s = session(model)
    if value is None:
        raise ValueError("enter a value for the policy")
    p = _prog(progress)
    ranks = s.fill_plan(policy, float(value), method, progress=lambda f, m: p(f, desc=m))
    return (_ok(f"plan filled by {policy} = {value}"),) + _plan_outputs(s, ranks, method)


POLICY_VALUE = {"output error, tied": ("spend the 16-bit budget of rank", 32),
                "output error": ("spend the 16-bit budget of rank", 32), "fixed": ("rank of every layer", 32),
                "energy": ("energy to keep (0…1)", 0.9), "error budget": ("largest relative MSE per layer", 0.01),
                "16-bit budget": ("extra 16-bit parameters (thousands)", 50)}


BUDGET_HINT = ("fill with “output error” to measure how much each layer moves the output; "
               "then this plot compares the policies at every budget")


def on_budget(model, method, plan_df):
    """Predicted output error vs 16-bit budget of the policies, the table's plan as a star (once
    the method's sensitivities are measured: an "output error" fill does it)."""
    try:
        s = session(model)
        if not s.has_sensitivity(method):
            return figures.empty_figure(BUDGET_HINT)
        ranks = _ranks_from_df(s, plan_df) if plan_df is not None and len(plan_df) else None
        b = s.budget_curves(method, ranks)
        return figures.budget_figure(b["curves"], b["current"], method)
    except (ValueError, KeyError) as e:
        return figures.empty_figure(str(e))


MEASURED_PLANS = Path(__file__).resolve().parent / "benchmarks" / "results" / "rank_plans_tiny_pixart.json"
MEASURED_HINT = ("image PSNR of each policy at equal 16-bit cost is measured for the embedded model "
                 "(python -m benchmarks.bench_rank_plans measures it for any model)")


def on_measured(model, method, plan_df=None):
    """The committed image study of the policies (embedded model only) for ``method``, with the
    table's plan cost as a vertical line: what the budget plot predicts, measured on 40 images."""
    try:
        s = session(model)
        if not s.is_embedded or not MEASURED_PLANS.is_file():
            return figures.empty_figure(MEASURED_HINT)
        result = json.loads(MEASURED_PLANS.read_text())
        if not any(r["method"] == method and "params16" in r for r in result["rows"]):
            return figures.empty_figure(f"{method}: no rank plans in the image study (it has "
                                        f"{', '.join(result['meta']['methods'])})")
        current = None
        if plan_df is not None and len(plan_df):
            current = plans.plan_params16(_ranks_from_df(s, plan_df), s.plan_cost_fn(method))
        return figures.rank_plans_figure(result, [method], current)
    except (ValueError, KeyError, OSError) as e:
        return figures.empty_figure(str(e))


def on_policy(policy):
    """The value box explains what the chosen policy's value means."""
    label, default = POLICY_VALUE.get(policy, ("value", 0))
    return gr.update(label=label, value=default)


@safe(5)
def on_plan_edit(model, plan_df, method):
    """A cell was edited (or the method changed): recompute the cost, and the table's "energy %"
    column for the edited ranks (5th output; the method's change event leaves the table alone)."""
    s = session(model)
    ranks = _ranks_from_df(s, plan_df)
    df, text, fig, js = _plan_outputs(s, ranks, method)
    note = s.ignored_note(ranks, method)  # e.g. SVDQuant chosen with ff.net.2 branches in the table
    return (f"⚠ {note}" if note else ""), text, fig, js, df


@safe(3)
def on_export(model, plan_df):
    """Write the plan as RankPlan JSON ({layer: rank}) to a file for download."""
    s = session(model)
    ranks = _ranks_from_df(s, plan_df)
    path = os.path.join(tempfile.mkdtemp(prefix="dirotq-plan-"), "rank_plan.json")
    with open(path, "w") as f:
        json.dump(ranks, f, indent=1, sort_keys=True)
    return _ok(f"exported {len(ranks)} ranks: rank_plan.json below"), path, gr.update(open=True)


@safe(5)
def on_import(model, file_or_text, method):
    """Read a RankPlan JSON (an uploaded file or pasted text) and check it fits this model."""
    s = session(model)
    if file_or_text is None or (isinstance(file_or_text, str) and not file_or_text.strip()):
        raise ValueError("nothing to import: upload a .json file or paste a plan")
    text = file_or_text
    path = getattr(file_or_text, "name", file_or_text)
    if isinstance(path, str) and not path.lstrip().startswith("{") and os.path.isfile(path):
        with open(path) as f:
            text = f.read()
    rep = s.plan_from_json(text)  # what it set, what it ignored; refuses a plan that sets nothing
    note = s.ignored_note(rep["ranks"], method)
    return (_ok(rep["message"]) + (f" · ⚠ {note}" if note else ""),) + _plan_outputs(s, rep["ranks"], method)


@safe(3)
def on_quantize_plan(model, method, plan_df, metric, with_sensitivity=False, scale_format="exact",
                     progress=gr.Progress()):
    """'Quantize with this plan': the model the Generate tab uses; shows the per-layer errors."""
    return on_all_layers(model, method, plan_df, metric, with_sensitivity, scale_format, progress)


# -------------------------------------------------------------------------------- generate
def _show(img, size: int = 256):
    from PIL import Image

    if img.width >= size:
        return img
    return img.resize((size, size * img.height // img.width), Image.NEAREST)


def _judge_score(scores: dict) -> str:
    """The judge's headline number: attributes of each named object all right, else image-level."""
    for k in ("object_all", "image_all", "mean"):
        if isinstance(scores.get(k), (int, float)):
            return f"{100 * scores[k]:.0f} % ({k.replace('_', ' ')})"
    vals = [v for k, v in scores.items() if isinstance(v, float) and not k.startswith("n_")]
    return f"{100 * sum(vals) / len(vals):.0f} % (mean)" if vals else "n/a"


@safe(5)
def on_generate(model, prompt, seed, steps, guidance, method, plan_df, scale_format="exact", progress=gr.Progress()):
    """16-bit and W4A4 images of one prompt and seed side by side, with metrics."""
    from PIL import Image

    s = session(model)
    # every input is checked before anything runs; on an error `safe` leaves the images on screen
    prompt, seed, steps, guidance = s.check_inputs(prompt, seed, steps, guidance)
    s.require_stats()
    p = _prog(progress)
    ranks = _ranks_from_df(s, plan_df) if plan_df is not None and len(plan_df) else None
    out = s.generate(prompt, seed, steps, guidance, method, ranks, progress=lambda f, m: p(f, desc=m),
                     scale_format=_scale_format(scale_format))
    m, t = out["metrics"], out["timings"]
    lines = [f"⚠ {w}" for w in out["warnings"]] + [f"**PSNR** {_fmt(m['psnr_db'], ' dB')} · **SSIM** {m['ssim']:.4f} (W4A4 vs the 16-bit image, same seed)",
             f"**time**: 16-bit {t['reference_s']:.2f} s, W4A4 {t['quantized_s']:.2f} s "
             f"(reference dtype {t['reference_dtype'].replace('torch.', '')})",
             f"**backend**: {t['backend']}"]
    if "judge_ref" in m:
        lines.append(f"**judge** (prompt faithfulness, share of the prompt's attributes the judge sees): "
                     f"16-bit {_judge_score(m['judge_ref'])}, W4A4 {_judge_score(m['judge_w4a4'])}"
                     + (f"  \n16-bit reads as: “{m['judge_ref_text'].strip()}”" if m.get("judge_ref_text") else "")
                     + (f"  \nW4A4 reads as: “{m['judge_w4a4_text'].strip()}”" if m.get("judge_w4a4_text") else ""))
    elif "judge_unavailable" in m:
        lines.append(f"**judge** unavailable: {m['judge_unavailable']}")
    diff = Image.fromarray(out["difference"])
    note = s.ignored_note(ranks, method)
    status = " · ".join([_ok(f"generated with {method}")] + [f"⚠ {w}" for w in out["warnings"] + ([note] if note else [])])
    return status, _show(out["reference"]), _show(out["quantized"]), _show(diff), "\n\n".join(lines)


# ------------------------------------------------------------------------------ model load
@safe(5)
def on_load_model(path, current):
    """Switch to another model folder / cached hub id (loaded once per process)."""
    path = (path or "").strip()
    if not path:
        raise ValueError("enter a model folder or a cached hub id")
    s = session(path)
    blocks = s.blocks()
    types = s.layer_types(blocks[0])
    cached = s.load_cached()
    status = _ok(f"loaded {s.describe()}" + ("; statistics found in the cache" if cached else "; press Calibrate"))
    return (status, path, gr.update(choices=[(f"block {b}", b) for b in blocks], value=blocks[0]),
            gr.update(choices=types, value=types[0]), _plan_df(s, s.default_plan()) if cached else
            _plan_df_uncalibrated(s))


def _plan_df_uncalibrated(s):
    df = _plan_df(s, s.default_plan())
    df["energy %"] = float("nan")
    return df


# ---------------------------------------------------------------------------------- layout
TEXT = {
    "spectrum": """**What you see.** The eigenvalues of the layer input's second moment C = E[xᵀx] (blue,
log scale), sorted, and the fraction of the input energy the top r principal directions carry (red).

**Why it matters.** DiRotQ rotates every token into this PCA basis (x·V) and keeps the first r
coefficients in 16-bit. The dashed line is your rank: everything left of it is exact, only the
energy right of it goes through INT4. A steep spectrum means a small r already takes the bulk
(and the outliers) out of the 4-bit path.""",
    "outliers": """**What you see.** Per channel: the largest |value| over tokens of held-out calibration prompts (top) and
the kurtosis E[x⁴]/E[x²]² (bottom; 3 for a Gaussian), in the original basis and after each
transform, on the same y scale. Gray: DiRotQ's 16-bit coefficients.

**Why it matters.** INT4 with a per-token group scale has 16 levels: one outlier channel sets the
scale of its group and flattens every other value to 0. RTN quantizes the original channels;
SmoothQuant divides them by s (moving the outlier into the weights); a Hadamard (QuaRot) spreads
each outlier over all channels; DiRotQ removes the dominant directions into 16-bit and spreads
what remains with a random rotation. The title of each panel gives the INT4 error of the part
that is quantized, as a fraction of the input energy.""",
    "error": """**What you see.** The layer's output error y = xWᵀ on tokens of held-out calibration prompts (never used to fit the
basis) when weights
*and* activations are 4-bit, as the rank r grows: DiRotQ (16-bit PCA directions of the
activations, full rotation), DiRotQ low-rank + Hadamard (the same directions, the kernel form) and
SVDQuant (16-bit low-rank branch of the smoothed weight), with RTN, SmoothQuant and QuaRot (no
rank) as dotted lines. Diamonds mark your rank (filled: measured there; open:
interpolated between the measured ranks).

**Read it.** r = d is the 16-bit layer for DiRotQ (what is left is float32 rounding). SVDQuant's
branch follows the weight's energy, DiRotQ's the activations' — the curve shows which one this
layer needs. A ★ "exact" at the top edge is a point with no error at all; ▲ are points above a
capped axis. Layer errors do not always predict image quality: the Generate tab checks images.

**Compare at equal cost.** Switch the x axis to the extra 16-bit parameters or FLOPs per token a
rank costs (the Rank plan tab's cost model): DiRotQ's full rotation starts at a d×d matrix and a
d×d GEMM whatever r is, the low-rank forms at almost nothing, and the dashed line is the chosen
method's cost at your rank — read the other curves along it.""",
    "group": """**What you see.** One held-out token (by default the one whose largest value is the most
times its own RMS) and one group of 64 of its values, the unit INT4 gives one scale: in the
original basis (RTN), after SmoothQuant, after QuaRot's Hadamard and after DiRotQ's rotation with
its r 16-bit coefficients removed. Gray lines are the 16 levels the group can take (scale = the
group's largest |value| / 7), black dashes where each value lands, bars the rounding error; red
dots are non-zero values that round to 0.

**Try it.** Plant an outlier (say 50 × the token's RMS): in the original basis it sets the
group's scale and rounds every other value to 0 — the scale collapse. SmoothQuant divides only
the channels that were large during calibration; the Hadamard spreads the outlier over the whole
token, so each group's scale grows a little; DiRotQ keeps the part of it in its top-r directions
16-bit and spreads the rest with its random rotation. The panel titles give the group's error and
the whole token's (its INT4 error relative to its energy).""",
    "all": """**What you see.** Every quantized layer's output error for the method on the left and the
rank plan of the *Rank plan* tab: a heat map by block and layer type, and bars in layer order.
With *sensitivity* ticked, the bars show instead each layer's predicted share of the **model-output**
error: its sensitivity (the output error with only that layer quantized, over the layer's own
error) times its error at its rank.

**Use it.** A layer's own error is not what the image sees: on the embedded model the attention
q/k/v have the worst layer SQNR, yet the feed-forward input projections move the output 20–40×
more. Tick *sensitivity* to see which layers matter; the *output error* policy of the Rank plan tab
spends rank by exactly that product. W4A16 layers (weight-only, e.g. PixArt's ff.net.2) show their
rank too: under DiRotQ and DiRotQ-LR a rank there is a 16-bit branch beside the 4-bit weight.""",
    "plan": """**Rank plan.** One 16-bit rank per layer. A W4A4 layer's rank keeps its input's top-r directions
16-bit. A weight-only layer (W4A16, e.g. PixArt's ff.net.2) keeps 16-bit activations anyway, so its rank
is a 16-bit branch beside its 4-bit weight: W·V_r on the input's top-r PCA directions, (d + o)·r
parameters (DiRotQ and DiRotQ-LR only; the other methods leave these ranks unused). Fill the plan by a
policy — *output error, tied* (the default; value = a rank r: the fixed plan's 16-bit budget, r on every
W4A4 layer, is spent where the *model output* gains most per extra parameter, from each layer's
measured sensitivity — how much of its error reaches what the sampler steps with, the guided noise
prediction — on ranks from 1 up, with one rank for the layers that
read one input, such as q/k/v, so they can run as one fused layer; under DiRotQ and DiRotQ-LR the
weight-only layers' branches compete for the same budget; the first fill per method runs the model,
15–35 s on 2 CPU cores for the embedded model, the less once the background curve sweep is done), *output error* (the same per layer), *fixed* (value = rank), *energy*
(fraction of energy to keep, e.g. 0.9), *error budget* (largest layer relative MSE, e.g. 0.01),
*16-bit budget* (thousands of extra 16-bit parameters, spent where the *layer* error drops most) —
then edit any cell. On images (240 of them), the default beats a fixed rank at the same cost by
+1.1 dB (r = 16) and +1.8 dB (r = 32) for DiRotQ-LR and by +0.9 and +0.8 dB for full DiRotQ; the three
layer-error policies lose 0.3–1.8 dB: a layer's own error does not say how much it moves the image.
The first plot below predicts each policy's output error at every budget; the second (embedded
model) shows the image PSNR measured for each policy, with this plan's cost as a dashed line. The cost is against plain W4A4:
DiRotQ's full rotation costs a d×d 16-bit matrix per layer whatever r is (an online d×d GEMM);
the low-rank form costs only O(d·r). The JSON is the `RankPlan` format the CLI and API read.""",
    "generate": """**Generate.** The same prompt and seed through the 16-bit model and the quantized model
(method and INT4 scale format on the left, ranks from the Rank plan tab). Format A keeps one 16-bit
scale per group of 64; format C one per row and a 4-bit multiplier per group, what the fast GPU
kernel runs (on the embedded model's images the two are within noise). PSNR/SSIM compare the two images; the
difference image is |W4A4 − 16-bit| × 4. On CPU the reference runs in float32 and the quantized
layers run the PyTorch reference path; with CUDA the Triton kernels run (the backend line says which).""",
}

ABOUT = f"""## DiRotQ in one page

**The problem.** W4A4 quantization stores weights *and* activations in 4 bits (16 levels, a scale per
group of 64 values). Diffusion transformers' activations have a few channels with very large
values (outliers): they set the scale and crush everything else to zero. Weights are easy
(GPTQ/RTN work); activations are the hard part.

**DiRotQ** (*{PAPER}*). Calibrate: run the model on a few prompts and timesteps and collect, per
layer, the second moment C = Σ xᵀx of its input. Its eigenvectors V (PCA) point along the
directions where the activation energy — and the outliers — live. Online, every token is rotated,
x̃ = x·T with T = V·diag(I_r, R): the first r coefficients (the dominant directions) stay
**16-bit**, the remaining d − r are quantized to **INT4** after a random rotation R spreads their
energy evenly. T is orthogonal, so the inverse folds into the weights offline (W̃ = W·T) and the
layer computes y = x̃'·W̃ᵀ + b. Rank r = d gives back the 16-bit layer, r = 0 with T = I is plain RTN.

**The baselines** (same quantizer, same layers):
- **RTN**: round to nearest, no transform — the floor.
- **SmoothQuant**: divide each input channel by s = max|x|^α / max|W|^(1−α) and multiply the
  weight column by s, moving difficulty from activations to weights (α = 0.5).
- **QuaRot**: multiply by a random Hadamard matrix, which spreads every outlier over all channels.
- **SVDQuant**: smoothing, then a rank-r 16-bit branch from the SVD of the smoothed *weight*; the
  residual is 4-bit. Same structure as DiRotQ's low-rank form, but its subspace comes from the
  weight, DiRotQ's from the activations.
- **DiRotQ low-rank + Hadamard** (this project's kernel-friendly form): c = x·V_r in 16-bit, the
  residual x − c·V_rᵀ quantized after a block Hadamard — O(d·r) instead of a d×d rotation.
- **W4A16**: weight-only 4-bit, activations 16-bit — the reference point.

**Cost.** The full rotation is a d×d 16-bit GEMM per layer online and a d×d matrix per layer in
memory; the rank plan tab shows what a plan costs. **Caveats** from the authors' own audit: one
pooled basis for all prompts and timesteps, a fixed r = d/8, per-layer error proxies that do not
always predict image quality — which is why this app shows both layer errors and images.

Reference: *DiRotQ*, {PAPER} (https://arxiv.org/abs/2605.16732). The embedded model is a small
PixArt-Σ-style DiT trained on procedural shapes; its outliers are milder than those of full-size DiTs,
so differences between methods are smaller here than on PixArt-Σ or FLUX.
"""

CSS = """
.teach {font-size: 0.92em; line-height: 1.35;}
#img-ref img, #img-q img, #img-diff img {image-rendering: pixelated;}
"""


def build_demo(model: str | None = None, *, device: str = "cpu", cache_dir: str | None = None,
               cuda_graphs: bool = False) -> gr.Blocks:
    """The Blocks app for ``model`` (default: the embedded tiny model). Loads the model once per process.
    ``cuda_graphs``: Generate replays the transformers' steps from CUDA graphs (GPU only)."""
    from dirotq.pipelines import DEFAULT_MODEL

    model = str(model or DEFAULT_MODEL)
    _SESSION_KW.clear()
    _SESSION_KW["device"] = device
    if cuda_graphs:
        _SESSION_KW["cuda_graphs"] = True
    if cache_dir is not None:
        _SESSION_KW["cache_dir"] = cache_dir
    s = session(model)
    blocks = s.blocks()
    types = s.layer_types(blocks[0])
    first = s.layer_spec(s.layer_name(blocks[0], types[0]))
    init_plan = _plan_df_uncalibrated(s)
    placeholder = figures.empty_figure("press “Calibrate” (left) to compute the statistics")

    with gr.Blocks(title="DiRotQ Explorer") as demo:
        model_state = gr.State(model)
        gr.Markdown(f"# DiRotQ Explorer\nW4A4 post-training quantization of diffusion transformers — "
                    f"why 4-bit activations are hard, and what a PCA rotation does about it ({PAPER}).")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                status = gr.Markdown("", elem_id="status")
                model_info = gr.Markdown(s.describe(), elem_classes="teach")
                with gr.Accordion("model", open=False):
                    model_box = gr.Textbox(value=model, label="model folder or cached hub id", elem_id="model-box")
                    load_btn = gr.Button("Load model", size="sm")
                calib_btn = gr.Button("Calibrate", variant="primary", elem_id="calibrate")
                block_dd = gr.Dropdown([(f"block {b}", b) for b in blocks], value=blocks[0], label="block",
                                       elem_id="block")
                type_dd = gr.Dropdown(types, value=types[0], label="layer type", elem_id="layer-type")
                layer_md = gr.Markdown(s.layer_label(first.name), elem_classes="teach", elem_id="layer-label")
                rank_sl = gr.Slider(0, first.in_features, value=min(32, first.in_features), step=1,
                                    label="rank r (16-bit directions)", elem_id="rank")
                energy_md = gr.Markdown("", elem_id="energy")
                method_dd = gr.Dropdown(METHOD_CHOICES, value=DEFAULT_METHOD, elem_id="method",
                                        label="method (Error vs rank, All layers, Rank plan, Generate)")
                format_rd = gr.Radio(FORMAT_CHOICES, value="exact", elem_id="scale-format",
                                     label="INT4 scale format (All layers, Generate)")
                with gr.Accordion("view options", open=False):
                    views_cb = gr.CheckboxGroup([("SmoothQuant", "smoothquant"), ("Hadamard (QuaRot)", "hadamard")],
                                                value=OUTLIER_EXTRA, label="also show outliers after")
                    metric_rd = gr.Radio([("SQNR (dB)", "sqnr_db"), ("relative MSE", "rel_mse")], value="sqnr_db",
                                         label="error measure")
            with gr.Column(scale=3):
                with gr.Tabs() as tabs:
                    with gr.Tab("Spectrum", id="spectrum"):
                        with gr.Row():
                            spec_plot = gr.Plot(placeholder, elem_id="plot-spectrum", scale=3, show_label=False)
                            gr.Markdown(TEXT["spectrum"], elem_classes="teach")
                    with gr.Tab("Outliers", id="outliers"):
                        with gr.Row():
                            out_plot = gr.Plot(placeholder, elem_id="plot-outliers", scale=3, show_label=False)
                            gr.Markdown(TEXT["outliers"], elem_classes="teach")
                    with gr.Tab("Error vs rank", id="error"):
                        with gr.Row():
                            with gr.Column(scale=3):
                                xaxis_rd = gr.Radio(X_AXES, value="rank", label="x axis: what the 16-bit part costs",
                                                    elem_id="x-axis")
                                err_plot = gr.Plot(placeholder, elem_id="plot-error", show_label=False)
                            gr.Markdown(TEXT["error"], elem_classes="teach")
                    with gr.Tab("One group", id="group"):
                        with gr.Row():
                            with gr.Column(scale=3):
                                with gr.Row():
                                    tok_nb = gr.Number(-1, label="token (−1: auto)", precision=0, min_width=120,
                                                       elem_id="group-token")
                                    grp_nb = gr.Number(-1, label="group (−1: auto)", precision=0, min_width=120,
                                                       elem_id="group-index")
                                    plant_sl = gr.Slider(0, 100, value=0, step=1, elem_id="group-plant", scale=2,
                                                         label="plant: × token RMS")
                                    chan_nb = gr.Number(-1, label="at channel (−1: auto)", precision=0, min_width=120,
                                                        elem_id="group-channel")
                                group_plot = gr.Plot(placeholder, elem_id="plot-group", show_label=False)
                            gr.Markdown(TEXT["group"], elem_classes="teach")
                    with gr.Tab("All layers", id="all"):
                        with gr.Row():
                            with gr.Column(scale=3):
                                with gr.Row():
                                    all_btn = gr.Button("Compute for this method and rank plan", elem_id="all-btn")
                                    sens_cb = gr.Checkbox(False, label="with each layer's sensitivity (what reaches the "
                                                          "model output; measured once per method, ~15 s on 2 CPU cores)",
                                                          elem_id="all-sens")
                                all_plot = gr.Plot(figures.empty_figure("press the button above"), elem_id="plot-all",
                                                   show_label=False)
                                worst_md = gr.Markdown("")
                            gr.Markdown(TEXT["all"], elem_classes="teach")
                    with gr.Tab("Rank plan", id="plan"):
                        with gr.Row():
                            with gr.Column(scale=3):
                                with gr.Row():
                                    policy_dd = gr.Dropdown(list(POLICIES), value=DEFAULT_POLICY, label="policy")
                                    value_nb = gr.Number(32, label=POLICY_VALUE[DEFAULT_POLICY][0])
                                    fill_btn = gr.Button("Fill", elem_id="fill-btn")
                                plan_df = gr.Dataframe(init_plan, headers=PLAN_COLUMNS, interactive=True,
                                                       datatype=["str", "number", "number", "number", "number", "str"],
                                                       column_widths=PLAN_COLUMN_WIDTHS,
                                                       label="per-layer ranks (edit the rank column; energy %: the input "
                                                             "energy the rank keeps; a W4A16 layer's rank is a 16-bit "
                                                             "branch beside its 4-bit weight)",
                                                       elem_id="plan-table", max_height=320)
                                cost_md = gr.Markdown("")
                                cost_plot = gr.Plot(figures.empty_figure("cost appears after a fill or an edit"))
                                budget_plot = gr.Plot(figures.empty_figure(BUDGET_HINT), elem_id="plot-budget")
                                measured_plot = gr.Plot(on_measured(model, DEFAULT_METHOD), elem_id="plot-measured")
                                with gr.Row():
                                    export_btn = gr.Button("Export JSON")
                                    quant_btn = gr.Button("Quantize with this plan", variant="primary")
                                with gr.Accordion("JSON: download, upload, edit", open=False) as json_acc:
                                    with gr.Row():
                                        export_file = gr.File(label="exported rank_plan.json", interactive=False,
                                                              height=120)
                                        import_file = gr.File(label="import a rank plan (.json)", file_types=[".json"],
                                                              height=120, type="filepath")
                                    plan_json = gr.Code("", language="json", label="plan JSON (edit, then Apply)",
                                                        max_lines=12)
                                    apply_btn = gr.Button("Apply JSON", size="sm")
                            gr.Markdown(TEXT["plan"], elem_classes="teach")
                    with gr.Tab("Generate", id="generate"):
                        with gr.Row():
                            with gr.Column(scale=3):
                                with gr.Row():
                                    prompt_tb = gr.Textbox(s.default_prompt(),
                                                           label="prompt", elem_id="prompt", scale=3)
                                    # no minimum/maximum: gradio would refuse out-of-range values before
                                    # on_generate runs, blanking the images; on_generate checks and says why
                                    seed_nb = gr.Number(0, label="seed", precision=0)
                                    steps_nb = gr.Number(20, label="steps (1–100)", precision=0)
                                    guid_nb = gr.Number(4.5, label="guidance (0–30)")
                                gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-btn")
                                with gr.Row():
                                    # one toolbar button: the label and three icons do not fit side by side
                                    # in a third of a 1280 px window (the label was cut under the icons)
                                    img_ref = gr.Image(label="16-bit reference", type="pil", elem_id="img-ref",
                                                       interactive=False, buttons=["download"])
                                    img_q = gr.Image(label="W4A4", type="pil", elem_id="img-q", interactive=False,
                                                     buttons=["download"])
                                    img_d = gr.Image(label="|difference| × 4", type="pil", elem_id="img-diff",
                                                     interactive=False, buttons=["download"])
                                gen_md = gr.Markdown("", elem_id="gen-info")
                            gr.Markdown(TEXT["generate"], elem_classes="teach")
                    with gr.Tab("About", id="about"):
                        gr.Markdown(ABOUT)

        tab_state = gr.State("spectrum")  # the visible tab: only its plot is drawn
        sel_state = gr.State(None)  # the selected layer and rank, {"model", "layer", "rank"}: what every view shows
        drawn_state = gr.State({})  # tab -> what its plot shows (skip redraws that would change nothing)
        sink = gr.State(None)  # an output nobody reads (the method's change does not rewrite the plan table)
        view_in = [model_state, block_dd, type_dd, rank_sl, views_cb, metric_rd, tab_state, sel_state, drawn_state,
                   method_dd, xaxis_rd, tok_nb, grp_nb, plant_sl, chan_nb]
        plots = [spec_plot, out_plot, err_plot]
        plan_out = [plan_df, cost_md, cost_plot, plan_json]
        start_out = [status, energy_md, *plots, layer_md, plan_df, rank_sl, group_plot, sel_state, drawn_state, type_dd]
        layer_out = [status, layer_md, rank_sl, energy_md, *plots, group_plot, sel_state, drawn_state, type_dd]
        rank_out = [status, energy_md, *plots, layer_md, rank_sl, group_plot, sel_state, drawn_state]
        view_out = [status, *plots, group_plot, drawn_state]
        # one queue of limit 1 for every redraw: a user's events run in order, so the last control
        # touched is what the plots show; preprocess=False lets on_rank see (and refuse) a rank
        # typed beyond the slider's range, which gradio would otherwise reject with a bare toast
        views = dict(concurrency_id="layer-views", concurrency_limit=1, preprocess=False, show_progress="hidden")

        demo.load(on_start, view_in, start_out, **views)
        # then: a tab selected while calibrating (drawn before statistics existed) is drawn now
        calib_btn.click(on_calibrate, view_in, start_out, concurrency_limit=1, preprocess=False).then(
            on_view, view_in, view_out, **views)
        # .input, not .change: programmatic updates (on_layer setting the type, a model load) fire no
        # second redraw, and picking a block whose type stays the same still redraws
        for c in (block_dd, type_dd):
            c.input(on_layer, view_in, layer_out, trigger_mode="always_last", **views)
        rank_sl.release(on_rank, view_in, rank_out, trigger_mode="always_last", **views)
        for c in (views_cb, metric_rd, method_dd, xaxis_rd, tok_nb, grp_nb, chan_nb):
            c.change(on_view, view_in, view_out, trigger_mode="always_last", **views)
        plant_sl.release(on_view, view_in, view_out, trigger_mode="always_last", **views)
        tabs.select(on_tab_select, view_in, [tab_state, *view_out], trigger_mode="always_last", **views)
        # Plotly resizes only visible plots on a window resize: one drawn in a tab hidden meanwhile keeps its
        # old width (overflowing at 1280 px after 1920) unless it is redrawn. A resize event once the tab
        # shows fits its plots to the width they have, also when the handler above skips the redraw.
        tabs.select(None, js="() => { requestAnimationFrame(() => window.dispatchEvent(new Event('resize'))); }")
        all_btn.click(on_all_layers, [model_state, method_dd, plan_df, metric_rd, sens_cb, format_rd],
                      [status, all_plot, worst_md])
        policy_dd.change(on_policy, policy_dd, value_nb)
        fill_btn.click(on_fill, [model_state, policy_dd, value_nb, method_dd], [status] + plan_out).then(
            on_budget, [model_state, method_dd, plan_df], budget_plot).then(
            on_measured, [model_state, method_dd, plan_df], measured_plot)
        plan_df.input(on_plan_edit, [model_state, plan_df, method_dd], [status, cost_md, cost_plot, plan_json, plan_df]
                      ).then(on_budget, [model_state, method_dd, plan_df], budget_plot).then(
            on_measured, [model_state, method_dd, plan_df], measured_plot)
        method_dd.change(on_plan_edit, [model_state, plan_df, method_dd], [status, cost_md, cost_plot, plan_json, sink])
        method_dd.change(on_measured, [model_state, method_dd, plan_df], measured_plot)
        export_btn.click(on_export, [model_state, plan_df], [status, export_file, json_acc])
        import_file.upload(on_import, [model_state, import_file, method_dd], [status] + plan_out)
        apply_btn.click(on_import, [model_state, plan_json, method_dd], [status] + plan_out)
        quant_btn.click(on_quantize_plan, [model_state, method_dd, plan_df, metric_rd, sens_cb, format_rd],
                        [status, all_plot, worst_md])
        gen_btn.click(on_generate, [model_state, prompt_tb, seed_nb, steps_nb, guid_nb, method_dd, plan_df, format_rd],
                      [status, img_ref, img_q, img_d, gen_md])
        load_btn.click(on_load_model, [model_box, model_state], [status, model_state, block_dd, type_dd, plan_df]
                       ).then(on_model_loaded, view_in, layer_out, **views)
    demo.queue(default_concurrency_limit=2)
    return demo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DiRotQ Explorer (Gradio app)")
    ap.add_argument("--model", default=None, help="diffusers pipeline folder or cached hub id (default: embedded tiny model)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--cache-dir", default=None, help="statistics/curves cache (default .cache/explorer)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="GPU: Generate replays both transformers' steps from CUDA graphs (the eager kernels without "
                         "their per-layer host time; dirotq.cuda_graphs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: half the cores; small GEMMs on a shared box run faster on one)")
    args = ap.parse_args(argv)
    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        print(f"app.py: --cuda-graphs needs --device cuda (this run: {args.device})", flush=True)
        return 2
    import torch

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    try:
        demo = build_demo(args.model, device=args.device, cache_dir=args.cache_dir, cuda_graphs=args.cuda_graphs)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"app.py: cannot open the model: {e}", flush=True)
        return 2
    # run_history=False: gradio 6 otherwise re-serialises its last 100 runs, figures included, into
    # localStorage after every event: the slider's redraw grew from 0.2 s to over 1 s within 40 changes
    _, url, _ = demo.launch(server_name=args.host, server_port=args.port, ssr_mode=False, prevent_thread_lock=True,
                            theme=gr.themes.Soft(), css=CSS, quiet=True, run_history=False)
    print(f"DiRotQ Explorer running on {url or f'http://{args.host}:{args.port}/'}", flush=True)
    try:
        demo.block_thread()  # returns on Ctrl-C, once gradio has closed the server
    except KeyboardInterrupt:
        pass
    # a handler thread may still be inside torch (a calibration, the curve warm-up): finalizing the
    # interpreter under it aborts with "terminate called without an active exception", so leave now
    # (caches are written under a temporary name, then renamed: an interrupted write is never read back)
    print("DiRotQ Explorer stopped (Ctrl-C)", flush=True)
    os._exit(130)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
