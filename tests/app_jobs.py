"""Waiting for the app's background jobs (headlab.ui.jobs) in AppTest tests.

A job started by a button runs in a worker thread while the page goes on; the page shows its result on the
first run after it has finished. AppTest does not run the progress fragment's timer, so a test waits for
the jobs itself and then reruns the page.
"""

from __future__ import annotations

import time

from streamlit.testing.v1 import AppTest

from headlab.ui.shared_cache import CACHES


def wait_for_jobs(timeout: float = 240.0) -> None:
    """Block until no job of the process is running (raises TimeoutError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    for cache in list(CACHES.values()):
        for _, job in cache.jobs.items():
            if not job.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"job {job.name!r} still running after {timeout:.0f} s")


def run_after_jobs(at: AppTest) -> AppTest:
    """Wait for the jobs a click started, then run the page again (it shows their results)."""
    wait_for_jobs()
    return at.run()
