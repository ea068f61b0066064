"""The input side of reconstruction: one input map per sub-block re-fits every kept Q/K/V and gate/up row."""

from __future__ import annotations

import pytest
import torch
import transformers

from headlab.engine.core import gates
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.export.write import export
from headlab.engine.models.load import load_pruned
from headlab.engine.pruning.reconstruct.layerwise import RefitConfig, fit_input_map, obs_prune, refit
from headlab.engine.runtime.replay import LayerReplay
from tests.tiny import tiny_handle

TEXTS = [f"{i} The quick brown fox jumps over the lazy dog, then {i * 7} more foxes follow it home." for i in range(12)]


def _pruned(g) -> PruneMask:
    m = PruneMask.dense(g)
    m.heads[0, 1] = 0.0
    m.ffn[0, ::2] = 0.0
    return m


def test_the_map_is_the_row_wise_least_squares_of_every_row():
    gen = torch.Generator().manual_seed(0)
    xd = torch.randn(400, 8, generator=gen)
    xp = xd + 0.3 * torch.randn(400, 8, generator=gen)  # the pruned model's shifted inputs
    w = torch.randn(5, 8, generator=gen)  # five rows of an input projection
    m = fit_input_map([xp], [xd], [torch.ones(400, dtype=torch.bool)], damp=0.0)
    for row in w:  # each row solved on its own: min ||X_p w' - X_d w||^2
        alone = torch.linalg.lstsq(xp.double(), (xd @ row).double()[:, None]).solution[:, 0]
        torch.testing.assert_close((m.T @ row).double(), alone, atol=1e-4, rtol=0)
    # damping pulls toward the identity: a huge one changes nothing
    big = fit_input_map([xp], [xd], [torch.ones(400, dtype=torch.bool)], damp=1e6)
    torch.testing.assert_close(big, torch.eye(8), atol=1e-4, rtol=0)


def test_input_maps_come_after_the_first_loss_and_bring_the_model_closer_to_dense():
    h = tiny_handle("llama")
    m = _pruned(h.geometry)
    plain = refit(h, m, TEXTS)
    pruned_only = refit(h, m, TEXTS, config=RefitConfig(inputs="pruned"))
    every = refit(h, m, TEXTS, config=RefitConfig(inputs="all"))
    assert not plain.attn_in and not plain.ffn_in
    # layer 0's attention reads the dense input (nothing lost before it): no map there in either mode
    assert sorted(pruned_only.attn_in) == [] and sorted(pruned_only.ffn_in) == [0]
    assert sorted(every.attn_in) == [1] and sorted(every.ffn_in) == [0, 1]
    replay = LayerReplay(h, TEXTS)
    assert replay.kl(every) < replay.kl(plain)
    assert every.meta["reconstruction"]["inputs"] == "all"


def test_a_mask_with_input_maps_saves_loads_and_checks(tmp_path):
    h = tiny_handle("llama")
    m = refit(h, _pruned(h.geometry), TEXTS, config=RefitConfig(inputs="all"))
    m.save(tmp_path / "m.json")
    back = PruneMask.load(tmp_path / "m.json", h.geometry)
    assert back == m and back.digest() == m.digest()
    torch.testing.assert_close(back.ffn_in[1], m.ffn_in[1])
    other = m.clone()
    other.ffn_in[1] = m.ffn_in[1] + 1e-3
    assert other.digest() != m.digest() and other.first_changed_layer(m) == 1
    bad = m.clone()
    bad.attn_in[1] = torch.ones(3, 3)
    with pytest.raises(MaskError, match="attn_in"):
        bad.check(h.geometry)
    assert not m.without_refit().has_refit


def test_an_export_folds_the_maps_into_the_input_projections(tmp_path):
    h = tiny_handle("llama")
    heads = [2, 2] if h.adapter.config_decouples_heads else [0, 0]
    m = obs_prune(h, heads, [32, 32], TEXTS, even_groups=True, config=RefitConfig(inputs="all"))
    assert m.attn_in and m.ffn_in
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    with torch.no_grad():
        dense = token_logits(h, ids, am)
        with gates.apply(h, m):
            ref = token_logits(h, ids, am)
    assert not torch.allclose(ref, dense, atol=1e-3)  # the maps act
    torch.testing.assert_close(token_logits(h, ids, am), dense)  # and the shared model is untouched
    r = export(h, m, tmp_path / "out", evaluate=False)
    back = load_pruned(tmp_path / "out")
    torch.testing.assert_close(token_logits(back, ids, am), ref, atol=1e-4, rtol=0)
    if r.layout == "uniform":
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids, attention_mask=am).logits, ref, atol=1e-4, rtol=0)


def test_a_family_without_pre_norms_is_refused_by_name():
    h = tiny_handle("gpt2")
    with pytest.raises(ValueError, match="input re-fits"):
        refit(h, _pruned(h.geometry), TEXTS, config=RefitConfig(inputs="all"))


def test_per_sample_masks_apply_each_rows_own_map():
    h = tiny_handle("llama")
    m = refit(h, _pruned(h.geometry), TEXTS, config=RefitConfig(inputs="all"))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    with torch.no_grad():
        with gates.apply(h, [m, PruneMask.dense(h.geometry)]):
            both = token_logits(h, ids, am)
        with gates.apply(h, m):
            first = token_logits(h, ids[:1], am[:1])
        dense = token_logits(h, ids[1:], am[1:])
    torch.testing.assert_close(both[0], first[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], dense[0], atol=1e-5, rtol=0)


def test_joint_allocation_takes_the_cheapest_removals_across_layers_and_kinds():
    from headlab.engine.pruning.reconstruct.joint import _take, _take_mixed, joint_counts

    costs = [torch.tensor([1.0, 5.0, 6.0]), torch.tensor([2.0, 3.0, 4.0])]
    assert _take(costs, 3, 1, [4, 4]) == [1, 2]  # 1, 2, 3 are the cheapest
    # a layer's count is a prefix of its own order: an expensive first removal hides a cheap second one
    assert _take([torch.tensor([9.0, 0.0]), torch.tensor([1.0, 2.0])], 2, 1, [3, 3]) == [0, 2]
    assert _take(costs, 2, 2, [4, 4]) == [0, 2]  # whole chunks of 2: (2 + 3) < (1 + 5)
    mixed = _take_mixed({"attn": [torch.tensor([1.0, 100.0])], "ffn": [torch.tensor([0.5, 0.6, 0.7, 50.0])]},
                        {"attn": 4, "ffn": 1}, 7, {"attn": 1, "ffn": 1}, {"attn": 3, "ffn": 5})
    assert mixed == {"attn": [1], "ffn": [3]}  # per parameter: a head costs 0.25, a channel 0.5-0.7
    h = tiny_handle("llama")
    g = h.geometry
    heads, channels = joint_counts(h, 2, 40, TEXTS, RefitConfig())
    assert sum(heads) == 2 and sum(channels) == 40 and all(c < g.ffn_dim for c in channels)
    heads, channels = joint_counts(h, 2, 40, TEXTS, RefitConfig(), even_groups=True, ffn_align=8)
    assert all(x % g.n_kv_heads == 0 for x in heads) and all(c % 8 == 0 for c in channels)
