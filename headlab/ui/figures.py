"""Plotly figures of the app (pure: data in, figure out; no Streamlit).

Conventions: every cell has hover text; axes and colour bars are labelled. The clickable
layers x heads grids are not plotly figures: see headlab/ui/head_grid.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from headlab.engine.core.mask import PruneMask
from headlab.engine.runtime.attention_maps import AttentionMap

__all__ = [
    "CATEGORICAL",
    "PRUNED_COLOR",
    "GATE_COLORSCALE",
    "block_gates_figure",
    "attention_heatmap",
    "attention_small_multiples",
    "correlation_figure",
    "curve_figure",
]

PRUNED_COLOR = "#e4572e"
# Categories (clusters, prompt sets): ten hues that are all distinct (Tableau 10), then 26 more (Alphabet).
CATEGORICAL = [*px.colors.qualitative.T10, *px.colors.qualitative.Alphabet]
GATE_COLORSCALE = [[0.0, PRUNED_COLOR], [0.5, "#f6d8a8"], [1.0, "#2f6f9f"]]  # gate 0 (pruned) .. 1 (kept)
_FONT = dict(size=12)


def block_gates_figure(mask: PruneMask) -> go.Figure:
    """Per layer: ATTN and FFN sub-block gates and the fraction of FFN channels kept."""
    attn = mask.attn.detach().float().numpy()
    ffn_block = mask.ffn_block.detach().float().numpy()
    ffn_kept = mask.ffn_effective().detach().float().mean(dim=1).numpy()
    z = np.stack([attn, ffn_block, ffn_kept])  # (3, L)
    rows = ["ATTN sub-block", "FFN sub-block", "FFN channels kept"]
    L = z.shape[1]
    text = [[f"{rows[r]}, layer {l}: {z[r, l]:.3g}" for l in range(L)] for r in range(3)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(L)), y=rows, zmin=0, zmax=1, text=text, hoverinfo="text", xgap=1, ygap=2,
        colorscale=GATE_COLORSCALE,
        colorbar=dict(title=dict(text="gate / kept", side="right"), thickness=10),
    ))
    fig.update_layout(title=dict(text="Sub-blocks and FFN channels per layer", x=0, font=dict(size=14)),
                      height=190, margin=dict(l=130, r=10, t=40, b=40), font=_FONT)
    fig.update_xaxes(title_text="layer", dtick=1 if L <= 16 else 2 if L <= 40 else 4, fixedrange=True)
    fig.update_yaxes(autorange="reversed", fixedrange=True)
    return fig


def _colour_ticks(zmax: float, power: float) -> dict:
    """Colour-bar ticks labelled with true probabilities when the colours are drawn as p**power."""
    vals = [v for v in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0) if v <= zmax + 1e-9]
    return dict(tickvals=[v**power for v in vals], ticktext=[f"{v:g}" for v in vals])


def _axis_ticks(labels: Sequence[str], limit: int = 48) -> dict:
    n = len(labels)
    step = max(1, math.ceil(n / limit))
    idx = list(range(0, n, step))
    return dict(tickmode="array", tickvals=idx, ticktext=[labels[i] for i in idx])


def _hover_matrix(m: AttentionMap, head: int) -> list[list[str]]:
    p = m.probs[head]
    return [[f"query {m.query_hover[i]}<br>key {m.key_hover[j]}<br>p = {float(p[i, j]):.4f}"
             for j in range(p.shape[1])] for i in range(p.shape[0])]


def attention_heatmap(m: AttentionMap, head: int, *, title: str, power: float = 0.5, height: int = 560) -> go.Figure:
    """One head's map: queries down, keys across, token (or bin) labels on both axes."""
    p = m.probs[head].numpy()
    zmax = float(max(p.max(), 1e-6))
    fig = go.Figure(go.Heatmap(
        z=p**power, zmin=0, zmax=zmax**power, colorscale="Blues", hovertext=_hover_matrix(m, head), hoverinfo="text",
        colorbar=dict(title=dict(text="attention", side="right"), thickness=10, **_colour_ticks(zmax, power)),
    ))
    fig.update_layout(title=dict(text=title, x=0, font=dict(size=14)), height=height, font=dict(size=11),
                      margin=dict(l=110, r=10, t=40, b=110))
    fig.update_xaxes(title_text="key (attended to)", tickangle=-60, **_axis_ticks(m.key_labels))
    fig.update_yaxes(title_text="query (attending)", autorange="reversed", **_axis_ticks(m.query_labels))
    return fig


def attention_small_multiples(m: AttentionMap, *, title: str, group_size: int = 1, power: float = 0.5,
                              cols: int | None = None) -> go.Figure:
    """Every head of the layer as a small map, one shared colour scale; pruned heads say so."""
    H = m.n_heads
    cols = cols or min(H, 4 if H > 9 else 3)
    rows = math.ceil(H / cols)
    names = []
    for h in range(H):
        tag = " - pruned" if float(m.head_gates[h]) == 0 else ""
        kv = f", KV {h // group_size}" if group_size > 1 else ""
        names.append(f"head {h}{kv}{tag}")
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.03, vertical_spacing=0.06)
    zmax = float(max(m.probs.max(), 1e-6))
    for h in range(H):
        fig.add_trace(go.Heatmap(z=m.probs[h].numpy() ** power, coloraxis="coloraxis",
                                 hovertext=_hover_matrix(m, h), hoverinfo="text"),
                      row=h // cols + 1, col=h % cols + 1)
    fig.update_layout(
        title=dict(text=title, x=0, font=dict(size=14)), height=rows * 260 + 70, font=dict(size=11),
        margin=dict(l=20, r=10, t=70, b=20),
        coloraxis=dict(colorscale="Blues", cmin=0, cmax=zmax**power,
                       colorbar=dict(title=dict(text="attention", side="right"), thickness=10,
                                     **_colour_ticks(zmax, power))),
    )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    for ann in fig.layout.annotations:
        if ann.text.endswith("pruned"):
            ann.font = dict(color=PRUNED_COLOR, size=12)
    return fig


def correlation_figure(corr) -> go.Figure:
    """Spearman correlation between criteria, annotated."""
    names = list(corr.columns)
    z = corr.to_numpy()
    fig = go.Figure(go.Heatmap(
        z=z, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu", text=np.round(z, 2), texttemplate="%{text}",
        hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
        colorbar=dict(title=dict(text="Spearman ρ", side="right"), thickness=10),
    ))
    fig.update_layout(title=dict(text="Do the criteria agree? (rank correlation over heads)", x=0, font=dict(size=14)),
                      height=360, margin=dict(l=90, r=10, t=40, b=60), font=_FONT)
    fig.update_yaxes(autorange="reversed")
    return fig


def curve_figure(points: dict[str, list[tuple[float, float]]], dense: float | None, *,
                 unit: str = "heads") -> go.Figure:
    """Perplexity against the fraction of `unit` pruned, one line per criterion (log y axis)."""
    fig = go.Figure()
    for name, pts in points.items():
        if pts:
            xs, ys = zip(*sorted(pts))
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name,
                                     hovertemplate=f"{name}: %{{x:.0%}} pruned, perplexity %{{y:.2f}}<extra></extra>"))
    if dense is not None and points:
        # A trace, not add_hline: a line annotation on a log axis takes log10 units and would stretch the axis.
        xs = [f for pts in points.values() for f, _ in pts] or [0.0, 1.0]
        fig.add_trace(go.Scatter(x=[min(xs), max(xs)], y=[dense, dense], mode="lines", name=f"dense ({dense:.2f})",
                                 line=dict(dash="dash", color="grey"), hoverinfo="skip"))
    fig.update_layout(title=dict(text=f"Perplexity vs fraction of {unit} pruned", x=0, font=dict(size=14)),
                      height=380, margin=dict(l=60, r=10, t=40, b=50), font=_FONT,
                      legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title_text=f"fraction of {unit} pruned", tickformat=".0%")
    fig.update_yaxes(title_text="perplexity (log scale)", type="log", dtick=1)  # one tick per decade
    return fig
