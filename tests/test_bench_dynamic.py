"""bench/bench_dynamic.py's bookkeeping, on a tiny Llama: cache folders and rows, text disjointness, CSV columns."""

from __future__ import annotations

import pytest

from bench.bench_dynamic import Rows, network_folder
from headlab.engine.dynamic import calibration_ids
from headlab.engine.dynamic.ipn import IPNConfig
from tests.tiny import tiny_handle


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def ids(llama):
    return calibration_ids(llama, window=64, n_windows=4)


def test_a_network_of_other_steps_gets_another_folder(llama, ids, tmp_path):
    cfg = IPNConfig(target=0.5, steps=100, n_windows=4, window=64)
    folder = network_folder(tmp_path, llama, cfg, ids)
    assert folder == network_folder(tmp_path, llama, IPNConfig(target=0.5, steps=100, n_windows=4, window=64), ids)
    assert network_folder(tmp_path, llama, IPNConfig(target=0.5, steps=50, n_windows=4, window=64), ids) != folder
    assert network_folder(tmp_path, llama, IPNConfig(target=0.5, steps=100, n_windows=4, window=64, lr=0.02),
                          ids) != folder


def test_a_row_measured_with_other_settings_is_measured_again(tmp_path):
    rows = Rows(tmp_path / "rows.json", fresh=False)
    made = []
    rows.get("ipn@0.5", lambda: made.append(1) or {"ppl_main": 1.0}, {"network": "a"})
    rows.get("ipn@0.5", lambda: made.append(2) or {"ppl_main": 2.0}, {"network": "a"})
    assert made == [1]
    again = Rows(tmp_path / "rows.json", fresh=False)  # from disk, as a rerun reads it
    row = again.get("ipn@0.5", lambda: made.append(3) or {"ppl_main": 3.0}, {"network": "b"})
    assert made == [1, 3] and row["ppl_main"] == 3.0 and row["stamp"]["network"] == "b"


def test_the_training_paragraphs_lie_after_both_evaluation_slices(llama):
    from headlab.engine.data.datasets import calibration_texts
    from headlab.engine.runtime.regions import EvaluationLeak, check_fit_texts, region_windows

    assert "token" in check_fit_texts(llama, calibration_texts("wikitext"), "training and calibration")
    early = llama.tokenizer.decode(region_windows(llama, "heldout", n=1, window=64)[0], skip_special_tokens=True)
    with pytest.raises(EvaluationLeak, match="before the end of the held-out|training text #1 holds protected text"):
        check_fit_texts(llama, ["an unrelated sentence", early], "training")


def test_a_static_mask_skips_its_channels_rows_and_columns(llama):
    import torch

    from bench.bench_dynamic import mask_weights_skipped

    g = llama.geometry
    projs = [llama.adapter.projections(layer) for layer in range(g.n_layers)]
    all_weights = sum(p.weight.numel() for layer in projs for p in layer.values())
    channels = torch.ones(g.n_layers, g.ffn_dim, dtype=torch.bool)
    assert mask_weights_skipped(llama, channels, None) == 0.0
    channels[0, : g.ffn_dim // 2] = False
    assert mask_weights_skipped(llama, channels, None) == pytest.approx(g.ffn_dim // 2 * 3 * g.hidden / all_weights)
    heads = torch.ones(g.n_layers, g.n_heads, dtype=torch.bool)
    heads[1, 0] = False
    assert mask_weights_skipped(llama, channels, heads) == pytest.approx(
        (g.ffn_dim // 2 * 3 * g.hidden + 2 * g.head_dim * g.hidden) / all_weights)


def test_a_dynamic_row_reports_sparsity_on_both_texts(llama, ids):
    """The held-out meter is read, not discarded: its numbers are the held-out windows', not the main ones'."""
    import torch

    from bench.bench_dynamic import _dynamic_row
    from headlab.engine.dynamic import apply_rule, calibrate

    th = calibrate(llama, "cats", 0.5, ids)
    main = (ids[:2], torch.ones(2, dtype=torch.long))
    other = (torch.randint(0, 250, (2, 64)), torch.ones(2, dtype=torch.long))
    row = _dynamic_row(llama, lambda m: apply_rule(llama, th, m), "cats", main, other)
    for col in ("ffn_sparsity", "ffn_sparsity_heldout", "weights_skipped", "weights_skipped_heldout"):
        assert 0.0 < row[col] < 1.0, col
    assert row["ffn_sparsity"] != row["ffn_sparsity_heldout"]
    assert row["weights_skipped"] < row["ffn_sparsity"]  # over every projection, not only the FFN's


def test_a_per_prompt_mask_is_scored_on_the_continuation_not_its_prefix(llama):
    """The mask sees the first PROMPT tokens; only the tokens after them are scored (dense mask: dense NLL there)."""
    import math

    import torch
    import torch.nn.functional as F

    from bench.bench_dynamic import PROMPT, _nll_per_window, continuation
    from headlab.engine.dynamic.prompt_mask import PromptMask

    g = llama.geometry
    windows = calibration_ids(llama, window=2 * PROMPT, n_windows=2)
    seen = []

    def dense_mask(prefix):
        seen.append(prefix.clone())
        return PromptMask(torch.ones(g.n_layers, g.ffn_dim, dtype=torch.bool), None, torch.zeros(g.hidden))

    ppl, sparsity, skipped, layers = _nll_per_window(llama, windows, torch.ones(2, dtype=torch.long), dense_mask)
    assert [tuple(p.shape) for p in seen] == [(1, PROMPT)] * 2
    assert all(torch.equal(p[0], w[:PROMPT]) for p, w in zip(seen, windows))
    with torch.no_grad():
        logp = F.log_softmax(llama.model(input_ids=windows).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, windows[:, 1:, None])[..., 0]  # nll[:, t - 1]: token t
    assert ppl == pytest.approx(math.exp(float(nll[:, PROMPT - 1:].mean())), rel=1e-5)  # tokens PROMPT.. only
    assert ppl != pytest.approx(math.exp(float(nll.mean())), rel=1e-4)  # random weights: close, yet not equal
    assert sparsity == 0.0 and skipped == 0.0
    assert layers["kept_mean"] == layers["kept_p10"] == layers["kept_p90"] == [float(g.ffn_dim)] * g.n_layers
    assert continuation(torch.tensor([1, 448])).tolist() == [PROMPT, 448]


def test_ratios_use_the_dense_model_on_the_same_tokens(tmp_path):
    import csv

    from bench.bench_dynamic import write_csv

    rows = {"dense": {"ppl_main": 10.0, "ppl_heldout": 20.0},
            "cats@0.5": {"ppl_main": 12.0, "ppl_heldout": 22.0, "ffn_sparsity": 0.5},
            "per-prompt@0.5": {"ppl_main": 12.0, "ppl_heldout": 22.0, "ffn_sparsity": 0.5, "scored_from": 64,
                               "dense_ppl_main": 8.0, "dense_ppl_heldout": 11.0}}
    write_csv(rows, tmp_path / "dynamic.csv")
    out = {r["method"]: r for r in csv.DictReader((tmp_path / "dynamic.csv").open())}
    assert float(out["cats"]["ratio_main"]) == pytest.approx(1.2)
    assert float(out["per-prompt"]["ratio_main"]) == pytest.approx(1.5)
    assert float(out["per-prompt"]["ratio_heldout"]) == pytest.approx(2.0)


def test_head_sparsity_is_reported_for_networks_that_drop_heads_only(llama, ids):
    import torch

    from bench.bench_dynamic import _dynamic_row
    from headlab.engine.dynamic import apply_rule, calibrate

    th = calibrate(llama, "teal", 0.5, ids)  # zeroes inputs of o too: that is not dropping heads
    windows = (ids[:2], torch.ones(2, dtype=torch.long))
    assert _dynamic_row(llama, lambda m: apply_rule(llama, th, m), "teal", windows, windows)["head_sparsity"] is None


def test_teal_over_every_matrix_is_matched_to_the_networks_weights_skipped(llama, ids):
    """The level is set on the calibration windows so TEAL reads as few weights per token as the network there."""
    import torch

    from bench.bench_dynamic import matched_rule_row
    from headlab.engine.dynamic.ipn import untrained_ipn, weights_skipped

    ipn = untrained_ipn(llama, 0.5, ids)
    target = weights_skipped(llama, ipn, ids)
    windows = (ids, torch.ones(ids.shape[0], dtype=torch.long))
    row = matched_rule_row(llama, "teal", ipn, ids, windows, windows)
    assert row["matched_weights_skipped"] == pytest.approx(target)
    assert row["weights_skipped"] == pytest.approx(target, abs=0.005)  # measured on the same windows: it matches
    assert row["level"] == pytest.approx(target, abs=0.01) and row["level"] < 0.5  # not the network's 50% of channels
    assert row["input_sparsity"] == pytest.approx(row["level"], abs=0.01)


def test_rows_write_their_kept_channels_per_layer_beside_the_csv(llama, ids, tmp_path):
    """dynamic_layers.csv: per method, target and layer, the mean and the 10th/90th percentile over tokens."""
    import csv

    import torch

    from bench.bench_dynamic import _dynamic_row, mask_layer_columns, write_csv
    from headlab.engine.dynamic import apply_rule, calibrate

    g = llama.geometry
    windows = (ids, torch.ones(ids.shape[0], dtype=torch.long))
    exact = _dynamic_row(llama, lambda m: apply_rule(llama, calibrate(llama, "exact", 0.5, ids), m), "exact",
                         windows, windows)
    oracle = _dynamic_row(llama, lambda m: apply_rule(llama, calibrate(llama, "oracle", 0.5, ids), m), "oracle",
                          windows, windows)
    half = torch.ones(g.n_layers, g.ffn_dim, dtype=torch.bool)
    half[:, : g.ffn_dim // 2] = False
    quarter = half.clone()
    quarter[:, g.ffn_dim // 2 : 3 * g.ffn_dim // 4] = False
    prompt = mask_layer_columns(llama, [half] * 5 + [quarter] * 5)  # two kinds of windows: a spread
    assert prompt["kept_p10"] == [g.ffn_dim / 4] * g.n_layers and prompt["kept_p90"] == [g.ffn_dim / 2] * g.n_layers
    rows = {"dense": {"ppl_main": 10.0, "ppl_heldout": 20.0}, "exact@0.5": exact, "oracle@0.5": oracle,
            "per-prompt@0.5": {"ppl_main": 12.0, "ppl_heldout": 22.0, "ffn_sparsity": 0.6, "layers": prompt},
            "cats@0.5": {"ppl_main": 12.0, "ppl_heldout": 22.0, "ffn_sparsity": 0.5}}  # an older row: no layers
    write_csv(rows, tmp_path / "dynamic.csv")
    out = list(csv.DictReader((tmp_path / "dynamic_layers.csv").open()))
    assert [(r["method"], r["layer"]) for r in out] == [(m, str(layer)) for m in ("exact", "oracle", "per-prompt")
                                                       for layer in range(g.n_layers)]
    by = {(r["method"], int(r["layer"])): r for r in out}
    k = round(0.5 * g.ffn_dim)
    assert all(float(by["oracle", layer][c]) == k for layer in range(g.n_layers)
               for c in ("kept_mean", "kept_p10", "kept_p90"))
    for layer in range(g.n_layers):
        r = by["exact", layer]
        assert float(r["kept_p10"]) < float(r["kept_mean"]) < float(r["kept_p90"])
        assert int(r["ffn_dim"]) == g.ffn_dim
