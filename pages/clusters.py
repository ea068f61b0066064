"""Clusters: calibration prompts grouped by meaning, one learned mask per cluster, and routing a prompt."""

import streamlit as st

from headlab.engine.pruning.softmask import MaskTarget, TrainConfig
from headlab.engine.routing.router import pruned_blocks, routed_generate, train_router
from headlab.ui import keys, session
from headlab.ui.clusters import (
    ENCODER_OPTIONS,
    OTHER_ENCODER,
    cluster_table,
    clusters,
    encoder,
    masks_figure,
    prompt_map,
    silhouettes,
    training_figures,
    umap_key,
    umap_running,
)
from headlab.ui.errors import user_errors

st.title("Clusters")
st.caption("Input-dependent pruning: calibration prompts are embedded by a sentence encoder and clustered; "
           "one hard-concrete mask over the ATTN/FFN sub-blocks is learned per cluster; a prompt runs with "
           "the mask of its nearest cluster.")
for key, value in ((keys.W_CLUSTERS_K, 4), (keys.W_CLUSTERS_PER_SOURCE, 80), (keys.W_CLUSTERS_COLOUR, "cluster"),
                   (keys.W_CLUSTERS_REMOVED, 8), (keys.W_CLUSTERS_STEPS, 30),
                   (keys.W_CLUSTERS_PROMPT, "Write a Python function that returns the n-th Fibonacci number."),
                   (keys.W_CLUSTERS_ENCODER, ENCODER_OPTIONS[0])):
    session.widget_default(key, value)
e1, e2 = st.columns([1, 2])
enc_name = e1.selectbox("Sentence encoder", ENCODER_OPTIONS, key=keys.W_CLUSTERS_ENCODER,
                        help="The shipped all-MiniLM-L6-v2, or any sentence-transformers model: a folder with "
                             "modules.json (a HeadLab export of the MiniLM is one) or a hub id.")
if enc_name == OTHER_ENCODER:
    enc_name = e2.text_input("Encoder folder or hub id", key=keys.W_CLUSTERS_ENCODER_PATH,
                             placeholder="/path/to/sentence-transformers-folder or org/name").strip()
    if not enc_name:
        st.info("Type a sentence-transformers folder or hub id, then press Enter.")
        st.stop()
c1, c2, c3 = st.columns(3)
k = c1.slider("Clusters (k)", 2, 10, key=keys.W_CLUSTERS_K)
per_source = c2.select_slider("Prompts per set (at most)", [20, 40, 80, 160], key=keys.W_CLUSTERS_PER_SOURCE)
colour = c3.radio("Colour by", ["cluster", "category", "source"], horizontal=True, key=keys.W_CLUSTERS_COLOUR)
with user_errors():
    enc = encoder(enc_name)
    run = clusters(enc, enc.identity, k, per_source)
    handle = session.handle()
model_key = session.model_choice().key

left, right = st.columns([3, 2])

with left:
    job_key = umap_key(enc.identity, per_source)
    running = umap_running(job_key)
    st.session_state[keys.CLUSTERS_UMAP_POLLING] = running
    st.fragment(prompt_map, run_every=2.0 if running else None)(run, job_key, colour)
with right:
    pur = run.purity()
    st.metric("Purity against the categories", f"{pur.overall:.2f}")
    st.dataframe(cluster_table(run, pur), hide_index=False, width="stretch",
                 column_config={"categories": st.column_config.TextColumn(width="large")})
    sil = silhouettes(enc, enc.identity, per_source)
    best = max(sil, key=sil.get)
    st.caption("Silhouette (cosine) by k: " + ", ".join(f"{kk}: {s:.3f}" for kk, s in sil.items())
               + f". Highest at k = {best}" + ("." if best == k else f"; the slider is at k = {k}."))
    if best != k:
        st.button(f"Use k = {best}", on_click=lambda: st.session_state.update({keys.W_CLUSTERS_K: best}))

st.subheader("Train one mask per cluster")
n_blocks = 2 * handle.geometry.n_layers
with st.form(keys.FORM_CLUSTERS_TRAIN):
    f1, f2, f3 = st.columns(3)
    st.session_state[keys.W_CLUSTERS_REMOVED] = min(st.session_state[keys.W_CLUSTERS_REMOVED], n_blocks - 1)
    removed = f1.number_input("Sub-blocks to remove", 1, n_blocks - 1, key=keys.W_CLUSTERS_REMOVED)
    steps = f2.number_input("Steps per mask", 1, 1000, key=keys.W_CLUSTERS_STEPS,
                            help="One step = one forward and backward over 4 texts of at most 128 tokens.")
    f3.caption(f"{k} cluster masks + 1 static mask on all {len(run.prompts)} prompts, KL to the dense model.")
    start = st.form_submit_button("Train masks", type="primary")
if start:
    bar, plots = st.progress(0.0), st.empty()
    history: dict[str, list] = {}

    def progress(name, log) -> None:
        history.setdefault(name, []).append(log)
        done = (len(history) - 1) * log.steps + log.step
        bar.progress(done / ((k + 1) * log.steps), text=f"mask {name}: step {log.step}/{log.steps}, "
                     f"KL {log.objective:.3f}, expected sparsity {log.expected_sparsity['blocks']:.3f}")
        if log.step % 5 == 0 or log.step == log.steps:
            curve, gates = training_figures(history[name])
            with plots.container():
                st.plotly_chart(curve, key=f"{keys.CHART_CLUSTERS_LIVE}.curve.{name}.{log.step}")
                st.plotly_chart(gates, key=f"{keys.CHART_CLUSTERS_LIVE}.gates.{name}.{log.step}")

    with user_errors():
        router = train_router(handle, enc, run.prompts, run.embeddings, run.clustering,
                              MaskTarget(blocks=int(removed)), TrainConfig(steps=int(steps)), progress=progress)
    st.session_state[keys.CLUSTERS_ROUTER] = (model_key, enc.identity, k, per_source, router, history)
    plots.empty()
    bar.empty()

state = st.session_state.get(keys.CLUSTERS_ROUTER)
if state is None or state[0] != model_key or state[1:4] != (enc.identity, k, per_source):
    st.info("Train masks to see them side by side and to route prompts.")
    st.stop()
router, history = state[4:]
m1, m2 = st.columns([2, 3])
with m1:
    st.plotly_chart(masks_figure(router), key=keys.CHART_CLUSTERS_MASKS)
with m2:
    name = st.selectbox("Gate activity of", list(history), key=keys.W_CLUSTERS_HISTORY)
    curve, gates = training_figures(history[name])
    st.plotly_chart(curve, key=keys.CHART_CLUSTERS_CURVE)
    st.plotly_chart(gates, key=keys.CHART_CLUSTERS_GATES)

st.subheader("Route a prompt")
prompt = st.text_area("Prompt", key=keys.W_CLUSTERS_PROMPT)
if st.button("Route and generate", type="primary"):
    with user_errors():
        out = routed_generate(handle, router, enc, prompt, max_new_tokens=48) if handle.is_causal_lm else None
        route = out.route if out else router.route(enc, prompt)[0]
    st.markdown(f"**Cluster {route.cluster}** (mostly {pur.majority[route.cluster]}); removes "
                f"{', '.join(pruned_blocks(route.mask)) or 'nothing'}.")
    for note in (out.notices if out else [route.notice] if route.notice else []):
        st.warning(note)
    if out:
        st.text(out.text)
    st.button("Use this mask on the other pages", on_click=session.set_mask, args=(route.mask,))
