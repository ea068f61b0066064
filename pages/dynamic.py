"""Dynamic: per-token sparsity. Which FFN channels (and heads) each token keeps, its cost, a learned predictor."""

import streamlit as st

from headlab.engine.dynamic.methods import dynamic_refusal
from headlab.engine.runtime.paired_bootstrap import change_interval
from headlab.ui import dynamic, keys, session
from headlab.ui.dynamic_panels import (
    bench_layers_panel,
    bench_panel,
    generation_panel,
    progress,
    token_panel,
    training_panel,
)
from headlab.ui.errors import user_errors

st.title("Dynamic")
st.caption("Per-token sparsity: every token keeps, in every layer, only some FFN channels (and, with a trained "
           "importance network, some query heads), chosen from the token itself. CATS, TEAL and WINA threshold an "
           "activation; the oracle keeps exactly k channels per token in every layer, the true top ones by "
           "|act(gate) * up| (not an upper bound: methods that vary the count per layer can beat it); the importance "
           "network (IPN) estimates every channel's contribution from a 4-bit sketch of the layer's weights and learns "
           "its thresholds. The shared model is never changed: each method runs through per-call hooks.")
with user_errors():
    handle = session.handle()
reason = dynamic_refusal(handle)
if reason is not None:
    st.info(f"Dynamic sparsity needs a causal language model with a gated FFN (the Llama family): {reason}.")
    st.stop()
model_key = session.model_choice().key
grid_note = dynamic.weight_grid_note(handle, model_key)
if grid_note is not None:
    st.info(grid_note)
DEFAULT_PROMPT = "The Eiffel Tower in Paris was finished in 1889. Explain in two sentences why it was built."
for key, value in ((keys.W_DYN_METHOD, "cats"), (keys.W_DYN_TARGET, 0.5), (keys.W_DYN_NEW_TOKENS, 32),
                   (keys.W_DYN_PROMPT, DEFAULT_PROMPT), (keys.W_DYN_STEPS, 40), (keys.W_DYN_HEADS, False),
                   (keys.W_DYN_FOLDER, "runs/ipn"), (keys.W_DYN_SAVE_FOLDER, "runs/ipn")):
    session.widget_default(key, value)

c1, c2, c3 = st.columns([1.4, 1.2, 1.4], vertical_alignment="bottom")
choice = c1.selectbox("Method", list(dynamic.METHOD_LABELS), format_func=dynamic.METHOD_LABELS.get,
                      key=keys.W_DYN_METHOD)
target = c2.slider("Target FFN sparsity", 0.1, 0.9, step=0.05, key=keys.W_DYN_TARGET,
                   help="The fraction of FFN channels each token drops on average; the rules and the untrained IPN "
                        "are calibrated to it (on the shipped calibration text, once for every session), and a "
                        "training run aims at it.")
if choice == dynamic.FOLDER:
    folder = c3.text_input("Folder (from dynamic-calibrate, dynamic-train or Save below)", key=keys.W_DYN_FOLDER)
    if c3.button("Load"):
        with user_errors(stop=False):
            dynamic.load_folder(handle, model_key, folder)

with progress(f"Calibrating {choice} to {target:.0%} FFN sparsity") as p, user_errors():
    chosen = dynamic.chosen_method(handle, model_key, choice, target, p)
if chosen is None:
    st.info("Train a network below (it appears here when done)." if choice == dynamic.TRAINED
            else "Load a folder of thresholds or of a trained network made for this model.")
else:
    with user_errors():
        dense = session.live_perplexity(None)
        with progress(f"Perplexity under {chosen.label}") as p:
            dyn = dynamic.live_perplexity(handle, model_key, chosen, p)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Perplexity, dense", f"{dense.perplexity:.3f}")
    diff = dyn.result.perplexity - dense.perplexity
    m2.metric(f"Perplexity, {chosen.label}", f"{dyn.result.perplexity:.3f}",
              delta=f"{diff:+.3f} ({dyn.result.perplexity / dense.perplexity:.3f}x dense)", delta_color="inverse")
    m3.metric("FFN channels dropped (measured)", f"{dyn.sparsity.ffn:.1%}")
    m4.metric("Weights a sparse kernel skips", f"{dyn.sparsity.weights_skipped:.1%}",
              help="Of the weights of every layer's seven projections (q, k, v, o, gate, up, down), the same "
                   "count for every method: a zeroed input of W skips its column; a dropped FFN channel also "
                   "skips the gate and up rows the method did not compute to decide it (IPN: both, CATS: up).")
    flags = f"--method {choice} --target {target}" if choice in dynamic.CALIBRATED else "--load FOLDER"
    noise = ""
    if dense.token_nll is not None and dyn.result.token_nll is not None and dense.n_tokens == dyn.result.n_tokens:
        noise = f" Change {change_interval(dense.token_nll, dyn.result.token_nll).describe()}."
    st.caption(f"Live evaluation: {dyn.result.describe()}.{noise} Command line: "
               f"`python -m headlab dynamic-eval {flags}`.")

    st.subheader("Per token")
    prompt = st.text_area("Prompt", key=keys.W_DYN_PROMPT, height=80)
    token_panel(handle, model_key, chosen, prompt)
    st.subheader("Generation, dense and dynamic")
    generation_panel(handle, model_key, chosen, prompt)

st.subheader("Train the importance network")
training_panel(handle, model_key, target)
st.subheader("Quality vs speed (benchmarks)")
bench_panel()
st.subheader("Kept FFN channels per layer (benchmarks)")
bench_layers_panel()
