"""headlab.engine.core.jobs: one background job runner, and the keyed board that shares jobs between sessions."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from headlab.engine.core.jobs import CANCELLED, DONE, FAILED, Job, JobBoard, JobCancelled


def test_a_job_runs_in_a_daemon_thread_and_exposes_progress_partial_results_and_its_result():
    release = threading.Event()

    def work(job: Job) -> int:
        job.set_stage("counting")
        job.report(1, 2, partial=[1])
        release.wait(5)
        job.report(2, 2, partial=[1, 2])
        return 3

    job = Job(work, name="count").start()
    assert job.running and not job.finished  # running from start(), before the thread is scheduled
    deadline = time.monotonic() + 5
    while job.done < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (job.done, job.total, job.partial, job.stage, job.fraction) == (1, 2, [1], "counting", 0.5)
    release.set()
    assert job.outcome() == 3
    assert job.state == DONE and job.partial == [1, 2] and job.error is None
    assert job._thread.daemon


def test_outcome_calls_progress_in_the_waiting_thread_not_in_the_worker():
    step = threading.Event()
    seen: list[tuple[int, int, str]] = []

    def work(job: Job) -> str:
        for i in range(3):
            job.report(i + 1, 3)
            step.wait(0.05)
        return "ok"

    job = Job(work).start()
    assert job.outcome(lambda d, t: seen.append((d, t, threading.current_thread().name)), poll_s=0.01) == "ok"
    assert seen and all(name == threading.current_thread().name for _, _, name in seen)


def test_a_progress_callback_that_raises_ends_the_wait_but_never_the_work():
    class Stop(Exception):  # what Streamlit raises in a session's script when it reruns
        pass

    release = threading.Event()

    def work(job: Job) -> int:
        job.report(1, 2)
        release.wait(5)
        job.report(2, 2)
        return 7

    def drawing(done: int, total: int) -> None:
        raise Stop

    job = Job(work).start()
    with pytest.raises(Stop):
        job.outcome(drawing, poll_s=0.01)
    assert job.running
    release.set()
    assert job.outcome() == 7 and job.state == DONE


def test_a_waiter_redraws_unchanged_progress_so_it_can_be_stopped_before_the_next_report():
    class Stop(Exception):
        pass

    release, draws = threading.Event(), []

    def work(job: Job) -> int:
        job.report(1, 2)
        release.wait(10)  # a long step: no report for a while
        return 1

    def drawing(done: int, total: int) -> None:
        draws.append((done, total))
        if len(draws) == 3:  # the front end stops the waiting thread at a drawing call
            raise Stop

    job = Job(work).start()
    t0 = time.monotonic()
    with pytest.raises(Stop):
        job.outcome(drawing, poll_s=0.01, redraw_s=0.05)
    assert draws == [(1, 2)] * 3 and time.monotonic() - t0 < 5
    assert job.running
    release.set()
    assert job.outcome() == 1


def test_a_failure_is_logged_kept_and_raised_to_whoever_waits(caplog):
    def work(job: Job) -> None:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.WARNING, logger="headlab.engine.core.jobs"):
        job = Job(work, name="broken").start()
        job.wait(5)
    assert job.state == FAILED and job.failed and job.error == "RuntimeError: a bug"
    record = next(r for r in caplog.records if "broken" in r.getMessage())
    assert record.levelno == logging.ERROR and record.exc_info is not None
    with pytest.raises(RuntimeError, match="a bug"):
        job.outcome()


def test_a_user_error_is_logged_as_a_warning(caplog):
    def work(job: Job) -> None:
        raise FileNotFoundError("no such folder")

    with caplog.at_level(logging.WARNING, logger="headlab.engine.core.jobs"):
        Job(work, name="refused").start().wait(5)
    record = next(r for r in caplog.records if "refused" in r.getMessage())
    assert record.levelno == logging.WARNING and "no such folder" in record.getMessage()


def test_cancel_is_cooperative_and_a_cancelled_job_keeps_what_it_returned():
    started = threading.Event()

    def work(job: Job) -> int:
        started.set()
        steps = 0
        while not job.cancel_requested() and steps < 500:
            steps += 1
            time.sleep(0.01)
        return steps

    job = Job(work).start()
    started.wait(5)
    job.cancel()
    assert job.wait(5) and job.state == CANCELLED
    assert 0 < job.outcome() < 500
    never = Job(lambda job: 1)
    never.cancel()
    never.start().wait(5)
    assert never.state == CANCELLED and never.result is None
    with pytest.raises(JobCancelled):
        never.outcome()


def test_a_job_runs_once():
    job = Job(lambda job: 1).run()
    assert job.result == 1
    with pytest.raises(RuntimeError, match="already started"):
        job.start()


def test_the_board_computes_a_key_once_for_concurrent_submitters():
    calls = []
    release = threading.Event()

    def work(job: Job) -> int:
        calls.append(1)
        release.wait(5)
        return 42

    board = JobBoard()
    jobs: list[Job] = []
    threads = [threading.Thread(target=lambda: jobs.append(board.submit("k", Job(work)))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    release.set()
    assert len({id(j) for j in jobs}) == 1 and jobs[0].outcome() == 42
    assert calls == [1] and board.result("k") == 42
    assert board.submit("k", Job(work)) is jobs[0]  # a finished job is reused, not recomputed
    assert calls == [1]


def test_the_board_retries_a_key_after_a_failure():
    attempts = []

    def flaky(job: Job) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")
        return "second try"

    board = JobBoard()
    first = board.submit("k", Job(flaky))
    with pytest.raises(RuntimeError):
        first.outcome()
    assert board.result("k") is None
    second = board.submit("k", Job(flaky))
    assert second is not first and second.outcome() == "second try" and board.result("k") == "second try"


def test_the_board_drops_the_least_recently_used_finished_jobs_but_never_a_running_one():
    release = threading.Event()
    board = JobBoard(max_entries=2)
    running = board.submit("slow", Job(lambda job: release.wait(5)))
    for key in ("a", "b", "c"):
        board.submit(key, Job(lambda job, key=key: key)).wait(5)
    assert board.get("slow") is running and board.get("a") is None and board.result("c") == "c"
    release.set()
    running.wait(5)
