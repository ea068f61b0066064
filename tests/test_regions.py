"""Validation, main and held-out text stay apart: every method is run under a guard that fails if it reads any
text reserved for evaluation or for choosing, and the evaluations themselves trip it (so it can fail)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.data.datasets import wikitext_calibration, wikitext_paragraphs, wikitext_stream
from headlab.engine.pruning.strategies import Budget, Calibration, get_strategy
from headlab.engine.pruning.strategies.depth import depth_prune
from headlab.engine.pruning.strategies.reconstruct import (
    AUTO_ALLOCATION,
    DEFAULT_INPUTS,
    DEPTH_INPUTS,
    GLOBAL_NORMALISATION,
    REFIT_TEXTS,
    ObsStrategy,
    depth_refit_prune,
    refit_texts,
    width_by_reconstruction,
)
from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity
from headlab.engine.runtime.regions import (
    REGIONS,
    EvaluationLeak,
    check_fit_texts,
    check_region_windows,
    fit_paragraphs,
    guard,
    ood_items,
    ood_nll,
    ood_validation_items,
    region_perplexity,
    region_windows,
    training_prompts,
)
from tests.tiny import tiny_handle

ROOT = Path(__file__).resolve().parent.parent


def test_the_regions_are_disjoint_and_validation_lies_between_main_and_held_out():
    main, val, ho = REGIONS["main"], REGIONS["validation"], REGIONS["heldout"]
    assert main.end <= val.start and val.end <= ho.start


def test_the_guard_trips_on_every_evaluation_and_on_validation_unless_allowed():
    h = tiny_handle("llama")
    with guard(h) as g, pytest.raises(EvaluationLeak):
        perplexity(h, None, PerplexityProtocol(window=128, stride=128, n_windows=1))
    assert g.checked > 0
    windows = region_windows(h, "validation", n=1, window=128)
    with guard(h), pytest.raises(EvaluationLeak):
        region_perplexity(h, None, windows)
    with guard(h, allow=("validation",)):
        region_perplexity(h, None, windows)  # choosing reads validation text, and may
    with guard(h), pytest.raises(EvaluationLeak):
        region_perplexity(h, None, region_windows(h, "heldout", n=1, window=128))
    with guard(h), pytest.raises(EvaluationLeak):
        ood_nll(h, None, ood_items(1))
    # the out-of-domain part of validation is validation: guarded, and read where choosing is allowed
    with guard(h), pytest.raises(EvaluationLeak):
        ood_nll(h, None, ood_validation_items(1))
    with guard(h, allow=("validation",)):
        ood_nll(h, None, ood_validation_items(1))


def test_fit_texts_come_after_the_held_out_windows():
    h = tiny_handle("llama")
    assert "fit texts" in check_fit_texts(h, wikitext_calibration(128))
    with pytest.raises(EvaluationLeak, match="before the end of the held-out"):
        check_fit_texts(h, wikitext_calibration(1300))


def test_the_fit_region_holds_exactly_fit_paragraphs_and_their_running_text():
    h = tiny_handle("llama")
    n = fit_paragraphs(h)
    assert 128 < n < len(wikitext_paragraphs())
    check_fit_texts(h, wikitext_calibration(n))
    check_fit_texts(h, wikitext_stream(h.tokenizer, n, 512), "running text")
    with pytest.raises(EvaluationLeak, match="before the end of the held-out"):
        check_fit_texts(h, wikitext_calibration(n + 1))


def test_a_benchmark_scores_exactly_the_regions_its_fit_texts_were_checked_against():
    h = tiny_handle("llama")
    main, heldout = region_windows(h, "main"), region_windows(h, "heldout")
    check_region_windows(h, main=main, heldout=heldout)
    with pytest.raises(EvaluationLeak, match="not the heldout region"):
        check_region_windows(h, heldout=region_windows(h, "heldout", n=4))
    with pytest.raises(EvaluationLeak, match="not the main region"):
        check_region_windows(h, main=main.roll(1, dims=1))
    with pytest.raises(ValueError, match="unknown region"):
        check_region_windows(h, calibration=main)


def test_out_of_domain_validation_items_are_not_the_scored_ones():
    scored = {i.scored.strip() for i in ood_items()}
    validation = {i.scored.strip() for i in ood_validation_items()}
    assert len(validation) >= 30 and not scored & validation
    assert {i.source for i in ood_validation_items()} == {i.source for i in ood_items()}


def test_training_prompts_never_hold_an_out_of_domain_item():
    items = (*ood_items(), *ood_validation_items())
    scored = {i.scored.strip() for i in items} | {i.context.strip() for i in items if i.context}
    for name in ("mt_bench", "vicuna_bench", "gsm8k"):
        texts = training_prompts(name, 10_000)
        assert texts and not scored & {t.strip() for t in texts}
    # vicuna_bench's last prompt is also mt_bench's first: it is kept out of training
    assert "Compose an engaging travel blog post" not in " ".join(training_prompts("mt_bench", 5))


@pytest.mark.parametrize("method", ["flap", "ablation+comp", "gradient", "hardconcrete+comp", "flap-refit", "obs"])
def test_no_head_method_reads_evaluation_or_validation_text(method):
    h = tiny_handle("llama")
    calib = Calibration.shipped("wikitext", 8, max_length=64)
    kwargs = {"steps": 4} if method.startswith("hardconcrete") else {}
    with guard(h) as g:
        mask = get_strategy(method, **kwargs)(h, Budget(heads=0.25), calib)
    assert g.checked > 0 and isinstance(mask, PruneMask)


def test_reconstruction_and_joint_allocation_read_only_fit_text():
    h = tiny_handle("llama")
    calib = Calibration.shipped("wikitext", 8, max_length=64)
    with guard(h) as g:
        ObsStrategy(allocation="global", inputs="all")(h, Budget(heads=0.25, ffn=0.25), calib)
        width_by_reconstruction(h, 0.8, calib)
        depth_refit_prune(h, 0.5, "block_influence-refit", calib)
        depth_prune(h, 0.5, "ablation-iterative", calib)
    # everything read was fit text: more tokens than the calibration alone holds
    assert g.checked > sum(len(t) for t in calib.texts[:2])
    check_fit_texts(h, refit_texts(calib), "re-fit")


def _chosen(config: str, stage: str) -> str | None:
    path = ROOT / "bench" / "results" / "choices.csv"
    rows = [r for r in csv.DictReader(path.open()) if r["config"] == config and r["stage"] == stage]
    chosen = [r["candidate"] for r in rows if r["chosen"] == "True"]
    assert len(chosen) <= 1
    if chosen:  # the winner scored lowest on validation, and only validation was scored
        best = min(rows, key=lambda r: float(r["ppl_validation"]))
        assert best["candidate"] == chosen[0]
    return chosen[0] if chosen else None


def test_the_defaults_are_the_settings_chosen_on_validation():
    """bench/bench_choices.py picks each default on the validation region; the code uses exactly those."""
    inputs = _chosen("width20", "inputs")
    assert inputs == f"inputs={DEFAULT_INPUTS}"
    assert _chosen("width20", "allocation") == f"allocation={AUTO_ALLOCATION['width']}"
    assert _chosen("heads30", "allocation") == f"allocation={AUTO_ALLOCATION['heads']}"
    assert _chosen("depth20", "inputs") in (None, f"inputs={DEPTH_INPUTS}")  # depth's stand-ins: their own choice
    norm = _chosen("width20", "normalisation") or _chosen("heads30", "normalisation")
    assert norm in (None, f"normalise={GLOBAL_NORMALISATION}")
    # the re-fit's text count is a compute budget: the winner is never fewer texts than the library's default
    for config in ("width20", "heads30"):
        texts = _chosen(config, "texts")
        assert texts is not None and int(texts.split(",")[0].split("=")[1]) >= REFIT_TEXTS
    # the commands calibrate on WikiText unless told otherwise: that is what validation chose
    assert _chosen("width20", "calibration") == "calibration=wikitext"


def test_the_tokens_of_a_region_are_where_it_says():
    h = tiny_handle("llama")
    w = region_windows(h, "heldout", n=2, window=64)
    from headlab.engine.runtime.evaluate import _wikitext_ids

    ids = _wikitext_ids(h.tokenizer)
    assert torch.equal(w[0], ids[REGIONS["heldout"].start: REGIONS["heldout"].start + 64])


def test_distillation_reads_only_fit_text_and_training_prompts(monkeypatch, tmp_path):
    """The distillation data (end-of-file paragraphs, the teacher's answers to training prompts) and the
    training itself never touch protected text; the prompts never include an out-of-domain item."""
    from headlab.engine.export.surgery import prune
    from headlab.engine.recovery.distill import DistillConfig, distill, distill_data
    from headlab.engine.recovery.distill.data import prompt_split

    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path))
    items = (*ood_items(), *ood_validation_items())
    scored = {i.scored.strip() for i in items} | {i.context.strip() for i in items if i.context}
    assert not scored & {t.strip() for t in prompt_split()[0] + prompt_split()[1]}
    h = tiny_handle("llama")
    m = PruneMask.dense(h.geometry)
    m.ffn[:, ::2] = 0
    with guard(h) as g:
        data = distill_data(h, n_wikitext=8, n_prompts=6, max_new_tokens=4)
        distill(h, prune(h, m), data, DistillConfig(steps=2, batch_size=2, max_length=48, eval_every=2,
                                                    checkpoint_every=100))
    assert g.checked > 0
