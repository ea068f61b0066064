"""Diagnostics: what each head attends to, and why entropy and magnitude rank it as they do."""

import pandas as pd
import plotly.express as px
import streamlit as st

from headlab.engine.importance.diagnostics import HEAD_KINDS, THRESHOLDS, diagnose, kind_counts
from headlab.engine.pruning.strategies.scores import cached_ablation
from headlab.engine.runtime.attention_maps import token_limit
from headlab.ui import compute, jobs, keys, session
from headlab.ui.errors import user_errors
from headlab.ui.suggest import HEAD_COSTS_BOARD, head_costs_board, head_costs_key, shared_calibration, start_head_costs

KIND_COLORS = dict(zip(HEAD_KINDS, px.colors.qualitative.Set2))

st.title("Diagnostics")
st.caption("Each head is labelled by where its attention goes on the calibration text, with the numbers behind "
           f"the label: sink (>= {THRESHOLDS['sink']:.0%} on the first token), previous-token "
           f"(>= {THRESHOLDS['prev']:.0%}), local (>= {THRESHOLDS['local']:.0%} within 4 tokens), broad "
           f"(normalized entropy >= {THRESHOLDS['broad_entropy']}), else mixed.")
with user_errors():
    handle = session.handle()
    calib = shared_calibration()
    with st.spinner(f"One capture pass over {calib.describe()} (once per model)..."):
        stats = calib.stats(handle)
measured = cached_ablation(calib, mean=True)
if measured is None:
    cost_key = head_costs_key(session.model_choice().key, calib)
    current = head_costs_board().jobs.get(cost_key)
    if (current is None or current.failed) and st.button(
            "Measure each head's real cost (mean-ablation KL; minutes, once per model: kept on disk and resumed "
            "if interrupted)"):
        start_head_costs(handle, session.model_choice().key, calib)
    finished = jobs.watch(HEAD_COSTS_BOARD, cost_key)
    if finished is not None and finished.failed:
        st.error(f"Measuring the heads failed: {finished.error}")
    measured = cached_ablation(calib, mean=True)
diagnoses = diagnose(handle, stats, measured)
table = pd.DataFrame([d.__dict__ for d in diagnoses])
table["head_id"] = [f"L{d.layer}H{d.head}" for d in diagnoses]

counts = kind_counts(diagnoses)
st.markdown(" · ".join(f"**{n}** {k}" for k, n in counts.items()))
left, right = st.columns(2)
with left:
    fig = px.scatter(table, x="entropy_normalized", y="sink", color="kind", color_discrete_map=KIND_COLORS,
                     category_orders={"kind": list(HEAD_KINDS)}, hover_name="head_id",
                     hover_data={"layer": True, "head": True, "prev_mass": ":.2f", "local_mass": ":.2f",
                                 "entropy_rank": True, "kind": False},
                     labels={"entropy_normalized": "normalized entropy", "sink": "attention on the first token"},
                     title="Entropy against sink mass")
    st.plotly_chart(fig, config={"displayModeBar": False})
with right:
    y = "ablation_kl" if measured is not None else "constant_share"
    fig = px.scatter(table, x="entropy_rank", y=y, color="kind", color_discrete_map=KIND_COLORS,
                     category_orders={"kind": list(HEAD_KINDS)}, hover_name="head_id", log_y=y == "ablation_kl",
                     hover_data={"layer": True, "head": True, "magnitude_rank": True, "kind": False},
                     labels={"entropy_rank": "entropy's pruning order (1 = first to go)",
                             "ablation_kl": "measured cost (KL, nats/token)",
                             "constant_share": "share of the output that is constant"},
                     title="What entropy prunes first vs what the head is worth")
    st.plotly_chart(fig, config={"displayModeBar": False})

with st.expander("Why entropy and magnitude mislead", expanded=True):
    by_kind = table.groupby("kind")
    summary = by_kind[["entropy_rank", "magnitude_rank", "constant_share",
                       *(["ablation_kl"] if measured is not None else [])]].median()
    st.markdown(
        "- **Entropy** rewards sharp attention. A sink head parks its attention on the first token, which is how a "
        "head idles: entropy calls it sharp and keeps it, yet such heads are often the cheapest to remove. A broad "
        "head averages many tokens, so entropy prunes it first, but early layers build each token's context that "
        "way; pruning by entropy can empty the first layer's attention altogether.\n"
        "- **Magnitude** compares weight norms across layers, ignoring how much signal flows through the weights "
        "and that the residual stream a head writes into grows with depth; small-norm heads can matter a lot "
        "(previous-token heads often have small weights).\n"
        "- **What works**: measure the cost of removing each head (the KL to the dense model when it is replaced "
        "by its mean output) and keep that mean as a bias when pruning (compensation). The Prune page's "
        "*Suggest mask* does both.")
    st.caption("Medians per kind (ranks: 1 = pruned first; measured cost once measured):")
    st.dataframe(summary.reindex([k for k in HEAD_KINDS if k in summary.index]), width="stretch")

kinds = st.multiselect("Show kinds", HEAD_KINDS, default=list(HEAD_KINDS))
cols = ["head_id", "kind", "reason", "sink", "prev_mass", "local_mass", "mean_distance", "entropy_normalized",
        "entropy_rank", "magnitude_rank", "constant_share", *(["ablation_kl"] if measured is not None else []),
        "why_entropy", "why_magnitude"]
st.dataframe(table[table.kind.isin(kinds)][cols], hide_index=True, width="stretch",
             column_config={c: st.column_config.NumberColumn(format="%.3f") for c in
                            ("sink", "prev_mass", "local_mass", "entropy_normalized", "constant_share", "ablation_kl")})

st.subheader("On a long prompt")
st.caption("The same labels and statistics for one prompt of any length up to the model's context, under the "
           "current mask: one forward, then each layer's attention is formed a block of rows at a time.")
with st.form(keys.FORM_DIAG_LONG_PROMPT):
    long_text = st.text_area("Prompt", key=keys.W_DIAG_LONG_PROMPT, height=90,
                             placeholder=f"Paste a text of up to {token_limit(handle):,} tokens")
    go = st.form_submit_button("Label the heads on this prompt")
model_key = session.model_choice().key
if go:
    bar = st.progress(0.0, text="One forward, then every layer")
    with user_errors():
        st.session_state[keys.DIAG_LONG_PROMPT_RESULT] = (model_key, compute.long_prompt_diagnosis(
            handle, long_text, session.mask(),
            progress=lambda d, t: bar.progress(d / t, text=f"Forward and layers {d}/{t}")))
    bar.empty()
key_and_result = st.session_state.get(keys.DIAG_LONG_PROMPT_RESULT)
if key_and_result is not None and key_and_result[0] == model_key:
    found = key_and_result[1]
    st.markdown(f"{found.n_tokens:,} tokens{' (cut to fit)' if found.truncated else ''}: "
                + " · ".join(f"**{n}** {k}" for k, n in found.kind_counts().items()))
    st.dataframe(pd.DataFrame(found.rows), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in
                                ("sink", "prev_mass", "self_mass", "local_mass", "entropy", "entropy_normalized")})

st.subheader("Jobs")
st.caption("Long measurements run on the server, whatever page is open: started from any page, they keep running "
           "when you navigate or reload, and their results appear where they are needed.")
rows = jobs.table()
if rows:
    st.table(pd.DataFrame(rows).set_index("job"))
else:
    st.caption("No job has run in this server yet.")
