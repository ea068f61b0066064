"""Criterion scores for a model and calibration set, computed once per process and shared.

Scores are a pure function of (model, calibration set), so every session on the same
choice reuses them. The default calibration is small (16 texts x 128 tokens: well under a
minute for SmolLM2 on a CPU); one capture pass (forward + backward) feeds every criterion.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from engine.data.datasets import CALIBRATION_SETS, calibration_texts
from engine.importance.criteria import Scores, score
from engine.models.load import ModelHandle
from ui import keys
from ui.shared_cache import shared_cache

__all__ = ["Calibration", "APP_CRITERIA", "HEAD_CRITERIA", "calibration_choice", "cached_scores",
           "DEFAULT_CALIBRATION"]

HEAD_CRITERIA = ("entropy", "magnitude", "gradient", "activation")
APP_CRITERIA = (*HEAD_CRITERIA, "random", "block_influence")


@dataclass(frozen=True)
class Calibration:
    """A calibration set: shipped set name, number of texts, tokens per text."""

    name: str = "wikitext"
    n_texts: int = 16
    max_length: int = 128

    def describe(self) -> str:
        return f"{self.n_texts} {self.name} texts x {self.max_length} tokens"


DEFAULT_CALIBRATION = Calibration()


def calibration_choice() -> Calibration:
    """The calibration set picked in the sidebar (the default before any choice)."""
    name = st.session_state.get(keys.W_CALIBRATION, DEFAULT_CALIBRATION.name)
    n = int(st.session_state.get(keys.W_CALIBRATION_TEXTS, DEFAULT_CALIBRATION.n_texts))
    return Calibration(name if name in CALIBRATION_SETS else DEFAULT_CALIBRATION.name, n)


def cached_scores(handle: ModelHandle, model_key: str, calibration: Calibration) -> dict[str, Scores]:
    """Scores of APP_CRITERIA (one shared capture pass), with a progress bar while they are computed."""

    def compute() -> dict[str, Scores]:
        texts = calibration_texts(calibration.name, calibration.n_texts)
        bar = st.progress(0.0, text=f"Scoring heads on {calibration.describe()}...")

        def progress(done: int, total: int) -> None:
            bar.progress(done / total, text=f"Scoring heads on {calibration.describe()}: batch {done}/{total}")

        try:
            result, _ = score(handle, texts, APP_CRITERIA, progress=progress, max_length=calibration.max_length)
        finally:
            bar.empty()
        return result

    return shared_cache("scores", 8).get_or_compute((model_key, calibration), compute)
