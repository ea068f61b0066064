"""Several sessions at once: shared work is done once, and a session that stops waiting stops nothing.

Each AppTest is one browser session of the same process (caches and background jobs are
process-wide), on a tiny saved Llama. The slow steps are made slower (a pause inside them)
so that sessions really overlap.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import streamlit as st
import streamlit.testing.v1.app_test as app_test_module
from streamlit.runtime import Runtime
from streamlit.testing.v1 import AppTest

import headlab.engine.importance.capture as capture_module
import headlab.engine.pruning.strategies.scores as scores_module
import headlab.engine.runtime.evaluate as evaluate_module
from headlab.engine.core.jobs import DONE, RUNNING
from headlab.ui.scoring import APP_CRITERIA, DEFAULT_CALIBRATION
from headlab.ui.shared_cache import shared_cache
from tests.tiny import save_tiny

APP = str(Path(__file__).resolve().parent.parent / "app.py")
SESSIONS = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_tiny(path, "llama")
    return path


@pytest.fixture
def fresh_app(tiny_dir, monkeypatch):
    """The tiny model by default, and nothing computed yet in this process."""
    monkeypatch.setenv("HEADLAB_MODEL", str(tiny_dir))
    st.cache_resource.clear()
    st.cache_data.clear()
    evaluate_module._wikitext_ids.cache_clear()
    return tiny_dir


class _KeepRuntime:
    """AppTest sets the process-wide Runtime instance for each run and unsets it when the run ends;
    with several runs at once the first to end would unset it under the others. This keeps it set."""

    def __setattr__(self, name: str, value) -> None:
        if value is not None:
            setattr(Runtime, name, value)


@pytest.fixture
def concurrent_apptests(monkeypatch):
    monkeypatch.setattr(app_test_module, "Runtime", _KeepRuntime())
    yield
    Runtime._instance = None


def _patch_everywhere(monkeypatch, real, replacement) -> None:
    for module in list(sys.modules.values()):  # every module that imported the function by name
        if module is not None and vars(module).get(real.__name__) is real:
            monkeypatch.setattr(module, real.__name__, replacement)


def _heads_page(at: AppTest) -> AppTest:
    assert not at.exception, [e.message for e in at.exception]
    assert at.title[0].value == "Heads"
    return at


def test_four_sessions_opening_at_once_tokenise_the_evaluation_text_once_and_score_once(fresh_app, monkeypatch,
                                                                                       concurrent_apptests):
    calls: Counter[str] = Counter()
    real_read, real_capture, real_criterion = (evaluate_module.read_wikitext, capture_module.capture,
                                               scores_module.get_criterion)

    def read_wikitext():  # called once per tokenisation of the evaluation text
        calls["tokenise"] += 1
        time.sleep(0.5)
        return real_read()

    def capture(*args, **kwargs):
        calls["capture"] += 1
        time.sleep(0.5)
        return real_capture(*args, **kwargs)

    def get_criterion(name):
        calls[f"criterion:{name}"] += 1
        return real_criterion(name)

    monkeypatch.setattr(evaluate_module, "read_wikitext", read_wikitext)
    _patch_everywhere(monkeypatch, real_capture, capture)
    monkeypatch.setattr(scores_module, "get_criterion", get_criterion)

    apps = [AppTest.from_file(APP, default_timeout=180) for _ in range(SESSIONS)]
    threads = [threading.Thread(target=at.run) for at in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for at in apps:
        _heads_page(at)
    assert calls["tokenise"] == 1
    assert calls["capture"] == 1
    assert all(calls[f"criterion:{name}"] == 1 for name in APP_CRITERIA), calls
    shown = {tuple(m.value for m in at.metric) for at in apps}
    assert len(shown) == 1  # every session shows the same dense perplexities


def test_a_session_that_stops_waiting_during_scoring_and_a_reload_reuse_the_same_running_capture(
        fresh_app, monkeypatch, concurrent_apptests):
    real_capture, started, release, calls = capture_module.capture, threading.Event(), threading.Event(), []

    def capture(*args, progress=None, **kwargs):
        calls.append(1)
        if progress:
            progress(0, 1)  # something to draw, so the waiting session polls the job
        started.set()
        release.wait(120)
        return real_capture(*args, progress=progress, **kwargs)

    _patch_everywhere(monkeypatch, real_capture, capture)
    first = AppTest.from_file(APP, default_timeout=180)
    with pytest.raises(RuntimeError):  # the run is stopped while it waits for the capture (a rerun, a closed tab)
        first.run(timeout=3)
    assert started.is_set()
    jobs = [j for j in shared_cache("calibration", 4).jobs._jobs.values()]
    assert len(jobs) == 1 and jobs[0].state == RUNNING  # the session's stop ended its wait, not the work

    reloaded = AppTest.from_file(APP, default_timeout=180)  # a page reload is a new session
    waiting = threading.Thread(target=reloaded.run)
    waiting.start()
    time.sleep(1.0)
    release.set()
    waiting.join(180)
    _heads_page(reloaded)
    assert jobs[0].state == DONE and len(calls) == 1
    _heads_page(first.run())  # the first session, run again, takes the finished result too
    assert len(calls) == 1
    assert DEFAULT_CALIBRATION.describe() in " ".join(c.value for c in reloaded.caption)
