"""Prune: choose a criterion, a budget and a scope (or click heads), and watch perplexity and text respond."""

import streamlit as st

from headlab.engine.core.mask import UNIT_KINDS, UNIT_WORDS
from headlab.engine.importance.registry import criteria_for
from headlab.engine.pruning.select import select
from headlab.engine.runtime.paired_bootstrap import change_interval
from headlab.ui import compute, curves, figures, head_grid, jobs, keys, session, widgets
from headlab.ui.errors import user_errors
from headlab.ui.suggest import HEADS_BOARD, SIZE_BOARD, suggest_panel

DEFAULT_GEN_PROMPT = "Explain in two sentences why the sky is blue."

st.title("Prune")
with user_errors():
    handle = session.handle()
    scores = session.scores()
g = handle.geometry
# The criteria offered for each unit: those scoring it that the app's shared pass computed, the unit's default first.
criteria_offered = {unit: tuple(c for c in criteria_for(unit) if c in scores) for unit in UNIT_KINDS}
model_key = session.model_choice().key
for key, value in ((keys.W_PRUNE_UNIT, "heads"), (keys.W_PRUNE_BUDGET, 0.0), (keys.W_PRUNE_SCOPE, "global"),
                   (keys.W_PRUNE_KV, False), (keys.W_GEN_PROMPT, DEFAULT_GEN_PROMPT), (keys.W_GEN_TOKENS, 32)):
    session.widget_default(key, value)


def apply_selection() -> None:
    """Re-select the chosen unit from the controls, on top of the mask's other units."""
    unit = st.session_state[keys.W_PRUNE_UNIT]
    criterion = st.session_state.get(keys.W_PRUNE_CRITERION, criteria_offered[unit][0])
    if criterion not in criteria_offered[unit]:
        criterion = st.session_state[keys.W_PRUNE_CRITERION] = criteria_offered[unit][0]
    scope = st.session_state[keys.W_PRUNE_SCOPE] if unit != "blocks" else "global"
    with user_errors(stop=False):
        session.set_mask(select(g, scores[criterion], float(st.session_state[keys.W_PRUNE_BUDGET]), unit=unit,
                                scope=scope, kv_groups=bool(st.session_state[keys.W_PRUNE_KV]) and unit == "heads",
                                base=session.mask().reset_unit(unit)))


def change_unit() -> None:
    """A new unit starts from its own natural criterion (ShortGPT's block influence for sub-blocks)."""
    st.session_state[keys.W_PRUNE_CRITERION] = criteria_offered[st.session_state[keys.W_PRUNE_UNIT]][0]
    apply_selection()


c1, c2, c3, c4 = st.columns([1.3, 1, 1.4, 1])
unit = c1.radio("Prune", UNIT_KINDS, format_func=UNIT_WORDS.get, horizontal=True, key=keys.W_PRUNE_UNIT,
                on_change=change_unit)
session.widget_default(keys.W_PRUNE_CRITERION, criteria_offered[unit][0])
if st.session_state[keys.W_PRUNE_CRITERION] not in criteria_offered[unit]:
    st.session_state[keys.W_PRUNE_CRITERION] = criteria_offered[unit][0]
c2.selectbox("Criterion", criteria_offered[unit], key=keys.W_PRUNE_CRITERION, on_change=apply_selection,
             help="Units with the lowest importance under this criterion are pruned first.")
c3.slider(f"Fraction of {UNIT_WORDS[unit]} to prune", 0.0, 0.9, step=0.05, key=keys.W_PRUNE_BUDGET,
          on_change=apply_selection)
c4.selectbox("Scope", ["global", "uniform"], key=keys.W_PRUNE_SCOPE, on_change=apply_selection,
             disabled=unit == "blocks", help="global: one ranking over the model; uniform: the same count per layer")
c4.checkbox("Whole KV groups", key=keys.W_PRUNE_KV, on_change=apply_selection,
            disabled=unit != "heads" or g.group_size == 1,
            help="Prune a KV head with all the query heads reading it (removes its K/V weights too).")
# open while a suggestion is running or was made (also after a reload, when a job runs for this model)
suggesting = (keys.SUGGESTION in st.session_state or keys.SUGGEST_JOB in st.session_state
              or any(jobs.running(board, f"{session.model_choice().key}|") for board in (HEADS_BOARD, SIZE_BOARD)))
with st.expander("Suggest mask: the strongest measured method for a budget of heads or of parameters (width, depth)",
                 expanded=suggesting):
    suggest_panel(handle)
mask = session.mask()

left, right = st.columns([1, 2])
with left:
    widgets.clickable_head_grid(head_grid.gate_view(mask, g.group_size, title="Mask: heads (click to switch)"),
                                key=keys.W_PRUNE_GRID)
with right:
    st.plotly_chart(figures.block_gates_figure(mask), config={"displayModeBar": False})
    if not handle.is_causal_lm:
        st.info("This model is an encoder (no LM head): perplexity and generation need a causal language model.")
        st.stop()
    with user_errors(), st.spinner("Perplexity under this mask (re-running the layers from the first change)...",
                                   show_time=True):
        dense, current = session.live_perplexity(None), session.live_perplexity(mask)
    widgets.perplexity_metrics(dense, current)
    full = {label: compute.known_full_perplexity(model_key, m) for label, m in (("dense", None), ("with mask", mask))}
    agree = compute.known_full_agreement(model_key, mask)
    if (None in full.values() or agree is None) and st.button(
            "Full evaluation (12 x 512 tokens)",
            help="The pinned protocol: perplexity with its change's interval, top-1 and greedy agreement with the "
                 "dense model"):
        bar = st.progress(0.0, text="Full evaluation")
        with user_errors():
            for label, m in (("dense", None), ("with mask", mask)):
                full[label] = compute.full_perplexity(handle, model_key, m, lambda d, t, lb=label: bar.progress(
                    d / t, text=f"Full evaluation, {lb}: {d}/{t} windows"))
            agree = compute.full_agreement(handle, model_key, mask, lambda d, t: bar.progress(
                d / t, text=f"Agreement with the dense model: {d}/{t} windows"))
        bar.empty()
    for label, r in full.items():
        if r is not None:
            st.caption(f"Full evaluation, {label}: {r.describe()}")
    if all(r is not None and r.token_nll is not None for r in full.values()) and full["dense"] != full["with mask"]:
        change = change_interval(full["dense"].token_nll, full["with mask"].token_nll)
        st.caption(f"Full evaluation, change: {change.describe()}")
    if agree is not None:
        st.caption(f"Against the dense model on the same windows: {agree.describe()}")

    st.markdown("**Generation** (greedy)")
    p1, p2 = st.columns([4, 1])
    prompt = p1.text_input("Prompt", key=keys.W_GEN_PROMPT)
    n_new = p2.number_input("New tokens", 8, 128, step=8, key=keys.W_GEN_TOKENS)
    for column, (label, m) in zip(st.columns(2), (("Dense", None), ("With the mask", mask))):
        with column, user_errors(stop=False), st.spinner(f"Generating ({label.lower()})...", show_time=True):
            column.markdown(f"*{label}*")
            column.text(compute.generation(handle, model_key, prompt, m, int(n_new)) or "(nothing generated)")

st.subheader(f"Perplexity vs fraction of {UNIT_WORDS[unit]} pruned")
if unit == "blocks":
    st.caption("Curves are drawn for heads and FFN channels.")
    st.stop()
calibration_key = session.calibration().describe()
job = curves.curve_job(model_key, calibration_key, unit)
if job is None:
    st.caption(f"Each criterion prunes {', '.join(f'{f:.0%}' for f in curves.CURVE_FRACTIONS)} of the "
               f"{UNIT_WORDS[unit]} (global ranking); perplexity on the live evaluation text. Runs in the background.")
    if st.button("Compute the curves"):
        curves.start_curve_job(handle, model_key, calibration_key, unit, scores, criteria_offered[unit])
        st.rerun()
else:
    polling = not job.finished

    @st.fragment(run_every=1.0 if polling else None)
    def curve_panel() -> None:
        if job.error:
            st.error(f"The curves could not be computed: {job.error}")
        elif not job.finished:
            st.progress(job.done / max(job.total, 1), text=f"Computing curves: {job.done}/{job.total} points")
        elif polling:
            st.rerun()  # finished while polling: one full run redraws the page without the timer
        if any(job.points.values()):
            st.plotly_chart(figures.curve_figure(job.points, dense.perplexity, unit=UNIT_WORDS[unit]),
                            config={"displayModeBar": False}, key=keys.CHART_PRUNE_CURVE)

    curve_panel()
