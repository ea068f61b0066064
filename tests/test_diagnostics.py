"""Head diagnostics: the kind rules, the numbers behind them, and the plain-language reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headlab.engine.importance.capture import capture
from headlab.engine.importance.diagnostics import (
    HEAD_KINDS,
    THRESHOLDS,
    classify_head,
    diagnose,
    diagnosis_rows,
    kind_counts,
)
from tests.app_jobs import run_after_jobs
from tests.test_compensation import constant_kv_group
from tests.tiny import save_tiny, tiny_handle

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Diagnostics explain scores", "a b c d e f g h i j k l"]


@pytest.mark.parametrize("sink, prev, local, ent, kind", [
    (0.9, 0.0, 0.1, 0.1, "sink"),
    (0.1, 0.8, 0.9, 0.2, "previous-token"),
    (0.1, 0.2, 0.7, 0.4, "local"),
    (0.05, 0.1, 0.15, 0.9, "broad"),
    (0.35, 0.1, 0.2, 0.7, "mixed"),
    (0.1, 0.1, 0.2, 0.3, "mixed"),
])
def test_classify_head_follows_the_documented_rules_in_order(sink, prev, local, ent, kind):
    got, reason = classify_head(sink, prev, local, ent)
    assert got == kind
    assert reason  # every label comes with the numbers that decided it


def test_a_sink_label_quotes_its_sink_mass():
    kind, reason = classify_head(0.83, 0.0, 0.0, 0.1)
    assert kind == "sink" and "83%" in reason and f"{THRESHOLDS['sink']:.0%}" in reason


def test_diagnose_gives_one_row_per_head_with_consistent_ranks(handle):
    g = handle.geometry
    stats = capture(handle, TEXTS, gradients=False)
    d = diagnose(handle, stats)
    n = g.n_layers * g.n_heads
    assert len(d) == n and [(x.layer, x.head) for x in d[:2]] == [(0, 0), (0, 1)]
    assert sorted(x.entropy_rank for x in d) == list(range(1, n + 1))
    assert sorted(x.magnitude_rank for x in d) == list(range(1, n + 1))
    assert all(x.kind in HEAD_KINDS and 0 <= x.constant_share <= 1 + 1e-6 for x in d)
    highest = max(d, key=lambda x: x.entropy)
    assert highest.entropy_rank == 1, "entropy prunes the broadest head first"
    assert all(x.why_entropy.startswith("entropy ranks it") and "magnitude ranks it" in x.why_magnitude for x in d)


def test_a_head_with_constant_output_has_a_constant_share_of_one():
    handle = tiny_handle("qwen2")
    heads = constant_kv_group(handle, layer=0, kv=1)
    stats = capture(handle, TEXTS, gradients=False)
    d = {(x.layer, x.head): x for x in diagnose(handle, stats)}
    assert all(d[0, h].constant_share == pytest.approx(1.0, abs=1e-4) for h in heads)
    others = [h for h in range(handle.geometry.n_heads) if h not in heads]
    assert all(d[0, h].constant_share < 0.99 for h in others)


def test_rows_and_counts_cover_every_head_and_kind(llama_handle):
    stats = capture(llama_handle, TEXTS, gradients=False)
    d = diagnose(llama_handle, stats)
    rows = diagnosis_rows(d)
    counts = kind_counts(d)
    assert set(counts) == set(HEAD_KINDS) and sum(counts.values()) == len(rows)
    assert {"layer", "head", "kind", "sink", "reason", "why_entropy", "why_magnitude"} <= set(rows[0])


def test_measured_cost_is_attached_when_given(llama_handle):
    g = llama_handle.geometry
    stats = capture(llama_handle, TEXTS, gradients=False)
    kl = torch.arange(g.n_layers * g.n_heads, dtype=torch.float32).view(g.n_layers, g.n_heads) / 100
    d = diagnose(llama_handle, stats, ablation=kl)
    assert d[3].ablation_kl == pytest.approx(0.03)
    assert diagnose(llama_handle, stats)[0].ablation_kl is None


# --- the Diagnostics page, on a tiny saved model --------------------------------------------------
APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


def test_diagnostics_page_shows_a_kind_per_head_and_measures_costs_on_request(tiny_llama_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HEADLAB_MODEL", str(tiny_llama_dir))
    at = AppTest.from_file(APP, default_timeout=240).run()
    at.switch_page("pages/diagnostics.py").run()
    assert not at.exception
    assert at.title[0].value == "Diagnostics"
    table = head_table(at)
    assert len(table) == 8 and set(table["kind"]) <= set(HEAD_KINDS)
    assert "ablation_kl" not in table.columns
    next(b for b in at.button if b.label.startswith("Measure each head")).click()
    at.run()
    assert not at.exception
    run_after_jobs(at)  # a job on the server: the page did not wait for it
    assert not at.exception
    assert "ablation_kl" in head_table(at).columns
    jobs_view = at.table[-1].value  # the Jobs view lists it, finished
    assert any(j.startswith("Measuring each head's cost") and s == "done"
               for j, s in zip(jobs_view.index, jobs_view["state"]))


def head_table(at):
    """The per-head table (the one with a head_id column and a row per head)."""
    return next(d.value for d in at.dataframe if "head_id" in d.value.columns and "kind" in d.value.columns)
