"""The "suggest mask" panel (for the Prune page).

    from headlab.ui.suggest import suggest_panel
    suggest_panel()          # budget + mode -> headlab.engine.pruning.strategies.suggest_mask -> apply, then edit by hand

Above the button, the plan of the first suggestion (headlab.ui.plan: estimated time and memory, from a
short timed probe). It runs on the session's shared engine `Calibration` (headlab.ui.scoring.shared_calibration: one per
model and calibration set, for every session and page): its capture pass is the one the
Heads page's scores came from, and the per-head ablation KLs the first suggestion measures (a
few CPU-minutes) stay in it, so every later budget, mode and session is instant or close to
it. The panel shows the method, the predicted and the measured perplexity (live protocol),
applies the mask to the session, and after hand edits recomputes the compensation biases for
the edited gates.
"""

from __future__ import annotations

import streamlit as st

from headlab.engine.core.handle import ModelHandle
from headlab.engine.pruning.compensation import compensate
from headlab.engine.pruning.strategies import (
    MODE_METHODS,
    MODES,
    SIZE_METHODS,
    Budget,
    Calibration,
    Suggestion,
    strategy_names,
    suggest_mask,
    suggest_size,
)
from headlab.engine.pruning.strategies.scores import ablation_scores, cached_ablation
from headlab.engine.runtime.plan import JobShape
from headlab.engine.runtime.prefix_cache import live_protocol
from headlab.engine.core.jobs import DONE
from headlab.ui import jobs, keys, session
from headlab.ui.errors import user_errors
from headlab.ui.plan import plan_notice
from headlab.ui.shared_cache import SharedCache, shared_cache

__all__ = ["HEAD_COSTS_BOARD", "head_costs_board", "head_costs_key", "shared_calibration", "start_head_costs",
           "suggest_panel"]

AUTO = "best for the mode"
# headlab.ui.jobs boards: the jobs outlive the page
HEADS_BOARD, SIZE_BOARD, HEAD_COSTS_BOARD = "suggest", "suggested_size", "head_costs"
TARGETS = ("heads", "parameters, by width", "parameters, by depth")
shared_calibration = session.calibration_data  # the name pages/diagnostics.py imports

MODE_HELP = {
    "fast": "one cut by each head's measured cost (mean-ablation KL), then compensation; instant once measured",
    "measured": "the same in 4 steps, re-measuring the heads near the cut under the pruned model (minutes)",
    "optimise": "a hard-concrete mask trained on KL to the dense model from that ranking (slowest)",
    "reconstruct": "per-layer counts from that ranking, heads chosen and kept weights re-solved layer by layer",
}


def _show(info: Suggestion) -> None:
    c1, c2, c3 = st.columns(3)
    c1.metric("Dense", f"{info.dense_perplexity:.2f}" if info.dense_perplexity else "-")
    c2.metric("Predicted", f"{info.predicted_perplexity:.2f}" if info.predicted_perplexity else "-",
              help="dense x exp(sum of the removed heads' single-head KL): assumes removals add up")
    c3.metric("Measured", f"{info.measured_perplexity:.2f}" if info.measured_perplexity else "-",
              delta=f"{info.measured_ratio:.2f}x dense" if info.measured_ratio else None, delta_color="off")
    st.caption(f"{info.method}: {info.budget}; calibration {info.calibration}; "
               f"{info.protocol or 'no perplexity (encoder)'}; {info.seconds:.0f} s")


def head_costs_board() -> SharedCache:
    """The process-wide board of per-head cost measurements (one job per model and calibration)."""
    return shared_cache(HEAD_COSTS_BOARD)  # the same board headlab.ui.jobs submits to and watches


def head_costs_key(model_key: str, calib: Calibration) -> str:
    return f"{model_key}|{calib.describe()}"


def _measure(handle: ModelHandle, calib: Calibration):
    return lambda report: ablation_scores(handle, calib, mean=True, progress=report)[0]


def start_head_costs(handle: ModelHandle, model_key: str, calib: Calibration) -> str:
    """Start (or join) the measurement of every head's mean-ablation KL; its job key on HEAD_COSTS_BOARD."""
    key = head_costs_key(model_key, calib)
    jobs.submit(HEAD_COSTS_BOARD, key, head_costs_label(model_key, calib), _measure(handle, calib))
    return key


def head_costs_label(model_key: str, calib: Calibration) -> str:
    return f"Measuring each head's cost ({model_key}, {calib.describe()})"


def _follow_job(model_key: str, board: str, prefix: str) -> None:
    """Show this session's suggestion job on `board` (or, after a reload, one running for this model) without
    blocking the page; apply its result once when it has finished, then rerun the page."""
    started = st.session_state.get(keys.SUGGEST_JOB)
    job_key = started[1] if started is not None and started[0] == board else None
    if job_key is None:
        others = jobs.running(board, prefix)
        if not others:
            return
        job_key = others[-1][0]  # started before a reload (another session): this session follows it from now on
        st.session_state[keys.SUGGEST_JOB] = (board, job_key)
    job = jobs.watch(board, job_key)
    if job is None or not jobs.take(job_key):
        return
    if job.state != DONE:
        st.error(f"{job.name} failed: {job.error}" if job.error else f"{job.name} was cancelled")
        return
    mask, info = job.result
    st.session_state[keys.SUGGESTION] = (model_key, mask, info)
    session.set_mask(mask)
    st.rerun()  # the sidebar (drawn before this page) and everything above the panel show the new mask


def _size_panel(handle: ModelHandle, model_key: str, route: str) -> None:
    """A parameter budget by `route`: the route's best measured method, computed once per (model, size, route)."""
    st.session_state.setdefault(keys.W_SUGGEST_PARAMS, 0.2)
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    c1.slider("Parameters to remove", 0.05, 0.5, step=0.05, key=keys.W_SUGGEST_PARAMS, format="%.2f",
              help=f"{route}: {SIZE_METHODS[route]} (the best of bench/bench_quality.py without training; minutes)")
    keep = round(1.0 - float(st.session_state[keys.W_SUGGEST_PARAMS]), 4)
    if c2.button("Suggest mask", type="primary", width="stretch", key=keys.W_SUGGEST_SIZE_BUTTON):
        job_key = f"{model_key}|size|{keep:.4f}|{route}"
        jobs.submit(SIZE_BOARD, job_key, f"Suggest mask: {1 - keep:.0%} of parameters by {route}",
                    lambda report: suggest_size(handle, keep, route, progress=report))  # on the shipped calibration
        st.session_state[keys.SUGGEST_JOB] = (SIZE_BOARD, job_key)
    _follow_job(model_key, SIZE_BOARD, f"{model_key}|size|")
    last = st.session_state.get(keys.SUGGESTION)
    if last is not None and last[0] == model_key and last[2].mode.startswith("size:"):
        _show(last[2])
        if session.mask() != last[1]:
            st.info("You edited the suggested mask: the re-solved weights of the layers you edited were dropped "
                    "(the other layers keep theirs).")


def suggest_panel(handle: ModelHandle | None = None) -> None:
    """Draw the panel (a suggestion runs as a job: headlab.ui.jobs; its mask is applied when it is done)."""
    handle = handle or session.handle()
    model_key = session.model_choice().key
    st.session_state.setdefault(keys.W_SUGGEST_BUDGET, 0.2)
    st.session_state.setdefault(keys.W_SUGGEST_MODE, "fast")
    st.session_state.setdefault(keys.W_SUGGEST_METHOD, AUTO)
    st.session_state.setdefault(keys.W_SUGGEST_TARGET, TARGETS[0])
    target = st.radio("Budget", TARGETS, key=keys.W_SUGGEST_TARGET, horizontal=True,
                      help="Heads: a fraction of the attention heads, by the mode's method. Parameters: a smaller "
                           "model by width (heads and FFN channels, structured OBS with the kept weights re-solved) "
                           "or by depth (whole layers by measured KL, the neighbours re-fitted to stand in).")
    if target != TARGETS[0]:
        return _size_panel(handle, model_key, "width" if target == TARGETS[1] else "depth")
    c1, c2, c3, c4 = st.columns([2, 2, 1.4, 1], vertical_alignment="bottom")
    c1.slider("Heads to remove", 0.05, 0.6, step=0.05, key=keys.W_SUGGEST_BUDGET, format="%.2f")
    c2.radio("Mode", MODES, key=keys.W_SUGGEST_MODE, horizontal=True,
             format_func=lambda m: f"{m} ({MODE_METHODS[m]})", help="; ".join(f"{m}: {h}" for m, h in MODE_HELP.items()))
    c3.selectbox("Method", [AUTO, *strategy_names(with_comp=True)], key=keys.W_SUGGEST_METHOD,
                 help="Any strategy by name (+comp: with FLAP compensation); the mode's best by default")
    clicked = c4.button("Suggest mask", type="primary", width="stretch")
    choice = session.calibration()
    plan_notice(handle, model_key, "suggest", JobShape(n_texts=choice.n_texts, max_length=choice.max_length,
                                                       eval_tokens=2 * live_protocol(handle).window))
    if clicked:
        calib = session.calibration_data()
        budget, mode = float(st.session_state[keys.W_SUGGEST_BUDGET]), st.session_state[keys.W_SUGGEST_MODE]
        method = st.session_state[keys.W_SUGGEST_METHOD]
        job_key = f"{model_key}|{calib.describe()}|heads|{budget:.4f}|{mode}|{method}"
        needs_costs = (method == AUTO or "ablation" in method) and cached_ablation(calib, mean=True) is None
        label = f"Suggest mask: {budget:.0%} of heads, {mode}" + (
            " (measuring each head's cost first, once per model; kept on disk)" if needs_costs else "")
        costs = head_costs_board()

        def run(report):
            if needs_costs:  # the one shared measurement (Diagnostics may have started it): its progress, here
                measuring = costs.job(head_costs_key(model_key, calib), _measure(handle, calib))
                measuring.name = head_costs_label(model_key, calib)
                measuring.outcome(report)
            return suggest_mask(handle, Budget(heads=budget), mode=mode, method=None if method == AUTO else method,
                                calib=calib, progress=report)

        jobs.submit(HEADS_BOARD, job_key, label, run)
        st.session_state[keys.SUGGEST_JOB] = (HEADS_BOARD, job_key)
    _follow_job(model_key, HEADS_BOARD, f"{model_key}|")
    last = st.session_state.get(keys.SUGGESTION)
    if last is not None and last[0] == model_key:
        _show(last[2])
        current = session.mask()
        if current.has_bias and current != last[1]:
            st.info("You edited the suggested mask: its compensation biases still describe the suggestion.")
            if st.button("Recompute compensation for my edits"):
                with user_errors(stop=False), st.spinner("Recomputing the mean biases..."):
                    edited = compensate(handle, current, session.calibration_data().stats(handle))
                    session.set_mask(edited)
                    st.session_state[keys.SUGGESTION] = (model_key, edited, last[2])
                    st.rerun()
