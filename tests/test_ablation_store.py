"""Per-head costs kept on disk as measured: an interrupted measurement resumes where it stopped."""

from __future__ import annotations

import json

import pytest
import torch

from headlab.engine.core.jobs import Job
from headlab.engine.importance.ablation_store import AblationStore
from headlab.engine.pruning.strategies import Calibration
from headlab.engine.pruning.strategies.scores import ablation_scores
from tests.tiny import tiny_handle

TEXTS = ["The cat sat on the mat and looked out of the window.", "Rivers carry water from the hills to the sea.",
         "A small shop sold bread, milk and the morning papers.", "Numbers 3, 14 and 15 were drawn."]


class Stop(Exception):
    pass


def calibration(tmp_path) -> Calibration:
    c = Calibration(list(TEXTS), max_length=32, name="test")
    c.persist_dir = tmp_path  # the per-head costs go to tmp_path / "ablation"
    return c


def test_an_interrupted_measurement_resumes_from_the_heads_on_disk(tmp_path):
    h = tiny_handle("llama")  # 2 layers x 4 heads
    reference, _ = ablation_scores(h, Calibration(list(TEXTS), max_length=32, name="test"), mean=True)

    def stop_after_three(done, total):
        if total == 8 and done == 3:
            raise Stop

    first = calibration(tmp_path)
    with pytest.raises(Stop):
        ablation_scores(h, first, mean=True, progress=stop_after_three)
    files = list((tmp_path / "ablation").glob("ablation-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["values"]) == 3

    seen = []
    again = calibration(tmp_path)  # a new server: nothing in memory
    delta, _ = ablation_scores(h, again, mean=True, progress=lambda d, t: seen.append((d, t)))
    head_steps = [d for d, t in seen if t == 8]
    assert head_steps[0] == 3, "the progress starts after the three heads already measured"
    assert head_steps[-1] == 8 and len([d for d in head_steps if d > 3]) == 5  # five heads measured now
    assert torch.allclose(delta, reference, atol=1e-6)
    assert len(json.loads(files[0].read_text())["values"]) == 8


def test_a_store_reads_only_its_own_runs(tmp_path):
    h = tiny_handle("llama")
    store = AblationStore.for_run(tmp_path, h, TEXTS, max_length=32, mean=True)
    store.add(0, 1, 0.5)
    store.flush()
    assert AblationStore.for_run(tmp_path, h, TEXTS, max_length=32, mean=True).load() == {(0, 1): 0.5}
    assert AblationStore.for_run(tmp_path, h, TEXTS[:3], max_length=32, mean=True).load() == {}
    assert AblationStore.for_run(tmp_path, h, TEXTS, max_length=32, mean=False).load() == {}
    other = tiny_handle("llama", seed=1)  # same name and shape, other weights
    assert AblationStore.for_run(tmp_path, other, TEXTS, max_length=32, mean=True).load() == {}
    store.path.write_text("{not json")
    assert AblationStore.for_run(tmp_path, h, TEXTS, max_length=32, mean=True).load() == {}


def test_a_job_reports_elapsed_time_and_an_eta_from_its_own_rate():
    def work(job):
        job.report(10, 20)  # a resumed job: 10 done before it started
        job.report(12, 20)
        return "ok"

    job = Job(work, name="resumed")
    assert job.eta() is None and job.elapsed == 0.0
    job.run()
    assert job.result == "ok" and job.elapsed >= 0.0 and job.started_at is not None
    assert job.eta() is None  # finished

    partial = Job(lambda j: None, name="manual")
    partial.report(10, 20)
    partial._rate_from = (partial._rate_from[0] - 4.0, 10)  # 4 s ago at 10 done
    partial.report(12, 20)  # 2 heads in 4 s: 8 left take 16 s
    assert partial.eta() == pytest.approx(16.0, rel=0.05)
