"""Pruning strategies: replay, ablation, iterative schedules, the optimised mask, suggest_mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.core.tokens import encode_batch
from headlab.engine.importance.ablation import ablation_kl, head_removal_mask
from headlab.engine.importance.gate_gradients import gate_gradients
from headlab.engine.pruning.reconstruct.joint import unit_params
from headlab.engine.pruning.select import BudgetError
from headlab.engine.pruning.strategies import (
    Budget,
    Calibration,
    UnknownStrategyError,
    get_strategy,
    strategy_names,
    suggest_mask,
)
from headlab.engine.pruning.strategies.hardconcrete import prior_log_alpha
from headlab.engine.pruning.strategies.iterative import schedule
from headlab.engine.pruning.strategies.reconstruct import AUTO_ALLOCATION
from headlab.engine.pruning.strategies.suggest import predicted_perplexity
from headlab.engine.runtime.replay import LayerReplay

TEXTS = [
    "The quick brown fox jumps over the lazy dog again and again.",
    "Pruning attention heads keeps most of the model.",
    "a b c d e f g h i j k l m n o p q r s t",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14",
    "She sells sea shells by the sea shore, they say.",
]


def calib() -> Calibration:
    return Calibration(list(TEXTS), max_length=48, batch_size=2)


def full_kl(handle, mask, texts=TEXTS[:4]) -> float:
    """KL(dense || masked) averaged over predicting positions, by two full forwards."""
    ids, am = encode_batch(handle.tokenizer, texts, 48)
    with torch.no_grad():
        dense = F.log_softmax(token_logits(handle, ids, am).float(), -1)
        with gates.apply(handle, mask):
            masked = F.log_softmax(token_logits(handle, ids, am).float(), -1)
    valid = am.bool()
    if handle.geometry.causal:
        valid = valid & am.roll(-1, 1).bool()
        valid[:, -1] = False
    kl = (dense.exp() * (dense - masked)).sum(-1)
    return float(kl[valid].mean())


def test_replay_from_a_layer_equals_a_full_forward(handle):
    g = handle.geometry
    replay = LayerReplay(handle, TEXTS[:4], max_length=48, batch_size=2)
    assert replay.base_kl == pytest.approx(0.0, abs=1e-6)
    mask = PruneMask.dense(g).with_head(g.n_layers - 1, 1, 0.0)
    assert replay.kl(mask, g.n_layers - 1) == pytest.approx(full_kl(handle, mask), rel=1e-4, abs=1e-7)
    assert replay.kl(mask, g.n_layers - 1) > 0


def test_ablation_kl_of_each_head_matches_removing_it_by_full_forward(llama_handle):
    g = llama_handle.geometry
    delta, kept = ablation_kl(llama_handle, TEXTS[:4], max_length=48, batch_size=2)
    assert kept.all() and delta.shape == (g.n_layers, g.n_heads)
    for layer, head in [(0, 0), (1, 3)]:
        expected = full_kl(llama_handle, PruneMask.dense(g).with_head(layer, head, 0.0))
        assert delta[layer, head] == pytest.approx(expected, rel=1e-4)


def test_mean_ablation_of_a_constant_output_head_costs_nothing():
    from headlab.engine.importance.capture import capture
    from tests.test_compensation import constant_kv_group
    from tests.tiny import tiny_handle

    handle = tiny_handle("qwen2")
    heads = constant_kv_group(handle, layer=0, kv=0)
    stats = capture(handle, TEXTS, gradients=False, max_length=48)
    delta, _ = ablation_kl(handle, TEXTS[:4], means=stats.head_in_mean, max_length=48, batch_size=2)
    zero, _ = ablation_kl(handle, TEXTS[:4], means=None, max_length=48, batch_size=2)
    assert delta[0, heads].abs().max() < 1e-6
    assert zero[0, heads].min() > 1e-5


def test_head_removal_mask_with_means_matches_full_compensation(llama_handle):
    from headlab.engine.importance.mean_ablation import attention_bias

    g = llama_handle.geometry
    means = torch.randn(g.n_layers, g.n_heads * g.head_dim)
    base = PruneMask.dense(g).with_head(0, 2, 0.0)
    base.attn_bias = attention_bias(llama_handle.adapter, base.heads, means)
    m = head_removal_mask(llama_handle, base, 1, [0, 3], means)
    assert torch.allclose(m.attn_bias, attention_bias(llama_handle.adapter, m.heads, means), atol=1e-6)


def test_ablating_a_layers_last_head_replays_from_where_its_mean_is_folded(llama_handle):

    g = llama_handle.geometry
    means = torch.randn(g.n_layers, g.n_heads * g.head_dim)
    base = PruneMask.dense(g)
    base.heads[1, 1:] = 0.0
    base = head_removal_mask(llama_handle, base, 1, [], means)
    m = head_removal_mask(llama_handle, base, 1, [0], means)
    assert m.attn[1] == 0 and base.first_changed_layer(m) == 0, "layer 1's mean now sits on layer 0's FFN"
    replay = LayerReplay(llama_handle, TEXTS[:4], base=base, max_length=48, batch_size=2)
    assert replay.kl(m, 0) - replay.base_kl == pytest.approx(full_kl(llama_handle, m) - full_kl(llama_handle, base),
                                                            rel=1e-3, abs=1e-7)


def test_schedule_splits_the_budget_into_steps_that_add_up():
    parts = schedule(54, 4)
    assert sum(parts) == 54 and max(parts) - min(parts) <= 1
    assert schedule(5, 1) == [5]
    assert sum(schedule(7, 3)) == 7
    with pytest.raises(ValueError):
        schedule(3, 0)


@pytest.mark.parametrize("iterative, one_shot", [("gradient-iterative", "gradient"),
                                                 ("gradient-iterative+comp", "gradient+comp"),
                                                 ("ablation-iterative", "ablation"),
                                                 ("ablation-iterative+comp", "ablation+comp")])
def test_iterative_pruning_with_one_step_equals_one_shot(llama_handle, iterative, one_shot):
    c = calib()
    budget = Budget(heads=3)
    a = get_strategy(iterative, steps=1)(llama_handle, budget, c)
    b = get_strategy(one_shot)(llama_handle, budget, c)
    assert torch.equal(a.heads, b.heads)
    assert (a.attn_bias is None) == (b.attn_bias is None)
    if a.attn_bias is not None:
        assert torch.allclose(a.attn_bias, b.attn_bias)


def test_iterative_pruning_removes_exactly_the_budget_in_several_steps(handle):
    c = calib()
    for name in ("gradient-iterative", "ablation-iterative+comp"):
        m = get_strategy(name, steps=3)(handle, Budget(heads=3, ffn=10), c)
        s = m.summary()
        assert s["heads_pruned"] == 3 and s["ffn_channels_pruned"] == 10, name


def test_gate_gradients_of_the_dense_model_equal_the_capture_gradients(llama_handle):
    c = calib()
    stats = c.stats(llama_handle)
    heads, ffn = gate_gradients(llama_handle, c.texts, None, batch_size=c.batch_size, max_length=c.max_length)
    assert torch.allclose(heads, stats.head_grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(ffn, stats.ffn_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("heads, ffn", [(5, 0), (0.25, 0.1), (1, 7)])
def test_optimised_mask_meets_its_budget_exactly(llama_handle, heads, ffn):
    g = llama_handle.geometry
    budget = Budget(heads=heads, ffn=ffn)
    want_h, want_f = budget.counts(g)
    for comp in (False, True):
        m = get_strategy("hardconcrete", steps=6, prior=None, compensate=comp)(llama_handle, budget, calib())
        s = m.summary()
        assert m.is_hard
        assert s["heads_pruned"] == want_h and s["ffn_channels_pruned"] == want_f
        assert (m.attn_bias is not None) == comp


def test_optimised_mask_training_changes_log_alpha_towards_the_budget(llama_handle):
    logs = []
    get_strategy("hardconcrete", steps=8, prior="gradient", log=lambda *a: logs.append(a))(
        llama_handle, Budget(heads=4), calib())
    assert len(logs) == 8 and all(torch.isfinite(torch.tensor(l[2])) for l in logs)


def test_prior_log_alpha_orders_units_like_the_prior():
    prior = torch.tensor([0.3, 0.1, 0.9, 0.5])
    la = prior_log_alpha(prior, base=1.0, spread=2.0)
    assert torch.equal(torch.argsort(la), torch.argsort(prior))
    assert la.mean() == pytest.approx(1.0, abs=1e-6)


def test_every_strategy_returns_a_valid_mask_with_the_requested_counts(handle):
    c = calib()
    g = handle.geometry
    for name in strategy_names(with_comp=True):
        kwargs = {"steps": 2} if "iterative" in name or "hardconcrete" in name else {}
        m = get_strategy(name, **kwargs)(handle, Budget(heads=2, ffn=5), c)
        m.check(g)
        s = m.summary()
        if name == "obs" and AUTO_ALLOCATION["width"].endswith("joint"):  # the split may move, the size may not
            p = unit_params(handle)
            removed = s["heads_pruned"] * p["attn"] + s["ffn_channels_pruned"] * p["ffn"]
            assert abs(removed - (2 * p["attn"] + 5 * p["ffn"])) <= max(p.values()), name
        else:
            assert s["heads_pruned"] == 2 and s["ffn_channels_pruned"] == 5, name
        if not (name.endswith("-refit") or name == "obs"):  # re-solved methods keep their fits' intercepts as biases
            assert (m.attn_bias is not None) == (name.endswith("+comp") or name == "flap"), name
        assert m.meta["method"] == name, name


def test_flap_cuts_standardised_scores_so_every_layer_keeps_a_share():
    from tests.tiny import tiny_handle

    handle = tiny_handle("qwen2")
    m = get_strategy("flap")(handle, Budget(heads=0.5), calib())
    per_layer = (m.heads == 0).sum(dim=1)
    assert per_layer.sum() == 6 and per_layer.min() >= 1


def test_unknown_method_names_the_known_ones():
    with pytest.raises(UnknownStrategyError, match="ablation-iterative"):
        get_strategy("entropyy")
    with pytest.raises(UnknownStrategyError, match="always compensates"):
        get_strategy("flap+comp")


def test_budget_beyond_the_model_is_refused_before_any_work(llama_handle):
    with pytest.raises(BudgetError):
        suggest_mask(llama_handle, 1.5)
    with pytest.raises(BudgetError):
        get_strategy("gradient")(llama_handle, Budget(heads=100), calib())


def test_calibration_shares_one_capture_between_strategies(llama_handle):
    c = calib()
    get_strategy("gradient")(llama_handle, Budget(heads=2), c)
    first = c.stats(llama_handle)
    get_strategy("flap")(llama_handle, Budget(heads=2), c)
    assert c.stats(llama_handle) is first


def test_suggest_mask_reports_prediction_and_measurement(llama_handle):
    from headlab.engine.runtime.evaluate import PerplexityProtocol

    c = calib()
    protocol = PerplexityProtocol(window=32, stride=32, n_windows=2)
    mask, info = suggest_mask(llama_handle, 0.25, calib=c, protocol=protocol)
    assert mask.summary()["heads_pruned"] == 2 and mask.has_bias
    assert info.method == "ablation+comp" and info.predicted_perplexity is not None
    assert info.measured_perplexity > 0 and info.dense_perplexity > 0
    assert "window 32" in info.protocol
    assert mask.meta["suggestion"]["method"] == "ablation+comp"


def test_suggest_mask_on_an_encoder_skips_perplexity():
    from tests.tiny import tiny_handle

    mask, info = suggest_mask(tiny_handle("bert"), 2, calib=calib())
    assert mask.summary()["heads_pruned"] == 2 and mask.has_bias
    assert info.measured_perplexity is None and info.predicted_perplexity is None


def test_predicted_perplexity_adds_the_removed_heads_kl(llama_handle):
    g = llama_handle.geometry
    kl = torch.zeros(g.n_layers, g.n_heads)
    kl[0, 1], kl[1, 2] = 0.1, 0.2
    m = PruneMask.dense(g).with_head(0, 1, 0.0).with_head(1, 2, 0.0)
    assert predicted_perplexity(10.0, kl, m) == pytest.approx(10.0 * torch.exp(torch.tensor(0.3)).item(), rel=1e-5)


def test_suggest_panel_applies_a_compensated_mask_and_recompensates_hand_edits(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from headlab.ui import keys
    from tests.app_jobs import run_after_jobs
    from tests.tiny import save_tiny

    path = save_tiny(tmp_path / "tiny-llama", "llama")
    monkeypatch.setenv("HEADLAB_MODEL", str(path))

    def page():
        from headlab.ui.suggest import suggest_panel

        suggest_panel()

    at = AppTest.from_function(page, default_timeout=240).run()
    assert not at.exception
    at.slider(key="suggest.budget").set_value(0.25)
    next(b for b in at.button if b.label == "Suggest mask").click()
    at.run()
    assert not at.exception
    run_after_jobs(at)  # a job on the server: the page went on without waiting
    mask = at.session_state[keys.MASK].mask
    assert mask.summary()["heads_pruned"] == 2 and mask.has_bias
    assert {m.label for m in at.metric} == {"Dense", "Predicted", "Measured"}
    edited = mask.toggle_head(1, int((mask.heads[1] == 1).nonzero()[0]))
    at.session_state[keys.MASK] = type(at.session_state[keys.MASK])(at.session_state[keys.MASK].model_key, edited)
    at.run()
    next(b for b in at.button if b.label.startswith("Recompute compensation")).click()
    at.run()
    assert not at.exception
    again = at.session_state[keys.MASK].mask
    assert torch.equal(again.heads, edited.normalized().heads) and not torch.equal(again.attn_bias, mask.attn_bias)


@pytest.mark.parametrize("method", ["random", "gradient", "block_influence", "ablation+comp", "ablation-iterative+comp"])
def test_depth_pruning_drops_whole_layers_to_the_size_target(method):
    from headlab.engine.pruning.strategies.depth import depth_prune
    from headlab.engine.runtime.cost import cost
    from tests.tiny import tiny_handle

    handle = tiny_handle("llama")
    m = depth_prune(handle, 0.75, method, calib())
    assert len(m.meta["layers_dropped"]) == 1
    dropped = m.meta["layers_dropped"][0]
    assert m.attn[dropped] == 0 and m.ffn_block[dropped] == 0
    assert cost(handle, m).params_removed > 0
    if method.endswith("+comp") and dropped == 1:
        assert m.ffn_bias is not None and m.ffn_bias[0].abs().sum() > 0, "layer 1's mean rides on layer 0's FFN"


def test_depth_ablation_measures_the_kl_of_dropping_each_layer():
    from headlab.engine.pruning.strategies.depth import depth_method_scores
    from tests.tiny import tiny_handle

    handle = tiny_handle("llama")
    c = Calibration(TEXTS[:4], max_length=48, batch_size=2)
    scores = depth_method_scores(handle, "ablation", c)
    g = handle.geometry
    for layer in range(g.n_layers):
        m = PruneMask.dense(g).with_block(layer, "attn", 0.0).with_block(layer, "ffn", 0.0)
        assert scores[layer] == pytest.approx(full_kl(handle, m, TEXTS[:4]), rel=1e-3)


def test_cli_suggest_diagnose_and_prune_with_a_new_criterion(tmp_path, capsys):
    from headlab.engine.cli.main import main
    from tests.tiny import save_tiny, tiny_handle

    model, h = save_tiny(tmp_path / "tiny-llama", "llama"), tiny_handle("llama")
    small = ["--model", str(model), "--n-texts", "4", "--max-length", "32"]
    protocol = ["--window", "32", "--stride", "32", "--windows", "2"]
    out = tmp_path / "mask.json"
    assert main(["suggest", *small, *protocol, "--budget", "0.25", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "method ablation+comp" in text and "predicted" in text and "measured" in text
    assert PruneMask.load(out, h.geometry).has_bias
    csv_path = tmp_path / "heads.csv"
    assert main(["diagnose", *small, "--out", str(csv_path)]) == 0
    assert len(csv_path.read_text().strip().splitlines()) == 1 + h.geometry.n_layers * h.geometry.n_heads
    assert main(["prune", *small, "--criterion", "fluctuation", "--budget", "0.25", "--no-eval",
                 "--out", str(tmp_path / "f.json")]) == 0
    assert main(["suggest", *small, "--budget", "0.25", "--method", "nope"]) == 2
    assert "unknown pruning method" in capsys.readouterr().err


@pytest.mark.parametrize("route", ["width", "depth"])
def test_suggest_size_reaches_the_parameter_budget_by_the_routes_best_method(llama_handle, route):
    from headlab.engine.pruning.strategies import SIZE_METHODS, suggest_size
    from headlab.engine.runtime.cost import cost
    from headlab.engine.runtime.evaluate import PerplexityProtocol

    protocol = PerplexityProtocol(window=32, stride=32, n_windows=2)
    mask, info = suggest_size(llama_handle, 0.8, route, calib=calib(), protocol=protocol)
    assert info.method == SIZE_METHODS[route] and mask.has_refit
    removed = cost(llama_handle, mask).params_removed_fraction
    if route == "width":
        assert abs(removed - 0.2) < 0.03 and int(mask.attn.eq(0).sum()) == 0
    else:  # whole layers: the count closest to the target, here one of two
        assert int(mask.attn.eq(0).sum()) == 1 and int(mask.ffn_block.eq(0).sum()) == 1
    assert info.measured_perplexity > 0 and "window 32" in info.protocol
    with pytest.raises(ValueError, match="unknown route"):
        suggest_size(llama_handle, 0.8, "diagonal", calib=calib())
    with pytest.raises(ValueError, match=r"keep must be a fraction"):
        suggest_size(llama_handle, 1.2, "width", calib=calib())


def test_cli_suggest_by_parameter_budget_writes_a_reconstructed_mask(tmp_path, capsys):
    from headlab.engine.cli.main import main
    from tests.tiny import save_tiny, tiny_handle

    model, h = save_tiny(tmp_path / "tiny-llama", "llama"), tiny_handle("llama")
    out = tmp_path / "mask.json"
    args = ["suggest", "--model", str(model), "--n-texts", "4", "--max-length", "32", "--window", "32", "--stride",
            "32", "--windows", "2", "--keep", "0.8", "--route", "width", "--out", str(out)]
    assert main(args) == 0
    assert "method obs" in capsys.readouterr().out
    assert PruneMask.load(out, h.geometry).has_refit
    assert main([*args[:-2], "--budget", "0.2", "--out", str(out)]) == 2
    assert "--keep asks for a parameter budget" in capsys.readouterr().err
