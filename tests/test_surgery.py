"""Physical pruning: the sliced copy computes what the masked model computes, and is as small as cost says."""

from __future__ import annotations

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.core.reshape import GatheredHeads, RemovedSubBlock
from headlab.engine.export.surgery import LAYERS_KEY, SurgeryError, gqa_layout, plan, prune
from headlab.engine.runtime.cost import cost
from tests.tiny import tiny_handle

MASK_KINDS = ("heads", "channels", "attn_block", "ffn_block", "layer", "mixed")


def make_mask(g, kind: str) -> PruneMask:
    """A hard mask of one kind for a tiny 2-layer model (heads chosen to leave GQA groups uneven)."""
    m = PruneMask.dense(g)
    if kind in ("heads", "mixed"):
        m.heads[0, 0] = 0.0
        m.heads[1, [1, g.n_heads - 1]] = 0.0
    if kind in ("channels", "mixed"):
        m.ffn[0, ::3] = 0.0
        m.ffn[1, 10:50] = 0.0
    if kind == "attn_block":
        m = m.with_block(0, "attn", 0.0)
    if kind == "ffn_block":
        m = m.with_block(1, "ffn", 0.0)
    if kind == "layer":
        m = m.with_block(0, "attn", 0.0).with_block(0, "ffn", 0.0)
    if kind == "mixed":
        m = m.with_block(1, "attn", 0.0)
    return m


def _ids(n: int = 3, t: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (n, t), generator=gen)
    am = torch.ones_like(ids)
    am[0, -4:] = 0  # padding must be handled alike
    return ids, am


@torch.no_grad()
def _masked_and_pruned(handle, mask):
    ids, am = _ids()
    with gates.apply(handle, mask.normalized()):
        ref = token_logits(handle, ids, am)
    pruned = prune(handle, mask)
    return ref, token_logits(pruned, ids, am), pruned


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_pruned_model_logits_equal_masked_model_logits(handle, kind):
    ref, got, _ = _masked_and_pruned(handle, make_mask(handle.geometry, kind))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_pruned_parameter_count_equals_cost_accounting(handle, kind):
    mask = make_mask(handle.geometry, kind)
    pruned = prune(handle, mask)
    kept = sum(p.numel() for p in pruned.model.parameters())
    assert kept == cost(handle, mask).params_kept
    assert kept < cost(handle).params_total


def test_surgery_leaves_the_shared_model_untouched(handle):
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    modules = [type(m) for m in handle.model.modules()]
    prune(handle, make_mask(handle.geometry, "mixed"))
    after = handle.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in handle.model.modules()] == modules


def test_kv_head_is_removed_only_when_its_whole_group_is_pruned(llama_handle):
    g = llama_handle.geometry  # 4 heads, 2 KV heads: heads (0, 1) read KV 0, (2, 3) read KV 1
    mask = PruneMask.dense(g)
    mask.heads[0, [0, 1]] = 0.0  # group 0 gone
    mask.heads[1, 0] = 0.0  # group 0 half gone
    pruned = prune(llama_handle, mask)
    sizes = [pruned.adapter.layer_sizes(i) for i in range(2)]
    assert (sizes[0]["heads"], sizes[0]["kv_heads"]) == (2, 1)
    assert (sizes[1]["heads"], sizes[1]["kv_heads"]) == (3, 2)
    notes = " ".join(pruned.meta["surgery"].notes)
    assert "KV head 0 kept because query head(s) [1] still read it" in notes


def test_uneven_gqa_groups_store_each_kv_head_once_and_match(llama_handle):
    mask = PruneMask.dense(llama_handle.geometry)
    mask.heads[0, 0] = 0.0  # layer 0 groups keep 1 and 2 heads
    ref, got, pruned = _masked_and_pruned(llama_handle, mask)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    attn = pruned.adapter.attention(0)
    assert isinstance(attn.k_proj, GatheredHeads) and attn.k_proj.out_features == 2 * 16
    assert attn.k_proj.head_index.tolist() == [0, 1, 1]
    assert LAYERS_KEY in pruned.model.config.to_dict()  # not expressible by a standard config


def test_gqa_layout_of_even_groups_needs_no_gather():
    layout = gqa_layout([True, False, True, True, False, True], group_size=3)  # (0, 2 | 3, 5)
    assert layout.q_heads == (0, 2, 3, 5) and layout.kv_heads == (0, 1) and layout.kv_index is None
    uneven = gqa_layout([True, True, True, False, False, True], group_size=3)
    assert uneven.kv_index == (0, 0, 0, 1)


def test_a_layer_with_every_head_pruned_loses_its_attention_sub_block():
    h = tiny_handle("gpt2")  # GPT-2's O-projection has a bias: masked heads alone would still add it
    mask = PruneMask.dense(h.geometry)
    mask.heads[0] = 0.0
    sp = plan(h.geometry, mask)
    assert not sp.layers[0].attn
    ref, got, pruned = _masked_and_pruned(h, mask)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert isinstance(pruned.adapter.layers()[0].attn, RemovedSubBlock)


def test_dropping_a_layer_updates_the_config(handle):
    pruned = prune(handle, make_mask(handle.geometry, "layer"))
    cfg = pruned.model.config
    assert cfg.num_hidden_layers == 1 == len(pruned.adapter.layers())
    assert pruned.geometry.n_layers == 1
    if getattr(cfg, "layer_types", None) is not None:
        assert len(cfg.layer_types) == 1


def test_uniform_mask_gives_the_standard_config(llama_handle):
    g = llama_handle.geometry
    mask = PruneMask.dense(g)
    mask.heads[:, [0, 2]] = 0.0  # one head from each group in every layer
    mask.ffn[:, :32] = 0.0
    pruned = prune(llama_handle, mask)
    cfg = pruned.model.config
    assert pruned.meta["standard_config"]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == (2, 2, 96, 16)
    assert getattr(cfg, LAYERS_KEY, None) is None
    assert pruned.geometry.n_heads == 2  # further masking works on the pruned model
    ids, am = _ids()
    assert token_logits(pruned, ids, am).shape[-1] == g.vocab_size


def test_soft_masks_are_refused_with_a_clear_message(llama_handle):
    mask = PruneMask.dense(llama_handle.geometry)
    mask.heads[0, 0] = 0.5
    with pytest.raises(SurgeryError, match="hard mask"):
        prune(llama_handle, mask)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_with_kv_cache_matches_when_layer_zero_attention_is_removed(family):
    h = tiny_handle(family)
    mask = PruneMask.dense(h.geometry).with_block(0, "attn", 0.0)
    ids = torch.tensor([[5, 9, 77, 100, 3, 41]])
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "do_sample": False, "pad_token_id": 256}
    with torch.no_grad():
        with gates.apply(h, mask):
            ref = h.model.generate(input_ids=ids, **kw)
        got = prune(h, mask).model.generate(input_ids=ids, **kw)
    assert torch.equal(got, ref)


def test_compensation_biases_are_folded_into_output_projections(llama_handle):
    if "attn_bias" not in PruneMask.__dataclass_fields__:
        pytest.skip("this engine's masks carry no compensation biases")
    g = llama_handle.geometry
    mask = make_mask(g, "heads")
    gen = torch.Generator().manual_seed(3)
    mask.attn_bias = torch.randn(g.n_layers, g.hidden, generator=gen) * 0.1
    mask.ffn_bias = torch.randn(g.n_layers, g.hidden, generator=gen) * 0.1
    ref, got, pruned = _masked_and_pruned(llama_handle, mask)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert sum(p.numel() for p in pruned.model.parameters()) == cost(llama_handle, mask).params_kept
