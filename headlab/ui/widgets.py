"""Streamlit pieces several pages share: the clickable head grid, perplexity metrics, a toggle form."""

from __future__ import annotations

import streamlit as st

from headlab.engine.core.adapter import Geometry
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, PerplexityResult
from headlab.engine.runtime.paired_bootstrap import change_interval
from headlab.ui import session
from headlab.ui.head_grid import GridView, head_grid

__all__ = ["clickable_head_grid", "perplexity_metrics", "toggle_form"]


def clickable_head_grid(view: GridView, key: str) -> None:
    """Draw a head grid (headlab.ui.head_grid views); each click on a cell toggles that head in the session's mask.

    Clicks are applied before the script runs (the grid's callback), each once and in order. A
    click this run's script has not seen applied yet (its callback did not run) is applied now
    and the script reruns, so the page never shows a mask without it.
    """
    applied = session.click_acks(key)
    clicks = head_grid(view, key=key, applied=applied,
                       on_clicks=lambda: session.apply_clicks(key, (st.session_state.get(key) or {}).get("clicks")))
    if session.apply_clicks(key, clicks):
        st.rerun()


def perplexity_metrics(dense: PerplexityResult, current: PerplexityResult, *, label: str = "Perplexity") -> None:
    """Dense vs current-mask perplexity side by side, with what the live evaluation covers."""
    c1, c2, c3 = st.columns([1, 1, 2])
    c1.metric(f"{label}, dense", f"{dense.perplexity:.3f}")
    delta = current.perplexity - dense.perplexity
    # Always a delta line ("no change" for the dense mask), so what is drawn below never moves when one appears.
    c2.metric(f"{label}, with mask", f"{current.perplexity:.3f}", delta=f"{delta:+.3f}" if delta else "no change",
              delta_color="inverse" if delta else "off", delta_arrow="auto" if delta else "off")
    run = session.last_live_run()
    timing = ""
    if run is not None and not run.reused_result:
        last = session.handle().geometry.n_layers - 1
        timing = f" Last change re-ran layers {run.start_layer}-{last} in {run.seconds:.2f} s."
    p = current.protocol
    plural = "s" if p.n_windows > 1 else ""
    count = f"{p.n_windows} " if p.n_windows > 1 else ""
    windows = (f"the first {count}window{plural} of {p.window}"
               if p.window == DEFAULT_PROTOCOL.window and p.stride == DEFAULT_PROTOCOL.stride
               else f"{p.n_windows} window{plural} of {p.window}")
    noise = ""
    if delta and dense.token_nll is not None and current.token_nll is not None:
        noise = f" Change {change_interval(dense.token_nll, current.token_nll).describe()}."
    c3.caption(f"Live evaluation: {current.n_tokens} scored tokens of WikiText-2 test, {windows} "
               f"(the pinned protocol: {DEFAULT_PROTOCOL.n_windows} x {DEFAULT_PROTOCOL.window}).{noise}{timing}")


def toggle_form(g: Geometry, key: str) -> None:
    """A layer / head picker with a button, for toggling a head without the grid."""
    def submit() -> None:
        session.toggle([(int(st.session_state[f"{key}.layer"]), int(st.session_state[f"{key}.head"]))])

    with st.form(key, border=False):
        c1, c2, c3 = st.columns([1, 1, 1], vertical_alignment="bottom")
        c1.number_input("Layer", 0, g.n_layers - 1, 0, key=f"{key}.layer")
        c2.number_input("Head", 0, g.n_heads - 1, 0, key=f"{key}.head")
        c3.form_submit_button("Switch head off / on", on_click=submit, width="stretch")
