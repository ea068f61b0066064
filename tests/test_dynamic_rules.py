"""Dynamic sparsity rules (oracle, CATS, TEAL, WINA) on a tiny Llama: calibration, exactness, isolation, storage."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading

import pytest
import torch
from safetensors.torch import save_file

from headlab.engine.core.errors import UnsupportedModelError
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.dynamic import (
    Thresholds,
    ThresholdsError,
    apply_rule,
    calibrate,
    calibration_ids,
    dynamic_perplexity,
    load_thresholds,
    measure_sparsity,
    save_thresholds,
)
from headlab.engine.dynamic.store import META_FILE, TENSORS_FILE
from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity
from tests.tiny import tiny_handle

THRESHOLD_RULES = ("exact", "cats", "teal", "wina", "teal-ffn", "wina-ffn")
ALL_RULES = ("oracle",) + THRESHOLD_RULES
PROTOCOL = PerplexityProtocol(window=64, stride=64, n_windows=2)


@pytest.fixture
def llama():
    return tiny_handle("llama")


@pytest.fixture
def ids(llama):
    return calibration_ids(llama, window=64, n_windows=6)


def _logits(handle, ids, thresholds=None):
    with torch.no_grad():
        if thresholds is None:
            return handle.model(input_ids=ids).logits
        with apply_rule(handle, thresholds):
            return handle.model(input_ids=ids).logits


def _dense(handle, rule):
    g = handle.geometry
    return Thresholds.dense(rule, g.n_layers, g.ffn_dim)


@pytest.mark.parametrize("target", [0.3, 0.6])
@pytest.mark.parametrize("rule", ALL_RULES)
def test_calibrated_thresholds_hit_the_target_sparsity_on_the_calibration_data(llama, ids, rule, target):
    th = calibrate(llama, rule, target, ids)
    report = measure_sparsity(llama, th, ids, batch_size=ids.shape[0])
    assert set(report.per_layer) == set(th.values)
    for site, fractions in report.per_layer.items():
        for layer, f in enumerate(fractions):
            assert abs(f - target) < 0.01, (rule, site, layer, f)
    assert abs(report.overall - target) < 0.01
    assert abs(report.ffn - target) < 0.01
    assert report.n_tokens == ids.numel()


@pytest.mark.parametrize("rule", ALL_RULES)
def test_minus_infinity_thresholds_equal_the_dense_model_exactly(llama, ids, rule):
    dense = _logits(llama, ids)
    assert torch.equal(_logits(llama, ids, _dense(llama, rule)), dense)
    sparse = _logits(llama, ids, calibrate(llama, rule, 0.5, ids))  # the hooks do act when thresholds bite
    assert not torch.allclose(sparse, dense, atol=1e-4)


def test_the_oracle_keeps_exactly_k_channels_per_token_the_largest_ones(llama, ids):
    g = llama.geometry
    th = calibrate(llama, "oracle", 0.7, ids)
    k = round(0.3 * g.ffn_dim)
    seen: dict[str, list] = {"dense": [], "oracle": []}
    down = llama.adapter.projections(0)["down"]
    with torch.no_grad():
        with temporary_hooks() as hooks:
            hooks.pre(down, lambda m, a: seen["dense"].append(a[0].clone()))
            llama.model(input_ids=ids)
        with apply_rule(llama, th) as meter, temporary_hooks() as hooks:
            hooks.pre(down, lambda m, a: seen["oracle"].append(a[0].clone()))  # runs after the rule's hook
            llama.model(input_ids=ids)
    h, kept = seen["dense"][0], seen["oracle"][0]
    assert ((kept != 0).sum(-1) == k).all()
    assert torch.equal(kept[kept != 0], h[kept != 0])  # kept channels pass through unchanged
    smallest_kept = h.abs().masked_fill(kept == 0, float("inf")).amin(-1)
    largest_dropped = h.abs().masked_fill(kept != 0, -1.0).amax(-1)
    assert (smallest_kept >= largest_dropped).all()
    assert meter.report().ffn == pytest.approx(1 - k / g.ffn_dim)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("rule", ALL_RULES)
def test_the_shared_model_is_unchanged_after_a_call(llama, ids, rule):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    th = calibrate(llama, rule, 0.5, ids)
    dynamic_perplexity(llama, rule, th, PROTOCOL)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_rule(llama, th):
            raise RuntimeError("boom")
    after = llama.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _hook_count(llama.model) == 0


def test_a_rule_is_invisible_to_other_threads(llama, ids):
    dense = _logits(llama, ids[:1])
    other = {}
    with apply_rule(llama, calibrate(llama, "teal", 0.5, ids)):
        t = threading.Thread(target=lambda: other.setdefault("logits", _logits(llama, ids[:1])))
        t.start()
        t.join()
        mine = llama.model(input_ids=ids[:1]).logits.detach()
    assert torch.equal(other["logits"], dense)
    assert not torch.allclose(mine, dense, atol=1e-4)


def test_dynamic_perplexity_reuses_the_pinned_protocol(llama, ids):
    dense = perplexity(llama, protocol=PROTOCOL, use_kernels=False)
    same = dynamic_perplexity(llama, "cats", _dense(llama, "cats"), PROTOCOL)
    assert same.result.perplexity == pytest.approx(dense.perplexity, rel=1e-6)
    assert same.result.n_tokens == dense.n_tokens and same.result.protocol == PROTOCOL
    assert same.sparsity.ffn == 0.0
    sparse = dynamic_perplexity(llama, "cats", calibrate(llama, "cats", 0.6, ids), PROTOCOL)
    assert sparse.result.perplexity != pytest.approx(dense.perplexity, rel=1e-6)
    assert 0.4 < sparse.sparsity.ffn < 0.8  # other text than the calibration's: near, not at, the target
    with pytest.raises(ThresholdsError, match="calibrated for 'cats'"):
        dynamic_perplexity(llama, "teal", _dense(llama, "cats"), PROTOCOL)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_save_load_round_trip_gives_identical_masks(llama, ids, rule, tmp_path):
    th = calibrate(llama, rule, 0.5, ids)
    save_thresholds(llama, th, tmp_path / "th")
    back = load_thresholds(llama, tmp_path / "th")
    assert back.rule == th.rule and back.target == th.target
    assert all(torch.equal(back.values[s], th.values[s].float()) for s in th.values)
    assert torch.equal(_logits(llama, ids, back), _logits(llama, ids, th))
    first = measure_sparsity(llama, th, ids)
    assert measure_sparsity(llama, back, ids).per_layer == first.per_layer
    assert not list((tmp_path / "th").glob(".*.tmp"))  # written atomically: no temporaries left


def test_thresholds_of_another_model_are_refused(llama, ids, tmp_path):
    save_thresholds(llama, calibrate(llama, "teal", 0.5, ids), tmp_path)
    with pytest.raises(ThresholdsError, match="other weights"):
        load_thresholds(tiny_handle("llama", seed=1), tmp_path)
    with pytest.raises(ThresholdsError, match="calibrated for model 'tiny-llama', not 'other'"):
        load_thresholds(dataclasses.replace(llama, name="other"), tmp_path)


def test_misshaped_thresholds_are_refused(llama, ids, tmp_path):
    th = calibrate(llama, "wina", 0.5, ids)
    bad = Thresholds("wina", {s: torch.zeros(3) for s in th.values})
    with pytest.raises(ThresholdsError, match=r"shape \(3,\).*\(2,\)"):
        save_thresholds(llama, bad, tmp_path)
    save_thresholds(llama, th, tmp_path)
    # A file written for a 3-layer model with a consistent checksum: refused for its shapes.
    save_file({s: torch.zeros(3) for s in th.values}, str(tmp_path / TENSORS_FILE))
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["tensors_sha256"] = hashlib.sha256((tmp_path / TENSORS_FILE).read_bytes()).hexdigest()
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ThresholdsError, match=r"shape \(3,\)"):
        load_thresholds(llama, tmp_path)
    with pytest.raises(ThresholdsError, match="need sites"):
        save_thresholds(llama, Thresholds("cats", dict(th.values)), tmp_path)


def test_corrupt_threshold_files_are_refused(llama, ids, tmp_path):
    save_thresholds(llama, calibrate(llama, "cats", 0.5, ids), tmp_path)
    tensors = tmp_path / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-5])
    with pytest.raises(ThresholdsError, match="corrupt or altered"):
        load_thresholds(llama, tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(ThresholdsError, match="corrupt: not valid JSON"):
        load_thresholds(llama, tmp_path)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load_thresholds(llama, tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_families_without_a_gated_ffn_are_refused_clearly(family):
    handle = tiny_handle(family)
    g = handle.geometry
    with pytest.raises(UnsupportedModelError, match=f"{family}: dynamic sparsity needs .* gated FFN"):
        with apply_rule(handle, Thresholds.dense("teal", g.n_layers, g.ffn_dim)):
            pass
    assert _hook_count(handle.model) == 0


def test_bad_rule_and_target_are_refused(llama, ids):
    with pytest.raises(ThresholdsError, match="unknown dynamic sparsity rule 'nope'"):
        calibrate(llama, "nope", 0.5, ids)
    with pytest.raises(ThresholdsError, match=r"fraction in \[0, 1\]"):
        calibrate(llama, "teal", 1.5, ids)


def test_weights_skipped_is_over_every_projection_and_counts_what_each_method_need_not_read(llama, ids):
    """One denominator (the seven projections of every layer); per dropped FFN channel, the rows the method spares."""
    from headlab.engine.dynamic.ipn import apply_ipn, untrained_ipn

    g = llama.geometry
    projs = [llama.adapter.projections(layer) for layer in range(g.n_layers)]
    all_weights = sum(p.weight.numel() for layer in projs for p in layer.values())
    channel = g.hidden  # elements of one down column, or of one gate or up row

    def expected(report, per_channel: int) -> float:
        return sum(report.per_layer["down"]) * g.ffn_dim * per_channel / all_weights

    oracle = measure_sparsity(llama, calibrate(llama, "oracle", 0.5, ids), ids)
    cats = measure_sparsity(llama, calibrate(llama, "cats", 0.5, ids), ids)
    assert oracle.weights_skipped == pytest.approx(expected(oracle, channel))  # gate and up computed to rank
    assert cats.weights_skipped == pytest.approx(expected(cats, 2 * channel))  # + the up row; the gate is read
    with torch.no_grad(), apply_ipn(llama, untrained_ipn(llama, 0.5, ids)) as meter:
        llama.model(input_ids=ids)
    ipn = meter.report()
    assert ipn.weights_skipped == pytest.approx(expected(ipn, 3 * channel))  # decided from the sketch
    teal = measure_sparsity(llama, calibrate(llama, "teal", 0.5, ids), ids)
    by_site = sum(teal.per_layer[s][layer] * projs[layer][s].weight.numel()
                  for s in teal.per_layer for layer in range(g.n_layers))
    assert teal.weights_skipped == pytest.approx(by_site / all_weights)
    assert ipn.weights_skipped < 0.45 < teal.weights_skipped  # 50% of FFN channels is not 50% of every matrix
    assert measure_sparsity(llama, _dense(llama, "teal"), ids).weights_skipped == 0.0


def test_the_oracle_is_described_as_what_it_is_not_as_an_upper_bound():
    """It keeps exactly k per token in every layer; methods that vary the count beat it, so no file may call it a bound."""
    from pathlib import Path

    from headlab.engine.dynamic.rules import ORACLE
    from headlab.ui.dynamic import METHOD_LABELS

    root = Path(__file__).resolve().parents[1]
    for rel in ("headlab/engine/dynamic/rules.py", "docs/dynamic.md", "bench/bench_dynamic.py",
                "headlab/ui/dynamic.py", "pages/dynamic.py"):
        text = " ".join((root / rel).read_text().split()).lower()
        assert "upper bound" not in text.replace("not an upper bound", "").replace("not a bound", ""), rel
    assert "exactly k" in ORACLE.citation and "exactly k" in METHOD_LABELS["oracle"]


def test_the_exact_rule_thresholds_the_oracles_score_per_layer(llama, ids):
    """Channel j kept iff |act(gate) * up|_j >= t_l: the count varies per token, each layer averages the target."""
    th = calibrate(llama, "exact", 0.6, ids)
    down = llama.adapter.projections(1)["down"]
    seen: dict[str, list] = {"scored": [], "kept": []}
    with torch.no_grad(), temporary_hooks() as first:
        first.pre(down, lambda m, a: seen["scored"].append(a[0].clone()))  # before the rule's hook: what it scores
        with apply_rule(llama, th) as meter, temporary_hooks() as after:
            after.pre(down, lambda m, a: seen["kept"].append(a[0].clone()))
            llama.model(input_ids=ids)
    h, kept = seen["scored"][0], seen["kept"][0] != 0
    assert torch.equal(kept, h.abs() >= float(th.values["down"][1]))
    counts = kept.sum(-1).flatten().float()
    assert counts.std() > 0  # not a fixed k per token, unlike the oracle
    assert float(counts.mean()) / llama.geometry.ffn_dim == pytest.approx(0.4, abs=0.01)
    assert meter.report().per_layer["down"][0] == pytest.approx(0.6, abs=0.01)


def test_the_oracle_at_a_networks_budgets_keeps_its_per_layer_counts(llama, ids):
    from headlab.engine.dynamic.ipn import layer_keep_counts, oracle_at_budgets, untrained_ipn

    ipn = untrained_ipn(llama, 0.5, ids)
    with torch.no_grad():
        ipn.tau[0] += 1.0  # layer 0 keeps fewer channels than layer 1: uneven budgets
    counts = layer_keep_counts(llama, ipn, ids)
    assert counts[0] < counts[1] - 5
    th = oracle_at_budgets(llama, ipn, ids)
    assert th.values["down"].tolist() == counts.round().tolist()
    assert th.target == pytest.approx(1 - float(counts.round().mean()) / llama.geometry.ffn_dim)
    report = measure_sparsity(llama, th, ids)
    g = llama.geometry
    for layer in range(g.n_layers):
        assert report.per_layer["down"][layer] == pytest.approx(1 - float(counts[layer].round()) / g.ffn_dim)
    with pytest.raises(ThresholdsError, match="keep counts"):
        Thresholds.oracle_budgets([g.ffn_dim + 1, 3], g.ffn_dim)


@pytest.mark.parametrize("rule, whole", [("teal-ffn", "teal"), ("wina-ffn", "wina")])
def test_a_rule_restricted_to_the_ffn_leaves_attention_dense_and_drops_the_target_of_ffn_channels(llama, ids, rule,
                                                                                                  whole):
    """teal-ffn / wina-ffn zero the inputs of gate, up and down only, scored as their rule over every matrix."""
    from headlab.engine.dynamic.rules import column_norms, get_rule, threshold_at, weighted_score

    g = llama.geometry
    th = calibrate(llama, rule, 0.5, ids)
    assert set(th.values) == {"gate", "up", "down"}
    seen: dict[str, list] = {"q": [], "o": []}
    with torch.no_grad(), apply_rule(llama, th) as meter, temporary_hooks() as hooks:
        proj = llama.adapter.projections(0)
        hooks.pre(proj["q"], lambda m, a: seen["q"].append(a[0].clone()))
        hooks.pre(proj["o"], lambda m, a: seen["o"].append(a[0].clone()))
        llama.model(input_ids=ids)
    report = meter.report()
    assert set(report.per_layer) == {"gate", "up", "down"}
    assert (seen["q"][0] != 0).all() and (seen["o"][0] != 0).all()  # attention inputs untouched
    assert report.ffn == pytest.approx(0.5, abs=0.01)
    projs = [llama.adapter.projections(layer) for layer in range(g.n_layers)]
    ffn_weights = sum(p[s].weight.numel() for p in projs for s in ("gate", "up", "down"))
    all_weights = sum(w.weight.numel() for p in projs for w in p.values())
    assert report.weights_skipped == pytest.approx(0.5 * ffn_weights / all_weights, abs=0.01)
    # attention dense: layer 0's FFN input is the dense model's, and its threshold the full rule's score quantile
    gate = llama.adapter.projections(0)["gate"]
    with torch.no_grad(), temporary_hooks() as hooks:
        hooks.pre(gate, lambda m, a: seen.setdefault("x", a[0].clone()))
        llama.model(input_ids=ids)
    x = seen["x"]
    score = weighted_score(x, column_norms(gate.weight)) if get_rule(whole).weighted else x.abs()
    assert float(th.values["gate"][0]) == pytest.approx(threshold_at(score, 0.5), rel=1e-6)


def test_wina_ffn_weighs_inputs_by_column_norm_and_teal_ffn_does_not(llama, ids):
    teal, wina = calibrate(llama, "teal-ffn", 0.5, ids), calibrate(llama, "wina-ffn", 0.5, ids)
    assert not torch.allclose(teal.values["down"], wina.values["down"])
    assert torch.equal(_logits(llama, ids, Thresholds.dense("wina-ffn", 2, llama.geometry.ffn_dim)),
                       _logits(llama, ids))


@pytest.mark.parametrize("rule", ["teal", "wina", "teal-ffn"])
def test_a_rule_calibrated_to_a_weights_skipped_reaches_it_on_the_calibration_text(llama, ids, rule):
    """The level is found by bisection: over all seven matrices it is the target itself, over the FFN higher."""
    from headlab.engine.dynamic import calibrate_weights_skipped

    th = calibrate_weights_skipped(llama, rule, 0.3, ids, tolerance=0.002)
    assert measure_sparsity(llama, th, ids, batch_size=ids.shape[0]).weights_skipped == pytest.approx(0.3, abs=0.002)
    assert th.meta["weights_skipped"] == pytest.approx(0.3, abs=0.002)
    if rule == "teal-ffn":
        assert th.meta["level"] > 0.35  # the FFN is only part of the weights: a higher level skips as much
    else:
        assert th.meta["level"] == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ThresholdsError, match="keep count"):
        calibrate_weights_skipped(llama, "oracle", 0.3, ids)


def test_the_meter_records_each_layers_kept_channels_and_their_spread_over_tokens(llama, ids):
    """The oracle keeps exactly k in every token (no spread); a per-layer threshold lets the count vary."""
    g = llama.geometry
    k = round(0.4 * g.ffn_dim)
    oracle = measure_sparsity(llama, calibrate(llama, "oracle", 0.6, ids), ids)
    assert oracle.kept_mean == pytest.approx([k] * g.n_layers)
    assert oracle.kept_p10 == oracle.kept_p90 == [float(k)] * g.n_layers
    exact = measure_sparsity(llama, calibrate(llama, "exact", 0.6, ids), ids)
    assert exact.kept_mean == pytest.approx([(1 - z) * g.ffn_dim for z in exact.per_layer["down"]])
    for p10, mean, p90 in zip(exact.kept_p10, exact.kept_mean, exact.kept_p90):
        assert p10 < mean < p90  # the count varies per token
    counts = []  # the same percentiles from the kept masks themselves
    with torch.no_grad(), apply_rule(llama, calibrate(llama, "exact", 0.6, ids)), temporary_hooks() as hooks:
        hooks.pre(llama.adapter.projections(1)["down"], lambda m, a: counts.append((a[0] != 0).sum(-1).flatten()))
        llama.model(input_ids=ids)
    per_token = torch.cat(counts).double()
    assert exact.kept_p90[1] == float(per_token.kthvalue(math.ceil(0.9 * per_token.numel())).values)
    assert exact.kept_p10[1] == float(per_token.kthvalue(math.ceil(0.1 * per_token.numel())).values)


def test_count_quantile_reads_a_histogram():
    from headlab.engine.dynamic.apply import count_quantile

    h = torch.zeros(11)
    h[3], h[7] = 5, 5
    assert (count_quantile(h, 0.1), count_quantile(h, 0.5), count_quantile(h, 0.51), count_quantile(h, 0.9)) == (
        3.0, 3.0, 7.0, 7.0)
    assert math.isnan(count_quantile(torch.zeros(4), 0.5))
