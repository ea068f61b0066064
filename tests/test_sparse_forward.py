"""The kernel inference path equals the gated model, for hard masks on Llama-family and Gemma 3 models."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend="triton" run on the CPU

import pytest
import torch.nn.functional as F

from headlab.engine.core import gates
from headlab.engine.core.errors import UnsupportedModelError
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.models.wrap import wrap_model
from headlab.engine.runtime.sparse_forward import sparse_logits, supports_sparse
from tests.tiny import tiny_handle

# fp32 throughout; the kernel path sums in a different order than the dense matmuls.
TOL = {"atol": 1e-4, "rtol": 1e-4}
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 8, 1, 64, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 12]])


def gated(handle, mask):
    with torch.no_grad(), gates.apply(handle, mask):
        return handle.model(input_ids=IDS).logits


def random_mask(g, seed):
    gen = torch.Generator().manual_seed(seed)
    m = PruneMask.dense(g)
    m.heads = (torch.rand(g.n_layers, g.n_heads, generator=gen) > 0.4).float()
    m.heads[:, 0] = 1.0
    m.ffn = (torch.rand(g.n_layers, g.ffn_dim, generator=gen) > 0.5).float()
    return m


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_path_matches_gated_model_for_random_masks(family, seed):
    h = tiny_handle(family)
    m = random_mask(h.geometry, seed)
    assert torch.allclose(sparse_logits(h, IDS, m), gated(h, m), **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_sparse_path_handles_whole_kv_groups_and_removed_sub_blocks(family):
    h = tiny_handle(family)
    g = h.geometry
    m = PruneMask.dense(g)
    m.heads[0, : g.group_size] = 0  # a whole KV group: its K/V rows are skipped too
    m.heads[1] = 0  # every head: the ATTN sub-block goes
    m.ffn_block[0] = 0
    assert torch.allclose(sparse_logits(h, IDS, m), gated(h, m), **TOL)
    assert torch.allclose(sparse_logits(h, IDS, PruneMask.dense(g)), gated(h, None), **TOL)


def test_sparse_path_runs_one_mask_per_row():
    h = tiny_handle("llama")
    m0, m1 = random_mask(h.geometry, 3), random_mask(h.geometry, 4)
    out = sparse_logits(h, IDS, [m0, m1])
    with torch.no_grad(), gates.apply(h, [m0, m1]):
        expected = h.model(input_ids=IDS).logits
    assert torch.allclose(out, expected, **TOL)


def test_sparse_path_applies_compensation_biases():
    h = tiny_handle("llama")
    g = h.geometry
    m = random_mask(g, 5)
    m.attn_bias = torch.randn(g.n_layers, g.hidden) * 0.1
    m.ffn_bias = torch.randn(g.n_layers, g.hidden) * 0.1
    assert torch.allclose(sparse_logits(h, IDS, m), gated(h, m), **TOL)


def test_triton_kernels_on_the_engine_path_match_the_gated_model():
    h = tiny_handle("llama")
    m = random_mask(h.geometry, 6)
    short = IDS[:1, :7]  # the interpreter is slow: one short row
    with torch.no_grad(), gates.apply(h, m):
        expected = h.model(input_ids=short).logits
    assert torch.allclose(sparse_logits(h, short, m, backend="triton"), expected, **TOL)


def test_soft_masks_and_other_families_are_refused_clearly():
    h = tiny_handle("llama")
    soft = PruneMask.dense(h.geometry)
    soft.heads[0, 0] = 0.5
    with pytest.raises(MaskError, match="hard"):
        sparse_logits(h, IDS, soft)
    gpt2 = tiny_handle("gpt2")
    assert not supports_sparse(gpt2)
    with pytest.raises(UnsupportedModelError, match="headlab.engine.core.gates.apply"):
        sparse_logits(gpt2, IDS, PruneMask.dense(gpt2.geometry))


def test_perplexity_through_kernels_equals_the_hook_path():
    from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity

    h = tiny_handle("llama")
    m = random_mask(h.geometry, 7)
    protocol = PerplexityProtocol(window=64, stride=48, n_windows=3)
    hooks = perplexity(h, m, protocol, use_kernels=False)
    kernel = perplexity(h, m, protocol, use_kernels=True)
    assert kernel.n_tokens == hooks.n_tokens
    assert kernel.perplexity == pytest.approx(hooks.perplexity, rel=1e-5)


def uneven_gqa_mask(g):
    """Heads pruned so that KV groups keep different numbers of query heads, plus channels and a sub-block."""
    m = PruneMask.dense(g)
    m.heads[0, 1 : g.group_size] = 0  # group 0 keeps one head, the others all of theirs
    m.heads[1, : g.group_size] = 0  # group 0 gone entirely (its K/V are skipped too)
    m.heads[1, g.group_size + 1] = 0  # and group 1 keeps one head fewer than group 2 (if any)
    m.ffn[0, ::3] = 0
    m.ffn_block[1] = 0
    return m


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_sparse_path_matches_gated_model_with_uneven_gqa_groups(family):
    h = tiny_handle(family)
    m = uneven_gqa_mask(h.geometry)
    assert torch.allclose(sparse_logits(h, IDS, m), gated(h, m), **TOL)


def test_attention_runs_on_the_kept_heads_only(monkeypatch):
    import headlab.kernels.compact

    h = tiny_handle("qwen2")  # 6 heads in 2 KV groups of 3
    g = h.geometry
    m = uneven_gqa_mask(g)
    seen = []
    real = headlab.kernels.compact.head_sparse_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(headlab.kernels.compact, "head_sparse_attention", spy)
    sparse_logits(h, IDS, m)
    kept = (m.heads > 0).sum(1).tolist()
    kv_kept = (m.heads > 0).view(g.n_layers, g.n_kv_heads, g.group_size).any(2).sum(1).tolist()
    assert seen == list(zip(kept, kv_kept)), "q/k/v must hold the kept (KV) heads only, not the full width"


def test_triton_attention_reads_the_kv_head_each_compact_query_head_names():
    from headlab.kernels import head_sparse_attention, reference

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 3, 2, 9, 16  # 3 query heads over 2 KV heads: no repeat_kv pairing exists
    q, k, v = (torch.randn(B, n, T, D, generator=gen) for n in (H, Hkv, Hkv))
    kv_index = torch.tensor([[0, 1, 1], [1, 1, 0]])
    keep = torch.tensor([[True, True, True], [True, False, True]])
    expected = F.scaled_dot_product_attention(q, k[torch.arange(B)[:, None], kv_index],
                                              v[torch.arange(B)[:, None], kv_index], is_causal=True)
    expected = expected * keep[:, :, None, None]
    got_ref = reference.head_sparse_attention(q, k, v, keep, True, None, kv_index=kv_index)
    torch.testing.assert_close(got_ref, expected, atol=1e-5, rtol=1e-5)
    got = head_sparse_attention(q, k, v, keep, kv_index=kv_index, backend="triton")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kv_index out of range"):
        head_sparse_attention(q, k, v, keep, kv_index=kv_index + 1)


def test_triton_kernels_run_uneven_gqa_groups_and_mixed_masks_like_the_gated_model():
    h = tiny_handle("qwen2")
    g = h.geometry
    short = IDS[:, :6]  # the interpreter is slow: short rows
    m0, m1 = uneven_gqa_mask(g), random_mask(g, 8)
    for masks in (m0, [m0, m1]):
        with torch.no_grad(), gates.apply(h, masks):
            expected = h.model(input_ids=short).logits
        assert torch.allclose(sparse_logits(h, short, masks, backend="triton"), expected, **TOL)


def sliding_qwen2(window: int = 4):
    """A tiny Qwen2 whose second layer attends to the last `window` tokens only."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.tiny import VOCAB, tiny_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=96, max_position_embeddings=128, vocab_size=VOCAB,
                      use_sliding_window=True, sliding_window=window, max_window_layers=1)
    model = Qwen2ForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    return wrap_model(model, tiny_tokenizer(), name="tiny-qwen2-sliding")


def test_a_sliding_window_layer_runs_through_the_kernels_like_the_gated_model():
    from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity

    h = sliding_qwen2()  # layer 1 sees the last 4 tokens; IDS rows are 11 long
    assert supports_sparse(h)
    assert h.adapter.attention_window(0) is None and h.adapter.attention_window(1) == 4
    for seed in (0, 1):
        m = random_mask(h.geometry, seed)
        assert torch.allclose(sparse_logits(h, IDS, m), gated(h, m), **TOL)
    m = PruneMask.dense(h.geometry).with_head(0, 1, 0.0)
    protocol = PerplexityProtocol(window=32, stride=32, n_windows=2)
    assert perplexity(h, m, protocol, use_kernels=True).perplexity == pytest.approx(
        perplexity(h, m, protocol, use_kernels=False).perplexity, rel=1e-5)


def test_a_mistral_style_window_on_every_layer_runs_through_the_kernels():
    from transformers import MistralConfig, MistralForCausalLM

    from tests.tiny import VOCAB, tiny_tokenizer

    def mistral(window):
        torch.manual_seed(0)
        cfg = MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                            intermediate_size=96, max_position_embeddings=128, vocab_size=VOCAB, sliding_window=window)
        model = MistralForCausalLM(cfg).eval()
        model.config._attn_implementation = "eager"
        return wrap_model(model, tiny_tokenizer(), name="tiny-mistral")

    for window in (3, None):
        h = mistral(window)
        assert supports_sparse(h) and h.adapter.attention_window(1) == window
        m = random_mask(h.geometry, 2)
        assert torch.allclose(sparse_logits(h, IDS, m), gated(h, m), **TOL)
    assert not torch.allclose(gated(mistral(3), None), gated(mistral(None), None), **TOL)  # the window matters


def test_windowed_attention_reads_only_the_last_window_keys_on_every_backend():
    from headlab.kernels import head_sparse_attention

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D, W = 2, 4, 2, 9, 16, 3
    q, k, v = (torch.randn(B, n, T, D, generator=gen) for n in (H, Hkv, Hkv))
    keep = torch.tensor([[True, False, True, True], [True, True, False, True]])
    i = torch.arange(T)
    visible = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < W)  # (T, T)
    kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    expected = F.scaled_dot_product_attention(q, kk, vv, attn_mask=visible) * keep[:, :, None, None]
    for backend in ("torch", "triton"):  # Triton has no window: a window shorter than T runs the torch twin
        got = head_sparse_attention(q, k, v, keep, window=W, backend=backend)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    causal = head_sparse_attention(q, k, v, keep, backend="torch")
    for backend in ("torch", "triton"):  # a window as long as the sequence is plain causal attention (Triton runs)
        torch.testing.assert_close(head_sparse_attention(q, k, v, keep, window=T, backend=backend), causal,
                                   atol=1e-5, rtol=1e-5)


def test_physically_pruned_layers_are_refused_with_the_layer_named():
    import copy

    from headlab.engine.runtime.sparse_forward import sparse_refusal

    h = tiny_handle("llama")
    pruned = copy.deepcopy(h.model)
    wrap_model(pruned, h.tokenizer).adapter.resize_ffn_(1, list(range(10)))
    reason = sparse_refusal(wrap_model(pruned, h.tokenizer))
    assert reason.startswith("layer 1 was physically pruned ({'ffn': 10}")


def test_refusals_name_soft_masks_and_left_padding():
    from headlab.engine.runtime.sparse_forward import sparse_refusal

    h = tiny_handle("llama")
    soft = PruneMask.dense(h.geometry)
    soft.ffn[0, 0] = 0.5
    assert "soft gates" in sparse_refusal(h, [PruneMask.dense(h.geometry), soft])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert "right-padded" in sparse_refusal(h, PruneMask.dense(h.geometry), left)
    with pytest.raises(ValueError, match="right-padded"):
        sparse_logits(h, IDS[:, :3], PruneMask.dense(h.geometry), attention_mask=left)
    assert "not a causal language model" in sparse_refusal(tiny_handle("bert"))
