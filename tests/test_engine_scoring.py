"""Capture statistics, criteria, selection and cost accounting on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.errors import UnknownCriterionError
from headlab.engine.core.mask import UNIT_KINDS, PruneMask
from headlab.engine.importance.capture import capture, row_entropy
from headlab.engine.importance.criteria import head_magnitude
from headlab.engine.importance.registry import CRITERIA, criteria_for, get_criterion, score
from headlab.engine.pruning.select import BudgetError, count_from_budget, select, select_heads
from headlab.engine.runtime.cost import cost

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pruning heads", "a b c d e f g h i j k l m n o p"]


def test_entropy_of_a_uniform_row_is_log_t():
    for T in (1, 2, 7, 128):
        p = torch.full((3, T), 1.0 / T)
        assert torch.allclose(row_entropy(p), torch.full((3,), math.log(T)), atol=1e-6)


def test_entropy_of_a_one_hot_row_is_zero():
    p = torch.zeros(4, 9)
    p[:, 3] = 1
    assert torch.equal(row_entropy(p), torch.zeros(4))


def test_capture_shapes_and_ranges(handle):
    g = handle.geometry
    s = capture(handle, TEXTS, gradients=True, batch_size=2)
    assert s.entropy.shape == (g.n_layers, g.n_heads)
    assert s.ffn_act.shape == (g.n_layers, g.ffn_dim)
    assert s.block_influence.shape == (g.n_layers, 2)
    assert s.head_grad.shape == (g.n_layers, g.n_heads) and (s.head_grad > 0).any()
    assert s.block_grad.shape == (g.n_layers, 2)
    longest = max(len(t.encode()) for t in TEXTS)
    assert (s.entropy >= 0).all() and (s.entropy <= math.log(longest) + 1e-5).all()
    assert (s.entropy_normalized >= 0).all() and (s.entropy_normalized <= 1 + 1e-5).all()
    for name in ("sink", "self_mass", "prev_mass", "local_mass"):
        t = getattr(s, name)
        assert (t >= -1e-6).all() and (t <= 1 + 1e-6).all(), name
    assert s.n_tokens == sum(len(t.encode()) for t in TEXTS)


def test_capture_ignores_padding(llama_handle):
    """Scoring a text alone or next to a much longer one (so it gets padded) gives the same entropy."""
    short = ["Hello there, general"]
    alone = capture(llama_handle, short, gradients=False, batch_size=1)
    padded = capture(llama_handle, short + ["x" * 60], gradients=False, batch_size=2)
    both_separately = capture(llama_handle, short + ["x" * 60], gradients=False, batch_size=1)
    assert torch.allclose(padded.entropy, both_separately.entropy, atol=1e-5)
    assert torch.allclose(padded.head_act_norm, both_separately.head_act_norm, atol=1e-5)
    assert not torch.allclose(alone.entropy, padded.entropy)


def test_capture_refuses_models_without_attention_probabilities(llama_handle):
    llama_handle.model.config._attn_implementation = "sdpa"
    try:
        with pytest.raises(RuntimeError, match="eager"):
            capture(llama_handle, TEXTS, gradients=False)
    finally:
        llama_handle.model.config._attn_implementation = "eager"


def test_capture_leaves_no_hooks_and_no_grad_on_weights(handle):
    capture(handle, TEXTS, gradients=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in handle.model.modules())
    assert all(p.grad is None and not p.requires_grad for p in handle.model.parameters())


def test_gradient_score_matches_finite_difference(llama_handle):
    """|dL/dgate| of one head agrees with a central finite difference of the loss."""
    from headlab.engine.core.objective import lm_loss
    from headlab.engine.core.tokens import encode_batch

    h = llama_handle
    h.model.double()  # float32 rounding would swamp a finite difference
    s = capture(h, TEXTS[:1], gradients=True, batch_size=1)
    ids, valid = encode_batch(h.tokenizer, TEXTS[:1], 128)
    eps = 1e-4

    def loss_at(v):
        m = PruneMask.dense(h.geometry).with_head(1, 2, v)
        with torch.no_grad(), gates.apply(h, m):
            return float(lm_loss(h, ids, valid)[0])

    fd = (loss_at(1.0) - loss_at(1.0 - eps)) / eps
    assert abs(fd) > 1e-5
    assert abs(abs(fd) - float(s.head_grad[1, 2])) < 0.01 * abs(fd)


def test_magnitude_splits_shared_kv_norms_under_gqa(llama_handle):
    a = llama_handle.adapter
    g = a.geometry
    mag = head_magnitude(a)
    w = a.head_weights(0)
    total = sum(t.flatten(1).norm(dim=1).sum() for t in (w.q, w.k, w.v, w.o))
    assert g.group_size == 2
    assert torch.allclose(mag[0].sum(), total, rtol=1e-5)


def test_unknown_criterion_names_the_known_ones():
    with pytest.raises(UnknownCriterionError, match="choose one of: .*entropy.*gradient"):
        get_criterion("wisdom")


def test_criteria_for_a_unit_score_it_and_start_with_its_default():
    assert criteria_for("heads")[0] == "gradient" and criteria_for("blocks")[0] == "block_influence"
    for unit in UNIT_KINDS:
        assert all(unit in CRITERIA[name].units for name in criteria_for(unit))
    assert "entropy" not in criteria_for("ffn") and "block_ppl" in criteria_for("blocks")
    with pytest.raises(ValueError, match="unit must be one of"):
        criteria_for("layers")


def test_each_capture_criterion_fills_exactly_the_units_it_declares(llama_handle):
    stats = capture(llama_handle, TEXTS, gradients=True, batch_size=2)
    own_passes = {"block_ppl", "taylor_plus", "ablation"}  # run their own passes over text (test_depth, test_strategies)
    for name in sorted(set(CRITERIA) - own_passes):
        s = get_criterion(name)(llama_handle, stats)
        assert {unit for unit in UNIT_KINDS if getattr(s, unit) is not None} == set(CRITERIA[name].units), name


def test_score_runs_every_registered_head_criterion_in_one_pass(handle):
    scores, stats = score(handle, TEXTS, ("entropy", "magnitude", "gradient", "activation", "random"))
    g = handle.geometry
    for name, s in scores.items():
        assert s.heads.shape == (g.n_layers, g.n_heads), name
        assert torch.isfinite(s.heads).all(), name
    assert torch.equal(scores["entropy"].heads, -stats.entropy)


@pytest.mark.parametrize("budget", [1.0, -0.1, 1.5, "half"])
def test_budget_outside_unit_interval_is_refused(budget):
    with pytest.raises(BudgetError):
        count_from_budget(budget, 10)


def test_count_budget_must_leave_something():
    assert count_from_budget(3, 10) == 3
    with pytest.raises(BudgetError, match="pruning all is refused"):
        count_from_budget(10, 10)


def test_global_selection_prunes_the_lowest_scores(llama_handle):
    g = llama_handle.geometry
    scores = torch.arange(g.n_layers * g.n_heads, dtype=torch.float32).view(g.n_layers, g.n_heads)
    keep = select_heads(g, scores, 3)
    assert keep.view(-1).tolist() == [0, 0, 0] + [1] * (g.n_layers * g.n_heads - 3)


def test_uniform_scope_prunes_the_same_count_per_layer(handle):
    g = handle.geometry
    scores = torch.rand(g.n_layers, g.n_heads)
    scores[0] += 10  # global would take everything from layer 1
    keep = select_heads(g, scores, 0.5, scope="uniform")
    assert keep.sum(dim=1).tolist() == [g.n_heads - round(0.5 * g.n_heads)] * g.n_layers


def test_per_layer_scope_takes_one_budget_per_layer(llama_handle):
    g = llama_handle.geometry
    keep = select_heads(g, torch.rand(g.n_layers, g.n_heads), [0.0, 0.5], scope="per_layer")
    assert keep.sum(dim=1).tolist() == [g.n_heads, g.n_heads // 2]
    with pytest.raises(BudgetError, match="one budget per layer"):
        select_heads(g, torch.rand(g.n_layers, g.n_heads), 0.5, scope="per_layer")


def test_kv_group_selection_prunes_whole_groups(llama_handle):
    g = llama_handle.geometry
    scores = torch.rand(g.n_layers, g.n_heads)
    keep = select_heads(g, scores, 1, kv_groups=True)
    groups = keep.view(g.n_layers, g.n_kv_heads, g.group_size)
    assert ((groups == 0).all(-1) | (groups == 1).all(-1)).all()
    assert int((keep == 0).sum()) == g.group_size


def test_selecting_a_whole_layer_removes_its_attention_sub_block(llama_handle):
    g = llama_handle.geometry
    scores = get_criterion("random")(llama_handle, None)
    scores.heads[0] = -1.0  # layer 0 is the least important everywhere
    mask = select(g, scores, g.n_heads)
    assert mask.attn[0] == 0 and (mask.heads[0] == 0).all()


def test_select_refuses_a_mask_of_the_wrong_shape(llama_handle):
    g = llama_handle.geometry
    with pytest.raises(ValueError, match="expected"):
        select_heads(g, torch.rand(g.n_layers + 1, g.n_heads), 0.2)


def test_cost_of_dense_mask_is_the_model_size(handle):
    c = cost(handle)
    assert c.params_kept == c.params_total == sum(p.numel() for p in handle.model.parameters())
    assert c.flops_kept == c.flops_dense


def test_cost_counts_kv_heads_only_when_their_whole_group_is_pruned(llama_handle):
    h = llama_handle
    g = h.geometry
    w = h.adapter.head_weights(0)
    per_q = w.q[0].numel() + w.o[0].numel()
    per_kv = w.k[0].numel() + w.v[0].numel()
    one = PruneMask.dense(g).with_head(0, 0, 0.0)
    both = one.with_head(0, 1, 0.0)  # heads 0 and 1 share KV head 0
    assert cost(h, one).params_removed == per_q
    assert cost(h, both).params_removed == 2 * per_q + per_kv


def test_cost_of_a_removed_sub_block_is_all_of_its_parameters(handle):
    g = handle.geometry
    m = PruneMask.dense(g).with_block(0, "ffn", 0.0)
    expected = sum(p.numel() for mod in handle.adapter.subblock_modules(0, "ffn") for p in mod.parameters())
    assert cost(handle, m).params_removed == expected
