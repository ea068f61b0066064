"""Perplexity against the fraction pruned, for each criterion, computed in a background thread.

`perplexity_curves` is the computation (no Streamlit); `CurveJob` runs it in a thread and
exposes progress and partial results; `curve_job`/`start_curve_job` keep one job per
(model, calibration set, unit) for the whole process, so a curve is computed once and every
session sees it (it depends only on the model and the scores, not on anyone's mask).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import streamlit as st

from engine.importance.criteria import Scores
from engine.models.load import ModelHandle
from engine.pruning.select import select
from engine.runtime.evaluate import PerplexityProtocol
from engine.runtime.prefix_cache import PrefixCache, live_protocol

__all__ = ["CURVE_FRACTIONS", "perplexity_curves", "CurveJob", "curve_job", "start_curve_job"]

CURVE_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
Points = dict[str, list[tuple[float, float]]]
_START_LOCK = threading.Lock()


def perplexity_curves(
    handle: ModelHandle,
    scores: dict[str, Scores],
    criteria: Sequence[str],
    fractions: Sequence[float] = CURVE_FRACTIONS,
    protocol: PerplexityProtocol | None = None,
    *,
    unit: str = "heads",
    progress: Callable[[int, int, Points], None] | None = None,
) -> Points:
    """Perplexity (live protocol) after pruning each fraction of `unit` by each criterion, globally ranked."""
    g = handle.geometry
    cache = PrefixCache(handle, protocol or live_protocol(handle))
    points: Points = {c: [] for c in criteria}
    total, done = len(criteria) * len(fractions), 0
    for name in criteria:
        for f in fractions:
            mask = select(g, scores[name], float(f), unit=unit, scope="global")
            points[name].append((float(f), cache.perplexity(mask).perplexity))
            done += 1
            if progress:
                progress(done, total, points)
    return points


@dataclass
class CurveJob:
    """A background computation of perplexity curves; read `done`, `total`, `points`, `error`."""

    criteria: tuple[str, ...]
    unit: str
    fractions: tuple[float, ...] = CURVE_FRACTIONS
    done: int = 0
    total: int = 0
    points: Points = field(default_factory=dict)
    error: str | None = None
    thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def start(self, handle: ModelHandle, scores: dict[str, Scores]) -> "CurveJob":
        self.total = len(self.criteria) * len(self.fractions)

        def report(done: int, total: int, points: Points) -> None:
            self.done, self.total = done, total
            self.points = {k: list(v) for k, v in points.items()}

        def run() -> None:
            try:
                self.points = perplexity_curves(handle, scores, self.criteria, self.fractions, unit=self.unit,
                                                progress=report)
            except Exception as e:  # shown on the page; the thread must not die silently
                self.error = f"{type(e).__name__}: {e}"

        self.thread = threading.Thread(target=run, name=f"headlab-curves-{self.unit}", daemon=True)
        self.thread.start()
        return self


@st.cache_resource(show_spinner=False)
def _jobs() -> dict[tuple, CurveJob]:
    return {}


def curve_job(model_key: str, calibration_key: str, unit: str) -> CurveJob | None:
    """The process-wide job for these curves, if one was started."""
    return _jobs().get((model_key, calibration_key, unit))


def start_curve_job(handle: ModelHandle, model_key: str, calibration_key: str, unit: str,
                    scores: dict[str, Scores], criteria: Sequence[str]) -> CurveJob:
    """Start (or return the running / finished) job for these curves."""
    jobs = _jobs()
    key = (model_key, calibration_key, unit)
    with _START_LOCK:  # two sessions clicking at once start one job
        job = jobs.get(key)
        if job is None or job.error is not None:
            job = CurveJob(tuple(criteria), unit)
            jobs[key] = job
            job.start(handle, scores)
    return job
