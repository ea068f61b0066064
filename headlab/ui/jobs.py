"""Long app jobs that outlive the page: started from a button, watched from any page, applied once.

    job = jobs.submit("suggest", key, label, compute)     # runs in a worker thread (headlab.engine.core.jobs)
    done = jobs.watch("suggest", key, label)              # progress drawn without blocking the page
    if done is not None and jobs.take(key): apply(done.result)

The work runs in the process-wide board of headlab.ui.shared_cache, so navigating to another page,
reloading the tab or opening a second one never stops it; a second request for the same key joins
the running job instead of starting another. The page does not wait for it: `watch` draws the
progress in a fragment that refreshes itself every second (the rest of the page stays usable) and
reruns the page once when the job finishes. `take` says whether this session has yet to use a
finished job's result, so a result is applied once. `table` lists every job of the process (the
Jobs view on the Diagnostics page).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import streamlit as st

from headlab.engine.core.jobs import DONE, FAILED, Job
from headlab.engine.core.progress import Progress
from headlab.ui.shared_cache import CACHES, shared_cache

__all__ = ["describe", "running", "submit", "table", "take", "watch"]

_TAKEN = "jobs.taken"  # session_state: keys of finished jobs whose result this session used


def submit(board: str, key: str, label: str, compute: Callable[[Progress], Any]) -> Job:
    """The running or finished job for `key` on `board`, started now if there is none (or it failed)."""
    job = shared_cache(board).job(key, compute)
    job.name = label
    if not job.finished:  # a new run (or a retry): its result is new to this session
        st.session_state.setdefault(_TAKEN, set()).discard(key)
    return job


def describe(job: Job) -> str:
    """"label: 97/270 (36%), 4 min 10 s so far, about 6 min left" for any job state."""
    eta = job.eta()
    left = f", about {_duration(eta)} left" if eta is not None else ""
    if job.state == DONE:
        return f"{job.name}: done in {_duration(job.elapsed)}"
    if job.state == FAILED:
        return f"{job.name}: failed after {_duration(job.elapsed)} ({job.error})"
    step = f"{job.done}/{job.total} ({100 * job.fraction:.0f}%), " if job.total else ""
    stage = f" {job.stage}:" if job.stage else ""
    return f"{job.name}:{stage} {step}{_duration(job.elapsed)} so far{left}"


def watch(board: str, key: str) -> Job | None:
    """Draw the progress of `key`'s job without blocking; the job once it has finished, else None.

    While it runs, a fragment redraws the progress every second; when the job finishes the whole page
    reruns once, so the caller sees the finished job on that run.
    """
    job = shared_cache(board).jobs.get(key)
    if job is None:
        return None
    if job.finished:
        return job

    @st.fragment(run_every=1.0)
    def progress() -> None:
        if job.finished:
            st.rerun()  # the page, not only this fragment: it applies or shows the result
        st.progress(job.fraction, text=describe(job))
        st.caption("Runs on the server: use the other pages meanwhile; the result appears here when it is done.")

    progress()
    return None


def take(key: str) -> bool:
    """Whether this session has not used `key`'s finished result yet (and mark it used)."""
    taken = st.session_state.setdefault(_TAKEN, set())
    if key in taken:
        return False
    taken.add(key)
    return True


def running(board: str, prefix: str = "") -> list[tuple[str, Job]]:
    """(key, job) of the jobs running on `board` whose key starts with `prefix` (any session's)."""
    if board not in CACHES:
        return []
    return [(k, j) for k, j in CACHES[board].jobs.items() if k.startswith(prefix) and not j.finished]


def table() -> list[dict[str, Any]]:
    """Every job of this process: what, state, progress, time so far and left (the Jobs view)."""
    rows = []
    for board, cache in sorted(CACHES.items()):
        for _, job in cache.jobs.items():
            eta = job.eta()
            rows.append({"job": job.name, "kind": board, "state": job.state,
                         "progress": f"{job.done}/{job.total}" if job.total and not job.finished else "",
                         "started": time.strftime("%H:%M:%S", time.localtime(job.started_at)) if job.started_at
                         else "", "time so far": _duration(job.elapsed),
                         "time left": _duration(eta) if eta is not None else "",
                         "error": job.error or ""})
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"
