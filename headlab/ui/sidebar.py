"""The sidebar every page shows: model, device and dtype, calibration set, the current mask.

Drawn by app.py before the page runs. A model choice is loaded before it replaces the
session's current one, so a bad folder or id shows an error and loses nothing.
"""

from __future__ import annotations

import json

import streamlit as st

from headlab.engine.core.errors import USER_ERRORS
from headlab.engine.core.mask import PruneMask
from headlab.engine.models.load import DEFAULT_MODEL, ENCODER_MODEL, GEMMA3_MODEL
from headlab.engine.pruning.strategies import CALIBRATION_CHOICES
from headlab.ui import jobs, keys, session
from headlab.ui.compute import mask_cost
from headlab.ui.models import DTYPES, ModelChoice, default_choice, device_options, load_cached
from headlab.ui.scoring import DEFAULT_CALIBRATION
from headlab.ui.server_options import remote_code_allowed

__all__ = ["render_sidebar", "OTHER_MODEL"]

OTHER_MODEL = "Local folder or hub id..."


def _model_options() -> list[str]:
    first = default_choice().name
    options = [first] + [n for n in (DEFAULT_MODEL, GEMMA3_MODEL, ENCODER_MODEL) if n != first]
    return options + [OTHER_MODEL]


def _model_picker() -> None:
    current = session.model_choice()
    options = _model_options()
    if keys.W_MODEL_OPTION not in st.session_state:
        st.session_state[keys.W_MODEL_OPTION] = current.name if current.name in options else OTHER_MODEL
    option = st.selectbox("Model", options, key=keys.W_MODEL_OPTION,
                          help="The shipped SmolLM2-135M-Instruct, Gemma 3 270M (base model, Gemma Terms of Use; "
                               "its first opening dequantises it, about a minute), the MiniLM encoder, or any "
                               "supported Hugging Face model (Llama, Mistral, Qwen2, Gemma 3, GPT-2, BERT) from a "
                               "folder or the hub.")
    name = option
    if option == OTHER_MODEL:
        name = st.text_input("Folder or hub id", key=keys.W_MODEL_PATH,
                             placeholder="/path/to/model or org/name").strip()
    session.widget_default(keys.W_DEVICE, current.device)
    session.widget_default(keys.W_DTYPE, current.dtype)
    c1, c2 = st.columns(2)
    devices = device_options()
    device = c1.selectbox("Device", devices, key=keys.W_DEVICE)
    dtype = c2.selectbox("Dtype", DTYPES, key=keys.W_DTYPE)
    trust = False
    if remote_code_allowed():  # only the person who started the server can offer this switch
        trust = st.checkbox("Allow the model's own code (trust_remote_code)", key=keys.W_TRUST_REMOTE_CODE,
                            help="Off by default: only turn on for a model whose code you trust.")
    if not name:
        st.info("Type a model folder or hub id, then press Enter.")
        return
    wanted = ModelChoice(name, device, dtype, trust)
    if wanted == current:
        return
    failed = st.session_state.get(keys.MODEL_FAILED)
    if failed is not None and failed[0] == wanted:
        st.error(failed[1])
        return
    try:
        load_cached(wanted)
    except USER_ERRORS as e:
        st.session_state[keys.MODEL_FAILED] = (wanted, f"Could not open {name!r}: {e}. Still showing {current.name}.")
        st.error(st.session_state[keys.MODEL_FAILED][1])
        return
    session.set_model_choice(wanted)


def _calibration_picker() -> None:
    session.widget_default(keys.W_CALIBRATION, DEFAULT_CALIBRATION.name)
    session.widget_default(keys.W_CALIBRATION_TEXTS, DEFAULT_CALIBRATION.n_texts)
    st.selectbox("Calibration set", CALIBRATION_CHOICES, key=keys.W_CALIBRATION,
                 help="Texts the head scores are computed on (one forward and backward pass). mixed: WikiText "
                      "paragraphs and the model's own answers to training prompts (generated once, then cached); "
                      "an instruct model pruned on it keeps more of its chat quality.")
    st.number_input("Calibration texts", 4, 64, step=4, key=keys.W_CALIBRATION_TEXTS)


def _load_uploaded_mask() -> None:
    upload = st.session_state.get(keys.W_MASK_UPLOAD)
    st.session_state.pop(keys.MASK_UPLOAD_ERROR, None)
    if upload is None:
        return
    try:
        mask = PruneMask.from_dict(json.loads(upload.getvalue().decode("utf-8")))
        session.set_mask(mask)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        st.session_state[keys.MASK_UPLOAD_ERROR] = f"{upload.name} is not a JSON mask file ({e})"
    except USER_ERRORS as e:
        st.session_state[keys.MASK_UPLOAD_ERROR] = f"{upload.name}: {e}"


def _mask_summary() -> None:
    handle = session.handle()
    mask = session.mask()
    s = mask.summary()
    c = mask_cost(handle, session.model_choice().key, mask)
    st.markdown("**Current mask**")
    st.markdown(
        f"- heads pruned: **{s['heads_pruned']}** / {s['heads_total']}\n"
        f"- FFN channels pruned: **{s['ffn_channels_pruned']:,}** / {s['ffn_channels_total']:,}\n"
        f"- sub-blocks removed: **{s['attn_blocks_pruned']}** ATTN, **{s['ffn_blocks_pruned']}** FFN\n"
        f"- parameters removed: **{_count(c.params_removed)}** ({100 * c.params_removed_fraction:.1f}%)\n"
        f"- FLOPs per token removed: **{100 * c.flops_removed_fraction:.1f}%**"
    )
    c1, c2 = st.columns(2)
    c1.button("Reset to dense", on_click=lambda: session.set_mask(PruneMask.dense(handle.geometry)),
              disabled=mask == PruneMask.dense(handle.geometry), width="stretch")
    c2.download_button("Save mask", json.dumps(mask.to_dict()), file_name="mask.json", mime="application/json",
                       width="stretch")
    st.file_uploader("Load a mask (JSON)", type=["json"], key=keys.W_MASK_UPLOAD, on_change=_load_uploaded_mask)
    if keys.MASK_UPLOAD_ERROR in st.session_state:
        st.error(st.session_state[keys.MASK_UPLOAD_ERROR])


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.2f} {suffix}"
    return str(n)


def render_sidebar() -> None:
    """Model picker, calibration choice and mask summary, in the sidebar of every page."""
    with st.sidebar:
        _model_picker()
        _calibration_picker()
        st.divider()
        try:
            _mask_summary()
        except USER_ERRORS as e:
            st.error(str(e))
        _running_jobs()


def _running_jobs() -> None:
    """One line per job running on the server (details on the Diagnostics page's Jobs view)."""
    for row in jobs.table():
        if row["state"] == "running":
            left = f", {row['time left']} left" if row["time left"] else ""
            st.caption(f"Running: {row['job']} {row['progress']}{left}")
