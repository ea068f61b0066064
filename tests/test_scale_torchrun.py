"""Data-parallel jobs under a real `torchrun` (2 processes, gloo, one thread each) against one process.

The one-process baselines run in this process on one thread, the same computation each rank does.

Tolerances: ablation KL is bit-identical (each head is measured by one rank, exactly as one process
does); capture statistics (entropy, gradients) add the same per-batch sums in another order, so they
agree to 1e-5 relative; per-cluster masks are bit-identical (one full training run per mask, same
seed); distillation with shares of equal token counts gives the same losses to 1e-3 relative (KLs of
~3e-4 in float32) and the same weights to 1e-4. Each torchrun takes a few seconds (two Python
start-ups dominate); every subprocess has a timeout.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headlab.engine.cli.main import main
from tests.scale_jobs import distill_job, ipn_job, router_job
from tests.tiny import save_tiny, tiny_handle

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds, per command: a hang fails the test instead of the suite
SCORE = ["score", "--criteria", "ablation,gradient,entropy", "--n-texts", "6", "--batch-size", "2",
         "--max-length", "32"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HEADLAB_DIST_TIMEOUT="120", PYTHONPATH=str(ROOT))
    return env


def _one_and_two(tmp_path: Path, job, name: str) -> tuple[dict, dict]:
    """The JSON results of tests.scale_jobs' `job` run in this process and under a 2-process torchrun."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert job(str(one)) == 0
    r2 = _torchrun(["tests.scale_jobs", name, str(two)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    return json.loads(one.read_text()), json.loads(two.read_text())


def _torchrun(argv: list[str], processes: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node PROCESSES -m ARGV` from the repository root (`env` added to the environment)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", *argv]
    return subprocess.run(cmd, check=False, cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True,
                          timeout=TIMEOUT)


@pytest.fixture
def one_thread():
    """This process computes on one thread while the test runs, as each rank does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_ablation_scoring_on_two_processes_equals_one(tiny_folder, tmp_path, one_thread, capsys):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert main([*SCORE, "--model", str(tiny_folder), "--out", str(one)]) == 0
    r2 = _torchrun(["headlab", *SCORE, "--model", str(tiny_folder), "--out", str(two)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("wrote 8 heads") == 1  # rank 0 alone reports and writes
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == 8
    assert any(row["ablation_importance"] != 0 for row in a)
    for x, y in zip(a, b):
        assert x["ablation_importance"] == y["ablation_importance"]
        for col in ("gradient_importance", "entropy_importance", "entropy", "sink"):
            assert y[col] == pytest.approx(x[col], rel=1e-5, abs=1e-7), col
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "two.csv"]  # no temporary left behind


def test_mask_training_on_two_processes_equals_one(tmp_path, one_thread):
    a, b = _one_and_two(tmp_path, router_job, "router")
    assert (a["world"], b["world"]) == (1, 2)
    assert a["trained"] == b["trained"] == ["cluster 0", "cluster 1", "cluster 2", "static"]
    assert a["masks"] == b["masks"]  # cluster 0 and 2 trained on rank 0, cluster 1 and the static one on rank 1
    assert a["static"] == b["static"]
    assert any(min(m["ffn_block"] + m["attn"]) == 0.0 for m in a["masks"])  # the masks do remove something


def test_importance_network_training_runs_data_parallel(tmp_path, one_thread):
    a, b = _one_and_two(tmp_path, ipn_job, "ipn")
    assert len(b["history"]) == 3
    # The KL term is the whole batch's on both (the first step's network is the same untrained one).
    assert b["history"][0]["kl"] == pytest.approx(a["history"][0]["kl"], rel=1e-4)
    assert a["params"].keys() == b["params"].keys()


def test_distillation_on_two_processes_equals_one(tmp_path, one_thread):
    a, b = _one_and_two(tmp_path, distill_job, "distill")
    assert b["world"] == 2 and len(b["loss"]) == 4  # the starting point and 3 steps
    assert b["heldout"] == a["heldout"]
    # Shares of one text each hold as many tokens as each other, so the mean of the shares' gradients is
    # the batch's gradient: the students agree up to the order of float sums.
    assert b["loss"][1:] == pytest.approx(a["loss"][1:], rel=1e-3)  # float32 KLs of ~3e-4, summed in another order
    for name, w in a["weights"].items():
        assert torch.allclose(torch.tensor(b["weights"][name]), torch.tensor(w), rtol=1e-4, atol=1e-6), name
    start = dict(tiny_handle("llama").model.named_parameters())
    moved = [n for n, w in a["weights"].items() if n in start and start[n].numel() == len(w)
             and not torch.equal(start[n].detach().flatten(), torch.tensor(w))]
    assert moved, "the three steps changed no weight: the comparison would prove nothing"


def test_the_distill_verb_runs_on_two_processes_and_rank_0_writes_the_run(tiny_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["headlab", "distill", "--model", str(tiny_folder), "--keep", "0.7", "--steps", "2", "--batch-size", "2",
            "--max-length", "32", "--n-wikitext", "6", "--n-prompts", "2", "--max-new-tokens", "3",
            "--n-score-texts", "2", "--no-eval", "--out", str(out)]
    r = _torchrun(argv, HEADLAB_CACHE=str(tmp_path / "cache"))  # the teacher's answers are cached there
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote the student") == 1
    assert len(list((tmp_path / "cache" / "distill").glob("continuations-*.json"))) == 1
    result = json.loads((out / "result.json").read_text())
    assert result["steps_run"] == 2
    assert (out / "student" / "config.json").is_file() and (out / "mask.json").is_file()


def test_a_failing_rank_stops_the_job_with_its_error_and_no_output(tiny_folder, tmp_path):
    out = tmp_path / "scores.csv"
    argv = ["tests.scale_jobs", "failing-rank", "1", "ablation", *SCORE, "--criteria", "ablation",
            "--model", str(tiny_folder), "--out", str(out)]
    r = _torchrun(argv)
    assert r.returncode != 0
    assert "ablation scoring failed on 1 of 2 ranks (rank 1: RuntimeError: injected failure on rank 1)" in r.stderr
    assert "nothing was written" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_rank_failing_inside_a_training_step_stops_the_job_and_nothing_is_written(tiny_folder, tmp_path):
    out = tmp_path / "ipn"
    argv = ["tests.scale_jobs", "failing-rank", "1", "ipn-step", "dynamic-train", "--model", str(tiny_folder),
            "--steps", "2", "--batch", "2", "--calib-window", "32", "--calib-windows", "2", "--out", str(out)]
    r = _torchrun(argv)
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_verb_that_does_not_split_its_work_refuses_torchrun(tiny_folder, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the refusal comes before any process group
    monkeypatch.setenv("RANK", "1")
    assert main(["eval", "--model", str(tiny_folder), "--window", "32", "--stride", "32", "--windows", "2"]) == 2
    assert "[rank 1] error: `eval` does not split its work across processes" in capsys.readouterr().err
