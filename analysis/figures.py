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

from .stats import VIEW_LABELS



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
    layout = dict(_LAYOUT, height=580, margin=dict(l=60, r=20, t=100, b=90), bargap=0,
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
            data.append(go.Bar(x=x[n16:], y=vals[n16:], name="INT4 channels", marker_color="#1f77b4",
                               showlegend=(j == 0 and row == 0), legendgroup="q", **axes))
            if n16:
                data.append(go.Bar(x=x[:n16], y=vals[:n16], name="16-bit channels (not quantized)",
                                   marker_color="#bbbbbb", showlegend=(row == 0), legendgroup="h", **axes))
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


def error_vs_rank_figure(curves: Mapping[str, Any], rank: int, metric: str = "sqnr_db", layer: str = "",
                         current: Mapping[str, float] | None = None) -> go.Figure:
    """Output error of the layer vs rank: one curve per ranked method (traces in ``curves['curves']``
    order, x = ``curves['ranks']``), the rank-free references as horizontal lines (one trace each,
    two points spanning the rank range), a marker at the chosen rank."""
    if metric not in ("sqnr_db", "rel_mse"):
        raise ValueError(f"metric must be 'sqnr_db' or 'rel_mse', got {metric!r}")
    ranks = list(curves["ranks"])
    data = []
    for m, cur in curves["curves"].items():
        y = [v if math.isfinite(v) else None for v in cur[metric]]
        data.append(go.Scatter(x=ranks, y=y, name=label(m), mode="lines+markers",
                               line=dict(color=color(m))))
    x0, x1 = (ranks[0], ranks[-1]) if ranks else (0, 1)
    for m, e in curves["references"].items():
        data.append(go.Scatter(x=[x0, x1], y=[e[metric]] * 2, name=label(m), mode="lines",
                               line=dict(color=color(m), dash="dot")))
    for m, v in (current or {}).items():
        if math.isfinite(v.get(metric, math.nan)):
            how = "interpolated between measured ranks" if v.get("interpolated") else "measured"
            data.append(go.Scatter(x=[rank], y=[v[metric]], mode="markers", showlegend=False,
                                   name=f"{label(m)} at r = {rank} ({how})",
                                   marker=dict(size=11, color=color(m),
                                               symbol="diamond-open" if v.get("interpolated") else "diamond")))
    axis_title = "SQNR (dB, higher is better)" if metric == "sqnr_db" else "relative MSE (lower is better)"
    yaxis = dict(title=dict(text=axis_title), type="log" if metric == "rel_mse" else "linear", **_AXIS)
    title = f"{_short(layer)}: output error vs rank (r = {rank})"
    notes = []
    if metric == "sqnr_db":
        # near r = d the error is float32 rounding (> 100 dB): cap the axis 40 dB above the best
        # rank-free baseline so the region where methods differ stays readable; say so when it cuts
        vals = [v for c in curves["curves"].values() for v in c["sqnr_db"] if math.isfinite(v)]
        refs = [e["sqnr_db"] for e in curves["references"].values() if math.isfinite(e["sqnr_db"])]
        if vals and refs:
            top = max(refs) + 40
            if max(vals) > top:
                lo = min(vals + refs)
                yaxis["range"] = [lo - 2, top]
                notes.append(dict(text=f"axis capped at {top:.0f} dB: higher points are off the chart", x=1, y=1,
                                  xref="paper", yref="paper", xanchor="right", yanchor="bottom", showarrow=False,
                                  font=dict(size=11, color="#666666")))
    layout = dict(_LAYOUT, title=dict(text=title), xaxis=dict(title=dict(text="rank r (16-bit directions)"), **_AXIS),
                  yaxis=yaxis, shapes=[_vline(rank)], annotations=notes, height=470,
                  margin=dict(l=60, r=20, t=60, b=100),
                  legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="center", x=0.5))
    return go.Figure(data=data, layout=layout)


def all_layers_figure(rows: Sequence[Mapping[str, Any]], metric: str = "sqnr_db", title: str = "") -> go.Figure:
    """Every target's error: heat map (top: block × layer type) and bars in layer order (bottom,
    one trace per layer type). The worst layers are the red cells / shortest SQNR bars."""
    types = list(dict.fromkeys(r["layer_type"] for r in rows))
    blocks = sorted({int(r["block"]) for r in rows})
    z = np.full((len(blocks), len(types)), np.nan)
    for r in rows:
        v = r[metric]
        z[blocks.index(int(r["block"])), types.index(r["layer_type"])] = v if math.isfinite(v) else np.nan
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
    for i, t in enumerate(types):
        sel = [r for r in rows if r["layer_type"] == t]
        data.append(go.Bar(x=[_short(r["name"]) for r in sel], y=[r[metric] for r in sel], name=t,
                           marker_color=palette[i % len(palette)], xaxis="x2", yaxis="y2"))
    layout["yaxis"].update(autorange="reversed")
    layout["xaxis2"].update(categoryorder="array", categoryarray=[_short(r["name"]) for r in rows], showticklabels=False,
                            title=dict(text="every layer, in order (hover for names)"))
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


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """``fig`` as a standalone HTML page that renders offline: plotly.min.js is written beside it
    from the installed plotly package (never committed: the wheel ships it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs="directory")
    return path


__all__ = ["spectrum_figure", "outliers_figure", "error_vs_rank_figure", "all_layers_figure", "cost_figure",
           "empty_figure", "sweep_figure", "write_html", "label", "color"]
