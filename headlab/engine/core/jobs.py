"""Background jobs: one function run in a daemon thread that anyone may read while it runs.

    job = Job(lambda job: perplexity_curves(..., progress=job.report), name="curves").start()
    job.state, job.done, job.total, job.partial      # read from any thread, at any time
    value = job.outcome(progress=bar_update)         # wait; `bar_update` runs in the *waiting* thread

    board = JobBoard()                                # shared computations by string key
    job = board.submit("model|calibration", Job(work))   # started once; a failed one is retried

The work is `work(job) -> result`: it reports with `job.report(done, total, partial)` (an
engine `Progress` when `partial` is left out) and `job.set_stage(text)`, and stops early
when `job.cancel_requested()` says so (cancelling is cooperative: nothing is killed).
Reporting only stores numbers, so it never raises into the worker; whoever wants to draw
progress polls the job from its own thread (`outcome(progress=...)`), where an exception
(e.g. Streamlit stopping a session's script on a rerun) ends the wait, never the work.
A failure is logged with its traceback (as a warning when it is one of headlab.engine.core.errors.
USER_ERRORS, an error otherwise) and kept on the job (`error`, `exception`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Generic, TypeVar

from headlab.engine.core.errors import USER_ERRORS
from headlab.engine.core.progress import Progress

__all__ = ["Job", "JobBoard", "JobCancelled", "PENDING", "RUNNING", "DONE", "FAILED", "CANCELLED"]

log = logging.getLogger(__name__)

T = TypeVar("T")

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
_FINISHED = (DONE, FAILED, CANCELLED)


class JobCancelled(RuntimeError):
    """Raised by `Job.outcome` when the job was cancelled before it produced a result."""


class Job(Generic[T]):
    """`work(job)` run once (in a daemon thread by `start`, or in the caller by `run`); see the module doc."""

    def __init__(self, work: Callable[["Job[T]"], T], name: str = "job") -> None:
        self.work = work
        self.name = name
        self.state = PENDING
        self.stage = ""  # what the work says it is doing
        self.done = 0
        self.total = 0
        self.partial: Any = None  # the latest partial result passed to `report`
        self.result: T | None = None
        self.error: str | None = None  # "ExceptionType: message" of a failure
        self.exception: BaseException | None = None
        self.started_at: float | None = None  # time.time() when it started, for front ends
        self.finished_at: float | None = None
        self._rate_from: tuple[float, int] | None = None  # (monotonic time, done) of the first report
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._claim = threading.Lock()  # start/run once
        self._thread: threading.Thread | None = None

    # --- the work's side ------------------------------------------------------------------
    def report(self, done: int, total: int, partial: Any = None) -> None:
        """Record progress (and a partial result when given); only stores values, never raises."""
        if partial is not None:
            self.partial = partial
        if self._rate_from is None:  # a resumed job may start at done > 0: its rate counts from here
            self._rate_from = (time.monotonic(), int(done))
        self.done, self.total = int(done), int(total)

    def set_stage(self, text: str) -> None:
        """Say what the work is doing now (shown by front ends next to the progress)."""
        self.stage = text

    def cancel_requested(self) -> bool:
        """Whether `cancel()` was called; the work checks this between steps (a `should_stop`)."""
        return self._cancel.is_set()

    # --- the owner's side -----------------------------------------------------------------
    def start(self) -> "Job[T]":
        """Run the work in a daemon thread; returns self. A job runs once."""
        self._claim_run()
        self._thread = threading.Thread(target=self._execute, name=f"headlab-{self.name}", daemon=True)
        self._thread.start()
        return self

    def run(self) -> "Job[T]":
        """Run the work in the calling thread (failures are kept, not raised); returns self."""
        self._claim_run()
        self._execute()
        return self

    def cancel(self) -> None:
        """Ask the work to stop at its next check; a job not yet started will not run."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (or `timeout` seconds passed); whether it finished."""
        return self._finished.wait(timeout)

    def outcome(self, progress: Progress | None = None, poll_s: float = 0.1, redraw_s: float = 1.0) -> T:
        """Wait for the result, calling `progress(done, total)` in this thread as it changes.

        Once the work has reported, `progress` is also called again at least every `redraw_s`
        seconds: a front end that stops a waiting thread at its next drawing call (Streamlit on a
        rerun or a closed tab) then stops it promptly, not at the work's next report.
        Re-raises the work's exception if it failed, JobCancelled if it was cancelled without a
        result. An exception raised by `progress` ends this wait only: the work goes on.
        """
        seen, drawn_at = None, 0.0
        while not self._finished.wait(poll_s if progress else None):
            now = time.monotonic()
            if self.total and ((self.done, self.total) != seen or now - drawn_at >= redraw_s):
                seen, drawn_at = (self.done, self.total), now
                progress(*seen)
        if self.state == FAILED:
            raise self.exception  # type: ignore[misc]
        if self.state == CANCELLED and self.result is None:
            raise JobCancelled(f"job {self.name!r} was cancelled")
        return self.result  # type: ignore[return-value]

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def finished(self) -> bool:
        return self.state in _FINISHED

    @property
    def failed(self) -> bool:
        return self.state == FAILED

    @property
    def elapsed(self) -> float:
        """Seconds since it started (until it finished), 0 before."""
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at

    def eta(self) -> float | None:
        """Seconds left at the rate measured since the first report, or None before there is one."""
        if self.finished or self._rate_from is None or not self.total:
            return None
        t0, d0 = self._rate_from
        steps, spent = self.done - d0, time.monotonic() - t0
        if steps <= 0 or spent <= 0:
            return None
        return (self.total - self.done) * spent / steps

    @property
    def fraction(self) -> float:
        """done / total in [0, 1] (0 before the first report)."""
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def _claim_run(self) -> None:
        if not self._claim.acquire(blocking=False):
            raise RuntimeError(f"job {self.name!r} was already started")
        self.state = RUNNING  # from here on, not from when the thread first runs: readers never see a gap
        self.started_at = time.time()

    def _execute(self) -> None:
        if self._cancel.is_set():
            self.state = CANCELLED
            self._finished.set()
            return
        try:
            self.result = self.work(self)
            self.state = CANCELLED if self._cancel.is_set() else DONE
        except Exception as e:  # kept for whoever reads the job; a background thread must not die silently
            if isinstance(e, USER_ERRORS):  # most likely a bad input, not a bug: a warning
                log.warning("background job %r refused: %s", self.name, e, exc_info=True)
            else:
                log.exception("background job %r failed", self.name)
            self.exception, self.error = e, f"{type(e).__name__}: {e}"
            self.state = FAILED
        finally:
            if self.state == RUNNING:  # a BaseException escaped the work
                self.error = self.error or "interrupted"
                self.state = FAILED
            self.finished_at = time.time()
            self._finished.set()


class JobBoard:
    """Jobs by string key: each key's work runs once, whoever submits it and however often.

    A running or finished job is returned as is; a failed or cancelled one is replaced by the
    next submission (a retry). Beyond `max_entries` the least recently used finished jobs are
    dropped; running ones are never dropped.
    """

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Job | None:
        """The job submitted under `key` (any state), or None."""
        with self._lock:
            return self._jobs.get(key)

    def submit(self, key: str, job: Job) -> Job:
        """The live or finished job for `key`, else `job`, started in a daemon thread."""
        with self._lock:
            current = self._jobs.get(key)
            if current is not None and current.state not in (FAILED, CANCELLED):
                self._jobs.move_to_end(key)
                return current
            self._jobs[key] = job
            self._jobs.move_to_end(key)
            job.start()
            self._evict()
            return job

    def result(self, key: str) -> Any | None:
        """The result of `key`'s job if it is done, else None (never starts anything)."""
        job = self.get(key)
        return job.result if job is not None and job.state == DONE else None

    def items(self) -> list[tuple[str, Job]]:
        """(key, job) of every job the board holds, oldest first (a snapshot)."""
        with self._lock:
            return list(self._jobs.items())

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _evict(self) -> None:
        for key in [k for k, j in self._jobs.items() if j.finished][: max(0, len(self._jobs) - self.max_entries)]:
            del self._jobs[key]
