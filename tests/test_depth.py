"""Depth criteria and size targets: what each measures, and reaching a parameter count by width or depth."""

from __future__ import annotations

import math

import pytest
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import lm_loss
from headlab.engine.core.tokens import encode_batch
from headlab.engine.export.surgery import prune
from headlab.engine.importance.depth import protect_ends
from headlab.engine.importance.layer_importance import layer_importance
from headlab.engine.importance.registry import criterion_names, get_criterion
from headlab.engine.pruning.select import BudgetError
from headlab.engine.pruning.size_target import depth_mask, reach_size, target_params
from headlab.engine.runtime.cost import cost
from tests.tiny import tiny_handle

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat watches quietly.",
    "Attention heads can be pruned away; some of them matter a lot more than others.",
    "A smaller checkpoint should reload and give the same answers as the masked model.",
]


def test_depth_criteria_are_registered():
    assert {"block_ppl", "taylor_plus", "block_influence"} <= set(criterion_names())


def _ppl(handle, mask=None) -> float:
    from headlab.engine.core import gates

    ids, am = encode_batch(handle.tokenizer, TEXTS, 128)
    with torch.no_grad(), gates.apply(handle, mask):
        loss, _ = lm_loss(handle, ids, am)
    return math.exp(float(loss))


def test_block_ppl_is_the_perplexity_rise_of_removing_each_unit_alone(llama_handle):
    s = get_criterion("block_ppl", texts=TEXTS, batch_size=len(TEXTS))(llama_handle, None)
    g = llama_handle.geometry
    dense = _ppl(llama_handle)
    no_ffn1 = PruneMask.dense(g).with_block(1, "ffn", 0.0)
    no_layer0 = PruneMask.dense(g).with_block(0, "attn", 0.0).with_block(0, "ffn", 0.0)
    assert s.blocks.shape == (2, 2) and s.meta["layers"].shape == (2,)
    assert float(s.blocks[1, 1]) == pytest.approx(_ppl(llama_handle, no_ffn1) - dense, rel=1e-4)
    assert float(s.meta["layers"][0]) == pytest.approx(_ppl(llama_handle, no_layer0) - dense, rel=1e-4)


def test_taylor_plus_sums_weight_times_gradient_and_leaves_the_model_untouched(llama_handle):
    h = llama_handle
    s = get_criterion("taylor_plus", texts=TEXTS, batch_size=len(TEXTS))(h, None)
    assert all(not p.requires_grad and p.grad is None for p in h.model.parameters())
    # Reference: the same first-order saliency from plain autograd on a copy.
    from headlab.engine.core.hooks import private_copy

    model = private_copy(h.model)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, am = encode_batch(h.tokenizer, TEXTS, 128)
    out = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    valid = am[:, 1:].bool()
    loss = torch.nn.functional.cross_entropy(out[valid], ids[:, 1:][valid])
    loss.backward()
    mlp = model.model.layers[1].mlp
    expected_ffn1 = sum(float((p.detach() * p.grad).abs().sum()) for p in mlp.parameters())
    assert float(s.blocks[1, 1]) == pytest.approx(expected_ffn1, rel=1e-3)
    assert s.meta["protected"] == []  # 2 layers: too shallow to protect any


def test_protect_ends_keeps_the_first_and_last_layers_above_all_others():
    scores = torch.arange(12, dtype=torch.float32).flip(0)  # layer 0 most important ... 11 least
    out, protected = protect_ends(scores, first=4, last=2)
    assert protected == [0, 1, 2, 3, 10, 11]
    candidates = [i for i in range(12) if i not in protected]
    assert float(out[protected].min()) > float(out[candidates].max())
    assert torch.equal(out[candidates], scores[candidates])
    assert protect_ends(scores[:5], 4, 2)[1] == []  # would leave too few candidates


def test_block_influence_layer_importance_comes_from_the_capture(llama_handle):
    ls = layer_importance(llama_handle, "block_influence", TEXTS)
    assert ls.layers.shape == (2,) and torch.isfinite(ls.layers).all() and (ls.layers >= 0).all()


def test_depth_target_drops_the_least_important_layers_closest_to_the_target():
    h = tiny_handle("gpt2")
    total = cost(h).params_total
    one_layer = PruneMask.dense(h.geometry).with_block(1, "attn", 0.0).with_block(1, "ffn", 0.0)
    target = cost(h, one_layer).params_kept + 10
    mask, detail = depth_mask(h, target, torch.tensor([5.0, 1.0]))  # layer 1 least important
    assert mask == one_layer and "[1]" in detail
    assert cost(h, mask).params_kept < total


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2", "bert"])
def test_width_target_is_uniform_close_and_exports_with_a_standard_config(family):
    h = tiny_handle(family)
    r = reach_size(h, 0.8, route="width", texts=TEXTS)
    g = h.geometry
    per_channel = 3 * g.hidden if family in ("llama", "qwen2", "gemma3") else 2 * g.hidden + 1
    assert abs(r.params_kept - r.target) <= g.n_layers * per_channel  # within one channel per layer
    assert r.params_kept == cost(h, r.mask).params_kept
    kept_heads = r.mask.heads.sum(dim=1)
    kept_ch = r.mask.ffn.sum(dim=1)
    assert (kept_heads == kept_heads[0]).all() and (kept_ch == kept_ch[0]).all()
    pruned = prune(h, r.mask)
    assert pruned.meta["standard_config"]
    assert r.mask.meta["route"] == "width" and r.mask.meta["target_params"] == r.target


def test_depth_route_reports_what_it_reached(llama_handle):
    r = reach_size(llama_handle, 0.7, route="depth", criterion="block_ppl", texts=TEXTS)
    assert r.mask.meta["criterion"] == "block_ppl"
    assert r.params_kept == cost(llama_handle, r.mask).params_kept
    assert "1 of 2 layers dropped" in r.describe()


@pytest.mark.parametrize("keep", [0.0, 1.0, 1.5, -3, True])
def test_keep_outside_the_model_is_refused(llama_handle, keep):
    with pytest.raises(BudgetError):
        target_params(llama_handle, keep)


def test_width_route_needs_channel_scores(llama_handle):
    with pytest.raises(ValueError, match="FFN channel scores"):
        reach_size(llama_handle, 0.8, route="width", criterion="entropy", texts=TEXTS)
