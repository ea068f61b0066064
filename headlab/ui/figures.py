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
    "attention_difference",
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
    """At most `limit` evenly spaced tick labels (every label when they fit); hover shows every token anyway."""
    n = len(labels)
    step = max(1, math.ceil(n / max(1, limit)))
    idx = list(range(0, n, step))
    return dict(tickmode="array", tickvals=idx, ticktext=[_short(labels[i]) for i in idx])


def _short(label: str, width: int = 12) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _hover_matrix(m: AttentionMap, head: int, diff: np.ndarray | None = None) -> list[list[str]]:
    """Hover text per cell: the query and key tokens and p, or (with `diff`) the masked-minus-dense change."""
    z, value = (m.probs[head].numpy(), "p = {:.4f}") if diff is None else (diff, "masked - dense = {:+.4f}")
    return [[f"query {m.query_hover[i]}<br>key {m.key_hover[j]}<br>" + value.format(float(z[i, j]))
             for j in range(z.shape[1])] for i in range(z.shape[0])]


def attention_difference(dense: AttentionMap, masked: AttentionMap) -> np.ndarray:
    """[H, Q, K] masked minus dense attention (the same prompt, layer and drawing options)."""
    if dense.probs.shape != masked.probs.shape:
        raise ValueError(f"the two maps differ in shape: {tuple(dense.probs.shape)} vs {tuple(masked.probs.shape)}")
    return (masked.probs - dense.probs).numpy()


def _signed_power(z: np.ndarray, power: float) -> np.ndarray:
    return np.sign(z) * np.abs(z) ** power


def _colour_scale(z: np.ndarray, power: float, diff: bool) -> tuple[np.ndarray, dict]:
    """(the values as drawn, the scale: colorscale, low, high, mid, colorbar) of attention (p**power from 0, Blues)
    or of a masked-minus-dense difference (a signed power, red/blue centred on 0)."""
    zmax = float(max(np.abs(z).max(), 1e-6))
    if not diff:
        bar = dict(title=dict(text="attention", side="right"), thickness=10, **_colour_ticks(zmax, power))
        return z**power, dict(colorscale="Blues", low=0.0, high=zmax**power, mid=None, colorbar=bar)
    bar = dict(title=dict(text="masked - dense", side="right"), thickness=10, **_signed_ticks(zmax, power))
    return _signed_power(z, power), dict(colorscale="RdBu_r", low=-(zmax**power), high=zmax**power, mid=0,
                                         colorbar=bar)


def attention_heatmap(m: AttentionMap, head: int, *, title: str, power: float = 0.5, height: int = 560,
                      diff: np.ndarray | None = None, max_labels: int = 40) -> go.Figure:
    """One head's map: queries down, keys across, token (or bin) labels on both axes, square cells.

    `diff` ([Q, K], masked minus dense): drawn instead of the probabilities on a diverging scale centred on 0
    (red: the mask adds attention there, blue: it takes attention away).
    """
    z, sc = _colour_scale(m.probs[head].numpy() if diff is None else diff, power, diff is not None)
    fig = go.Figure(go.Heatmap(z=z, zmin=sc["low"], zmax=sc["high"], zmid=sc["mid"], colorscale=sc["colorscale"],
                               colorbar=sc["colorbar"], hovertext=_hover_matrix(m, head, diff), hoverinfo="text"))
    fig.update_layout(title=dict(text=title, x=0, font=dict(size=14)), height=height, font=dict(size=10),
                      margin=dict(l=80, r=10, t=40, b=90))
    fig.update_xaxes(title_text="key (attended to)", tickangle=-90, constrain="domain",
                     **_axis_ticks(m.key_labels, max_labels))
    fig.update_yaxes(title_text="query (attending)", autorange="reversed", scaleanchor="x", constrain="domain",
                     **_axis_ticks(m.query_labels, max_labels))
    return fig


def _signed_ticks(zmax: float, power: float) -> dict:
    vals = [v for v in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0) if v <= zmax + 1e-9] or [zmax]
    ticks = [-v for v in reversed(vals)] + [0.0] + vals
    return dict(tickvals=[float(np.sign(v) * abs(v) ** power) for v in ticks], ticktext=[f"{v:+g}" for v in ticks])


def attention_small_multiples(m: AttentionMap, *, title: str, group_size: int = 1, power: float = 0.5,
                              cols: int | None = None, diff: np.ndarray | None = None,
                              max_labels: int = 12) -> go.Figure:
    """Every head of the layer as a small square map with token labels, one shared colour scale; pruned heads say
    so. `diff` ([H, Q, K], masked minus dense): the differences instead, on a diverging scale centred on 0."""
    H = m.n_heads
    cols = cols or min(H, 4 if H > 9 else 3)
    rows = math.ceil(H / cols)
    names = []
    for h in range(H):
        tag = " - pruned" if float(m.head_gates[h]) == 0 else ""
        kv = f", KV {h // group_size}" if group_size > 1 else ""
        names.append(f"head {h}{kv}{tag}")
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.08, vertical_spacing=0.1)
    drawn, sc = _colour_scale(m.probs.numpy() if diff is None else diff, power, diff is not None)  # one scale
    for h in range(H):
        fig.add_trace(go.Heatmap(z=drawn[h], coloraxis="coloraxis", hoverinfo="text",
                                 hovertext=_hover_matrix(m, h, None if diff is None else diff[h])),
                      row=h // cols + 1, col=h % cols + 1)
    fig.update_layout(
        title=dict(text=title, x=0, font=dict(size=14)), height=rows * 270 + 90, font=dict(size=10),
        margin=dict(l=60, r=10, t=70, b=50),
        coloraxis=dict(colorscale=sc["colorscale"], cmin=sc["low"], cmax=sc["high"], cmid=sc["mid"],
                       colorbar=sc["colorbar"]),
    )
    keys_ticks, query_ticks = _axis_ticks(m.key_labels, max_labels), _axis_ticks(m.query_labels, max_labels)
    for h in range(H):
        r, c = h // cols + 1, h % cols + 1
        fig.update_xaxes(tickangle=-90, tickfont=dict(size=9), constrain="domain", row=r, col=c, **keys_ticks)
        fig.update_yaxes(autorange="reversed", tickfont=dict(size=9), constrain="domain", row=r, col=c,
                         scaleanchor=f"x{'' if h == 0 else h + 1}", **query_ticks)
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
