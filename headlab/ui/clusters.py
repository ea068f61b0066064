"""The Clusters page's pieces: cached encoder and clusterings, background UMAP, and its figures."""

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from headlab.engine.core.jobs import Job, JobBoard
from headlab.engine.models.load import ENCODER_MODEL, resolve_source
from headlab.engine.models.sentence import encoder_identity
from headlab.engine.routing.clusters import cached_projection, cluster_prompts, project_2d, silhouette_scores
from headlab.engine.routing.embeddings import SentenceEncoder
from headlab.engine.routing.router import Router
from headlab.ui import keys
from headlab.ui.figures import CATEGORICAL

PRUNED, KEPT = "#e4572e", "#2f6f9f"
OTHER_ENCODER = "Sentence-transformers folder or hub id..."
ENCODER_OPTIONS = (ENCODER_MODEL, OTHER_ENCODER)


@st.cache_resource(show_spinner="Opening the sentence encoder...", max_entries=4)
def _open_encoder(name: str, identity: str) -> SentenceEncoder:
    return SentenceEncoder.load(name)


def encoder(name: str = ENCODER_MODEL) -> SentenceEncoder:
    """The encoder `name` names, shared by every session; a folder rewritten since is opened afresh."""
    return _open_encoder(name, encoder_identity(resolve_source(name)))


@st.cache_resource(show_spinner="Embedding and clustering the calibration prompts...", max_entries=16)
def clusters(_encoder: SentenceEncoder, identity: str, k: int, per_source: int):
    return cluster_prompts(_encoder, k, per_source=per_source)


@st.cache_data(show_spinner="Silhouette for k = 2..10...")
def silhouettes(_encoder: SentenceEncoder, identity: str, per_source: int) -> dict[int, float]:
    return silhouette_scores(clusters(_encoder, identity, 4, per_source).embeddings)


@st.cache_resource
def umap_jobs() -> JobBoard:
    """Background UMAP computations, one per prompt set size, shared by every session."""
    return JobBoard()


def umap_key(identity: str, per_source: int) -> str:
    """The background job of one encoder's embeddings of one prompt set."""
    return f"umap|{identity}|{per_source}"


def umap_running(key: str) -> bool:
    """Whether a background UMAP projection of this prompt set is being computed."""
    job = umap_jobs().get(key)
    return job is not None and job.running


def start_umap(key: str, embeddings) -> None:
    """Compute (and cache on disk) the UMAP projection in a background job, unless one is running or done."""
    umap_jobs().submit(key, Job(lambda job: project_2d(embeddings, "umap"), name="umap"))


def masks_figure(router: Router) -> go.Figure:
    """Layers (rows) x {ATTN, FFN} of every cluster's mask and the static one, side by side."""
    named = [(f"C{c}", m) for c, m in enumerate(router.masks)] + [("static", router.static_mask)]
    cols = [[n for n, _ in named for _ in (0, 1)], ["A", "F"] * len(named)]  # a two-level axis: mask, then ATTN/FFN
    z = np.stack([t.float().numpy() for _, m in named for t in (m.attn, m.ffn_block)], axis=1)  # (L, 2 * masks)
    fig = go.Figure(go.Heatmap(z=z, x=cols, zmin=0, zmax=1, colorscale=[[0, PRUNED], [1, KEPT]], showscale=False,
                               xgap=2, ygap=1, hovertemplate="%{x}, layer %{y}: %{z:.0f}<extra></extra>"))
    fig.update_yaxes(title_text="layer", autorange="reversed", dtick=1 if z.shape[0] <= 12 else 2)
    fig.update_layout(title="Masks: blue kept, red removed", height=560,
                      margin=dict(l=50, r=10, t=40, b=10))
    return fig


def training_figures(history: list) -> tuple[go.Figure, go.Figure]:
    """Loss and expected sparsity per step; the keep probability of every sub-block per step."""
    steps = [h.step for h in history]
    curve = go.Figure([go.Scatter(x=steps, y=[h.objective for h in history], name="KL to dense"),
                       go.Scatter(x=steps, y=[h.expected_sparsity["blocks"] for h in history], yaxis="y2",
                                  name="expected sparsity"),
                       go.Scatter(x=steps, y=[h.target_sparsity["blocks"] for h in history], yaxis="y2",
                                  name="target", line=dict(dash="dash"))])
    curve.update_layout(height=260, margin=dict(l=50, r=50, t=10, b=40), legend=dict(orientation="h", y=-0.25),
                        yaxis=dict(title="loss"), yaxis2=dict(title="sparsity", overlaying="y", side="right"))
    probs = np.array([np.asarray(h.keep_probability["blocks"]).ravel() for h in history]).T  # (2L, steps): A0 F0 A1..
    names = [f"{kind} {l}" for l in range(probs.shape[0] // 2) for kind in ("ATTN", "FFN")]
    gates = go.Figure(go.Heatmap(z=probs, x=steps, y=names, zmin=0, zmax=1, colorscale="Viridis",
                                 colorbar=dict(title="P(kept)")))
    gates.update_layout(height=420, margin=dict(l=70, r=10, t=10, b=40), xaxis_title="step")
    gates.update_yaxes(autorange="reversed")
    return curve, gates


def prompt_map(run, job_key: str, colour: str) -> None:
    """The prompt map: UMAP once it is cached, PCA meanwhile (this fragment polls a running UMAP job)."""
    xy, method = cached_projection(run.embeddings, "umap"), "UMAP"
    if xy is None:
        xy, method = project_2d(run.embeddings, "pca"), "PCA"
        if umap_running(job_key):
            st.caption("Computing the UMAP projection in the background (about 20 s the first time); "
                       "the map switches to it when it is ready.")
        elif st.button("Compute the UMAP projection (in the background, then cached)"):
            start_umap(job_key, run.embeddings)
            st.rerun()
    elif st.session_state.get(keys.CLUSTERS_UMAP_POLLING):
        st.session_state[keys.CLUSTERS_UMAP_POLLING] = False  # the job has finished: one full rerun stops the polling
        st.rerun()
    df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "cluster": run.clustering.labels.numpy().astype(str),
                       "category": [p.category for p in run.prompts], "source": [p.source for p in run.prompts],
                       "prompt": [p.text[:160].replace("\n", " ") for p in run.prompts]})
    order = {"cluster": [str(c) for c in range(run.clustering.k)], "category": sorted(set(df.category)),
             "source": sorted(set(df.source))}
    fig = px.scatter(df, x="x", y="y", color=colour, title=f"{method} of the prompt embeddings",
                     color_discrete_sequence=CATEGORICAL, category_orders={colour: order[colour]},
                     hover_data={"prompt": True, "category": True, "cluster": True, "x": False, "y": False})
    fig.update_layout(height=460, margin=dict(l=10, r=10, t=40, b=10))
    st.plotly_chart(fig, key=keys.CHART_CLUSTERS_SCATTER)


def cluster_table(run, pur) -> pd.DataFrame:
    """Size, majority category, its share and every category's count, one row per cluster."""
    return pd.DataFrame({
        "size": run.clustering.sizes(), "majority category": pur.majority,
        "share": [f"{f:.0%}" for f in pur.majority_fraction],
        "categories": [", ".join(f"{c} {n}" for c, n in sorted(cnt.items(), key=lambda x: -x[1])) for cnt in pur.counts],
    })
