"""Plotly figure builders for the explorer (no UI code; every builder returns a ``go.Figure``).

Each figure holds exactly the data it claims (tests read the traces back): the spectrum trace is
the eigenvalue array, the error curves are the measured errors at the plotted ranks, the bars of
the per-layer chart are the per-layer errors in layer order.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .stats import VIEW_LABELS

COLORS = {"dirotq": "#d62728", "svdquant": "#1f77b4", "rtn": "#7f7f7f", "smoothquant": "#2ca02c",
          "quarot": "#9467bd", "dirotq-lr": "#ff7f0e", "w4a16": "#8c564b"}
LABELS = {"dirotq": "DiRotQ (PCA rotation)", "svdquant": "SVDQuant (weight SVD)", "rtn": "RTN",
          "smoothquant": "SmoothQuant", "quarot": "QuaRot (Hadamard)", "dirotq-lr": "DiRotQ low-rank + Hadamard",
          "w4a16": "W4A16 (weight-only)"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50), height=430,
               legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))


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
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    floor = ev[ev > 0].min() * 0.5 if (ev > 0).any() else 1e-12
    fig.add_trace(go.Scatter(x=np.arange(1, d + 1), y=ev, name="eigenvalue λᵢ of C/n", mode="lines+markers",
                             marker=dict(size=3), line=dict(color="#1f77b4")), secondary_y=False)
    fig.add_trace(go.Scatter(x=np.arange(0, d + 1), y=ex, name="energy kept by top r", mode="lines",
                             line=dict(color="#d62728")), secondary_y=True)
    fig.add_vline(x=rank + 0.5 if rank else 0.5, line=dict(color="black", dash="dash"))
    fig.update_yaxes(type="log", title_text="eigenvalue (log)", range=[math.log10(floor), None] if d else None,
                     secondary_y=False)
    fig.update_yaxes(title_text="cumulative energy", range=[0, 1.02], secondary_y=True)
    fig.update_xaxes(title_text="principal direction / rank r")
    fig.update_layout(title=f"{_short(layer)}: r = {rank} of {d} keeps {100 * ex[rank]:.1f} % of the energy",
                      **_LAYOUT)
    return fig


def outliers_figure(views: Mapping[str, Mapping[str, Any]], rank: int, layer: str = "",
                    log_kurtosis: bool = True) -> go.Figure:
    """Per-channel abs-max (row 1) and kurtosis (row 2) in each basis, one column per view, shared
    y axis per row (same scale before and after). 16-bit channels (DiRotQ's first r) in gray.

    Traces per view, in order: abs-max quantized, [abs-max 16-bit], kurtosis quantized, [kurtosis 16-bit].
    """
    names = list(views)
    fig = make_subplots(rows=2, cols=len(names), shared_yaxes="rows", vertical_spacing=0.12,
                        horizontal_spacing=0.03,
                        subplot_titles=[f"{VIEW_LABELS.get(v, v)}<br>INT4 error {100 * views[v]['act_err']:.2f} %"
                                        for v in names] + [""] * len(names))
    for j, v in enumerate(names, start=1):
        prof = views[v]
        n16 = int(prof.get("n16", 0))
        for row, key in ((1, "abs_max"), (2, "kurtosis")):
            vals = np.asarray(prof[key], dtype=float)
            x = np.arange(len(vals))
            fig.add_trace(go.Bar(x=x[n16:], y=vals[n16:], name="INT4 channels", marker_color="#1f77b4",
                                 showlegend=(j == 1 and row == 1), legendgroup="q"), row=row, col=j)
            if n16:
                fig.add_trace(go.Bar(x=x[:n16], y=vals[:n16], name="16-bit channels (not quantized)",
                                     marker_color="#bbbbbb", showlegend=(row == 1), legendgroup="h"), row=row, col=j)
        fig.update_xaxes(title_text="channel" if v == "original" else "coefficient", row=2, col=j)
    fig.update_yaxes(title_text="abs-max", row=1, col=1)
    fig.update_yaxes(title_text="kurtosis", row=2, col=1, type="log" if log_kurtosis else "linear")
    if log_kurtosis:
        for j in range(2, len(names) + 1):
            fig.update_yaxes(type="log", row=2, col=j)
    layout = dict(_LAYOUT, height=560, margin=dict(l=60, r=20, t=110, b=50))
    fig.update_layout(title=f"{_short(layer)}: where the outliers are (rank r = {rank})", bargap=0, **layout)
    return fig


def error_vs_rank_figure(curves: Mapping[str, Any], rank: int, metric: str = "sqnr_db", layer: str = "",
                         current: Mapping[str, float] | None = None) -> go.Figure:
    """Output error of the layer vs rank: DiRotQ and SVDQuant curves (traces in ``curves['curves']``
    order, x = ``curves['ranks']``), RTN/SmoothQuant/QuaRot as horizontal lines (one trace each, two
    points spanning the rank range), a marker at the chosen rank."""
    if metric not in ("sqnr_db", "rel_mse"):
        raise ValueError(f"metric must be 'sqnr_db' or 'rel_mse', got {metric!r}")
    ranks = list(curves["ranks"])
    fig = go.Figure()
    for m, cur in curves["curves"].items():
        y = [v if math.isfinite(v) else None for v in cur[metric]]
        fig.add_trace(go.Scatter(x=ranks, y=y, name=LABELS.get(m, m), mode="lines+markers",
                                 line=dict(color=COLORS.get(m))))
    x0, x1 = (ranks[0], ranks[-1]) if ranks else (0, 1)
    for m, e in curves["references"].items():
        fig.add_trace(go.Scatter(x=[x0, x1], y=[e[metric]] * 2, name=LABELS.get(m, m), mode="lines",
                                 line=dict(color=COLORS.get(m), dash="dot")))
    fig.add_vline(x=rank, line=dict(color="black", dash="dash"))
    if current:
        for m, v in current.items():
            if math.isfinite(v.get(metric, math.nan)):
                fig.add_trace(go.Scatter(x=[rank], y=[v[metric]], mode="markers", showlegend=False,
                                         name=f"{m} @ r", marker=dict(size=11, color=COLORS.get(m), symbol="diamond")))
    label = "SQNR (dB, higher is better)" if metric == "sqnr_db" else "relative MSE (lower is better)"
    fig.update_yaxes(title_text=label, type="log" if metric == "rel_mse" else "linear")
    fig.update_xaxes(title_text="rank r (16-bit directions)")
    fig.update_layout(title=f"{_short(layer)}: output error on held-out calibration tokens", **_LAYOUT)
    return fig


def all_layers_figure(rows: Sequence[Mapping[str, Any]], metric: str = "sqnr_db", title: str = "") -> go.Figure:
    """Every target's error: heat map (row 1: block × layer type) and bars in layer order (row 2,
    trace per layer type). The worst layers are the darkest cells / shortest SQNR bars."""
    types = list(dict.fromkeys(r["layer_type"] for r in rows))
    blocks = sorted({int(r["block"]) for r in rows})
    z = np.full((len(blocks), len(types)), np.nan)
    for r in rows:
        v = r[metric]
        z[blocks.index(int(r["block"])), types.index(r["layer_type"])] = v if math.isfinite(v) else np.nan
    fig = make_subplots(rows=2, cols=1, row_heights=[0.55, 0.45], vertical_spacing=0.2,
                        subplot_titles=["by block and layer type", "every layer, in order"])
    scale = "RdYlGn" if metric == "sqnr_db" else "RdYlGn_r"
    fig.add_trace(go.Heatmap(z=z, x=types, y=[f"block {b}" for b in blocks], colorscale=scale,
                             colorbar=dict(title="SQNR dB" if metric == "sqnr_db" else "rel MSE", len=0.5, y=0.78),
                             hovertemplate="%{y} %{x}: %{z:.3g}<extra></extra>"), row=1, col=1)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    for i, t in enumerate(types):
        sel = [r for r in rows if r["layer_type"] == t]
        fig.add_trace(go.Bar(x=[_short(r["name"]) for r in sel], y=[r[metric] for r in sel], name=t,
                             marker_color=palette[i % len(palette)]), row=2, col=1)
    fig.update_xaxes(categoryorder="array", categoryarray=[_short(r["name"]) for r in rows], showticklabels=False,
                     row=2, col=1)
    fig.update_yaxes(title_text="SQNR (dB)" if metric == "sqnr_db" else "relative MSE", row=2, col=1,
                     type="log" if metric == "rel_mse" else "linear")
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_layout(title=title or "per-layer output error", **dict(_LAYOUT, height=640))
    return fig


def cost_figure(layers: Sequence[Mapping[str, Any]], title: str = "") -> go.Figure:
    """Per block: extra 16-bit parameters (bars, left) and extra 16-bit FLOPs as % of the W4A4 GEMM
    (line, right). One bar per block (summed over its layers)."""
    blocks = sorted({int(c["block"]) for c in layers})
    p = [sum(c["extra_params16"] for c in layers if int(c["block"]) == b) for b in blocks]
    f = [100 * sum(c["flops16_extra"] for c in layers if int(c["block"]) == b)
         / max(sum(c["flops_w4a4"] for c in layers if int(c["block"]) == b), 1) for b in blocks]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=blocks, y=p, name="extra 16-bit parameters", marker_color="#1f77b4"), secondary_y=False)
    fig.add_trace(go.Scatter(x=blocks, y=f, name="extra 16-bit FLOPs (% of W4A4)", mode="lines+markers",
                             line=dict(color="#d62728")), secondary_y=True)
    fig.update_xaxes(title_text="block")
    fig.update_yaxes(title_text="parameters", secondary_y=False)
    fig.update_yaxes(title_text="% of W4A4 FLOPs", secondary_y=True, rangemode="tozero")
    fig.update_layout(title=title or "cost of the rank plan against plain W4A4", **dict(_LAYOUT, height=380))
    return fig


def empty_figure(message: str) -> go.Figure:
    """A blank figure carrying a message (before calibration, or on an error)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=15))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(template="plotly_white", height=300)
    return fig


__all__ = ["spectrum_figure", "outliers_figure", "error_vs_rank_figure", "all_layers_figure", "cost_figure",
           "empty_figure", "COLORS", "LABELS"]
