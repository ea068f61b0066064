"""`plan`: parameters, layout, memory per device and a probed time estimate, before a long job runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from headlab.engine.cli.main import main
from headlab.engine.models.load import load_model
from headlab.engine.runtime.plan import JOB_DEFAULTS, JOBS, plan_job
from tests.tiny import save_tiny

APP = str(Path(__file__).resolve().parent.parent / "app.py")
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("plan") / "llama", "llama"))


def _weights(folder: str) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of the model loaded whole."""
    model = load_model(folder).model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(p.numel() for p in model.parameters()), sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("job", JOBS)
def test_plan_counts_the_parameters_and_the_weights_on_the_layout_without_loading(folder, job):
    n, nbytes = _weights(folder)
    plan = plan_job(job, model=folder, probe=False)
    assert plan.parameters == n
    assert plan.layout == {"cpu": [""]}
    assert [d.device for d in plan.devices] == ["cpu"]
    if job != "distill":
        assert plan.devices[0].weight_bytes == nbytes
    else:  # the teacher plus a student with gradients and AdamW's two moments
        assert plan.devices[0].weight_bytes == pytest.approx(nbytes + n * (2 * 4 + 2 * 4), abs=1)
    assert plan.devices[0].activation_bytes > 0
    assert plan.estimated_seconds is None and "no probe run" in "\n".join(plan.lines())


def test_a_tied_lm_head_is_counted_once(tmp_path):
    gpt2 = str(save_tiny(tmp_path / "gpt2", "gpt2"))  # GPT-2 ties its LM head to the token embedding
    n, nbytes = _weights(gpt2)
    plan = plan_job("score", model=gpt2, probe=False)
    assert plan.parameters == n and plan.devices[0].weight_bytes == nbytes


def test_half_precision_halves_the_weight_bytes(folder):
    full = plan_job("score", model=folder, probe=False)
    half = plan_job("score", model=folder, dtype="bfloat16", probe=False)
    assert half.devices[0].weight_bytes * 2 == full.devices[0].weight_bytes
    assert half.dtype == "bfloat16"


def test_a_device_map_puts_each_modules_weights_on_its_device(folder):
    plan = plan_job("score", model=folder, device_map=SPLIT, probe=False)
    by_device = {d.device: d for d in plan.devices}
    assert set(by_device) == {"cpu", "disk"}
    handle = load_model(folder)
    layer1 = sum(p.numel() * 4 for p in handle.adapter.layers()[1].parameters())
    head = handle.model.lm_head.weight.numel() * 4
    assert by_device["disk"].weight_bytes == layer1 + head
    assert by_device["disk"].activation_bytes == 0
    assert "disk: layer 1, lm_head" in plan.lines()[1]


def test_more_processes_split_the_work_the_job_splits(folder):
    one = plan_job("score", model=folder, probe=True)
    two = plan_job("score", model=folder, processes=2, probe=True)
    # the capture batches and the heads halve; the dense pass and the record are done by every rank
    assert one.forward_equivalents / 2 < two.forward_equivalents < one.forward_equivalents
    masks = plan_job("train-masks", model=folder, processes=5, probe=False)
    assert "(1 mask(s) per process)" in masks.work


def test_the_probe_gives_a_time_estimate_on_an_open_handle(folder):
    handle = load_model(folder, device_map=SPLIT)
    plan = plan_job("train-masks", handle=handle)
    assert plan.probe_seconds > 0 and plan.estimated_seconds > 0
    assert plan.estimated_seconds == pytest.approx(plan.forward_equivalents * plan.probe_seconds)
    assert plan.probe_tokens == JOB_DEFAULTS["train-masks"].batch_size * JOB_DEFAULTS["train-masks"].max_length
    assert {d.device for d in plan.devices} == {"cpu", "disk"}


def test_bad_plans_are_refused(folder):
    with pytest.raises(ValueError, match="unknown job"):
        plan_job("quantize", model=folder, probe=False)
    with pytest.raises(ValueError, match="one model per process"):
        plan_job("score", model=folder, device_map="auto", processes=2, probe=False)


def test_the_plan_verb_prints_the_plan_and_writes_json(folder, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--job", "distill", "--model", folder, "--steps", "10", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for line in ("plan: distill on", "layout: cpu: whole model", "memory per device (estimate): cpu",
                 "work: 10 steps", "estimated time:"):
        assert line in text
    saved = json.loads(out.read_text())
    assert saved["shape"]["steps"] == 10 and saved["estimated_seconds"] > 0
    assert main(["plan", "--job", "score", "--model", folder, "--processes", "2", "--device-map", "auto",
                 "--no-probe"]) == 2
    assert "one model per process" in capsys.readouterr().err


def test_the_prune_page_shows_the_plan_of_a_suggestion_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_MODEL", str(save_tiny(tmp_path / "tiny-llama", "llama")))
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/prune.py").run()
    assert not at.exception
    plans = [e for e in at.expander if e.label.startswith("Plan: about ")]
    assert len(plans) == 1 and " on cpu" in plans[0].label
    text = plans[0].code[0].value
    assert "plan: suggest on" in text and "estimated time:" in text and "layout: cpu: whole model" in text
