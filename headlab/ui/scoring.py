"""The capture pass and criterion scores of a model and calibration set, computed once per process.

Both are pure functions of (model, calibration set), so every session and page on the same
choice reuses them. One engine `Calibration` (headlab.engine.pruning.strategies.base: the texts and
their one capture pass, forward + backward) is kept per (model, calibration set); the Heads
page's scores are derived from its capture, and the Prune page's suggest panel and the
Diagnostics page run their strategies on the same object, so the pass runs once. The default
calibration is small (16 texts x 128 tokens: well under a minute for SmolLM2 on a CPU).

The capture runs in a background job (headlab.ui.shared_cache): a session draws its progress, and a
rerun or reload of that session does not interrupt it.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from headlab.engine.core.progress import Progress
from headlab.engine.importance.criteria import Scores
from headlab.engine.models.load import ModelHandle, cache_dir
from headlab.engine.pruning.strategies import CALIBRATION_CHOICES, Calibration
from headlab.engine.pruning.strategies.scores import criterion_scores
from headlab.ui import keys
from headlab.ui.shared_cache import shared_cache

__all__ = ["CalibrationChoice", "APP_CRITERIA", "HEAD_CRITERIA", "calibration_choice", "shared_calibration",
           "cached_scores", "DEFAULT_CALIBRATION"]

HEAD_CRITERIA = ("entropy", "magnitude", "gradient", "activation")
APP_CRITERIA = (*HEAD_CRITERIA, "random", "block_influence")


@dataclass(frozen=True)
class CalibrationChoice:
    """The sidebar's choice of calibration set: shipped set name, number of texts, tokens per text."""

    name: str = "wikitext"
    n_texts: int = 16
    max_length: int = 128

    def describe(self) -> str:
        return f"{self.n_texts} {self.name} texts x {self.max_length} tokens"


DEFAULT_CALIBRATION = CalibrationChoice()


def calibration_choice() -> CalibrationChoice:
    """The calibration set picked in the sidebar (the default before any choice)."""
    name = st.session_state.get(keys.W_CALIBRATION, DEFAULT_CALIBRATION.name)
    n = int(st.session_state.get(keys.W_CALIBRATION_TEXTS, DEFAULT_CALIBRATION.n_texts))
    return CalibrationChoice(name if name in CALIBRATION_CHOICES else DEFAULT_CALIBRATION.name, n)


def shared_calibration(handle: ModelHandle, model_key: str, choice: CalibrationChoice) -> Calibration:
    """The engine Calibration of this model and set, its capture pass done (once for every session).

    Strategies add what they measure to its `cache`, so that is shared too.
    """

    def compute(report: Progress) -> Calibration:
        calib = Calibration.shipped(choice.name, choice.n_texts, max_length=choice.max_length, handle=handle)
        calib.persist_dir = cache_dir()  # slow measurements kept on disk (ablation/, kl_costs/): a restart resumes
        calib.stats(handle, report)
        for name in APP_CRITERIA:  # in the job, so concurrent sessions only ever read them (calib.cache)
            criterion_scores(handle, name, calib)
        return calib

    cache, key = shared_cache("calibration", 4), f"{model_key}|{choice.describe()}"
    ready = cache.get(key)
    if ready is not None:
        return ready
    text = f"Capture pass over {choice.describe()}"
    bar = st.progress(0.0, text=f"{text}...")

    def show(done: int, total: int) -> None:  # runs in this session's thread, never in the worker
        bar.progress(done / total, text=f"{text}: batch {done}/{total}")

    try:
        return cache.get_or_compute(key, compute, show)
    finally:
        bar.empty()


def cached_scores(handle: ModelHandle, model_key: str, choice: CalibrationChoice) -> dict[str, Scores]:
    """Scores of APP_CRITERIA, all from the shared calibration's one capture pass (computed in its job)."""
    calib = shared_calibration(handle, model_key, choice)
    return {name: criterion_scores(handle, name, calib) for name in APP_CRITERIA}
