"""Heads: every attention head scored by four criteria; click one to switch it off and watch perplexity."""

import streamlit as st

from headlab.ui import figures, head_grid, keys, session, tables, widgets
from headlab.ui.errors import user_errors
from headlab.ui.scoring import HEAD_CRITERIA

st.title("Heads")
with user_errors():
    handle = session.handle()
    g = handle.geometry
    scores = session.scores()
    mask = session.mask()
    # no spinner here: drawn above the grids, it would move them under a pointer while a click reruns the page
    live = (session.live_perplexity(None), session.live_perplexity(mask)) if handle.is_causal_lm else None

groups = f"; white lines separate the {g.n_kv_heads} groups of {g.group_size} heads sharing keys and values" \
    if g.group_size > 1 else ""
st.caption(f"{handle.name}: {g.n_layers} layers x {g.n_heads} heads{groups}. Scores from "
           f"{session.calibration().describe()}. **Click a head to switch it off (x) or on.**")
if live:
    widgets.perplexity_metrics(*live)
else:
    st.info("This model is an encoder (no LM head): no perplexity to watch, but scores, maps and masks all work.")

session.widget_default(keys.W_HEADS_COLOUR, "rank")
colour = st.radio("Colour by", ["rank", "value"], horizontal=True, key=keys.W_HEADS_COLOUR,
                  format_func={"rank": "rank (darkest = least useful)", "value": "the criterion's value"}.get)
pruned = (mask.heads_effective() == 0).numpy()
for column, name in zip(st.columns(len(HEAD_CRITERIA)), HEAD_CRITERIA):
    s = scores[name]
    common = dict(title=name, group_size=g.group_size, pruned=pruned, hover=tables.head_hover(s, g, mask))
    if colour == "rank":
        view = head_grid.rank_view(s.heads.numpy(), **common)
    else:
        view = head_grid.score_view(tables.display_statistic(s).numpy(), bar_title=tables.STATISTIC_LABELS[name],
                                    reverse=name == "entropy", **common)
    with column:
        widgets.clickable_head_grid(view, key=f"{keys.W_HEADS_GRID}.{name}")
with st.expander("Switch a head by number"):
    widgets.toggle_form(g, keys.FORM_HEADS_TOGGLE)

st.subheader("Least useful heads")
session.widget_default(keys.W_HEADS_RANK_BY, "gradient")
rank_by = st.selectbox("Rank by", HEAD_CRITERIA, key=keys.W_HEADS_RANK_BY)
table = tables.heads_table(scores, mask, g, rank_by)
event = st.dataframe(table, key=f"{keys.W_HEADS_TABLE}.v{session.mask_version()}", on_select="rerun",
                     selection_mode="multi-row", hide_index=True, height=320,
                     column_config={"gate": st.column_config.NumberColumn("gate", format="%.2g",
                                                                          help="1 kept, 0 pruned")})
cells = [(int(table.at[r, "layer"]), int(table.at[r, "head"])) for r in event.selection.rows]
c1, c2, _ = st.columns([1, 1, 2])
c1.button("Switch selected heads off / on", disabled=not cells, on_click=session.toggle, args=(cells,))
if c2.button("Show its attention", disabled=not cells,
             help="Opens the Attention page on the first selected head: what it attends to in a prompt"):
    st.session_state[keys.W_ATTN_LAYER], st.session_state[keys.W_ATTN_HEAD] = cells[0]
    st.switch_page("pages/attention.py")

st.subheader("Do the criteria agree?")
st.plotly_chart(figures.correlation_figure(tables.criteria_correlation(scores, list(HEAD_CRITERIA))),
                config={"displayModeBar": False})
