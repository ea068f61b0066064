"""Perplexity against the fraction pruned, for each criterion, computed in a background job.

`perplexity_curves` is the computation (no Streamlit); `CurveJob` is an headlab.engine.core.jobs.Job
running it, whose partial results are the points so far; `curve_job`/`start_curve_job` keep
one job per (model, calibration set, unit) on a process-wide JobBoard, so a curve is computed
once and every session sees it (it depends only on the model and the scores, not on anyone's
mask), and a failed one is computed again on the next click.
"""

from __future__ import annotations

from typing import Callable, Sequence

import streamlit as st

from headlab.engine.core.jobs import Job, JobBoard
from headlab.engine.importance.criteria import Scores
from headlab.engine.models.load import ModelHandle
from headlab.engine.pruning.select import select
from headlab.engine.runtime.evaluate import PerplexityProtocol
from headlab.engine.runtime.prefix_cache import PrefixCache, live_protocol

__all__ = ["CURVE_FRACTIONS", "perplexity_curves", "CurveJob", "curve_job", "start_curve_job"]

CURVE_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
Points = dict[str, list[tuple[float, float]]]


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


class CurveJob(Job):
    """A Job computing perplexity curves; read `done`, `total`, `points` (so far), `error`."""

    def __init__(self, handle: ModelHandle, scores: dict[str, Scores], criteria: Sequence[str], unit: str,
                 fractions: Sequence[float] = CURVE_FRACTIONS) -> None:
        self.criteria, self.unit, self.fractions = tuple(criteria), unit, tuple(fractions)
        super().__init__(lambda job: perplexity_curves(handle, scores, self.criteria, self.fractions, unit=unit,
                                                       progress=job.report), name=f"curves-{unit}")
        self.total = len(self.criteria) * len(self.fractions)

    @property
    def points(self) -> Points:
        """The points computed so far (all of them once done)."""
        latest = self.result if self.result is not None else self.partial or {}
        return {k: list(v) for k, v in latest.items()}


@st.cache_resource(show_spinner=False)
def _jobs() -> JobBoard:
    return JobBoard(max_entries=64)


def _key(model_key: str, calibration_key: str, unit: str) -> str:
    return f"{model_key}|{calibration_key}|{unit}"


def curve_job(model_key: str, calibration_key: str, unit: str) -> CurveJob | None:
    """The process-wide job for these curves, if one was started."""
    return _jobs().get(_key(model_key, calibration_key, unit))


def start_curve_job(handle: ModelHandle, model_key: str, calibration_key: str, unit: str,
                    scores: dict[str, Scores], criteria: Sequence[str]) -> CurveJob:
    """Start (or return the running / finished) job for these curves; two sessions clicking at once start one."""
    return _jobs().submit(_key(model_key, calibration_key, unit), CurveJob(handle, scores, criteria, unit))
