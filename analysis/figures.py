"""Plotly figure builders for the explorer (no UI code; every builder returns a ``go.Figure``).

Each figure holds exactly the data it claims (tests read the traces back): the spectrum trace is
the eigenvalue array, the error curves are the measured errors at the plotted ranks, the bars of
the per-layer chart are the per-layer errors in layer order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from dirotq.registry import display

from .stats import COST_AXES, VIEW_LABELS, cost_axis



def label(method: str) -> str:
    """A method's (or preset's) display name, from the registry."""
    return display(method)[0]


def color(method: str) -> str:
    return display(method)[1]


# template=None and hand-made axes: plotly's templates and make_subplots cost 40–100 ms per figure
# (deep copies and validation), which alone would break the app's 0.3 s redraw budget.
_AXIS = dict(gridcolor="#e5e5e5", zerolinecolor="#cccccc", linecolor="#999999", showline=True)
_LAYOUT = dict(template=None, paper_bgcolor="white", plot_bgcolor="white", font=dict(size=12),
               margin=dict(l=60, r=20, t=60, b=50), height=430,
               legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))


def _ax(n: int) -> str:
    """Axis suffix of subplot n (1-based): "" for the first, else the number."""
    return "" if n == 1 else str(n)


def _grid(rows: int, cols: int, *, row_heights: Sequence[float] | None = None, hspace: float = 0.03,
          vspace: float = 0.12, share_y_rows: bool = False) -> dict:
    """Layout axes of a rows × cols grid (subplot n = (row − 1)·cols + col owns xaxis{n}/yaxis{n}).

    ``share_y_rows``: every y axis in a row matches the row's first (same scale before and after).
    """
    heights = list(row_heights or [1.0 / rows] * rows)
    total = sum(heights)
    usable_h = 1.0 - vspace * (rows - 1)
    usable_w = 1.0 - hspace * (cols - 1)
    layout: dict = {}
    top = 1.0
    for r in range(rows):
        h = usable_h * heights[r] / total
        y0, y1 = top - h, top
        top = y0 - vspace
        for c in range(cols):
            n = r * cols + c + 1
            x0 = c * (usable_w / cols + hspace)
            layout[f"xaxis{_ax(n)}"] = dict(domain=[x0, x0 + usable_w / cols], anchor=f"y{_ax(n)}", **_AXIS)
            ya = dict(domain=[max(y0, 0.0), y1], anchor=f"x{_ax(n)}", **_AXIS)
            if share_y_rows and c:
                ya.update(matches=f"y{_ax(r * cols + 1)}", showticklabels=False)
            layout[f"yaxis{_ax(n)}"] = ya
    return layout


def _title_annotation(text: str, x: float, y: float) -> dict:
    return dict(text=text, x=x, y=y, xref="paper", yref="paper", showarrow=False, xanchor="center",
                yanchor="bottom", font=dict(size=12))


def _vline(x: float, xref: str = "x") -> dict:
    return dict(type="line", x0=x, x1=x, y0=0, y1=1, xref=xref, yref="paper",
                line=dict(color="black", dash="dash", width=1.5))


def _revision(*arrays: Any) -> str:
    """A short content hash of the figure's data (``layout.datarevision``): Plotly.react in the browser
    skips recalculating traces whose revision is unchanged."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=float)).tobytes())
    return h.hexdigest()


def _short(name: str) -> str:
    return name.replace("transformer_blocks.", "b").replace("single_transformer_blocks.", "s")


def spectrum_figure(eigenvalues: Sequence[float], explained: Sequence[float], rank: int, layer: str = "") -> go.Figure:
    """Eigenvalues of C/n (log scale, left axis) and cumulative explained energy (right axis) with
    the rank cut; the title states the energy kept at that rank.

    Traces: 0 = eigenvalues (x = 1..d), 1 = explained energy (x = 0..d); the cut is a shape.
    """
    ev = np.asarray(eigenvalues, dtype=float)
    ex = np.asarray(explained, dtype=float)
    d = len(ev)
    rank = int(min(max(rank, 0), d))
    floor = ev[ev > 0].min() * 0.5 if (ev > 0).any() else 1e-12
    data = [go.Scatter(x=np.arange(1, d + 1), y=ev, name="eigenvalue λᵢ of C/n", mode="lines+markers",
                       marker=dict(size=3), line=dict(color="#1f77b4")),
            go.Scatter(x=np.arange(0, d + 1), y=ex, name="energy kept by top r", mode="lines",
                       line=dict(color="#d62728"), yaxis="y2")]
    layout = dict(
        _LAYOUT,
        title=dict(text=f"{_short(layer)}: r = {rank} of {d} keeps {100 * ex[rank]:.1f} % of the energy"),
        xaxis=dict(title=dict(text="principal direction / rank r"), **_AXIS),
        yaxis=dict(title=dict(text="eigenvalue (log)"), type="log",
                   range=[math.log10(floor) - 0.2, math.log10(max(ev.max(), floor * 10)) + 0.3] if d else None,
                   **_AXIS),
        yaxis2=dict(title=dict(text="cumulative energy"), overlaying="y", side="right", range=[0, 1.02],
                    showgrid=False),
        shapes=[_vline(rank + 0.5 if rank else 0.5)],
        margin=dict(l=60, r=20, t=90, b=50),  # the title above the legend, not beside it
        # the traces depend on the layer only: a rank change is a relayout for Plotly.react in the browser
        # (no trace recalculation), when the data's revision is unchanged
        datarevision=_revision(ev, ex),
    )
    return go.Figure(data=data, layout=layout)


def outliers_figure(views: Mapping[str, Mapping[str, Any]], rank: int, layer: str = "",
                    log_kurtosis: bool = True) -> go.Figure:
    """Per-channel abs-max (row 1) and kurtosis (row 2) in each basis, one column per view, shared
    y axis per row (same scale before and after). 16-bit channels (DiRotQ's first r) in gray.

    Traces per view, in order: abs-max quantized, [abs-max 16-bit], kurtosis quantized, [kurtosis 16-bit].
    """
    names = list(views)
    k = len(names)
    layout = dict(_LAYOUT, height=580, margin=dict(l=60, r=20, t=100, b=90),
                  legend=dict(orientation="h", yanchor="top", y=-0.12, xanchor="center", x=0.5),
                  title=dict(text=f"{_short(layer)}: where the outliers are (rank r = {rank})"),
                  **_grid(2, k, hspace=0.03, vspace=0.1, share_y_rows=True))
    data = []
    annotations = []
    for j, v in enumerate(names):
        prof = views[v]
        n16 = int(prof.get("n16", 0))
        for row, key in ((0, "abs_max"), (1, "kurtosis")):
            n = row * k + j + 1
            vals = np.asarray(prof[key], dtype=float)
            x = np.arange(len(vals))
            axes = dict(xaxis=f"x{_ax(n)}", yaxis=f"y{_ax(n)}")
            # a filled step line, not bars: one SVG path instead of one rectangle per channel (1,024 for
            # ff.net.2), so the browser redraws it several times faster and it does not blur in 150 px
            data.append(go.Scatter(x=x[n16:], y=vals[n16:], name="INT4 channels", mode="lines", fill="tozeroy",
                                   line=dict(color="#1f77b4", width=1, shape="hvh"), fillcolor="rgba(31,119,180,0.55)",
                                   showlegend=(j == 0 and row == 0), legendgroup="q", **axes))
            if n16:
                data.append(go.Scatter(x=x[:n16], y=vals[:n16], name="16-bit channels (not quantized)", mode="lines",
                                       fill="tozeroy", line=dict(color="#999999", width=1, shape="hvh"),
                                       fillcolor="rgba(187,187,187,0.7)", showlegend=(row == 0), legendgroup="h",
                                       **axes))
        dom = layout[f"xaxis{_ax(j + 1)}"]["domain"]
        annotations.append(_title_annotation(f"{VIEW_LABELS.get(v, v)}<br>INT4 error {100 * prof['act_err']:.2f} %",
                                             (dom[0] + dom[1]) / 2, layout["yaxis"]["domain"][1] + 0.01))
        layout[f"xaxis{_ax(k + j + 1)}"]["title"] = dict(text="channel" if v == "original" else "coefficient")
    layout["yaxis"]["title"] = dict(text="abs-max")
    layout[f"yaxis{_ax(k + 1)}"]["title"] = dict(text="kurtosis")
    if log_kurtosis:
        for j in range(k):  # 3 = Gaussian; label decades and half-decades, not plotly's bare minor digits
            layout[f"yaxis{_ax(k + j + 1)}"].update(type="log", tickvals=[1, 3, 10, 30, 100, 300, 1000, 3000, 10000])
    layout["annotations"] = annotations
    return go.Figure(data=data, layout=layout)


_X_SHORT = {"rank": "rank", "params16": "16-bit parameters", "flops16": "16-bit FLOPs/token"}


def error_vs_rank_figure(curves: Mapping[str, Any], rank: int, metric: str = "sqnr_db", layer: str = "",
                         current: Mapping[str, float] | None = None, *, x_axis: str = "rank",
                         shape: tuple[int, int] | None = None, highlight: str | None = None) -> go.Figure:
    """Output error of the layer vs rank, or vs what each rank costs.

    ``x_axis``: ``"rank"``, or ``"params16"`` / ``"flops16"``: the extra 16-bit parameters / FLOPs per
    token of each point against plain W4A4 (``stats.cost_axis``; needs ``shape = (d, o)``), so methods
    with different 16-bit costs compare at equal cost. ``highlight``: the method drawn thicker; on a
    cost axis the dashed line is its cost at ``rank``. A point with zero error (SQNR = ∞) is drawn as
    a star labelled "exact" at the top edge (the bottom edge for relative MSE), finite points above a
    capped SQNR axis as ▲ at the same edge: nothing is off the chart.

    Traces, in order: one curve per ranked method (``curves['curves']`` order; x = ``curves['ranks']``
    or their cost, y = the measured errors with None where exact), one line per rank-free reference
    (two points: the rank range, or from its own cost to the largest cost), the markers at the chosen
    rank, then the edge markers (one trace per method that has any).
    """
    if metric not in ("sqnr_db", "rel_mse"):
        raise ValueError(f"metric must be 'sqnr_db' or 'rel_mse', got {metric!r}")
    if x_axis not in COST_AXES:
        raise ValueError(f"x_axis must be one of {tuple(COST_AXES)}, got {x_axis!r}")
    if x_axis != "rank" and shape is None:
        raise ValueError(f"x_axis={x_axis!r} needs the layer's shape (d, o) for its cost")
    ranks = list(curves["ranks"])

    def xs_of(m: str, rs: Sequence[int]) -> list:
        return list(rs) if x_axis == "rank" else cost_axis(m, rs, shape[0], shape[1], x_axis)

    def exact(v: Mapping[str, Any], i: int | None = None) -> bool:
        s = v["sqnr_db"][i] if i is not None else v.get("sqnr_db", 0.0)
        return s is not None and math.isinf(s) and s > 0

    def shown(v: float) -> bool:
        return v is not None and math.isfinite(v) and (metric == "sqnr_db" or v > 0)

    # the y range: finite values only; an SQNR axis is capped 40 dB above the best rank-free baseline
    # (near r = d the error is float32 rounding, > 100 dB) so the region where methods differ stays readable
    vals = [v for c in curves["curves"].values() for v in c[metric] if shown(v)]
    refs = [e[metric] for e in curves["references"].values() if shown(e[metric])]
    has_exact = any(exact(c, i) for c in curves["curves"].values() for i in range(len(ranks)))
    top = edge = None
    capped = False
    yaxis_range = None
    if vals or refs:
        lo, hi = min(vals + refs), max(vals + refs)
        if metric == "sqnr_db":
            top = hi
            if refs and hi > max(refs) + 40:
                top, capped = max(refs) + 40, True
            if capped or has_exact:
                edge = top + 5
                yaxis_range = [lo - 2, top + 12]
        elif has_exact:
            edge = lo / 10 ** 0.6
            yaxis_range = [math.log10(lo) - 1.0, math.log10(hi) + 0.2]

    data = []
    x_all: list[float] = []
    for m, cur in curves["curves"].items():
        x = xs_of(m, ranks)
        x_all += [float(v) for v in x]
        y = [v if shown(v) and not exact(cur, i) else None for i, v in enumerate(cur[metric])]
        width = 3.5 if m == highlight else 2
        hover = (None if x_axis == "rank" else
                 f"{label(m)}, r = %{{customdata}}<br>%{{x:.3s}} {_X_SHORT[x_axis]}<br>%{{y:.3g}}<extra></extra>")
        data.append(go.Scatter(x=x, y=y, name=label(m), mode="lines+markers", line=dict(color=color(m), width=width),
                               customdata=ranks, hovertemplate=hover))
    x0, x1 = (min(x_all), max(x_all)) if x_all else (0, 1)
    for m, e in curves["references"].items():
        if x_axis == "rank":
            data.append(go.Scatter(x=[x0, x1], y=[e[metric]] * 2, name=label(m), mode="lines",
                                   line=dict(color=color(m), dash="dot")))
        else:  # a marker at its own cost, the dotted line on to the right: "this error from this cost on"
            c0 = xs_of(m, [0])[0]
            data.append(go.Scatter(x=[c0, max(x1, c0)], y=[e[metric]] * 2, name=label(m), mode="lines+markers",
                                   marker=dict(size=[9, 0], symbol="square"), line=dict(color=color(m), dash="dot")))
    for m, v in (current or {}).items():
        yv = v.get(metric, math.nan)
        if not shown(yv) or m not in curves["curves"]:
            continue
        if capped and metric == "sqnr_db" and yv > top:
            yv = edge
        how = "interpolated between measured ranks" if v.get("interpolated") else "measured"
        data.append(go.Scatter(x=xs_of(m, [rank]), y=[yv], mode="markers", showlegend=False,
                               name=f"{label(m)} at r = {rank} ({how})",
                               marker=dict(size=11, color=color(m),
                                           symbol="diamond-open" if v.get("interpolated") else "diamond")))
    for m, cur in curves["curves"].items():
        if edge is None:
            break
        x = xs_of(m, ranks)
        pts = [(x[i], "exact") for i in range(len(ranks)) if exact(cur, i)]
        if capped:
            pts += [(x[i], "") for i, v in enumerate(cur[metric]) if shown(v) and v > top]
        if not pts:
            continue
        data.append(go.Scatter(
            x=[p[0] for p in pts], y=[edge] * len(pts), mode="markers+text", showlegend=False, cliponaxis=False,
            name=f"{label(m)}: exact (zero error) or above the axis", text=[p[1] for p in pts],
            textposition="top center" if metric == "sqnr_db" else "bottom center",
            textfont=dict(size=11, color=color(m)),
            marker=dict(size=12, color=color(m), line=dict(width=1, color="black"),
                        symbol=["star" if p[1] else "triangle-up-open" for p in pts])))

    axis_title = "SQNR (dB, higher is better)" if metric == "sqnr_db" else "relative MSE (lower is better)"
    yaxis = dict(title=dict(text=axis_title), type="log" if metric == "rel_mse" else "linear", **_AXIS)
    if metric == "rel_mse":
        yaxis["exponentformat"] = "power"
    if yaxis_range is not None:
        yaxis["range"] = yaxis_range
    notes = []
    if capped:
        notes.append(f"axis capped at {top:.0f} dB: ▲ higher")
    if has_exact:
        notes.append("★ exact: zero error")
    title = f"{_short(layer)}: output error vs {_X_SHORT[x_axis]} (r = {rank})"
    if notes:
        title += "<br><sup>" + " · ".join(notes) + "</sup>"
    xaxis = dict(title=dict(text=COST_AXES[x_axis]), **_AXIS)
    if x_axis == "rank":
        cut = rank
    else:
        xaxis["tickformat"] = "~s"
        h = highlight if highlight in curves["curves"] else next(iter(curves["curves"]), None)
        cut = xs_of(h, [rank])[0] if h else None
    layout = dict(_LAYOUT, title=dict(text=title), xaxis=xaxis, yaxis=yaxis,
                  shapes=[_vline(cut)] if cut is not None else [], height=470,
                  margin=dict(l=60, r=20, t=80 if notes else 60, b=100),
                  legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="center", x=0.5))
    return go.Figure(data=data, layout=layout)


GROUP_LABELS = {"original": "original x (RTN)", "smoothquant": "SmoothQuant x/s", "hadamard": "QuaRot x·H",
                "dirotq": "DiRotQ x·T (INT4 part)"}


def _strokes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One line segment per element, a[i] → b[i], separated by NaN gaps: n segments as one trace (one SVG
    path in the browser) instead of n markers or bars."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.stack([a, b, np.full(a.shape, np.nan)], 1).ravel()


def token_group_figure(tg: Mapping[str, Any], layer: str = "") -> go.Figure:
    """One quantization group of one token in each view (``stats.token_group``), one column per view:
    top, the values (red: non-zero values that round to 0) against the group's 16 INT4 levels (gray
    lines) and where each value lands (black dash); bottom, the rounding error per value. Each
    column has its own y scale: the point is how the levels sit against the values.

    Traces per view, in order: values (x = index in the group, y = ``values``; hover shows where it
    lands and its error), INT4 levels (one line per level, separated by None), dequantized values
    (x = index, y = ``dequant``), rounding error (one vertical stroke per value: x = i, i, gap;
    y = 0, error, gap; gaps are NaN), the non-zero values that round to 0 (red, drawn over the first
    trace).

    Drawn for speed in the browser (issue #21: 0.6 s per redraw at p90 before): the error strokes are
    one SVG path per view where bars are one element each, and the axes do not auto-expand the
    margins, which made Plotly draw the whole figure twice on every update (measured: half the time).
    """
    names = list(tg["views"])
    k = max(len(names), 1)
    # the legend below the axis title, inside the bottom margin even on two rows (a legend pushing the margin
    # out also makes Plotly draw twice)
    layout = dict(_LAYOUT, height=640, margin=dict(l=60, r=20, t=128, b=130),
                  legend=dict(orientation="h", yanchor="top", y=-0.17, xanchor="center", x=0.5),
                  **_grid(2, k, row_heights=[0.68, 0.32], hspace=0.045, vspace=0.08))
    planted = tg.get("planted")
    head = f"{_short(layer)}: token {tg['token']} of {tg['n_tokens']}, group {tg['group']} (r = {tg['rank']})"
    head += "<br><sup>" + (f"planted: channel {planted['channel']} set to {planted['value']:.3g} "
                           f"= {planted['value'] / max(tg['rms'], 1e-30):.0f}× the token's RMS" if planted else
                           "no planted outlier") + "</sup>"
    layout["title"] = dict(text=head, y=0.98, yanchor="top")
    data, annotations = [], []
    for j, v in enumerate(names):
        g = tg["views"][v]
        vals = np.asarray(g["values"], dtype=float)
        n = len(vals)
        x = np.arange(n)
        top, bot = dict(xaxis=f"x{_ax(j + 1)}", yaxis=f"y{_ax(j + 1)}"), dict(xaxis=f"x{_ax(k + j + 1)}",
                                                                                yaxis=f"y{_ax(k + j + 1)}")
        zero = (np.asarray(g["codes"]) == 0) & (np.abs(vals) > 0)
        deq, err = np.asarray(g["dequant"], dtype=float), np.asarray(g["error"], dtype=float)
        data.append(go.Scatter(x=x, y=vals, mode="markers", name="value", legendgroup="v", showlegend=j == 0,
                               marker=dict(size=6, color="#1f77b4"), customdata=np.stack([deq, err], 1),
                               hovertemplate="value %{y:.4g} → %{customdata[0]:.4g}<br>error %{customdata[1]:.3g}"
                                             "<extra></extra>", **top))
        lx, ly = [], []
        for lv in g["levels"]:
            lx += [-0.5, max(n, 1) - 0.5, None]
            ly += [float(lv), float(lv), None]
        data.append(go.Scatter(x=lx, y=ly, mode="lines", name="the 16 INT4 levels", legendgroup="l",
                               showlegend=j == 0, line=dict(color="#bbbbbb", width=1), hoverinfo="skip", **top))
        data.append(go.Scatter(x=x, y=deq, mode="markers", name="after INT4", legendgroup="q", showlegend=j == 0,
                               marker=dict(symbol="line-ew-open", size=10, color="black", line=dict(width=2)),
                               hoverinfo="skip", **top))
        data.append(go.Scatter(x=_strokes(x, x), y=_strokes(np.zeros(n), err), mode="lines", name="rounding error",
                               legendgroup="e", showlegend=j == 0, line=dict(color="#7f7f7f", width=3),
                               hoverinfo="skip", **bot))
        data.append(go.Scatter(x=x[zero], y=vals[zero], mode="markers", name="non-zero value that rounds to 0",
                               legendgroup="z", showlegend=j == 0, marker=dict(size=7, color="#d62728"),
                               hovertemplate="value %{y:.4g} → 0<extra></extra>", **top))
        dom = layout[f"xaxis{_ax(j + 1)}"]["domain"]
        if n:  # three short lines: a quarter of a 650 px plot holds ~26 characters
            sub = (f"scale {g['scale']:.3g} · <b>{g['zeroed']} of {n} → 0</b><br>"
                   f"error: group {100 * g['group_err']:.1f} %,<br>token {100 * g['token_err']:.2f} %")
        else:
            sub = "nothing quantized<br>(every coefficient<br>is 16-bit)"
        annotations.append(_title_annotation(f"<b>{GROUP_LABELS.get(v, v)}</b><br>{sub}", (dom[0] + dom[1]) / 2,
                                             layout["yaxis"]["domain"][1] + 0.01))
        layout[f"xaxis{_ax(j + 1)}"].update(showticklabels=False, range=[-1, max(n, 1)])
        layout[f"xaxis{_ax(k + j + 1)}"].update(range=[-1, max(n, 1)], matches=f"x{_ax(j + 1)}")
        if n:  # the levels, not the data, set the range: the outermost level is ±8 steps
            s = max(g["scale"], 1e-30)
            layout[f"yaxis{_ax(j + 1)}"]["range"] = [-8.6 * s, 8.6 * s]
            layout[f"yaxis{_ax(k + j + 1)}"]["range"] = [-0.6 * s, 0.6 * s]
    for key in layout:  # see the docstring: an auto-margin update redraws the figure a second time
        if key.startswith(("xaxis", "yaxis")):
            layout[key]["automargin"] = False
    layout["yaxis"]["title"] = dict(text="value")
    layout[f"yaxis{_ax(k + 1)}"]["title"] = dict(text="error")
    layout[f"xaxis{_ax(k + 1)}"]["title"] = dict(text="position in the group")
    layout["annotations"] = annotations
    return go.Figure(data=data, layout=layout)


def all_layers_figure(rows: Sequence[Mapping[str, Any]], metric: str = "sqnr_db", title: str = "") -> go.Figure:
    """Every target's error: heat map (top: block × layer type) and bars in layer order (bottom,
    one trace per layer type). The worst layers are the red cells / shortest SQNR bars. Rows with
    ``output_error`` (sensitivity measured: ``AnalysisSession.all_layer_errors``) put the layer's
    predicted share of the model-output error in the bars instead, beside the layer error of the
    heat map: what a layer's error does to the image, not how large it is."""
    types = list(dict.fromkeys(r["layer_type"] for r in rows))
    blocks = sorted({int(r["block"]) for r in rows})
    z = np.full((len(blocks), len(types)), np.nan)
    for r in rows:
        v = r[metric]
        z[blocks.index(int(r["block"])), types.index(r["layer_type"])] = v if math.isfinite(v) else np.nan
    with_output = any(math.isfinite(r.get("output_error", float("nan"))) for r in rows)
    layout = dict(_LAYOUT, height=680, title=dict(text=title or "per-layer output error"),
                  margin=dict(l=70, r=20, t=60, b=110),
                  legend=dict(orientation="h", yanchor="top", y=-0.08, xanchor="center", x=0.5),
                  **_grid(2, 1, row_heights=[0.55, 0.45], vspace=0.16))
    scale = "RdYlGn" if metric == "sqnr_db" else "RdYlGn_r"
    data = [go.Heatmap(z=z, x=types, y=[f"block {b}" for b in blocks], colorscale=scale,
                       colorbar=dict(title=dict(text="SQNR dB" if metric == "sqnr_db" else "rel MSE"), len=0.5, y=0.78),
                       hovertemplate="%{y} %{x}: %{z:.3g}<extra></extra>")]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    bar_key = "output_error" if with_output else metric
    for i, t in enumerate(types):
        sel = [r for r in rows if r["layer_type"] == t]
        extra = {}
        if with_output:
            extra = dict(customdata=[[r.get("gain", float("nan")), r["sqnr_db"]] for r in sel],
                         hovertemplate="%{x}: predicted output error %{y:.3g}<br>sensitivity %{customdata[0]:.3g}, "
                                       "layer SQNR %{customdata[1]:.1f} dB<extra></extra>")
        data.append(go.Bar(x=[_short(r["name"]) for r in sel], y=[r.get(bar_key, float("nan")) for r in sel], name=t,
                           marker_color=palette[i % len(palette)], xaxis="x2", yaxis="y2", **extra))
    layout["yaxis"].update(autorange="reversed")
    layout["xaxis2"].update(categoryorder="array", categoryarray=[_short(r["name"]) for r in rows], showticklabels=False,
                            title=dict(text="every layer, in order (hover for names)"))
    if with_output:
        layout["yaxis2"].update(title=dict(text="predicted model-output error<br>(sensitivity × layer error)"),
                                type="log")
    else:
        layout["yaxis2"].update(title=dict(text="SQNR (dB)" if metric == "sqnr_db" else "relative MSE"),
                                type="log" if metric == "rel_mse" else "linear")
    return go.Figure(data=data, layout=layout)


def cost_figure(layers: Sequence[Mapping[str, Any]], title: str = "") -> go.Figure:
    """Per block: extra 16-bit parameters (bars, left) and extra 16-bit FLOPs as % of the W4A4 GEMM
    (line, right). One bar per block (summed over its layers)."""
    blocks = sorted({int(c["block"]) for c in layers})
    p = [sum(c["extra_params16"] for c in layers if int(c["block"]) == b) for b in blocks]
    f = [100 * sum(c["flops16_extra"] for c in layers if int(c["block"]) == b)
         / max(sum(c["flops_w4a4"] for c in layers if int(c["block"]) == b), 1) for b in blocks]
    data = [go.Bar(x=blocks, y=p, name="extra 16-bit parameters", marker_color="#1f77b4"),
            go.Scatter(x=blocks, y=f, name="extra 16-bit FLOPs (% of W4A4)", mode="lines+markers",
                       line=dict(color="#d62728"), yaxis="y2")]
    layout = dict(_LAYOUT, height=380, title=dict(text=title or "cost of the rank plan against plain W4A4"),
                  xaxis=dict(title=dict(text="block"), dtick=1, **_AXIS), yaxis=dict(title=dict(text="parameters"), **_AXIS),
                  yaxis2=dict(title=dict(text="% of W4A4 FLOPs"), overlaying="y", side="right", rangemode="tozero",
                              showgrid=False))
    return go.Figure(data=data, layout=layout)


def empty_figure(message: str) -> go.Figure:
    """A blank figure carrying a message (before calibration, or on an error)."""
    return go.Figure(layout=dict(template=None, height=300, paper_bgcolor="white", plot_bgcolor="white",
                                 xaxis=dict(visible=False), yaxis=dict(visible=False),
                                 annotations=[dict(text=message, showarrow=False, x=0.5, y=0.5, xref="paper",
                                                   yref="paper", font=dict(size=15))]))


def sweep_figure(results: Mapping) -> go.Figure:
    """The evaluation's rank sweep (``dirotq.eval.rank_sweep`` results): PSNR and SSIM vs rank with
    95 % CI error bars per ranked method; rank-free baselines as dashed lines."""
    from plotly.subplots import make_subplots

    ranks = results["ranks"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("PSNR vs reference (dB)", "SSIM vs reference"))
    for m, c in results["curves"].items():
        for col, key in ((1, "psnr"), (2, "ssim")):
            ys = [c[str(r)][key]["mean"] for r in ranks]
            hi = [c[str(r)][key]["hi"] - c[str(r)][key]["mean"] for r in ranks]
            lo = [c[str(r)][key]["mean"] - c[str(r)][key]["lo"] for r in ranks]
            fig.add_trace(go.Scatter(x=ranks, y=ys, name=label(m), legendgroup=m, showlegend=col == 1,
                                     mode="lines+markers", error_y=dict(type="data", array=hi, arrayminus=lo), line=dict(color=color(m))),
                          row=1, col=col)
    for m, b in results.get("baselines", {}).items():
        for col, key in ((1, "psnr"), (2, "ssim")):
            fig.add_trace(go.Scatter(x=[ranks[0], ranks[-1]], y=[b[key]["mean"]] * 2, name=label(m), legendgroup=m,
                                     showlegend=col == 1, mode="lines", line=dict(dash="dash", color=color(m))),
                          row=1, col=col)
    meta = results["meta"]
    fig.update_layout(title=f"{meta['model']}: quality vs 16-bit rank ({meta['n_images']} images, "
                            f"weights {meta['weights']})", template="plotly_white")
    fig.update_xaxes(title_text="16-bit rank r (per layer)")
    return fig


def rank_plans_figure(result: Mapping, methods: Sequence[str] | None = None,
                      current: float | None = None) -> go.Figure:
    """``benchmarks/bench_rank_plans`` results: image PSNR (95 % CI bars) against the plan's extra
    16-bit parameters, one panel per method (``methods``: a subset), one trace per policy (x = the
    plan's cost, so plans of one budget stand side by side at or below it); ``current``: the extra
    16-bit parameters of a plan to mark with a vertical line."""
    rows = [r for r in result["rows"] if "params16" in r and r["policy"] in POLICY_STYLE
            and (methods is None or r["method"] in methods)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    layout = dict(_LAYOUT, height=470, margin=dict(l=60, r=20, t=90, b=120),
                  title=dict(text=f"{result['meta']['model']}: image PSNR vs 16-bit budget, by rank-plan policy "
                                  f"({result['meta']['n_images']} images)"),
                  legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="center", x=0.5),
                  **_grid(1, max(len(methods), 1), hspace=0.06))
    data, notes = [], []
    for i, m in enumerate(methods, start=1):
        ax = _ax(i)
        notes.append(_title_annotation(label(m), (i - 0.5) / len(methods), 1.0))
        layout[f"xaxis{ax}"]["title"] = dict(text="extra 16-bit parameters")
        for policy, (colour, symbol) in POLICY_STYLE.items():
            pts = sorted((r["params16"], r["psnr"]) for r in rows if r["method"] == m and r["policy"] == policy)
            if not pts:
                continue
            data.append(go.Scatter(x=[p for p, _ in pts], y=[q["mean"] for _, q in pts], name=policy,
                                   legendgroup=policy, showlegend=i == 1, mode="lines+markers", xaxis=f"x{ax}",
                                   yaxis=f"y{ax}", marker=dict(symbol=symbol, size=9), line=dict(color=colour),
                                   error_y=dict(type="data", array=[q["hi"] - q["mean"] for _, q in pts],
                                                arrayminus=[q["mean"] - q["lo"] for _, q in pts])))
    layout["yaxis"]["title"] = dict(text="PSNR vs 16-bit image (dB)")
    layout["annotations"] = notes
    if current is not None and methods:
        layout["shapes"] = [dict(type="line", xref="x", yref="paper", x0=current, x1=current, y0=0, y1=1,
                                 line=dict(color="#444", dash="dash", width=1.5))]
        notes.append(dict(x=current, y=0.02, xref="x", yref="paper", text="this plan's cost", showarrow=False,
                          xanchor="left", font=dict(size=11)))
    return go.Figure(data=data, layout=layout)


def budget_figure(curves: Mapping[str, Sequence[tuple[float, float]]], current: tuple[float, float] | None = None,
                  method: str = "") -> go.Figure:
    """Predicted model-output error (``analysis.plans.predicted_output_error``) against the extra
    16-bit parameters of a plan: one trace per policy (points at several budgets, in ``curves``
    order), a star for the current plan. Lower-left is better."""
    data = []
    for policy, pts in curves.items():
        colour, symbol = POLICY_STYLE.get(policy, ("#7f7f7f", "circle"))
        pts = sorted(pts)
        data.append(go.Scatter(x=[p for p, _ in pts], y=[e for _, e in pts], name=policy, mode="lines+markers",
                               marker=dict(symbol=symbol, size=8), line=dict(color=colour)))
    if current is not None:
        data.append(go.Scatter(x=[current[0]], y=[current[1]], name="this plan", mode="markers",
                               marker=dict(symbol="star", size=16, color="black")))
    # up to six traces: the legend goes under the plot, where it can wrap without covering the title
    layout = dict(_LAYOUT, height=440, margin=dict(l=70, r=20, t=50, b=130),
                  legend=dict(orientation="h", yanchor="top", y=-0.3, xanchor="center", x=0.5),
                  title=dict(text=f"{label(method)}: predicted output error vs 16-bit budget" if method else
                             "predicted output error vs 16-bit budget"),
                  xaxis=dict(title=dict(text="extra 16-bit parameters"), **_AXIS),
                  yaxis=dict(title=dict(text="Σ per-layer output error (lower is better)"), type="log", **_AXIS))
    return go.Figure(data=data, layout=layout)


POLICY_STYLE = {"fixed": ("#7f7f7f", "circle"), "output error": ("#d62728", "diamond"),
                "output error, tied": ("#ff7f0e", "diamond-open"),
                "output error, W4A4 layers only": ("#e377c2", "diamond"),
                "output error, tied, W4A4 layers only": ("#bcbd22", "diamond-open"),
                "energy": ("#2ca02c", "square"), "error budget": ("#9467bd", "triangle-up"),
                "16-bit budget": ("#1f77b4", "x")}


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """``fig`` as a standalone HTML page that renders offline: plotly.min.js is written beside it
    from the installed plotly package (never committed: the wheel ships it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs="directory")
    return path


__all__ = ["spectrum_figure", "outliers_figure", "error_vs_rank_figure", "token_group_figure", "GROUP_LABELS",
           "all_layers_figure", "cost_figure", "empty_figure", "sweep_figure", "rank_plans_figure", "budget_figure", "write_html", "label",
           "color"]
