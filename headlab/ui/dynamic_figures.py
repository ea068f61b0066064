"""Plotly figures of the Dynamic page (pure: data in, figure out; no Streamlit).

- `token_map_figure`: tokens (rows) x layers (columns), the fraction of FFN channels (or query heads)
  each token keeps; an invisible marker per cell makes it clickable (customdata = [token, layer]).
- `cell_figure`: one token in one layer, every FFN channel as a point: the method's score against
  the oracle's true |act(gate) * up|, coloured by agreement with the oracle's top-k at the same count.
- `units_figure`: the same channels as a grid ("which units fired"), and the kept heads.
- `training_figures`: loss, KL and sparsity per training step; per-layer kept fraction and recall.
- `quality_speed_figure`: perplexity against measured decode speed-up, one point per method and sparsity.
- `layer_kept_figure`: FFN channels kept per token in each layer, one line per method (the mean over tokens)
  with a band from the 10th to the 90th percentile, from bench/results/dynamic_layers.csv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from headlab.engine.dynamic.inspect import TokenCell, TokenMap
from headlab.ui.figures import CATEGORICAL, PRUNED_COLOR

__all__ = ["AGREEMENT", "cell_figure", "layer_kept_figure", "quality_speed_figure", "token_map_figure",
           "training_figures", "units_figure"]

_FONT = {"size": 12}
_LEGEND_BELOW = {"orientation": "h", "y": -0.22}
KEPT_COLOR = "#2f6f9f"
#: A channel's four cases against the oracle's top-k at the method's count: (name, colour).
AGREEMENT = (("kept, in the oracle's top-k", KEPT_COLOR), ("kept, the oracle would drop it", "#f2a541"),
             ("dropped, the oracle would keep it", PRUNED_COLOR), ("dropped by both", "#d9d9d9"))
_KEEP_SCALE = [[0.0, "#f7fbff"], [0.5, "#6baed6"], [1.0, "#08306b"]]


def _title(text: str, size: int = 14) -> dict:
    return {"text": text, "x": 0, "font": {"size": size}}


def _cases(cell: TokenCell) -> np.ndarray:
    """Per channel: 0..3, the index of its AGREEMENT case."""
    keep = cell.keep.numpy()
    top = np.zeros_like(keep)
    top[cell.oracle_top.numpy()] = True
    return np.where(keep, np.where(top, 0, 1), np.where(top, 2, 3))


def token_map_figure(tm: TokenMap, *, heads: bool = False, selected: tuple[int, int] | None = None) -> go.Figure:
    """The fraction of FFN channels (`heads`: query heads) kept per token and layer; click a cell to inspect it."""
    counts = (tm.heads_kept if heads else tm.channels_kept).numpy()  # (T, L)
    total = tm.n_heads if heads else tm.ffn_dim
    unit = "query heads" if heads else "FFN channels"
    T, L = counts.shape
    frac = counts / total
    hover = [[f"token {tm.tokens[t]}, layer {l}<br>{counts[t, l]} / {total} {unit} kept ({frac[t, l]:.0%})"
              for l in range(L)] for t in range(T)]
    fig = go.Figure(go.Heatmap(
        z=frac, x=list(range(L)), y=list(range(T)), zmin=0, zmax=1, colorscale=_KEEP_SCALE, xgap=1, ygap=1,
        hoverinfo="skip",  # the markers above carry the hover text: plotly clicks the point it hovers
        colorbar={"title": {"text": "kept", "side": "right"}, "thickness": 10, "tickformat": ".0%"},
    ))
    tt, ll = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
    row_px = 16
    fig.add_trace(go.Scatter(  # invisible, selectable: a click reports customdata = [token, layer]
        x=ll.ravel(), y=tt.ravel(), mode="markers", customdata=np.stack([tt.ravel(), ll.ravel()], axis=1),
        hovertext=[h for row in hover for h in row], hoverinfo="text", showlegend=False,
        marker={"size": row_px, "symbol": "square", "color": "rgba(0,0,0,0)"},
        selected={"marker": {"color": "rgba(0,0,0,0)"}}, unselected={"marker": {"opacity": 0}},
    ))
    if selected is not None and selected[0] < T and selected[1] < L:
        fig.add_trace(go.Scatter(x=[selected[1]], y=[selected[0]], mode="markers", hoverinfo="skip",
                                 showlegend=False, marker={"size": row_px, "symbol": "square-open",
                                                           "color": PRUNED_COLOR, "line": {"width": 2.5}}))
    fig.update_layout(title=_title(f"{'Query heads' if heads else 'FFN channels'} kept per token"),
                      height=max(260, row_px * T + 110), margin={"l": 10, "r": 10, "t": 40, "b": 40}, font=_FONT,
                      clickmode="event+select", dragmode=False)
    fig.update_xaxes(title_text="layer", range=[-0.5, L - 0.5], dtick=1 if L <= 16 else 2 if L <= 40 else 4,
                     fixedrange=True)
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=list(range(T)), ticktext=tm.tokens,
                     range=[T - 0.5, -0.5], fixedrange=True, tickfont={"size": 11})
    return fig


def cell_figure(cell: TokenCell, method: str) -> go.Figure:
    """Every FFN channel of one token and layer: the method's score (y) against the oracle's (x, log scale)."""
    cases = _cases(cell)
    oracle = np.maximum(cell.oracle.numpy(), 1e-12)
    scores = cell.scores.numpy()
    log_y = bool((scores > 0).all())
    fig = go.Figure()
    for i, (name, colour) in enumerate(AGREEMENT):
        idx = np.nonzero(cases == i)[0]
        fig.add_trace(go.Scatter(  # SVG: 1-2k points draw fast, and need no WebGL
            x=oracle[idx], y=scores[idx], mode="markers", name=f"{name} ({idx.size})", customdata=idx,
            marker={"size": 5, "color": colour, "opacity": 0.85},
            hovertemplate="channel %{customdata}<br>oracle |act(gate) * up| %{x:.3g}<br>" + method
            + " score %{y:.3g}<extra></extra>"))
    if math.isfinite(cell.threshold):
        fig.add_trace(go.Scatter(x=[float(oracle.min()), float(oracle.max())], y=[cell.threshold] * 2, mode="lines",
                                 name="threshold", line={"dash": "dash", "color": "grey"}, hoverinfo="skip"))
    fig.update_layout(title=_title(f"Token {cell.label}, layer {cell.layer}: {method} score vs the oracle"),
                      height=420, margin={"l": 60, "r": 10, "t": 40, "b": 50}, font=_FONT,
                      legend={"orientation": "h", "y": -0.3})
    decades = {"type": "log", "dtick": 1, "exponentformat": "power"}  # one labelled tick per decade
    fig.update_xaxes(title_text="oracle: |act(gate) * up| of the dense model (log)", **decades)
    fig.update_yaxes(title_text=f"{method} score" + (" (log)" if log_y else ""), **(decades if log_y else {}))
    return fig


def units_figure(cell: TokenCell, columns: int = 64) -> go.Figure:
    """The token's FFN channels as a grid coloured by AGREEMENT; with predicted heads, a last row of its query heads."""
    cases = _cases(cell).astype(float)
    F = cases.size
    cells = [(float(c), f"FFN channel {j}: {AGREEMENT[int(c)][0]}") for j, c in enumerate(cases)]
    cells += [(math.nan, "")] * (-F % columns)  # the last channel row, padded
    if cell.heads is not None:  # a blank row, then the heads: kept in the "kept" colour, dropped in grey
        cells += [(math.nan, "")] * columns
        cells += [(0.0 if k else 3.0, f"query head {h}: {'kept' if k else 'dropped'}")
                  for h, k in enumerate(cell.heads.tolist())]
        cells += [(math.nan, "")] * (-len(cells) % columns)
    rows = len(cells) // columns
    z = np.array([v for v, _ in cells]).reshape(rows, columns)
    text = np.array([t for _, t in cells], dtype=object).reshape(rows, columns)
    n = len(AGREEMENT)
    scale = [[v, c] for i, (_, c) in enumerate(AGREEMENT) for v in (i / n, (i + 1) / n)]
    fig = go.Figure(go.Heatmap(z=z, zmin=-0.5, zmax=n - 0.5, colorscale=scale, showscale=False, xgap=1, ygap=1,
                               hovertext=text, hoverinfo="text"))
    title = f"Units fired: {int(cell.keep.sum())} of {F} FFN channels ({columns} per row)"
    if cell.heads is not None:
        title += f"; last row: {int(cell.heads.sum())} of {cell.heads.numel()} heads"
    fig.update_layout(title=_title(title, 13), height=60 + 9 * rows + 40,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10}, font=_FONT)
    fig.update_xaxes(visible=False, fixedrange=True)
    fig.update_yaxes(visible=False, autorange="reversed", fixedrange=True)
    return fig


def training_figures(history: Sequence[dict], target: float, agreement: Sequence | None = None
                     ) -> tuple[go.Figure, go.Figure | None]:
    """Loss, KL and sparsity (vs the target) per step; with `agreement`, kept fraction, recall, precision per layer."""
    steps = [h["step"] for h in history]
    curve = go.Figure([go.Scatter(x=steps, y=[h["loss"] for h in history], name="loss"),
                       go.Scatter(x=steps, y=[h["kl"] for h in history], name="KL to dense"),
                       go.Scatter(x=steps, y=[h["ffn_sparsity"] for h in history], yaxis="y2", name="FFN sparsity"),
                       go.Scatter(x=steps, y=[target] * len(steps), yaxis="y2", name="target",
                                  line={"dash": "dash", "color": "grey"})])
    if history and history[-1].get("head_sparsity") is not None:
        curve.add_trace(go.Scatter(x=steps, y=[h["head_sparsity"] for h in history], yaxis="y2",
                                   name="head sparsity"))
    curve.update_layout(height=300, margin={"l": 60, "r": 60, "t": 30, "b": 40}, font=_FONT,
                        title=_title("Training"), legend=_LEGEND_BELOW, xaxis={"title": "step"},
                        yaxis={"title": "loss"},
                        yaxis2={"title": "sparsity", "overlaying": "y", "side": "right", "range": [0, 1],
                                "tickformat": ".0%", "dtick": 0.25, "showgrid": False})
    if not agreement:
        return curve, gate_activity_figure(history)
    layers = [a.layer for a in agreement]
    per_layer = go.Figure([
        go.Bar(x=layers, y=[a.kept for a in agreement], name="channels kept", marker_color=KEPT_COLOR),
        go.Scatter(x=layers, y=[a.recall for a in agreement], name="recall vs oracle", mode="lines+markers"),
        go.Scatter(x=layers, y=[a.precision for a in agreement], name="precision vs oracle", mode="lines+markers"),
    ])
    per_layer.update_layout(height=300, margin={"l": 60, "r": 10, "t": 30, "b": 40}, font=_FONT,
                            title=_title("Per layer, on held-out text"), legend=_LEGEND_BELOW, xaxis={"title": "layer"},
                            yaxis={"range": [0, 1.02], "tickformat": ".0%"})
    return curve, per_layer


def gate_activity_figure(history: Sequence[dict]) -> go.Figure | None:
    """Live gate activity while training: the fraction of FFN channels each layer dropped, per step (layers x steps)."""
    rows = [h for h in history if h.get("layer_sparsity")]
    if not rows:
        return None
    z = [[h["layer_sparsity"][layer] for h in rows] for layer in range(len(rows[0]["layer_sparsity"]))]
    fig = go.Figure(go.Heatmap(z=z, x=[h["step"] for h in rows], colorscale="Blues", zmin=0, zmax=1,
                               colorbar={"title": "dropped", "tickformat": ".0%"},
                               hovertemplate="step %{x}, layer %{y}: %{z:.1%} of channels dropped<extra></extra>"))
    fig.update_layout(height=300, margin={"l": 60, "r": 10, "t": 30, "b": 40}, font=_FONT,
                      title=_title("Gate activity: channels dropped per layer, per step"),
                      xaxis={"title": "step"}, yaxis={"title": "layer", "autorange": "reversed"})
    return fig


def quality_speed_figure(points: pd.DataFrame, dense_perplexity: float | None) -> go.Figure:
    """Perplexity (log) against measured decode speed-up; `points` has method, target, perplexity, speedup."""
    fig = go.Figure()
    for method, rows in points.groupby("method", sort=False):
        rows = rows.sort_values("target")
        fig.add_trace(go.Scatter(
            x=rows["speedup"], y=rows["perplexity"], mode="lines+markers+text", name=str(method),
            text=[f"{t:.0%}" for t in rows["target"]], textposition="top center",
            hovertemplate=f"{method}: " + "%{text} sparsity<br>speed-up %{x:.2f}x<br>perplexity %{y:.2f}"
            "<extra></extra>"))
    if dense_perplexity is not None:
        fig.add_trace(go.Scatter(x=[1.0], y=[dense_perplexity], mode="markers", name=f"dense ({dense_perplexity:.2f})",
                                 marker={"symbol": "star", "size": 12, "color": "black"}))
    fig.add_vline(x=1.0, line={"dash": "dot", "color": "grey"})
    fig.update_layout(title=_title("Quality vs speed: perplexity against measured decode speed-up"),
                      height=380, margin={"l": 60, "r": 10, "t": 40, "b": 50}, font=_FONT, legend=_LEGEND_BELOW)
    fig.update_xaxes(title_text="decode speed-up over dense (tokens/s ratio)", ticksuffix="x")
    fig.update_yaxes(title_text="perplexity (log scale)", type="log")
    return fig


def _translucent(colour: str, alpha: float) -> str:
    """rgba() of a "#rrggbb" colour at opacity `alpha`."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def layer_kept_figure(layers: pd.DataFrame, target: float) -> go.Figure:
    """Kept FFN channels per token against layer at one target sparsity: per method a line (mean over tokens) and a
    band (10th to 90th percentile); `layers` has method, target, layer, ffn_dim, kept_mean, kept_p10, kept_p90."""
    rows = layers[layers["target"].round(3) == round(target, 3)]
    ffn_dim = int(rows["ffn_dim"].max()) if len(rows) else 0
    fig = go.Figure()
    for i, (method, r) in enumerate(rows.groupby("method", sort=False)):
        r = r.sort_values("layer")
        colour = CATEGORICAL[i % len(CATEGORICAL)]
        if not colour.startswith("#") or len(colour) != 7:
            colour = KEPT_COLOR
        x = r["layer"].tolist()
        low, high, mean = (r[c] / r["ffn_dim"] for c in ("kept_p10", "kept_p90", "kept_mean"))
        fig.add_trace(go.Scatter(  # the band: 90th percentile forward, 10th back, filled
            x=x + x[::-1], y=high.tolist() + low.tolist()[::-1], fill="toself", mode="lines",
            line={"width": 0}, fillcolor=_translucent(colour, 0.15), legendgroup=str(method), showlegend=False,
            hoverinfo="skip", name=f"{method} 10th-90th percentile"))
        fig.add_trace(go.Scatter(
            x=x, y=mean, mode="lines+markers", name=str(method), legendgroup=str(method),
            line={"color": colour, "width": 2}, marker={"size": 4},
            customdata=np.stack([r["kept_mean"], r["kept_p10"], r["kept_p90"]], axis=1),
            hovertemplate=f"{method}, layer " + "%{x}<br>mean %{customdata[0]:.0f} channels kept per token "
            "(%{y:.0%})<br>10th-90th percentile over tokens: %{customdata[1]:.0f}-%{customdata[2]:.0f}<extra></extra>"))
    if len(rows):
        fig.add_hline(y=1.0 - target, line={"dash": "dot", "color": "grey"},
                      annotation_text=f"target: {1 - target:.0%} kept on average", annotation_position="top left")
    fig.update_layout(title=_title(f"FFN channels kept per token, by layer, at {target:.0%} target sparsity "
                                   "(line: mean over tokens; band: 10th-90th percentile)"),
                      height=420, margin={"l": 70, "r": 10, "t": 40, "b": 50}, font=_FONT, legend=_LEGEND_BELOW)
    n_layers = int(rows["layer"].max()) + 1 if len(rows) else 1
    fig.update_xaxes(title_text="layer", dtick=1 if n_layers <= 16 else 2 if n_layers <= 40 else 4)
    fig.update_yaxes(title_text=f"FFN channels kept per token (of {ffn_dim})" if ffn_dim else "FFN channels kept",
                     tickformat=".0%", rangemode="tozero")
    return fig
