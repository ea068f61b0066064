"""Hard-concrete gates, the Lagrangian sparsity constraint, and exact-budget binary masks."""

from __future__ import annotations

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.objective import token_logits
from headlab.engine.core.tokens import EmptyTextError
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.pruning.select import BudgetError
from headlab.engine.pruning.softmask import (
    HardConcrete,
    HardConcreteGates,
    MaskTarget,
    SharedScaleAdam,
    SoftMask,
    TrainConfig,
    kl_to_dense,
    train_mask,
)

TEXTS = calibration_texts("mt_bench", 12)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; more threads thrash on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spread_gates(n: int = 64) -> HardConcreteGates:
    g = HardConcreteGates(n)
    with torch.no_grad():
        g.log_alpha.copy_(torch.linspace(-6.0, 6.0, n))
    return g


def test_hard_concrete_samples_stay_in_unit_interval_and_hit_both_ends():
    g = spread_gates()
    gen = torch.Generator().manual_seed(0)
    z = torch.stack([g.sample(gen) for _ in range(200)])
    assert z.min() >= 0.0 and z.max() <= 1.0
    assert (z == 0).any() and (z == 1).any(), "clipping the stretched sample must give exact zeros and ones"
    assert ((z > 0) & (z < 1)).any()


def test_expected_l0_matches_monte_carlo_estimate():
    g = spread_gates()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        nonzero = torch.stack([(g.sample(gen) > 0).float() for _ in range(20000)])
    mc_per_unit = nonzero.mean(dim=0)
    assert torch.allclose(mc_per_unit, g.keep_probability().detach(), atol=0.02)
    assert g.expected_l0().item() == pytest.approx(float(nonzero.sum(dim=1).mean()), rel=0.01)


def test_expected_l0_is_differentiable_in_log_alpha():
    g = spread_gates(8)
    g.expected_l0().backward()
    assert g.log_alpha.grad is not None and (g.log_alpha.grad > 0).all()


def test_log_alpha_for_gives_the_requested_keep_probability():
    dist = HardConcrete()
    g = HardConcreteGates(3, init_keep=0.8, dist=dist)
    assert torch.allclose(g.keep_probability(), torch.full((3,), 0.8), atol=1e-5)


def test_top_k_keeps_exactly_the_largest_log_alphas():
    g = HardConcreteGates(6)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([0.5, -1.0, 2.0, 0.5, -3.0, 1.0]))
    keep = g.top_k(3)
    assert keep.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # the tie at 0.5 goes to the lower index


def test_sampled_soft_mask_carries_gradient_through_the_gated_model(llama_handle):
    h = llama_handle
    soft = SoftMask(h.geometry, ["blocks", "heads"], init_keep=0.9)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    attn = torch.ones_like(ids)
    with torch.no_grad():
        dense = torch.log_softmax(token_logits(h, ids, attn), dim=-1)
    mask = soft.sample_mask(torch.Generator().manual_seed(3))
    with gates.apply(h, mask):
        loss = kl_to_dense(dense, token_logits(h, ids, attn), attn.bool())
    loss.backward()
    assert all(p.grad is not None for p in soft.parameters())
    assert all(p.grad is None for p in h.model.parameters()), "the model's weights must stay frozen"


def test_kl_to_dense_is_zero_for_the_dense_model_itself(llama_handle):
    ids = torch.tensor([[1, 2, 3, 4]])
    attn = torch.ones_like(ids)
    logits = token_logits(llama_handle, ids, attn)
    assert float(kl_to_dense(torch.log_softmax(logits, -1), logits, attn.bool())) == pytest.approx(0.0, abs=1e-6)


def test_lagrangian_drives_expected_sparsity_to_the_target_within_two_percent(llama_handle):
    # Start far from the target (95% kept vs 50%) so the multipliers have to do the work.
    target = MaskTarget(blocks=2, heads=4)
    cfg = TrainConfig(steps=300, max_length=32, init_keep=0.95, lr_lambda=0.1, constraint="lagrangian")
    result = train_mask(llama_handle, TEXTS, target, cfg)
    start = result.history[0].expected_sparsity
    assert start["heads"] < 0.2
    for kind, s in result.expected_sparsity.items():
        assert abs(s - 0.5) <= 0.02, f"{kind}: expected sparsity {s:.3f}, target 0.5"


def test_projected_level_holds_the_ramped_target_on_every_step_of_a_short_run(llama_handle):
    target = MaskTarget(blocks=2, heads=4)
    cfg = TrainConfig(steps=12, max_length=16, warmup=0.5, constraint="project")
    result = train_mask(llama_handle, TEXTS[:4], target, cfg)
    for log in result.history:  # the expected sparsity each step's draws were made at
        for kind, s in log.expected_sparsity.items():
            assert s == pytest.approx(log.target_sparsity[kind], abs=1e-3), (log.step, kind)
    assert result.history[0].target_sparsity["heads"] < result.history[-1].target_sparsity["heads"] == 0.5
    for kind, s in result.expected_sparsity.items():
        assert s == pytest.approx(0.5, abs=1e-3), kind
    lagrangian_only = train_mask(llama_handle, TEXTS[:4], target, TrainConfig(steps=12, max_length=16,
                                                                             constraint="lagrangian"))
    assert abs(lagrangian_only.expected_sparsity["heads"] - 0.5) > 0.05  # what the projection is for


def test_binary_mask_removes_exactly_the_budget(handle):
    g = handle.geometry
    result = train_mask(handle, TEXTS[:4], MaskTarget(blocks=1, heads=3), TrainConfig(steps=3, max_length=16))
    m = result.mask
    assert m.is_hard
    assert int((m.attn == 0).sum() + (m.ffn_block == 0).sum()) == 1
    assert int((m.heads == 0).sum()) == 3
    assert result.removed == {"blocks": 1, "heads": 3}
    m.check(g)


def test_fractional_target_becomes_a_rounded_count(llama_handle):
    g = llama_handle.geometry  # 2 layers x 4 heads
    assert MaskTarget(blocks=0.25, heads=0.5).removed(g) == {"blocks": 1, "heads": 4}


def test_lm_objective_trains_too(llama_handle):
    result = train_mask(llama_handle, TEXTS[:4], MaskTarget(blocks=1), TrainConfig(steps=2, objective="lm",
                                                                                  max_length=16))
    assert len(result.history) == 2 and result.history[-1].objective > 0


def test_progress_reports_every_step_with_gate_probabilities(llama_handle):
    logs = []
    train_mask(llama_handle, TEXTS[:4], MaskTarget(blocks=1), TrainConfig(steps=4, max_length=16),
               progress=logs.append)
    assert [l.step for l in logs] == [1, 2, 3, 4]
    assert len(logs[-1].keep_probability["blocks"]) == llama_handle.geometry.n_layers
    assert len(logs[-1].keep_probability["blocks"][0]) == 2


@pytest.mark.parametrize("target", [MaskTarget(), MaskTarget(blocks=4), MaskTarget(heads=1.5)])
def test_impossible_targets_are_refused_with_a_clear_error(llama_handle, target):
    with pytest.raises(BudgetError):
        train_mask(llama_handle, TEXTS[:2], target, TrainConfig(steps=1))


def test_no_usable_text_is_refused(llama_handle):
    with pytest.raises(EmptyTextError):
        train_mask(llama_handle, ["", "   "], MaskTarget(blocks=1), TrainConfig(steps=1))


def test_training_is_deterministic_for_a_seed(llama_handle):
    cfg = TrainConfig(steps=5, max_length=16, seed=7)
    a = train_mask(llama_handle, TEXTS[:4], MaskTarget(heads=2), cfg)
    b = train_mask(llama_handle, TEXTS[:4], MaskTarget(heads=2), cfg)
    assert torch.equal(a.soft.gates["heads"].log_alpha, b.soft.gates["heads"].log_alpha)


def test_shared_scale_adam_keeps_step_sizes_proportional_to_gradients_unlike_adam():
    grad = torch.tensor([1.0, 0.1, -0.5])
    moved = {}
    for name, cls in (("shared", SharedScaleAdam), ("adam", torch.optim.Adam)):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = cls([p], lr=0.1)
        for _ in range(3):
            p.grad = grad.clone()
            opt.step()
        moved[name] = -p.detach()
    assert torch.allclose(moved["shared"] / moved["shared"][0], grad, atol=1e-5)
    assert torch.allclose(moved["adam"].abs(), moved["adam"].abs()[0].expand(3), atol=1e-4), "Adam moves all alike"


def test_unknown_gate_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
