"""The clickable layers x heads grid: what it shows (pure views), how its clicks reach the mask.

A grid is a small Streamlit component (headlab/ui/assets/head_grid.js, .css: no plotly, nothing loaded
from outside). Its data, built here by `score_view` / `rank_view` / `gate_view`:

    {"title", "layers", "heads", "group" (heads per KV group), "cell_px",
     "colors": [css colour per cell, row-major], "hover": [text per cell],
     "pruned": [0/1 per cell] or None (no marks), "bar": {"title", "stops", "ticks": [[pos, label]]},
     "applied": {grid id: last applied click}}

Click identity: the browser numbers every click of a mounted grid (`seq`, counting from 1 per
grid id; a page load or page switch mounts a new grid with a new id) and keeps the clicks the
server has not acknowledged in the grid's `clicks` state, {"grid": id, "events": [[seq, layer,
head], ...]}. The server applies the events whose seq is above the last it applied for that id,
in seq order, then acknowledges them through `applied` in the next data. So a click is applied
once (a state sent again, or several states coalesced into the newest, changes nothing), in
order, and never lost while the app is busy (the newest state holds every pending click).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import streamlit as st
from plotly.colors import get_colorscale, sample_colorscale

from headlab.engine.core.mask import PruneMask
from headlab.ui.figures import GATE_COLORSCALE

__all__ = ["Cell", "GridView", "score_view", "rank_view", "gate_view", "new_clicks", "head_grid"]

Cell = tuple[int, int]
GridView = dict[str, Any]
Applied = dict[str, int]  # grid id -> seq of the last click applied

_ASSETS = Path(__file__).resolve().parent / "assets"
_MAX_GRID_IDS = 32  # acknowledgements kept per grid key (one per mount: page loads and switches)

_component = st.components.v2.component(
    "headlab_head_grid",
    css=(_ASSETS / "head_grid.css").read_text(encoding="utf-8"),
    js=(_ASSETS / "head_grid.js").read_text(encoding="utf-8"),
)


def _cell_px(n_layers: int) -> int:
    return 18 if n_layers <= 32 else max(8, 576 // n_layers)


def _view(values: np.ndarray, *, title: str, colorscale: Any, zmin: float, zmax: float, reverse: bool,
          bar_title: str, ticks: Sequence[tuple[float, str]], group_size: int, pruned: np.ndarray | None,
          hover: list[list[str]]) -> GridView:
    scale = get_colorscale(colorscale) if isinstance(colorscale, str) else colorscale
    L, H = values.shape
    span = zmax - zmin if zmax > zmin else 1.0
    pos = np.clip((np.nan_to_num(values.astype(float), nan=zmin) - zmin) / span, 0.0, 1.0)
    at = (1.0 - pos) if reverse else pos
    stops = np.linspace(0.0, 1.0, 11)
    return {
        "title": title, "layers": L, "heads": H, "group": int(group_size), "cell_px": _cell_px(L),
        "colors": sample_colorscale(scale, at.ravel().tolist()),
        "hover": [hover[l][h] for l in range(L) for h in range(H)],
        "pruned": None if pruned is None else [int(p) for p in np.asarray(pruned, dtype=bool).ravel()],
        "bar": {"title": bar_title, "stops": sample_colorscale(scale, (1.0 - stops if reverse else stops).tolist()),
                "ticks": [[float(p), str(t)] for p, t in ticks]},
    }


def score_view(values: np.ndarray, *, title: str, bar_title: str, hover: list[list[str]], pruned: np.ndarray,
               group_size: int = 1, reverse: bool = False) -> GridView:
    """A criterion's values [L, H] on Viridis (`reverse` flips it so dark always means less useful), pruned marked."""
    values = np.asarray(values, dtype=float)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    ticks = [((v - lo) / (hi - lo) if hi > lo else 0.5, f"{v:.3g}") for v in np.linspace(lo, hi, 4)]
    return _view(values, title=title, colorscale="Viridis", zmin=lo, zmax=hi, reverse=reverse, bar_title=bar_title,
                 ticks=ticks, group_size=group_size, pruned=pruned, hover=hover)


def rank_view(importance: np.ndarray, *, title: str, hover: list[list[str]], pruned: np.ndarray,
              group_size: int = 1) -> GridView:
    """A criterion coloured by rank: darkest = least useful (pruned first), brightest = most useful."""
    imp = np.asarray(importance, dtype=float)
    order = np.argsort(imp.ravel(), kind="stable")
    pct = np.empty(imp.size)
    pct[order] = np.arange(imp.size) / max(imp.size - 1, 1)
    return _view(pct.reshape(imp.shape), title=title, colorscale="Viridis", zmin=0.0, zmax=1.0, reverse=False,
                 bar_title="rank", ticks=[(0.0, "least useful"), (1.0, "most useful")], group_size=group_size,
                 pruned=pruned, hover=hover)


def gate_view(mask: PruneMask, group_size: int = 1, *, title: str = "Heads kept (gate values)") -> GridView:
    """The mask's head gates [L, H] (sub-block removal folded in): 1 kept, 0 pruned, soft values between."""
    gates = mask.heads_effective().detach().float().numpy()
    L, H = gates.shape
    hover = [[f"layer {l}, head {h} (KV group {h // group_size}): gate {gates[l, h]:.3g}"
              + (" - pruned" if gates[l, h] == 0 else "") for h in range(H)] for l in range(L)]
    return _view(gates, title=title, colorscale=GATE_COLORSCALE, zmin=0.0, zmax=1.0, reverse=False, bar_title="gate",
                 ticks=[(0.0, "0 pruned"), (0.5, "0.5"), (1.0, "1 kept")], group_size=group_size, pruned=None,
                 hover=hover)


def new_clicks(state: Mapping[str, Any] | None, applied: Applied) -> tuple[list[Cell], Applied]:
    """The cells of `state`'s clicks not applied yet, in click order, and the acknowledgements after them.

    `state` is a grid's `clicks` state ({"grid": id, "events": [[seq, layer, head], ...]});
    anything malformed is ignored (the browser is not trusted).
    """
    if not isinstance(state, Mapping) or not isinstance(state.get("grid"), str):
        return [], applied
    grid, last = state["grid"], applied.get(state["grid"], 0)
    events = sorted((e for e in state.get("events") or () if _is_event(e) and e[0] > last), key=lambda e: e[0])
    if not events:
        return [], applied
    after = {k: v for k, v in applied.items() if k != grid}
    after[grid] = events[-1][0]
    while len(after) > _MAX_GRID_IDS:  # the oldest mounts first (dicts keep insertion order)
        del after[next(iter(after))]
    return [(int(e[1]), int(e[2])) for e in events], after


def _is_event(e: Any) -> bool:
    return isinstance(e, (list, tuple)) and len(e) == 3 and all(isinstance(v, int) and v >= 0 for v in e)


def head_grid(view: GridView, *, key: str, applied: Applied, on_clicks: Callable[[], None]) -> Mapping[str, Any] | None:
    """Draw the grid; `on_clicks` runs (before the script, as a widget callback) when its clicks change.

    Returns the grid's `clicks` state as this run saw it (None before the first click).
    """
    result = _component(key=key, data={**view, "applied": applied}, on_clicks_change=on_clicks, width="stretch")
    return result.get("clicks")
