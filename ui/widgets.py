"""Streamlit pieces several pages share: the clickable head grid, perplexity metrics, a toggle form."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from engine.core.adapter import Geometry
from engine.runtime.evaluate import PerplexityResult
from ui import session
from ui.figures import CLICK_TRACE_NAME

__all__ = ["clickable_head_grid", "perplexity_metrics", "toggle_form"]


def _selected_cells(fig: go.Figure, event) -> list[tuple[int, int]]:
    click_curve = next(i for i, t in enumerate(fig.data) if t.name == CLICK_TRACE_NAME)
    cells = set()
    for p in event.selection.get("points", []):
        # The click trace puts head h at x = h and layer l at y = l.
        if p.get("curve_number") == click_curve and p.get("x") is not None and p.get("y") is not None:
            cells.add((int(round(float(p["y"]))), int(round(float(p["x"])))))
    return sorted(cells)


def clickable_head_grid(fig: go.Figure, key: str) -> None:
    """Draw a layers x heads figure; a click on a cell toggles that head in the session's mask.

    The chart's key includes the mask version, so after a toggle the chart is a new widget
    with no selection, and clicking the same cell again toggles it back.
    """
    widget_key = f"{key}.v{session.mask_version()}"

    def on_select() -> None:
        event = st.session_state.get(widget_key)
        if event is not None:
            session.toggle(_selected_cells(fig, event))

    st.plotly_chart(fig, key=widget_key, on_select=on_select, selection_mode="points",
                    config={"displayModeBar": False})


def perplexity_metrics(dense: PerplexityResult, current: PerplexityResult, *, label: str = "Perplexity") -> None:
    """Dense vs current-mask perplexity side by side, with what the live evaluation covers."""
    c1, c2, c3 = st.columns([1, 1, 2])
    c1.metric(f"{label}, dense", f"{dense.perplexity:.3f}")
    delta = current.perplexity - dense.perplexity
    c2.metric(f"{label}, with mask", f"{current.perplexity:.3f}", delta=f"{delta:+.3f}" if delta else None,
              delta_color="inverse")
    run = session.last_live_run()
    timing = ""
    if run is not None and not run.reused_result:
        last = session.handle().geometry.n_layers - 1
        timing = f" Last change re-ran layers {run.start_layer}-{last} in {run.seconds:.2f} s."
    c3.caption(f"Live evaluation: {current.n_tokens} scored tokens of WikiText-2 "
               f"({current.protocol.n_windows} windows of {current.protocol.window}).{timing}")


def toggle_form(g: Geometry, key: str) -> None:
    """A layer / head picker with a button, for toggling a head without the grid."""
    def submit() -> None:
        session.toggle([(int(st.session_state[f"{key}.layer"]), int(st.session_state[f"{key}.head"]))])

    with st.form(key, border=False):
        c1, c2, c3 = st.columns([1, 1, 1], vertical_alignment="bottom")
        c1.number_input("Layer", 0, g.n_layers - 1, 0, key=f"{key}.layer")
        c2.number_input("Head", 0, g.n_heads - 1, 0, key=f"{key}.head")
        c3.form_submit_button("Switch head off / on", on_click=submit, width="stretch")
