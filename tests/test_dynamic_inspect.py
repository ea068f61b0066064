"""headlab.engine.dynamic.inspect: per-token keep masks, scores and the dense oracle of a rule or an importance network."""

from __future__ import annotations

import contextlib

import pytest
import torch

from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.dynamic import calibrate, calibration_ids
from headlab.engine.dynamic.inspect import inspect_tokens
from headlab.engine.dynamic.ipn import IPN, apply_ipn, untrained_ipn
from headlab.engine.dynamic.methods import applied
from tests.tiny import tiny_handle

RULES = ("oracle", "cats", "teal", "wina")


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def ids(llama):
    return calibration_ids(llama, window=48, n_windows=4)


@pytest.fixture(scope="module")
def prompt(ids):
    return ids[0, :24]


def _down_inputs(handle, ids, method=None):
    """Every layer's down-projection input [T, F] as the model computes it (after the method zeroed it)."""
    seen = {}
    method_hooks = applied(handle, method) if method is not None else contextlib.nullcontext()
    # registered after the method's hooks: they see what it let through
    with torch.no_grad(), method_hooks, temporary_hooks() as hooks:
        for layer in range(handle.geometry.n_layers):
            hooks.pre(handle.adapter.projections(layer)["down"],
                      lambda m, a, layer=layer: seen.__setitem__(layer, a[0][0].clone()))
        handle.model(input_ids=ids[None])
    return seen


@pytest.mark.parametrize("rule", RULES)
def test_the_kept_channels_are_those_the_rule_lets_through(llama, ids, prompt, rule):
    th = calibrate(llama, rule, 0.5, ids)
    tm = inspect_tokens(llama, th, prompt)
    after = _down_inputs(llama, prompt, th)
    T, L, F = prompt.numel(), llama.geometry.n_layers, llama.geometry.ffn_dim
    assert tm.keep.shape == tm.scores.shape == tm.oracle.shape == (L, T, F)
    assert tm.channels_kept.shape == (T, L) and tm.heads_kept is None and tm.head_keep is None
    assert len(tm.tokens) == T and tm.method == rule
    for layer in range(L):
        assert torch.equal(after[layer][~tm.keep[layer]], torch.zeros(int((~tm.keep[layer]).sum())))
        assert torch.equal(tm.channels_kept[:, layer], tm.keep[layer].sum(-1))
    assert 0.35 < float(tm.channels_kept.float().mean()) / F < 0.65


def test_the_oracle_column_is_the_dense_models_true_contribution(llama, ids, prompt):
    tm = inspect_tokens(llama, calibrate(llama, "teal", 0.5, ids), prompt)
    dense = _down_inputs(llama, prompt)
    for layer in range(llama.geometry.n_layers):
        assert torch.allclose(tm.oracle[layer], dense[layer].abs())


def test_cats_keeps_a_channel_exactly_when_its_score_reaches_the_layer_threshold(llama, ids, prompt):
    th = calibrate(llama, "cats", 0.6, ids)
    tm = inspect_tokens(llama, th, prompt)
    for layer in range(llama.geometry.n_layers):
        t = float(th.values["down"][layer])
        assert torch.all(tm.threshold[layer] == t)
        assert torch.equal(tm.keep[layer], tm.scores[layer] >= t)


def test_the_oracle_rule_in_the_first_layer_has_recall_one(llama, ids, prompt):
    tm = inspect_tokens(llama, calibrate(llama, "oracle", 0.75, ids), prompt)
    k = round(0.25 * llama.geometry.ffn_dim)
    assert torch.all(tm.channels_kept == k)
    assert torch.all(tm.recall()[:, 0] == 1.0)  # layer 0 sees the dense input: the same top-k
    cell = tm.cell(5, 0)
    assert torch.equal(cell.kept, cell.oracle_top) and cell.kept.numel() == k
    assert torch.isnan(tm.threshold).all()


def test_a_cell_compares_the_kept_channels_with_the_oracles_top_k_at_the_same_count(llama, ids, prompt):
    tm = inspect_tokens(llama, calibrate(llama, "teal", 0.5, ids), prompt)
    cell = tm.cell(7, 1)
    k = int(cell.keep.sum())
    top = set(cell.oracle.topk(k).indices.tolist())
    assert cell.recall == pytest.approx(len(top & set(cell.kept.tolist())) / k)
    assert cell.label == tm.tokens[7] and cell.label.startswith("7 ")
    assert float(tm.recall()[7, 1]) == pytest.approx(cell.recall)


def test_an_importance_network_with_heads_shows_its_scores_threshold_and_kept_heads(llama, ids, prompt):
    ipn = IPN.for_model(llama, heads=True, target=0.5)
    with torch.no_grad():
        ipn.head_bias.normal_(0, 1)  # some heads dropped, some kept
        ipn.tau.fill_(float(ipn.channel_scores(0, torch.randn(64)).median()))
    tm = inspect_tokens(llama, ipn, prompt)
    L, H = llama.geometry.n_layers, llama.geometry.n_heads
    assert tm.method == "ipn" and tm.head_keep.shape == (L, prompt.numel(), H)
    assert torch.equal(tm.heads_kept, tm.head_keep.sum(-1).T)
    assert 0 < int(tm.heads_kept.sum()) < prompt.numel() * L * H
    assert torch.equal(tm.keep, tm.scores > tm.threshold[..., None])
    with apply_ipn(llama, ipn) as meter, torch.no_grad():
        llama.model(input_ids=prompt[None])
    assert meter.report().ffn == pytest.approx(1 - float(tm.keep.float().mean()), abs=1e-6)


def test_an_untrained_network_mostly_keeps_the_oracles_channels(llama, ids, prompt):
    tm = inspect_tokens(llama, untrained_ipn(llama, 0.5, ids), prompt)
    assert tm.heads_kept is None
    assert float(tm.recall().mean()) > 0.7  # the oracle's own score, on a 4-bit sketch of the weights


def test_inspecting_leaves_the_model_unchanged_and_unhooked(llama, ids, prompt):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    for method in (calibrate(llama, "cats", 0.5, ids), untrained_ipn(llama, 0.5, ids)):
        inspect_tokens(llama, method, prompt)
    assert all(torch.equal(before[k], v) for k, v in llama.model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llama.model.modules()) == 0


def test_bad_prompts_and_cells_are_refused(llama, ids, prompt):
    th = calibrate(llama, "cats", 0.5, ids)
    with pytest.raises(ValueError, match="one non-empty prompt"):
        inspect_tokens(llama, th, ids[:2])
    with pytest.raises(ValueError, match="one non-empty prompt"):
        inspect_tokens(llama, th, torch.zeros(0, dtype=torch.long))
    with pytest.raises(IndexError, match="no cell"):
        inspect_tokens(llama, th, prompt).cell(prompt.numel(), 0)
