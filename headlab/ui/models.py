"""Which model a session has open, and the process-wide cache of loaded models.

A loaded model is shared by every session that opens the same (name, device, dtype):
`st.cache_resource` keeps one ModelHandle per choice, and nothing in the app mutates it
(masks act through per-call, per-thread hooks). HEADLAB_MODEL names the model preselected
when a session starts (tests point it at a tiny saved model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import streamlit as st
import torch

from headlab.engine.models.load import DEFAULT_MODEL, ModelHandle, load_model

__all__ = ["ModelChoice", "default_choice", "load_cached", "device_options", "DTYPES", "MODEL_ENV"]

MODEL_ENV = "HEADLAB_MODEL"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelChoice:
    """A model to open: alias / folder / hub id, device, dtype, and whether its own code may run."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False

    @property
    def key(self) -> str:
        """Identifies the loaded model in caches (scores, masks, prefix caches)."""
        return f"{self.name}|{self.device}|{self.dtype}|{int(self.trust_remote_code)}"


def default_choice() -> ModelChoice:
    """The model a new session opens: $HEADLAB_MODEL, else the shipped SmolLM2."""
    return ModelChoice(os.environ.get(MODEL_ENV) or DEFAULT_MODEL)


def device_options() -> list[str]:
    """Devices this machine offers."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


@st.cache_resource(show_spinner=False, max_entries=3)
def _load(name: str, device: str, dtype: str, trust_remote_code: bool) -> ModelHandle:
    return load_model(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code, progress=lambda _: None)


def load_cached(choice: ModelChoice) -> ModelHandle:
    """The shared, cached ModelHandle for `choice` (loads it on first use, with a spinner)."""
    with st.spinner(f"Opening {choice.name} on {choice.device} ({choice.dtype})..."):
        return _load(choice.name, choice.device, choice.dtype, choice.trust_remote_code)
