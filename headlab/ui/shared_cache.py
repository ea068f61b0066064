"""A process-wide store for results that take long to compute and are the same for every session.

Each value is computed once, by an headlab.engine.core.jobs.JobBoard job in a worker thread, whoever
asks and however many ask at once. A session only waits for the job and draws its progress
from its own script thread, so a rerun or page reload of that session ends its wait, not the
computation: the next run finds the job running (or done) and waits again. A failure is
raised to every session waiting for it and computed afresh on the next request.
"""

from __future__ import annotations

from typing import Any, Callable

import streamlit as st

from headlab.engine.core.jobs import Job, JobBoard
from headlab.engine.core.progress import Progress

__all__ = ["CACHES", "SharedCache", "shared_cache"]


class SharedCache:
    """String key -> value computed once in a background job; least recently used dropped beyond `max_entries`."""

    def __init__(self, max_entries: int = 16) -> None:
        self.jobs = JobBoard(max_entries)

    def get(self, key: str) -> Any | None:
        """The value if it has been computed, else None (never computes)."""
        return self.jobs.result(key)

    def get_or_compute(self, key: str, compute: Callable[[Progress], Any], progress: Progress | None = None) -> Any:
        """The value for `key`, computing it first as `compute(report)` in a worker thread.

        `progress(done, total)` is called in the calling thread while it waits (never by the worker).
        """
        return self.job(key, compute).outcome(progress)

    def job(self, key: str, compute: Callable[[Progress], Any]) -> Job:
        """The (running or finished) job computing `key`, started if there is none or the last one failed."""
        return self.jobs.submit(key, Job(lambda job: compute(job.report), name=key))


#: Every SharedCache made in this process, by name (the Jobs view lists their jobs).
CACHES: dict[str, SharedCache] = {}


@st.cache_resource(show_spinner=False)
def shared_cache(name: str, _max_entries: int = 16) -> SharedCache:
    """The process-wide SharedCache called `name`: one per name, whatever size a caller passes (the leading
    underscore keeps the size out of Streamlit's key; the first call's size holds)."""
    cache = SharedCache(_max_entries)
    CACHES[name] = cache
    return cache
