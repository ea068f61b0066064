"""FLAP compensation: mask bias fields, the gate hooks that apply them, the biases and the criterion."""

from __future__ import annotations

import json

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.importance.capture import capture
from headlab.engine.importance.fluctuation import head_fluctuation
from headlab.engine.importance.mean_ablation import attention_bias, ffn_bias
from headlab.engine.importance.registry import get_criterion
from headlab.engine.pruning.compensation import compensate, strip_compensation
from tests.tiny import tiny_handle

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pruning heads with a bias", "a b c d e f g h i j k"]
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 8, 1, 64], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])


def logits(handle, ids=IDS):
    with torch.no_grad():
        return token_logits(handle, ids, torch.ones_like(ids))


def constant_kv_group(handle, layer: int, kv: int) -> list[int]:
    """Make every head reading KV head `kv` of `layer` output a constant (V rows zero, V bias kept)."""
    g = handle.geometry
    v_proj = handle.adapter.attention(layer).v_proj
    rows = slice(kv * g.head_dim, (kv + 1) * g.head_dim)
    with torch.no_grad():
        v_proj.weight[rows] = 0.0
        v_proj.bias[rows] = torch.linspace(-1.0, 1.0, g.head_dim)
    return [h for h in range(g.n_heads) if g.kv_head_of(h) == kv]


def test_compensation_leaves_the_output_unchanged_for_a_head_with_constant_output():
    handle = tiny_handle("qwen2")  # Qwen2 has a V bias: zero V weights make a head's output exactly constant
    heads = constant_kv_group(handle, layer=1, kv=0)
    dense = logits(handle)
    stats = capture(handle, TEXTS, gradients=False)
    mask = PruneMask.dense(handle.geometry).with_head(1, heads[0], 0.0)
    with gates.apply(handle, mask):
        plain = logits(handle)
    with gates.apply(handle, compensate(handle, mask, stats)):
        compensated = logits(handle)
    assert not torch.allclose(plain, dense, atol=1e-4), "zeroing the head must change the output"
    assert torch.allclose(compensated, dense, atol=1e-5)


def test_fluctuation_of_a_constant_head_is_zero_and_of_others_is_not():
    handle = tiny_handle("qwen2")
    heads = constant_kv_group(handle, layer=0, kv=1)
    stats = capture(handle, TEXTS, gradients=False)
    fl = head_fluctuation(handle.adapter, stats)
    assert torch.allclose(fl[0, heads], torch.zeros(len(heads)), atol=1e-8)
    others = [h for h in range(handle.geometry.n_heads) if h not in heads]
    assert (fl[0, others] > 1e-6).all()
    assert torch.equal(get_criterion("fluctuation")(handle, stats).heads, fl)


def test_attention_bias_is_the_pruned_heads_mean_through_the_o_projection(llama_handle):
    g = llama_handle.geometry
    means = torch.randn(g.n_layers, g.n_heads * g.head_dim)
    heads = torch.ones(g.n_layers, g.n_heads)
    heads[0, 1] = 0.0
    bias = attention_bias(llama_handle.adapter, heads, means)
    w = llama_handle.adapter.head_output_proj(0).weight  # (d, H * hd)
    cols = slice(g.head_dim, 2 * g.head_dim)
    assert torch.allclose(bias[0], w[:, cols] @ means[0, cols], atol=1e-5)
    assert torch.equal(bias[1], torch.zeros(g.hidden))


def test_ffn_bias_is_the_pruned_channels_mean_through_the_down_projection(handle):
    g = handle.geometry
    means = torch.randn(g.n_layers, g.ffn_dim)
    gates_ = torch.ones(g.n_layers, g.ffn_dim)
    gates_[1, :3] = 0.0
    bias = ffn_bias(handle.adapter, gates_, means)
    down = handle.adapter.ffn_weights(1)["down"].float()  # (d, F)
    assert torch.allclose(bias[1], down[:, :3] @ means[1, :3], atol=1e-5)
    assert torch.equal(bias[0], torch.zeros(g.hidden))


def test_compensated_mask_equals_replacing_pruned_channels_by_their_mean_by_hand(handle):
    g = handle.geometry
    stats = capture(handle, TEXTS, gradients=False)
    mask = PruneMask.dense(g)
    mask.ffn[0, :4] = 0.0
    mean = stats.ffn_mean[0, :4]
    proj = handle.adapter.ffn_output_proj(0)

    def by_hand(module, args):
        x = args[0].clone()
        x[..., :4] = mean.to(x.dtype)
        return (x,)

    hook = proj.register_forward_pre_hook(by_hand)
    try:
        expected = logits(handle)
    finally:
        hook.remove()
    with gates.apply(handle, compensate(handle, mask, stats, units="ffn")):
        got = logits(handle)
    assert torch.allclose(got, expected, atol=1e-5)


def test_bias_of_a_removed_sub_block_is_not_applied(llama_handle):
    g = llama_handle.geometry
    removed = PruneMask.dense(g).with_block(0, "attn", 0.0)
    with_bias = removed.clone()
    with_bias.attn_bias = torch.randn(g.n_layers, g.hidden)
    with_bias.attn_bias[1] = 0.0
    with gates.apply(llama_handle, removed):
        a = logits(llama_handle)
    with gates.apply(llama_handle, with_bias):
        b = logits(llama_handle)
    assert torch.equal(a, b)


def test_per_sample_masks_carry_their_own_biases(llama_handle):
    g = llama_handle.geometry
    m0 = PruneMask.dense(g)
    m1 = PruneMask.dense(g)
    m1.ffn_bias = torch.randn(g.n_layers, g.hidden)
    with gates.apply(llama_handle, [m0, m1]):
        both = logits(llama_handle)
    with gates.apply(llama_handle, m1):
        second = logits(llama_handle, IDS[1:])
    assert torch.allclose(both[0], logits(llama_handle, IDS[:1])[0], atol=1e-5)
    assert torch.allclose(both[1], second[0], atol=1e-5)


def test_sequential_compensation_recomputes_means_under_the_pruned_model(llama_handle):
    g = llama_handle.geometry
    mask = PruneMask.dense(g)
    mask.heads[0, :2] = 0.0
    mask.heads[1, 0] = 0.0
    stats = capture(llama_handle, TEXTS, gradients=False)
    one_pass = compensate(llama_handle, mask, stats)
    sequential = compensate(llama_handle, mask, stats, texts=TEXTS, sequential=True)
    assert torch.allclose(one_pass.attn_bias[0], sequential.attn_bias[0], atol=1e-5), "layer 0 sees no change"
    assert not torch.allclose(one_pass.attn_bias[1], sequential.attn_bias[1], atol=1e-6)
    assert sequential.meta["compensation"]["sequential"] is True


def test_mask_json_round_trips_biases_and_omits_them_when_absent(tmp_path, llama_handle):
    g = llama_handle.geometry
    plain = PruneMask.dense(g).with_head(0, 1, 0.0)
    assert "attn_bias" not in plain.to_dict() and "ffn_bias" not in plain.to_dict()
    biased = plain.clone()
    biased.attn_bias = torch.randn(g.n_layers, g.hidden)
    path = biased.save(tmp_path / "m.json")
    back = PruneMask.load(path, g)
    assert back == biased and back != plain
    assert torch.equal(back.attn_bias, biased.attn_bias) and back.ffn_bias is None


def test_mask_files_written_before_biases_existed_still_load(tmp_path, llama_handle):
    g = llama_handle.geometry
    old = {"format": "headlab.prune_mask", "version": 1, "heads": [[1.0] * g.n_heads] * g.n_layers,
           "ffn": [[1.0] * g.ffn_dim] * g.n_layers, "attn": [1.0] * g.n_layers, "ffn_block": [1.0] * g.n_layers,
           "meta": {}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    m = PruneMask.load(tmp_path / "old.json", g)
    assert m.attn_bias is None and m.ffn_bias is None and not m.has_bias


def test_bias_of_the_wrong_shape_is_a_clear_error(llama_handle):
    g = llama_handle.geometry
    m = PruneMask.dense(g)
    m.attn_bias = torch.zeros(g.n_layers, g.hidden + 1)
    with pytest.raises(MaskError, match=r"mask.attn_bias has shape .* hidden size"):
        m.check(g)
    m.attn_bias = torch.full((g.n_layers, g.hidden), float("nan"))
    with pytest.raises(MaskError, match="NaN"):
        m.check(g)


def test_strip_compensation_drops_biases_and_their_note(llama_handle):
    g = llama_handle.geometry
    stats = capture(llama_handle, TEXTS, gradients=False)
    m = compensate(llama_handle, PruneMask.dense(g).with_head(0, 0, 0.0), stats)
    assert m.has_bias and "compensation" in m.meta
    s = strip_compensation(m)
    assert not s.has_bias and "compensation" not in s.meta and torch.equal(s.heads, m.heads)


def test_compensate_without_statistics_or_texts_is_refused(llama_handle):
    with pytest.raises(ValueError, match="statistics or texts"):
        compensate(llama_handle, PruneMask.dense(llama_handle.geometry))


def test_a_removed_attention_sub_block_is_replaced_by_its_mean_through_the_previous_ffn(llama_handle):
    """All heads of layer 1 pruned: the sub-block goes and its mean output rides on layer 0's FFN bias."""
    g = llama_handle.geometry
    stats = capture(llama_handle, TEXTS, gradients=False)
    mask = PruneMask.dense(g)
    mask.heads[1] = 0.0
    m = compensate(llama_handle, mask, stats)
    assert m.attn[1] == 0 and m.attn_bias is None and m.ffn_bias[0].abs().sum() > 0
    constant = attention_bias(llama_handle.adapter, torch.zeros(g.n_layers, g.n_heads), stats.head_in_mean)[1]
    attn = llama_handle.adapter.attention(1)

    def mean_output(module, args, kwargs, output):
        out = output[0]  # (B, T, d)
        return (torch.zeros_like(out) + constant.to(out.dtype), *output[1:])

    hook = attn.register_forward_hook(mean_output, with_kwargs=True)
    try:
        expected = logits(llama_handle)
    finally:
        hook.remove()
    with gates.apply(llama_handle, m):
        got = logits(llama_handle)
    assert torch.allclose(got, expected, atol=1e-5)


def test_compensated_masks_run_the_same_through_the_kernel_path(llama_handle):
    from headlab.engine.runtime.sparse_forward import sparse_logits

    g = llama_handle.geometry
    stats = capture(llama_handle, TEXTS, gradients=False)
    mask = PruneMask.dense(g)
    mask.heads[1] = 0.0
    mask.heads[0, 2] = 0.0
    mask.ffn[1, :9] = 0.0
    m = compensate(llama_handle, mask, stats)
    with gates.apply(llama_handle, m):
        hooked = logits(llama_handle)
    with torch.no_grad():
        kernel = sparse_logits(llama_handle, IDS, m)
    assert torch.allclose(hooked, kernel, atol=1e-4)


def test_a_removed_first_sub_block_has_nothing_to_fold_into(llama_handle):
    g = llama_handle.geometry
    stats = capture(llama_handle, TEXTS, gradients=False)
    mask = PruneMask.dense(g)
    mask.heads[0] = 0.0
    m = compensate(llama_handle, mask, stats)
    assert m.attn[0] == 0 and m.attn_bias is None and m.ffn_bias is None


@pytest.mark.real_model
def test_compensation_brings_the_pruned_default_model_closer_to_the_dense_one(smollm):
    from headlab.engine.core.tokens import encode_batch
    from headlab.engine.data.datasets import calibration_texts

    g = smollm.geometry
    stats = capture(smollm, calibration_texts("wikitext", 4), gradients=False, max_length=64)
    mask = PruneMask.dense(g)
    mask.heads[g.n_layers // 2:, :3] = 0.0  # 45 heads of the upper half
    from headlab.engine.data.datasets import read_wikitext

    text = read_wikitext()[600_000:601_500]  # the middle of the file: never calibration text
    ids, am = encode_batch(smollm.tokenizer, [text], 256)

    def kl(m):
        with torch.no_grad():
            dense = torch.log_softmax(token_logits(smollm, ids, am).float(), -1)
            with gates.apply(smollm, m):
                pruned = torch.log_softmax(token_logits(smollm, ids, am).float(), -1)
        return float((dense.exp() * (dense - pruned)).sum(-1).mean())

    assert kl(compensate(smollm, mask, stats)) < kl(mask)
