"""Batch-1 sparse decoding (engine.dynamic.decode) on a tiny Llama: the hook model token by token, dense parity, isolation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.core.errors import UnsupportedModelError
from engine.dynamic import (
    Thresholds,
    ThresholdsError,
    apply_rule,
    calibrate,
    calibration_ids,
    decode,
    decode_weight_bytes,
    dense_generate,
    sparse_generate,
)
from engine.models.wrap import wrap_model
from tests.tiny import VOCAB, tiny_handle, tiny_tokenizer

N_NEW = 12


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def prompt(llama):
    return calibration_ids(llama, window=16, n_windows=1)  # [1, 16]


@pytest.fixture(scope="module")
def cats(llama):
    return calibrate(llama, "cats", 0.5, calibration_ids(llama, window=64, n_windows=6))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _greedy(handle, prompt, n):
    """Dense greedy decoding the slow way: the whole prefix re-read per token, no cache, no stop token."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, handle.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _hf_generate(handle, prompt, n):
    """HF's cached greedy generation (it stops at the end-of-sequence token)."""
    with torch.no_grad():
        return handle.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                     do_sample=False, pad_token_id=handle.tokenizer.pad_token_id)


@pytest.mark.parametrize("gather_rows", [None, 16])
def test_sparse_decode_matches_the_hook_model_token_by_token(llama, prompt, cats, gather_rows, monkeypatch):
    if gather_rows is not None:  # up rows gathered in several blocks, not all at once
        monkeypatch.setattr(decode, "_GATHER_BYTES", gather_rows * llama.geometry.hidden * 4)
    out = sparse_generate(llama, prompt, cats, N_NEW)
    T = prompt.shape[1]
    assert out.ids.shape == (1, T + N_NEW) and out.logits.shape == (N_NEW, llama.geometry.vocab_size)
    with torch.no_grad(), apply_rule(llama, cats):
        for step in range(N_NEW):  # the hook model re-reads the whole prefix: no cache to share errors with
            ref = llama.model(input_ids=out.ids[:, : T + step]).logits[0, -1]
            torch.testing.assert_close(out.logits[step], ref, atol=1e-4, rtol=0)
            assert int(ref.argmax()) == int(out.ids[0, T + step])


def test_sparse_decode_reads_only_the_kept_channels(llama, prompt, cats):
    out = sparse_generate(llama, prompt, cats, N_NEW)
    F = llama.geometry.ffn_dim
    assert out.kept.shape == (N_NEW - 1, llama.geometry.n_layers)
    assert bool((out.kept < F).any()) and 0.2 < float(out.kept.float().mean()) / F < 0.8
    dense_bytes, sparse_bytes = decode_weight_bytes(llama), decode_weight_bytes(llama, out.kept)
    assert sparse_bytes < dense_bytes
    full = decode_weight_bytes(llama, torch.full_like(out.kept, F))
    assert full == pytest.approx(dense_bytes)


def test_minus_inf_thresholds_decode_exactly_like_dense_generation(llama, prompt):
    g = llama.geometry
    every = Thresholds.dense("cats", g.n_layers, g.ffn_dim)
    reference = _greedy(llama, prompt, N_NEW)
    sparse, dense = sparse_generate(llama, prompt, every, N_NEW), dense_generate(llama, prompt, N_NEW)
    assert torch.equal(sparse.ids, reference) and torch.equal(dense.ids, reference)
    hf = _hf_generate(llama, prompt, N_NEW)  # the same tokens up to where HF stops
    assert hf.shape[1] > prompt.shape[1] and torch.equal(dense.ids[:, : hf.shape[1]], hf)
    assert bool((sparse.kept == g.ffn_dim).all()) and dense.kept is None
    torch.testing.assert_close(sparse.logits, dense.logits, atol=1e-4, rtol=0)


def test_decoding_leaves_the_shared_model_unchanged_and_unhooked(llama, prompt, cats):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    hooks = _hook_count(llama.model)
    sparse_generate(llama, prompt, cats, 4)
    dense_generate(llama, prompt, 4)
    after = llama.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _hook_count(llama.model) == hooks == 0


def test_other_rules_and_families_are_refused(llama, prompt):
    g = llama.geometry
    with pytest.raises(ThresholdsError, match="CATS"):
        sparse_generate(llama, prompt, Thresholds.dense("teal", g.n_layers, g.ffn_dim), 2)
    gpt2 = tiny_handle("gpt2")
    with pytest.raises(UnsupportedModelError, match="llama"):
        sparse_generate(gpt2, prompt, Thresholds.dense("cats", g.n_layers, g.ffn_dim), 2)
    with pytest.raises(UnsupportedModelError, match="llama"):
        dense_generate(gpt2, prompt, 2)


def test_sparse_decode_keeps_ffn_biases(prompt):
    torch.manual_seed(1)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=128, max_position_embeddings=128, vocab_size=VOCAB, mlp_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    handle = wrap_model(model, tiny_tokenizer(), name="tiny-llama-mlp-bias")
    cats = calibrate(handle, "cats", 0.5, calibration_ids(handle, window=64, n_windows=2))
    out = sparse_generate(handle, prompt, cats, 6)
    T = prompt.shape[1]
    with torch.no_grad(), apply_rule(handle, cats):
        for step in range(6):
            ref = handle.model(input_ids=out.ids[:, : T + step]).logits[0, -1]
            torch.testing.assert_close(out.logits[step], ref, atol=1e-4, rtol=0)
