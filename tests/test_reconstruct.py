"""Layer-wise reconstruction on tiny models: what it changes, what it keeps, and that it exports."""

from __future__ import annotations

import pytest
import torch
import transformers

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.export.write import export
from headlab.engine.models.load import load_pruned
from headlab.engine.pruning.compensation import compensate
from headlab.engine.pruning.reconstruct.layerwise import RefitConfig, obs_prune, refit
from headlab.engine.runtime.replay import LayerInputs, LayerReplay
from tests.tiny import tiny_handle

TEXTS = [f"{i} The quick brown fox jumps over the lazy dog, then {i * 7} more foxes follow it home." for i in range(12)]


def _pruned(g) -> PruneMask:
    m = PruneMask.dense(g)
    m.heads[0, 1] = 0.0
    m.heads[1, [0, g.n_heads - 1]] = 0.0
    m.ffn[:, ::3] = 0.0
    return m


def test_nothing_removed_means_nothing_refitted():
    h = tiny_handle("llama")
    dense = PruneMask.dense(h.geometry)
    assert refit(h, dense, TEXTS) == dense
    assert obs_prune(h, [0, 0], [0, 0], TEXTS) == dense


def test_refit_keeps_the_units_and_beats_mean_compensation():
    h = tiny_handle("llama")
    m = _pruned(h.geometry)
    r = refit(h, m, TEXTS)
    assert torch.equal(r.heads, m.heads) and torch.equal(r.ffn, m.ffn)
    assert set(r.attn_refit) == {0, 1} and set(r.ffn_refit) == {0, 1}
    replay = LayerReplay(h, TEXTS)
    flap = compensate(h, m, texts=TEXTS)
    assert replay.kl(r) < 0.5 * replay.kl(flap) < 0.5 * replay.kl(m)
    errors = r.meta["reconstruction"]["relative_error"]
    assert all(0.0 <= e < 1.0 for kind in ("attn", "ffn") for e in errors[kind])


def test_refit_of_one_sub_block_only_leaves_the_other_alone():
    h = tiny_handle("llama")
    r = refit(h, _pruned(h.geometry), TEXTS, config=RefitConfig(units="ffn"))
    assert not r.attn_refit and set(r.ffn_refit) == {0, 1}
    assert r.attn_bias is None or not r.attn_bias.any()


def test_obs_removes_exactly_the_asked_counts_and_keeps_gqa_groups_even():
    h = tiny_handle("llama")
    g = h.geometry
    m = obs_prune(h, [2, 2], [40, 10], TEXTS, even_groups=True)
    assert (m.heads == 0).sum(1).tolist() == [2, 2] and (m.ffn == 0).sum(1).tolist() == [40, 10]
    per_group = (m.heads == 0).view(g.n_layers, g.n_kv_heads, g.group_size).sum(-1)
    assert (per_group == 1).all()
    with pytest.raises(ValueError, match="multiples"):
        obs_prune(h, [1, 2], [0, 0], TEXTS, even_groups=True)


def test_obs_choice_beats_removing_the_same_counts_by_index_then_refitting():
    h = tiny_handle("llama")
    g = h.geometry
    obs = obs_prune(h, [1, 1], [50, 50], TEXTS)
    fixed = PruneMask.dense(g)
    fixed.heads[:, 0] = 0.0
    fixed.ffn[:, :50] = 0.0
    replay = LayerReplay(h, TEXTS)
    assert replay.kl(obs) < replay.kl(refit(h, fixed, TEXTS))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reconstructed_export_equals_the_masked_model_and_reloads(tmp_path, family):
    h = tiny_handle(family)
    g = h.geometry
    heads = [2, 2] if h.adapter.config_decouples_heads else [0, 0]
    m = obs_prune(h, heads, [32, 32], TEXTS, even_groups=True)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    with torch.no_grad(), gates.apply(h, m):
        ref = token_logits(h, ids, am)
    r = export(h, m, tmp_path / "out", evaluate=False)
    back = load_pruned(tmp_path / "out")
    torch.testing.assert_close(token_logits(back, ids, am), ref, atol=1e-4, rtol=0)
    if r.layout == "uniform":
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids, attention_mask=am).logits, ref, atol=1e-4, rtol=0)
    assert r.params_after < r.params_before
    assert g.n_layers == back.geometry.n_layers


def test_residual_targets_let_the_sub_block_before_a_dropped_layer_stand_in_for_it():
    h = tiny_handle("llama")
    dropped = PruneMask.dense(h.geometry).with_block(1, "attn", 0.0).with_block(1, "ffn", 0.0)
    r = refit(h, dropped, TEXTS, config=RefitConfig(target="residual"))
    assert set(r.ffn_refit) == {0} and not r.attn_refit  # the FFN before the gap stands in for the dropped layer
    assert r.ffn_refit[0].units == tuple(range(h.geometry.ffn_dim))  # nothing of layer 0 was removed
    replay = LayerReplay(h, TEXTS)
    flap = compensate(h, dropped, texts=TEXTS)
    assert replay.kl(r) < replay.kl(flap)
    assert refit(h, dropped, TEXTS) == dropped  # output targets: nothing lost units, nothing to refit


def test_residual_targets_are_refused_for_post_ln_models():
    h = tiny_handle("bert")
    with pytest.raises(ValueError, match="pre-LN"):
        refit(h, _pruned(h.geometry), TEXTS, config=RefitConfig(target="residual"))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_running_layers_only_as_far_as_a_fit_needs_changes_nothing(monkeypatch, family):
    """The walk stops a pruned layer at O's input or a norm's output when that is all a fit reads: the masks are
    exactly those of full runs (LayerInputs.run_until replaced by a full run of the layer)."""
    h = tiny_handle(family)
    config = RefitConfig(inputs="all")
    fast = obs_prune(h, [1, 2], [30, 20], TEXTS, config=config)
    fast_refit = refit(h, _pruned(h.geometry), TEXTS, config=config)
    assert fast.attn_in and fast.ffn_in and fast.attn_refit and fast.ffn_refit

    def full_run(self, layer, mask, module, *, pre=False):
        self.run_from(layer, mask, stop=layer + 1)

    monkeypatch.setattr(LayerInputs, "run_until", full_run)
    assert obs_prune(h, [1, 2], [30, 20], TEXTS, config=config) == fast
    assert refit(h, _pruned(h.geometry), TEXTS, config=config) == fast_refit


def test_residual_targets_record_the_dense_stream_only_where_they_read_it(monkeypatch):
    """A depth gap's stand-in reads the dense stream after the gap: only that layer's states are kept (not all L + 1,
    which ran out of memory on 146,000 tokens), and the masks are exactly those made with every layer recorded."""
    from headlab.engine.pruning.reconstruct import layerwise

    h = tiny_handle("llama")
    L = h.geometry.n_layers
    dropped = PruneMask.dense(h.geometry).with_block(1, "attn", 0.0).with_block(1, "ffn", 0.0)
    gap = PruneMask.dense(h.geometry).with_block(1, "attn", 0.0)
    config = RefitConfig(target="residual", inputs="all")
    runs = layerwise._kept_positions(dropped) + [True]
    assert layerwise._stream_layers(h.geometry, dropped, None, config, runs) == {L}  # layer 0's FFN reads the output
    # a width mask removes no sub-block: every target is the walk's own next dense state, nothing is recorded
    width = _pruned(h.geometry)
    assert layerwise._stream_layers(h.geometry, width, None, config, layerwise._kept_positions(width) + [True]) == set()
    lean = [refit(h, m, TEXTS, config=config) for m in (dropped, gap, width)]
    lean_obs = obs_prune(h, [1, 2], [30, 20], TEXTS, config=config)
    monkeypatch.setattr(layerwise, "_stream_layers", lambda g, *a: set(range(g.n_layers + 1)))
    assert [refit(h, m, TEXTS, config=config) for m in (dropped, gap, width)] == lean
    assert obs_prune(h, [1, 2], [30, 20], TEXTS, config=config) == lean_obs
    monkeypatch.setattr(layerwise, "_stream_layers", lambda g, *a: set())
    with pytest.raises(RuntimeError, match="not recorded"):  # a layer it missed fails loudly, never fits on nothing
        refit(h, dropped, TEXTS, config=config)


def test_residual_targets_reach_past_a_removed_attention_to_the_next_ffn():
    """Layer 1's attention removed, its FFN kept: layer 0's FFN targets the dense stream in front of that FFN."""
    h = tiny_handle("llama")
    gap = PruneMask.dense(h.geometry).with_block(1, "attn", 0.0)
    r = refit(h, gap, TEXTS, config=RefitConfig(target="residual"))
    assert set(r.ffn_refit) == {0, 1} and not r.attn_refit
    replay = LayerReplay(h, TEXTS)
    assert replay.kl(r) < replay.kl(gap)
