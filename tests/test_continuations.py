"""Mixed calibration: WikiText paragraphs and the model's own answers to training prompts, never reserved text."""

from __future__ import annotations

import json

import pytest

from headlab.engine.data.datasets import calibration_texts
from headlab.engine.pruning.strategies import CALIBRATION_CHOICES, Budget, Calibration, get_strategy
from headlab.engine.pruning.strategies.reconstruct import AUTO_ALLOCATION, refit_texts
from headlab.engine.runtime.continuations import MIXED, mixed_texts, prompt_split
from headlab.engine.runtime.regions import check_fit_texts, guard, reserved_texts
from tests.tiny import tiny_handle


@pytest.fixture
def handle(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path))  # the answers are cached there
    return tiny_handle("llama")


def test_mixed_texts_alternate_wikitext_and_the_models_answers(handle):
    texts = mixed_texts(handle, 7, max_new_tokens=3)
    wiki, prompts = calibration_texts("wikitext", 4), prompt_split()[0][:3]
    assert len(texts) == 7 and texts[0::2] == wiki
    for text, prompt in zip(texts[1::2], prompts):
        tail = prompt[-40:]  # (the tiny model's short context keeps a long prompt's end)
        assert tail in text and not text.endswith(tail)  # the prompt, then what the model wrote
    assert mixed_texts(handle, 7, max_new_tokens=3) == texts  # cached and deterministic
    assert not reserved_texts() & {t.strip() for t in prompt_split()[0] + prompt_split()[1]}
    check_fit_texts(handle, texts, "mixed")


def test_a_mixed_calibration_needs_the_model_and_at_least_one_text(handle):
    assert MIXED in CALIBRATION_CHOICES
    with pytest.raises(ValueError, match="pass the model"):
        Calibration.shipped(MIXED, 8)
    with pytest.raises(ValueError, match="at least one text"):
        mixed_texts(handle, 0)
    calib = Calibration.shipped(MIXED, 4, max_length=32, handle=handle)
    assert calib.name == MIXED and len(calib.texts) == 4


def test_reconstruction_on_mixed_text_reads_no_protected_text_and_refits_on_more(handle):
    calib = Calibration.shipped(MIXED, 4, max_length=32, handle=handle)
    more = refit_texts(calib, 10, handle)
    assert len(more) == 10 and more[:4] == calib.texts  # the same mixture, longer
    assert refit_texts(calib, 10) == calib.texts  # without the model it cannot answer: the calibration's own
    with guard(handle) as g:
        mask = get_strategy("obs", n_texts=10)(handle, Budget(heads=0.25, ffn=0.25), calib)
    assert g.checked > 0 and mask.meta["allocation"] == AUTO_ALLOCATION["width"]


def test_the_command_line_scores_on_mixed_text(handle, tmp_path):
    from headlab.engine.cli.main import main
    from tests.tiny import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    out = tmp_path / "scores.json"
    rc = main(["score", "--model", str(folder), "--calibration", "mixed", "--n-texts", "4", "--max-length", "32",
               "--criteria", "magnitude,entropy", "--out", str(out)])
    assert rc == 0
    written = json.loads(out.read_text())
    assert written["calibration"] == "mixed" and written["n_texts"] == 4 and written["rows"]
