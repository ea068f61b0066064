"""The Dynamic page's panels: token map and cell detail, generation, training, benchmarks (drawing only).

Every heavy step goes through headlab.ui.dynamic (shared cache or this session's background job) while a
progress bar is drawn here; a rerun ends the drawing, never the computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import streamlit as st

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.progress import Progress
from headlab.engine.dynamic.ipn import IPN
from headlab.engine.dynamic.methods import save_method
from headlab.ui import dynamic, keys
from headlab.ui.dynamic_figures import (
    cell_figure,
    layer_kept_figure,
    quality_speed_figure,
    token_map_figure,
    training_figures,
    units_figure,
)
from headlab.ui.errors import user_errors

__all__ = ["bench_layers_panel", "bench_panel", "generation_panel", "progress", "token_panel", "training_panel"]

_STATIC = {"displayModeBar": False}
_RECALL_HELP = ("Of the k channels with the largest true |act(gate) * up| (k = the count this token kept), the share "
                "the method kept.")


@contextlib.contextmanager
def progress(text: str) -> Iterator[Progress]:
    """A progress bar drawn while the body waits on a shared computation; removed afterwards."""
    slot = st.empty()

    def draw(done: int, total: int) -> None:
        slot.progress(min(done / total, 1.0) if total else 0.0, text=f"{text}...")

    draw(0, 1)
    try:
        yield draw
    finally:
        slot.empty()


def _select_cell(chart_key: str) -> None:
    """A click on a map: its cell becomes the inspected one (the token and layer inputs follow)."""
    points = ((st.session_state.get(chart_key) or {}).get("selection") or {}).get("points") or []
    for p in points:  # the map puts layer l at x = l and token t at y = t
        if p.get("x") is not None and p.get("y") is not None:
            st.session_state[keys.W_DYN_TOKEN] = round(float(p["y"]))
            st.session_state[keys.W_DYN_LAYER] = round(float(p["x"]))
            return


def _clamp(key: str, high: int) -> int:
    st.session_state[key] = max(0, min(int(st.session_state.get(key, 0)), high))
    return st.session_state[key]


def token_panel(handle: ModelHandle, model_key: str, chosen: dynamic.Chosen, prompt: str) -> None:
    """The tokens x layers map of kept channels (and heads); the clicked cell's channels against the oracle."""
    with progress("Running the prompt, dense and under the method") as p, user_errors():
        tm = dynamic.token_map(handle, model_key, chosen, prompt, p)
    rows = f"the first {dynamic.MAP_TOKENS} tokens of the prompt" if tm.n_tokens >= dynamic.MAP_TOKENS else "its tokens"
    st.caption(f"Rows: {rows}; columns: layers. Click a cell to see that token's units in that layer.")
    selected = (_clamp(keys.W_DYN_TOKEN, tm.n_tokens - 1), _clamp(keys.W_DYN_LAYER, tm.n_layers - 1))
    left, right = st.columns([1, 1])
    with left:
        maps = [(False, keys.CHART_DYN_MAP)] + ([(True, keys.CHART_DYN_HEADS_MAP)] if tm.heads_kept is not None else [])
        for column, (heads, key) in zip(st.columns(len(maps)), maps):
            with column:
                st.plotly_chart(token_map_figure(tm, heads=heads, selected=selected), key=key, config=_STATIC,
                                on_select=lambda k=key: _select_cell(k), selection_mode="points")
    with right:
        c1, c2 = st.columns(2)
        token = c1.number_input("Token", 0, tm.n_tokens - 1, key=keys.W_DYN_TOKEN)
        layer = c2.number_input("Layer", 0, tm.n_layers - 1, key=keys.W_DYN_LAYER)
        cell = tm.cell(int(token), int(layer))
        shown = [("FFN channels kept", f"{int(cell.keep.sum())} / {tm.ffn_dim}", None),
                 ("Oracle recall", f"{cell.recall:.0%}", _RECALL_HELP)]
        if cell.heads is not None:
            shown.append(("Query heads kept", f"{int(cell.heads.sum())} / {tm.n_heads}", None))
        for column, (label, value, help_text) in zip(st.columns(len(shown)), shown):
            column.metric(label, value, help=help_text)
        st.plotly_chart(cell_figure(cell, tm.method), key=keys.CHART_DYN_CELL, config=_STATIC)
        st.plotly_chart(units_figure(cell), key=keys.CHART_DYN_UNITS, config=_STATIC)


def generation_panel(handle: ModelHandle, model_key: str, chosen: dynamic.Chosen, prompt: str) -> None:
    """Dense and dynamic greedy decoding of the prompt side by side, with decoded tokens per second."""
    g1, g0, g2 = st.columns([1, 1, 2], vertical_alignment="bottom")
    n_new = int(g1.number_input("New tokens", 8, 128, step=8, key=keys.W_DYN_NEW_TOKENS))
    networks = isinstance(chosen.method, IPN)
    precision = g0.radio("FFN weights", dynamic.PRECISIONS, horizontal=True, key=keys.W_DYN_PRECISION,
                         format_func=lambda p: "4-bit" if p == "int4" else p, disabled=not networks,
                         help="4-bit: dense and dynamic both read the FFN at 16 levels per group of 32 inputs, the "
                              "precision the shipped models are stored at (importance networks only).")
    precision = precision if networks else "float32"
    request = (model_key, chosen.key, prompt, n_new, precision)
    if g2.button("Generate, dense and dynamic", type="primary"):
        st.session_state[keys.DYN_GENERATE] = request
    out = dynamic.known_generation(model_key, chosen, prompt, n_new, precision)
    if out is None and st.session_state.get(keys.DYN_GENERATE) == request:
        with progress("Decoding, dense then dynamic (timed)") as p, user_errors():
            out = dynamic.generation(handle, model_key, chosen, prompt, n_new, p, precision)
    if out is None:
        st.caption("Batch-1 greedy decoding with the KV cache (chat template), dense then under the method; tokens/s "
                   "count the decoded tokens, the prefill excluded. Timed once and shown to every session.")
        return
    left, right = st.columns(2)
    left.metric("Dense", f"{out.dense.decode_tokens_per_s:.1f} tokens/s")
    left.text(handle.tokenizer.decode(out.dense.new_tokens, skip_special_tokens=True) or "(nothing generated)")
    right.metric(chosen.label, f"{out.dynamic.decode_tokens_per_s:.1f} tokens/s",  # signed: the arrow follows it
                 delta=f"{out.speedup - 1:+.0%} ({out.speedup:.2f}x dense)",
                 delta_color="normal" if out.sparse_decode else "off")
    right.text(handle.tokenizer.decode(out.dynamic.new_tokens, skip_special_tokens=True) or "(nothing generated)")
    g = handle.geometry
    if out.sparse_decode:
        heads = "" if out.dynamic.heads is None else f", {out.dynamic.heads.float().mean():.1f} of {g.n_heads} heads"
        bits = " at 4 bits, as the dense model beside it" if precision == "int4" else ""
        path = (f"It read only each token's kept weights{bits}: on average {out.dynamic.kept.float().mean():.0f} of "
                f"{g.ffn_dim} FFN channels{heads} per layer; ideal speed-up from the weight bytes read "
                f"{out.ideal_speedup:.2f}x.")
    else:
        path = (f"It ran with hooks on the dense layers, every weight still read, so its speed says nothing about "
                f"the method ({out.note}).")
    st.caption(f"The first {out.same_tokens} of {n_new} new tokens agree. {path}")


def training_panel(handle: ModelHandle, model_key: str, target: float) -> None:
    """Train an IPN in the background (KL to the dense model + sparsity), with live loss, sparsity and agreement."""
    run = dynamic.training(model_key)
    running = run is not None and not run.job.finished
    with st.form(keys.FORM_DYN_TRAIN):
        f1, f2, f3 = st.columns(3)
        steps = int(f1.number_input("Steps", 1, 5000, key=keys.W_DYN_STEPS,
                                    help="One step = a forward and backward pass over 2 calibration windows of 256 "
                                         "tokens; the model stays frozen, only the network's parameters move."))
        heads = f2.checkbox("Also predict query heads", key=keys.W_DYN_HEADS)
        f3.caption(f"Target: {target:.0%} FFN sparsity (the slider above). Loss: KL to the dense model + a sparsity "
                   f"term driven to the target.")
        start = st.form_submit_button("Train the IPN", type="primary", disabled=running)
    if start and not running:
        with user_errors():
            run = dynamic.start_training(handle, model_key, target, steps, heads)
        running = True
    if run is None:
        st.caption("Training runs in the background: switching pages or changing settings does not stop it.")
        return
    if running and st.button("Stop training"):
        run.job.cancel()

    @st.fragment(run_every=1.0 if running else None)
    def live() -> None:
        job, history, total = run.job, run.history, run.config.steps
        done = history[-1]["step"] if history else 0
        last = f": loss {history[-1]['loss']:.4f}, FFN sparsity {history[-1]['ffn_sparsity']:.1%}" if history else ""
        if not job.finished:
            st.progress(done / total, text=f"{job.stage or 'Starting'}: step {done}/{total}{last}")
        if job.error:
            st.error(f"The training failed: {job.error}")
        result = run.result
        if history:
            curve, per_layer = training_figures(history, run.config.target, result.agreement if result else None)
            c1, c2 = st.columns(2)
            c1.plotly_chart(curve, key=keys.CHART_DYN_TRAINING, config=_STATIC)
            if per_layer is not None:
                c2.plotly_chart(per_layer, key=keys.CHART_DYN_LAYERS, config=_STATIC)
        if result is not None:
            st.success(f"Trained in {result.run.seconds:.0f} s ({len(history)} steps"
                       f"{', stopped early' if result.run.stopped else ''}); {result.run.measured_sparsity:.1%} FFN "
                       f"sparsity on the calibration windows. Choose \"{dynamic.METHOD_LABELS[dynamic.TRAINED]}\" "
                       f"above to inspect and evaluate it.")
        if running and job.finished:
            st.rerun()  # finished while polling: one full run redraws the page without the timer

    live()
    if run.result is not None:
        s1, s2 = st.columns([3, 1], vertical_alignment="bottom")
        folder = s1.text_input("Save the trained network to", key=keys.W_DYN_SAVE_FOLDER)
        if s2.button("Save"):
            with user_errors(stop=False):
                path = save_method(handle, run.result.ipn, folder, {"training": run.config.to_dict(),
                                                                     "history": run.history})
                st.success(f"Wrote {path} (ipn.safetensors + ipn.json); `python -m headlab dynamic-eval --load "
                           f"{path}` evaluates it from the command line.")


def bench_panel() -> None:
    """Perplexity against measured decode speed-up from the benchmark CSVs, or what is missing and how to make it."""
    points, dense, notes = dynamic.bench_points()
    sources = (f"perplexity from {dynamic.bench_source(dynamic.BENCH_QUALITY)}, decode speed-up from "
               f"{dynamic.bench_source(dynamic.BENCH_DECODE)}")
    if points is None:
        st.info(f"No quality/speed chart yet: {'; '.join(notes)}. The chart puts one point per method and sparsity: "
                f"{sources}.")
        return
    st.plotly_chart(quality_speed_figure(points, dense), key=keys.CHART_DYN_QUALITY, config=_STATIC)
    st.caption(f"Benchmark figures, not this session's: {sources}, on the model and machine recorded in those "
               "files; their perplexity is the pinned protocol's (12 windows x 512 tokens), not the live one above. "
               + "".join(f"Note: {n}. " for n in notes))


def bench_layers_panel() -> None:
    """Kept FFN channels per layer and method (mean, 10th-90th percentile over tokens) from the benchmark file."""
    layers, notes = dynamic.bench_layers()
    source = dynamic.bench_source(dynamic.BENCH_LAYERS)
    if layers is None:
        st.info(f"No per-layer chart yet: {'; '.join(notes)}.")
        return
    targets = sorted(layers["target"].unique())
    target = st.selectbox("Target sparsity", targets, index=targets.index(0.5) if 0.5 in targets else 0,
                          format_func=lambda t: f"{t:.0%}", key=keys.W_DYN_BENCH_TARGET)
    st.plotly_chart(layer_kept_figure(layers, target), key=keys.CHART_DYN_BENCH_LAYERS, config=_STATIC)
    st.caption(f"Benchmark figures from {source}, on the pinned protocol's tokens: how each method spends its "
               "channels over depth at the same average. The oracle keeps exactly k in every token of every layer "
               "(no band); a per-layer threshold or the IPN keeps more in some layers and tokens, fewer in others; "
               "per-prompt and routed masks vary only between windows, the static mask not at all. "
               "Click a legend entry to hide a method.")
