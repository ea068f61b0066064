"""Attention maps: the layer's true probabilities, reduced server-side, dense and under a mask.

The blockwise path against the eager map, memory and the layer-input cache: tests/test_attention_blocks.py.
"""

from __future__ import annotations

import pytest
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.core.tokens import EmptyTextError
from headlab.engine.runtime.attention_maps import attention_map, attention_map_pair, pool_attention, token_labels

TEXT = "The quick brown fox jumps over the lazy dog."


def _reference_probs(handle, text: str, layer: int) -> torch.Tensor:
    ids = handle.tokenizer(text, return_tensors="pt")["input_ids"]
    out = handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    return out.attentions[layer][0]  # (H, T, T)


def test_attention_map_equals_the_models_own_attention_output(handle):
    m = attention_map(handle, TEXT, layer=1)
    ref = _reference_probs(handle, TEXT, 1)
    assert m.probs.shape == ref.shape
    torch.testing.assert_close(m.probs, ref, atol=1e-6, rtol=1e-5)
    assert m.n_tokens == ref.shape[-1] and len(m.query_labels) == ref.shape[-1]
    assert not m.pooled and not m.truncated


def test_causal_maps_are_lower_triangular_and_rows_sum_to_one(llama_handle):
    m = attention_map(llama_handle, TEXT, layer=0)
    assert torch.allclose(m.probs.sum(-1), torch.ones(m.probs.shape[:2]), atol=1e-5)
    assert float(m.probs.triu(diagonal=1).abs().max()) == 0.0


def test_long_inputs_are_pooled_into_at_most_max_bins_and_stay_distributions(llama_handle):
    text = "word " * 60  # 300 byte tokens, capped by the tiny model's context of 128
    m = attention_map(llama_handle, text, layer=1, max_bins=16)
    assert m.truncated and m.n_tokens == 128
    assert m.probs.shape == (4, 16, 16) and m.pooled and m.bin_size == 8
    assert torch.allclose(m.probs.sum(-1), torch.ones(4, 16), atol=1e-5)  # mass pooling keeps row sums
    assert m.query_labels[0] == "0-7" and m.query_hover[0].startswith("tokens 0-7:")


def test_max_pooling_keeps_the_largest_probability_of_each_cell():
    p = torch.zeros(1, 4, 4)
    p[0, 3, 0] = 0.9
    p[0, 2, 1] = 0.4
    pooled, edges = pool_attention(p, 2, "max")
    assert edges == [0, 2, 4]
    assert pooled[0, 1, 0] == pytest.approx(0.9)
    mass, _ = pool_attention(p, 2, "mass")
    assert mass[0, 1, 0] == pytest.approx((0.9 + 0.4) / 2)  # rows averaged, keys summed


def test_a_window_shows_token_resolution_labels_for_its_span(llama_handle):
    m = attention_map(llama_handle, TEXT, layer=0, window=(5, 10))
    assert m.span == (5, 15) and m.probs.shape == (4, 10, 10)
    assert m.query_labels[0].startswith("5 ")
    full = attention_map(llama_handle, TEXT, layer=0)
    torch.testing.assert_close(m.probs, full.probs[:, 5:15, 5:15])


def test_masked_map_changes_when_an_earlier_layer_is_pruned_and_marks_pruned_heads(llama_handle):
    g = llama_handle.geometry
    mask = PruneMask.dense(g).toggle_head(1, 2).with_block(0, "attn", 0.0)
    dense, masked = attention_map_pair(llama_handle, TEXT, 1, mask)
    assert not torch.allclose(dense.probs, masked.probs)  # layer 0's attention is gone
    assert masked.head_gates.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert dense.head_gates.tolist() == [1.0] * g.n_heads
    same_layer_only = PruneMask.dense(g).toggle_head(0, 1)
    d0, m0 = attention_map_pair(llama_handle, TEXT, 0, same_layer_only)
    torch.testing.assert_close(d0.probs, m0.probs)  # gates act on head outputs, not on their own map


def test_empty_prompt_is_a_clear_user_error(llama_handle):
    with pytest.raises(EmptyTextError, match="prompt is empty"):
        attention_map(llama_handle, "   ", layer=0)


def test_layer_out_of_range_names_the_valid_layers(llama_handle):
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        attention_map(llama_handle, TEXT, layer=2)


def test_token_labels_are_unique_and_readable(llama_handle):
    ids = llama_handle.tokenizer("a a\n", add_special_tokens=False)["input_ids"]
    labels = token_labels(llama_handle.tokenizer, ids)
    assert labels == ["0 a", "1 ' '", "2 a", "3 '\\n'"]
    assert len(set(labels)) == len(labels)


def test_no_hook_survives_an_attention_map_call(llama_handle):
    attention_map(llama_handle, TEXT, layer=0, mask=PruneMask.dense(llama_handle.geometry).toggle_head(1, 1))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama_handle.model.modules())


@pytest.mark.real_model
def test_a_4096_token_prompt_is_mapped_blockwise_on_the_shipped_model(smollm):
    from headlab.engine.data.datasets import read_wikitext
    from headlab.engine.runtime.attention_maps import prompt_length, token_limit

    ids = smollm.tokenizer(read_wikitext()[:30000])["input_ids"][:4096]
    text = smollm.tokenizer.decode(ids)
    n, truncated = prompt_length(smollm, text)
    assert n >= 4090 and not truncated and token_limit(smollm) >= 4096  # was cut at 1,024 before
    m = attention_map(smollm, text, layer=smollm.geometry.n_layers - 1, max_bins=64)
    assert m.n_tokens == n and not m.truncated
    assert m.probs.shape == (smollm.geometry.n_heads, 64, 64)
    assert torch.allclose(m.probs.sum(-1), torch.ones(m.probs.shape[:2]), atol=1e-4)
