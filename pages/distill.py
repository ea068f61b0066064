"""Distill: recover a pruned student from the dense teacher (optionally as a 1-/2-bit student) and watch it live."""

import plotly.graph_objects as go
import streamlit as st

from headlab.engine.core.tokens import context_length
from headlab.engine.pruning.size_target import target_params, width_mask
from headlab.engine.recovery.distill import MODES, DistillConfig
from headlab.engine.recovery.quantize import export_student
from headlab.engine.recovery.recipes import RECIPES, RecoveryJob
from headlab.engine.runtime.prefix_cache import live_protocol
from headlab.ui import compute, keys, session
from headlab.ui.errors import user_errors

RECIPE_LABELS = {"fp32": "Full precision", "single": "Single-stage (quantise at step 0, one KD run)",
                 "multi": "Multi-stage (FP32 KD, then 2-bit, then 1-bit)"}

st.title("Distill")
st.caption("The student is a physically smaller copy of the model; the dense model is the teacher (never changed). "
           "Loss: KL between next-token distributions at temperature 2 (sentence embeddings for an encoder).")
with user_errors():
    handle = session.handle()
mask = session.mask()

c1, c2, c3 = st.columns([1.3, 1.3, 1])
BY_SIZE = ("uniform width, reconstructed (OBS)", "uniform width, by gradient")
source = c1.radio("Student", ["the session's mask", *BY_SIZE], key=keys.W_DISTILL_SOURCE,
                  help="Reconstructed: structured OBS chooses the units and re-solves the kept output weights "
                       "(minutes, once per size; a far better start). By gradient: instant, no re-fit.")
keep = c1.slider("Keep this fraction of the parameters", 0.3, 0.95, 0.7, 0.05, key=keys.W_DISTILL_KEEP,
                 disabled=source not in BY_SIZE,
                 help="The same heads per KV group and FFN channels removed in every layer.")
recipe = c2.selectbox("Recipe", RECIPES, format_func=RECIPE_LABELS.get, key=keys.W_DISTILL_RECIPE)
bits = c2.radio("Target bits", [1, 2], horizontal=True, key=keys.W_DISTILL_BITS, disabled=recipe == "fp32",
                help="1 bit: sign x per-row scale; 2 bits: ternary. Q/K/V/O and FFN weights; embeddings stay.")
mode = c2.radio("Train", MODES, horizontal=True, key=keys.W_DISTILL_MODE,
                format_func={"full": "all weights", "lora": "LoRA adapters"}.get)
by_time = c3.toggle("Size by minutes", key=keys.W_DISTILL_BY_TIME, disabled=recipe != "fp32",
                    help="As many steps as fit this many minutes of training: a few timed steps give seconds per "
                         "step from its tokens, summed over the batches the run will draw, so the cosine schedule "
                         "ends when the time does. Full precision only.") and recipe == "fp32"
minutes = float(c3.number_input("Minutes of training", 0.5, 600.0, 5.0, 0.5, key=keys.W_DISTILL_MINUTES,
                                disabled=not by_time))
steps = int(c3.number_input("Steps (all stages together)", 2, 10_000, 60, key=keys.W_DISTILL_STEPS,
                            disabled=by_time))
lr = c3.select_slider("Learning rate", [3e-5, 1e-4, 2e-4, 5e-4, 1e-3], 2e-4, key=keys.W_DISTILL_LR)
window = min(512, context_length(handle.model))
TEXT = {"running text": (max(1, 512 // window), window, window), "paragraphs": (4, 128, 0)}  # (texts, tokens, pack)
text = c3.radio("WikiText as", list(TEXT), horizontal=True, key=keys.W_DISTILL_TEXT,
                help=f"Running text: windows of {window} tokens cut from the file across paragraph boundaries, as "
                     "perplexity windows are (better on validation text: bench/results/recovery_budget.csv). "
                     "Paragraphs: 4 texts x 128 tokens per step, each starting a context.")
batch_size, max_length, pack = TEXT[text]

job: RecoveryJob | None = st.session_state.get(keys.DISTILL_JOB)
running = job is not None and job.running
b1, b2, _ = st.columns([1, 1, 4])
if b1.button("Start", type="primary", disabled=running):
    with user_errors():
        student_mask = mask
        if source == BY_SIZE[0]:
            bar = st.progress(0.0, text="Reconstructing the student")
            student_mask = compute.reconstructed_width_mask(handle, session.model_choice().key, keep, lambda d, t: bar.progress(
                min(d / max(t, 1), 1.0), text=f"Reconstructing the student: layer {d}/{t}"))
            bar.empty()
        elif source == BY_SIZE[1]:
            gradient = session.scores()["gradient"]
            student_mask, _ = width_mask(handle, target_params(handle, keep), gradient.heads, gradient.ffn)
        elif mask == mask.dense(handle.geometry):
            st.warning("The session's mask prunes nothing: the student is a full-size copy.")
        config = DistillConfig(steps=steps, lr=lr, mode=mode, eval_every=max(1, steps // 10), patience=0,
                               warmup=max(1, steps // 10), batch_size=batch_size, max_length=max_length)
        job = RecoveryJob(handle, student_mask, recipe, bits, config, protocol=live_protocol(handle),
                          pack=pack, minutes=minutes if by_time else None).start()
        st.session_state[keys.DISTILL_JOB] = job
        running = True
if b2.button("Stop", disabled=not running):
    job.stop()
if job is None:
    st.info(f"Choose a student and a recipe, then Start. Each step runs the teacher and the student on "
            f"{batch_size} x {max_length} tokens: seconds per step for the default model on a CPU.")
    st.stop()


def _history_figure(history) -> go.Figure:
    train = [r for r in history if r.loss is not None]  # a stage's step 0 is an evaluation only
    held = [r for r in history if r.heldout is not None]
    fig = go.Figure()
    fig.add_scatter(x=[r.step for r in train], y=[r.loss for r in train], name="training loss", mode="lines")
    fig.add_scatter(x=[r.step for r in held], y=[r.heldout for r in held], name="held-out gap to the teacher",
                    mode="lines+markers")
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="step", yaxis_type="log",
                      legend=dict(orientation="h", y=1.1))
    return fig


def _metric_rows(job: RecoveryJob) -> list[dict]:
    rows = [("teacher", job.before.get("teacher")), ("student, no recovery", job.before.get("student")),
            (f"student, after {job.result.label if job.result else 'distillation'}", job.after)]
    return [{"model": name, **{k: v for k, v in m.items() if k in ("perplexity", "spearman", "nn_agreement",
                                                                   "mean_cosine", "n_tokens", "n_texts")}}
            for name, m in rows if m]


@st.fragment(run_every=1.0 if running else None)
def live_panel() -> None:
    # sized by minutes: once timed, and again after a fifth of the steps (the records carry the run's length)
    done = job.history[-1].step if job.history else 0
    total = job.history[-1].steps if job.history else job.config.steps
    st.progress(min(done / total, 1.0) if total else 0.0, text=f"{job.status}: step {done}/{total}")
    if job.error:
        st.error(f"The distillation failed: {job.error}")
    if job.history:
        st.plotly_chart(_history_figure(job.history), config={"displayModeBar": False}, key=keys.CHART_DISTILL_HISTORY)
    if job.before:
        st.dataframe(_metric_rows(job), hide_index=True)
        if handle.is_causal_lm:
            st.caption(f"Perplexity on the live protocol: {live_protocol(handle).describe(handle.name)}")
    if running and job.finished:
        st.rerun()  # finished while polling: one full run redraws the page without the timer


live_panel()
if job.finished and job.student is not None and job.after is not None:
    folder = st.text_input("Write the student to", "runs/distilled-student", key=keys.W_DISTILL_FOLDER)
    if st.button("Export"):
        with user_errors():
            path = export_student(job.student, folder, manifest={"recipe": job.recipe, "after": job.after})
        st.success(f"Wrote {path} (plain transformers loads a uniform student; int8 codes + scales for 1-/2-bit).")
