"""A few checks on the shipped real models (SmolLM2-135M-Instruct and the MiniLM encoder)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from headlab.engine.cli.main import main
from headlab.engine.core.mask import PruneMask
from headlab.engine.runtime.evaluate import PerplexityProtocol, generate, perplexity

pytestmark = pytest.mark.real_model


def test_default_model_dense_perplexity_matches_the_measured_protocol(smollm):
    r = perplexity(smollm)
    assert r.n_tokens == 12 * 511
    assert r.perplexity == pytest.approx(33.92, abs=0.1)
    assert "window 512, stride 512, 12 windows, 6,132 scored tokens" in r.describe()


def test_pruning_the_sink_layer_hurts_and_a_dense_mask_does_not(smollm):
    quick = PerplexityProtocol(window=256, stride=256, n_windows=2)
    dense = perplexity(smollm, None, quick).perplexity
    assert perplexity(smollm, PruneMask.dense(smollm.geometry), quick).perplexity == pytest.approx(dense, rel=1e-6)
    hurt = PruneMask.dense(smollm.geometry).with_block(0, "attn", 0.0)
    assert perplexity(smollm, hurt, quick).perplexity > 2 * dense


def test_generation_answers_and_changes_under_a_heavy_mask(smollm):
    dense = generate(smollm, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in dense
    m = PruneMask.dense(smollm.geometry)
    m.attn[:6] = 0
    assert generate(smollm, "What is the capital of France?", m, max_new_tokens=12) != dense


@pytest.mark.parametrize("model,layers,heads", [("smollm2-135m-instruct", 30, 9), ("minilm", 6, 12)])
def test_cli_score_writes_every_criterion_for_every_head(tmp_path, model, layers, heads):
    out = tmp_path / "scores.csv"
    rc = main(["score", "--model", model, "--n-texts", "2", "--max-length", "48", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == layers * heads
    for crit in ("entropy", "magnitude", "gradient", "activation"):
        values = [float(r[f"{crit}_importance"]) for r in rows]
        assert all(v == v for v in values) and len(set(values)) > 1, crit


def test_cli_prune_then_eval_round_trips_the_mask(tmp_path, capsys):
    mask_path = tmp_path / "mask.json"
    rc = main(["prune", "--criterion", "magnitude", "--budget", "27", "--no-eval", "--out", str(mask_path)])
    assert rc == 0
    mask = PruneMask.load(mask_path)
    assert mask.summary()["heads_pruned"] == 27 and mask.meta["criterion"] == "magnitude"
    rc = main(["eval", "--mask", str(mask_path), "--windows", "1", "--window", "128", "--stride", "128",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["masked"]["perplexity"] > result["dense"]["perplexity"]


def test_cli_reports_a_bad_mask_file_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "headlab.prune_mask", "heads": [[1.0]], "ffn": [[1.0]], "attn": [1.0],
                               "ffn_block": [1.0]}))
    assert main(["eval", "--mask", str(bad), "--windows", "1"]) == 2
    assert "mask.heads has shape (1, 1) but this model needs (30, 9)" in capsys.readouterr().err


def test_minilm_is_a_real_bert_encoder(minilm):
    g = minilm.geometry
    assert (g.n_layers, g.n_heads, g.hidden) == (6, 12, 384) and not g.causal
    with pytest.raises(ValueError, match="causal language model"):
        perplexity(minilm)
    ids = minilm.tokenizer(["a sentence"], return_tensors="pt")
    with torch.no_grad():
        assert minilm.model(**ids).last_hidden_state.shape[-1] == 384
