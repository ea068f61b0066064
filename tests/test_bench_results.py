"""Where the quality benchmarks write: another model's rows never replace the default model's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_quality import results_csv
from headlab.engine.models.load import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_table_holds_the_default_models_rows_only():
    assert results_csv("quality", None, False, None) == Path("bench/results/quality.csv")
    assert results_csv("quality", DEFAULT_MODEL, False, None) == Path("bench/results/quality.csv")
    assert results_csv("choices", None, True, None) == Path("bench/results/choices_quick.csv")
    assert results_csv("quality", "gemma3-270m", False, "out/q.csv") == Path("out/q.csv")
    with pytest.raises(SystemExit, match="--csv bench/results/quality_gemma3.csv"):
        results_csv("quality", "gemma3-270m", False, None)


@pytest.mark.parametrize("argv, message", [
    (["--model", "gemma3-270m"], "name its results file with --csv"),
    (["--stages", "allocation,bogus"], "--stages: unknown ['bogus']"),
])
def test_bench_choices_refuses_before_loading_anything(argv, message, tmp_path):
    run = subprocess.run([sys.executable, "bench/bench_choices.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"HEADLAB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 1 and message in run.stderr
    assert not any(tmp_path.iterdir())  # no model opened, nothing cached


def test_a_mask_cached_when_auto_meant_another_allocation_is_stale(tmp_path):
    from bench.bench_quality import load_cached_mask, stale_reason
    from headlab.engine.core.mask import PruneMask
    from headlab.engine.pruning.strategies.reconstruct import AUTO_ALLOCATION
    from tests.tiny import tiny_handle

    g = tiny_handle("llama").geometry
    other = "ablation" if AUTO_ALLOCATION["heads"] != "ablation" else "global"
    mask = PruneMask.dense(g)
    mask.meta.update(allocation=other, allocation_asked="auto")
    assert "now means allocation" in stale_reason(mask, "obs[inputs=all]", "heads30")
    assert stale_reason(mask, f"obs[inputs=all,allocation={other}]", "heads30") is None  # asked by name
    mask.meta.update(allocation=AUTO_ALLOCATION["heads"])
    assert stale_reason(mask, "obs[inputs=all]", "heads30") is None
    assert "now means" in stale_reason(mask, "obs", "width20") or AUTO_ALLOCATION["width"] == AUTO_ALLOCATION["heads"]
    mask.meta.update(allocation=other)
    mask.save(tmp_path / "m.json")
    results = {"obs[inputs=all]@heads30": {"ppl": 1.0}, "other@heads30": {"ppl": 2.0}}
    assert load_cached_mask(tmp_path / "m.json", "obs[inputs=all]", "heads30", g, results) is None
    assert results == {"other@heads30": {"ppl": 2.0}}  # measured on the stale mask: forgotten
    assert load_cached_mask(tmp_path / "m.json", f"obs[allocation={other}]", "heads30", g) is not None
    assert load_cached_mask(tmp_path / "missing.json", "obs", "heads30", g) is None


def test_a_depth_mask_cached_when_auto_meant_other_input_maps_is_stale():
    from bench.bench_quality import stale_reason
    from headlab.engine.core.mask import PruneMask
    from headlab.engine.pruning.strategies.reconstruct import DEPTH_INPUTS
    from tests.tiny import tiny_handle

    other = "all" if DEPTH_INPUTS != "all" else "none"
    mask = PruneMask.dense(tiny_handle("llama").geometry)
    mask.meta["reconstruction"] = {"inputs": other}
    assert f"now means inputs={DEPTH_INPUTS}" in stale_reason(mask, "ablation-iterative-refit", "depth20")
    assert stale_reason(mask, f"ablation-iterative-refit[inputs={other}]", "depth20") is None  # asked by name
    mask.meta["reconstruction"] = {"inputs": DEPTH_INPUTS}
    assert stale_reason(mask, "ablation-iterative-refit", "depth20") is None


def test_depth_refit_candidates_share_the_cached_layer_search_and_count_its_time(tmp_path):
    import argparse

    import torch

    from bench.bench_quality import cached_mask_path, make_mask
    from headlab.engine.core.mask import PruneMask
    from headlab.engine.pruning.strategies import Calibration
    from tests.tiny import tiny_handle

    h, args = tiny_handle("llama"), argparse.Namespace(iter_steps=2, hc_steps=2)
    calib = Calibration.shipped("wikitext", 4, max_length=32)
    first = make_mask(h, "magnitude-refit", "depth30", calib, args, tmp_path)
    search = cached_mask_path(tmp_path, "magnitude", "depth30")
    assert first.has_refit and search.exists() and "layer_search_reused_s" not in first.meta  # kept for the next
    saved = PruneMask.load(search, h.geometry)
    assert saved.meta["layers_dropped"] == first.meta["layers_dropped"] and saved.meta["bench_select_seconds"] >= 0
    second = make_mask(h, "magnitude-refit[damp=0.5]", "depth30", calib, args, tmp_path)
    assert second.meta["layers_dropped"] == first.meta["layers_dropped"]
    assert second.meta["layer_search_reused_s"] == saved.meta["bench_select_seconds"]
    assert not any(k.startswith("bench_") for k in second.meta)  # the search's own timing is not copied over
    assert second.meta["reconstruction"]["damp"] == 0.5
    again = make_mask(h, "magnitude-refit", "depth30", calib, args, tmp_path)
    assert all(torch.equal(again.attn_refit[k].weight, first.attn_refit[k].weight) for k in first.attn_refit)
    # another calibration searches again and leaves the cached search alone
    other = make_mask(h, "magnitude-refit", "depth30", Calibration.shipped("wikitext", 3, max_length=32), args,
                      tmp_path)
    assert "layer_search_reused_s" not in other.meta
    assert PruneMask.load(search, h.geometry).meta["calibration"] == saved.meta["calibration"]


def test_a_global_allocation_cached_before_it_read_the_refit_texts_is_stale_only_for_more_texts():
    from bench.bench_quality import stale_reason
    from headlab.engine.core.mask import PruneMask
    from headlab.engine.pruning.strategies.reconstruct import REFIT_TEXTS
    from tests.tiny import tiny_handle

    mask = PruneMask.dense(tiny_handle("llama").geometry)
    mask.meta.update(allocation="global", allocation_asked="global")  # an older mask: no allocation_texts
    more = f"obs[allocation=global,n_texts={4 * REFIT_TEXTS}]"
    assert "measured on" in stale_reason(mask, more, "heads30")
    assert stale_reason(mask, "obs[allocation=global]", "heads30") is None  # it did read REFIT_TEXTS texts
    mask.meta["allocation_texts"] = 4 * REFIT_TEXTS  # made by the current code
    assert stale_reason(mask, more, "heads30") is None
    mask.meta.update(allocation="flap", allocation_asked="flap")  # no costs measured: nothing to go stale
    del mask.meta["allocation_texts"]
    assert stale_reason(mask, f"obs[allocation=flap,n_texts={4 * REFIT_TEXTS}]", "width20") is None


def test_a_run_of_some_stages_keeps_the_csvs_other_rows(tmp_path):
    from bench.bench_choices import merged_rows
    from headlab.engine.core.csvfile import write_rows

    path = tmp_path / "choices.csv"
    old = [{"config": "width20", "stage": "damp", "candidate": "damp=0.01"},
           {"config": "heads30", "stage": "texts", "candidate": "n_texts=128"},
           {"config": "heads30", "stage": "texts", "candidate": "n_texts=512"}]
    assert merged_rows(path, old) == old  # no file yet
    write_rows(old, path)
    new = [{"config": "heads30", "stage": "texts", "candidate": "n_texts=512"}]
    assert merged_rows(path, new) == [old[0], new[0]]  # the stage run replaces all its rows, the others stay


def test_parallel_runs_of_bench_choices_keep_each_others_scores(tmp_path):
    import json

    from bench.bench_choices import save_result

    path = tmp_path / "choices.json"
    width = {"obs@width20": {"ppl_validation": 30.0}}
    heads = {"obs@heads50": {"ppl_validation": 26.0}}  # another run, started from the same empty file
    save_result(path, width, "obs@width20")
    save_result(path, heads, "obs@heads50")
    width["obs[damp=0.001]@width20"] = {"ppl_validation": 29.0}
    save_result(path, width, "obs[damp=0.001]@width20")  # this run's copy never held heads50's entry
    assert json.loads(path.read_text()) == {"obs@width20": {"ppl_validation": 30.0},
                                            "obs@heads50": {"ppl_validation": 26.0},
                                            "obs[damp=0.001]@width20": {"ppl_validation": 29.0}}
    assert "obs@heads50" in width  # and the run sees what the others wrote


def test_a_fresh_cache_takes_the_csvs_validation_scores_instead_of_remaking_their_masks(tmp_path):
    from bench.bench_choices import recorded_results
    from headlab.engine.core.csvfile import write_rows

    path = tmp_path / "choices.csv"
    assert recorded_results(path) == {}
    write_rows([{"config": "width20", "stage": "allocation", "candidate": "allocation=kl", "method": "obs[allocation=kl]",
                 "ppl_validation": "33.199", "vood_nll": "3.2", "select_s": "1018.1", "measured": "2026-12-07"},
                {"config": "heads30", "stage": "texts", "candidate": "n_texts=512", "method": "obs[n_texts=512]",
                 "ppl_validation": "19.5", "vood_nll": "", "select_s": "", "measured": "2026-12-06"}], path)
    got = recorded_results(path)
    assert list(got) == ["obs[allocation=kl]@width20"]  # a row without its out-of-domain score is measured again
    assert got["obs[allocation=kl]@width20"]["ppl_validation"] == 33.199 and got["obs[allocation=kl]@width20"]["from_csv"]


def test_a_recovery_curve_at_another_budget_keeps_the_first_and_the_same_budget_replaces_it(tmp_path):
    from bench.bench_recovery_budget import merge_curves
    from headlab.engine.core.csvfile import write_rows

    path = tmp_path / "recovery.csv"
    write_rows([{"student": "s", "minutes": m, "ratio_main": r} for m, r in ((0.0, 1.6), (30.0, 1.3))], path)
    rows15 = [{"student": "s", "budget_minutes": 15.0, "minutes": m, "ratio_main": r} for m, r in ((0.0, 1.6), (15.0, 1.2))]
    merged = merge_curves(path, rows15, "s", 15.0)
    assert [(float(r["budget_minutes"]), float(r["minutes"])) for r in merged] == [(30, 0), (30, 30), (15, 0), (15, 15)]
    write_rows(merged, path)
    again = merge_curves(path, [{**rows15[1], "ratio_main": 1.1}], "s", 15.0)
    assert [(float(r["budget_minutes"]), float(r["ratio_main"])) for r in again] == [(30, 1.6), (30, 1.3), (15, 1.1)]
