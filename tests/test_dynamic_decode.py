"""Batch-1 sparse decoding (headlab.engine.dynamic.decode) on a tiny Llama: the gated model token by token, dense parity, isolation.

Each decoded token's logits are compared with the gated model (the shared model under hooks that zero
what the chooser drops at every position) re-reading the whole prefix: no cache to share errors with.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # the Triton decode kernel runs interpreted here; set before the first import of a Triton kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from headlab.engine.core.errors import UnsupportedModelError
from headlab.engine.dynamic import (
    CatsChooser,
    Chooser,
    FixedChooser,
    IPNChooser,
    Thresholds,
    ThresholdsError,
    apply_rule,
    calibrate,
    calibration_ids,
    decode_weight_bytes,
    dense_generate,
    sparse_generate,
)
from headlab.engine.dynamic import gathered as gathered_module
from headlab.engine.dynamic.gathered import interleaved_ffn, is_silu
from headlab.engine.dynamic.ipn import IPN, IPNError, apply_ipn, calibrate_thresholds, untrained_ipn
from headlab.engine.models.wrap import wrap_model
from headlab.kernels import compiled, interpreter_enabled, triton_available
from headlab.kernels.compiled import CompiledKernelError
from tests.compiled_kernel import compiled_kernel
from tests.tiny import VOCAB, tiny_handle, tiny_tokenizer

N_NEW = 12
# fp32: the decode path sums the same products in another order (observed ~2e-7 on these logits)
TOL = {"atol": 1e-4, "rtol": 0}
BACKENDS = ["compiled", "torch"]


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def prompt(llama):
    return calibration_ids(llama, window=16, n_windows=1)  # [1, 16]


@pytest.fixture(scope="module")
def cats(llama):
    return calibrate(llama, "cats", 0.5, calibration_ids(llama, window=64, n_windows=6))


def _backend(name: str) -> str:
    if name == "compiled":
        compiled_kernel()  # built by the same builder as `make setup`; a skip only without a compiler
    if name == "triton" and not (triton_available() and interpreter_enabled()):
        pytest.skip("the Triton decode kernel runs on CPU tensors only under TRITON_INTERPRET=1")
    return name


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


def _assert_matches_gated_model(handle, out, prompt, gates, n=N_NEW):
    """Every decoded token's logits equal the gated model's at that position, and greedy picked from them."""
    T = prompt.shape[1]
    with torch.no_grad(), gates:
        for step in range(n):
            ref = handle.model(input_ids=out.ids[:, : T + step]).logits[0, -1]
            torch.testing.assert_close(out.logits[step], ref, **TOL)
            assert int(ref.argmax()) == int(out.ids[0, T + step])


class ProbeChooser(Chooser):
    """Heads and channels from random projections of the token's own input: different per token, like a predictor.

    Layer 0 keeps head h where <x, r_h> > 0 (about half); layer 1 where it exceeds a margin, so some tokens
    keep no head at all (the sub-block rule) and others keep all four.
    """

    name = "probe"
    chooses_heads = True

    def __init__(self, handle, seed: int = 3, margins=(0.0, 1.0)):
        g = handle.geometry
        gen = torch.Generator().manual_seed(seed)
        self.heads_proj = torch.randn(g.n_layers, g.hidden, g.n_heads, generator=gen)
        self.channels_proj = torch.randn(g.n_layers, g.hidden, g.ffn_dim, generator=gen)
        self.margins = margins

    def head_keep(self, layer, x):
        return x @ self.heads_proj[layer] > self.margins[layer]

    def channel_keep(self, layer, x):
        return x @ self.channels_proj[layer] > 0

    def predictor_bytes(self, handle):
        return self.heads_proj[0].numel() * 4 * handle.geometry.n_layers


def _biased_llama(seed=1, hidden_act="silu"):
    """A tiny Llama with biases on every projection (attention_bias and mlp_bias), randomised."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=128, max_position_embeddings=128, vocab_size=VOCAB, mlp_bias=True,
                      attention_bias=True, hidden_act=hidden_act)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return wrap_model(model, tiny_tokenizer(), name=f"tiny-llama-biases-{hidden_act}")


# ------------------------------------------------------------------------------------------- CATS


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
def test_cats_decode_matches_the_hook_model_token_by_token(llama, prompt, cats, backend):
    out = sparse_generate(llama, prompt, cats, N_NEW, backend=_backend(backend))
    T = prompt.shape[1]
    assert out.ids.shape == (1, T + N_NEW) and out.logits.shape == (N_NEW, llama.geometry.vocab_size)
    assert out.ffn_path == backend and out.chooser == "cats" and out.heads is None
    _assert_matches_gated_model(llama, out, prompt, apply_rule(llama, cats))


def test_cats_torch_fallback_in_several_scratch_blocks_matches_too(llama, prompt, cats, monkeypatch):
    monkeypatch.setattr(gathered_module, "GATHER_ROWS", 5)  # kept rows gathered five at a time
    out = sparse_generate(llama, prompt, cats, N_NEW, backend="torch")
    assert bool((out.kept > 10).all())
    _assert_matches_gated_model(llama, out, prompt, apply_rule(llama, cats))


def test_sparse_decode_reads_only_the_kept_channels(llama, prompt, cats):
    out = sparse_generate(llama, prompt, cats, N_NEW)
    F = llama.geometry.ffn_dim
    assert out.kept.shape == (N_NEW - 1, llama.geometry.n_layers)
    assert bool((out.kept < F).any()) and 0.2 < float(out.kept.float().mean()) / F < 0.8
    dense_bytes, sparse_bytes = decode_weight_bytes(llama), decode_weight_bytes(llama, out.kept)
    assert sparse_bytes < dense_bytes
    chooser = CatsChooser(llama, cats)
    assert decode_weight_bytes(llama, out.kept, chooser=chooser) == pytest.approx(sparse_bytes)
    full = decode_weight_bytes(llama, torch.full_like(out.kept, F))  # CATS keeping all: gate once, up/down in full
    assert full == pytest.approx(dense_bytes)
    assert out.chooser_s > 0 and out.chooser_s < out.decode_s


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_thresholds_decode_exactly_like_dense_generation(llama, prompt, backend):
    g = llama.geometry
    every = Thresholds.dense("cats", g.n_layers, g.ffn_dim)
    reference = _greedy(llama, prompt, N_NEW)
    sparse = sparse_generate(llama, prompt, every, N_NEW, backend=_backend(backend))
    dense = dense_generate(llama, prompt, N_NEW)
    assert torch.equal(sparse.ids, reference) and torch.equal(dense.ids, reference)
    hf = _hf_generate(llama, prompt, N_NEW)  # the same tokens up to where HF stops
    assert hf.shape[1] > prompt.shape[1] and torch.equal(dense.ids[:, : hf.shape[1]], hf)
    assert bool((sparse.kept == g.ffn_dim).all()) and dense.kept is None and dense.ffn_path is None
    torch.testing.assert_close(sparse.logits, dense.logits, **TOL)


# ------------------------------------------------------------------------------- heads and channels


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
def test_decode_with_per_token_heads_matches_the_gated_model(llama, prompt, backend):
    chooser = ProbeChooser(llama)
    out = sparse_generate(llama, prompt, chooser, N_NEW, backend=_backend(backend))
    H = llama.geometry.n_heads
    assert out.heads.shape == (N_NEW - 1, llama.geometry.n_layers)
    assert bool((out.heads == 0).any()), "no token dropped a whole attention sub-block: the test lost its edge"
    assert bool(((out.heads > 0) & (out.heads < H)).any()) and bool((out.heads == H).any())
    assert len(set(out.kept[:, 0].tolist())) > 3  # channels differ per token
    _assert_matches_gated_model(llama, out, prompt, chooser.gates(llama))


def test_heads_and_biases_follow_the_sub_block_rule(prompt):
    """With an O bias, a token that keeps no head adds nothing (not the bias); kept heads add it once."""
    handle = _biased_llama()
    chooser = ProbeChooser(handle, seed=5)
    out = sparse_generate(handle, prompt, chooser, N_NEW)
    assert bool((out.heads == 0).any())
    _assert_matches_gated_model(handle, out, prompt, chooser.gates(handle))


def test_a_fixed_chooser_keeping_everything_is_the_dense_model(llama, prompt):
    g = llama.geometry
    everything = FixedChooser(llama, [torch.arange(g.ffn_dim)] * g.n_layers, [torch.arange(g.n_heads)] * g.n_layers)
    out = sparse_generate(llama, prompt, everything, N_NEW)
    assert torch.equal(out.ids, _greedy(llama, prompt, N_NEW))
    assert bool((out.heads == g.n_heads).all()) and bool((out.kept == g.ffn_dim).all())
    assert decode_weight_bytes(llama, out.kept, out.heads, chooser=everything) == pytest.approx(
        decode_weight_bytes(llama))


def test_weight_bytes_count_kept_heads_q_rows_and_o_columns_and_the_predictor(llama, prompt):
    g, proj = llama.geometry, llama.adapter.projections(0)
    half = FixedChooser(llama, [torch.arange(g.ffn_dim)] * g.n_layers, [torch.tensor([0, 3])] * g.n_layers)
    out = sparse_generate(llama, prompt, half, 4)
    assert bool((out.heads == 2).all())
    q_and_o = (proj["q"].weight.numel() + proj["o"].weight.numel()) * 4  # fp32, no attention biases
    saved = decode_weight_bytes(llama) - decode_weight_bytes(llama, out.kept, out.heads, chooser=half)
    assert saved == pytest.approx(g.n_layers * q_and_o / 2)
    probe = ProbeChooser(llama)
    gen = sparse_generate(llama, prompt, probe, 4)
    with_probe = decode_weight_bytes(llama, gen.kept, gen.heads, chooser=probe)
    kept_mean = gen.kept.float().mean(0)
    per_channel = 3 * g.hidden * 4  # gate row + up row + down column (no gate computed by the chooser)
    heads_mean = gen.heads.float().mean(0)
    expected = decode_weight_bytes(llama) + probe.predictor_bytes(llama) - sum(
        (g.ffn_dim - float(kept_mean[i])) * per_channel + (1 - float(heads_mean[i]) / g.n_heads) * q_and_o
        for i in range(g.n_layers))
    assert with_probe == pytest.approx(expected)


# ------------------------------------------------------------------------------- importance network


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipn_decode_matches_apply_ipn_token_by_token(llama, prompt, backend):
    ipn = untrained_ipn(llama, 0.5, calibration_ids(llama, window=64, n_windows=4))
    chooser = IPNChooser(llama, ipn)
    out = sparse_generate(llama, prompt, chooser, N_NEW, backend=_backend(backend))
    assert out.chooser == "ipn" and out.heads is None and not chooser.computes_gate
    F = llama.geometry.ffn_dim
    assert 0.2 < float(out.kept.float().mean()) / F < 0.8
    _assert_matches_gated_model(llama, out, prompt, apply_ipn(llama, ipn))
    # the ideal counts the network's sketches and gate rows of the kept channels only
    with_ipn = decode_weight_bytes(llama, out.kept, chooser=chooser)
    assert with_ipn == pytest.approx(decode_weight_bytes(llama, out.kept, chooser=FixedChooser(
        llama, [torch.arange(F)] * llama.geometry.n_layers)) + ipn.predictor_bytes)


def test_ipn_decode_with_predicted_heads_matches_apply_ipn(llama, prompt):
    ipn = IPN.for_model(llama, heads=True, adaptive=False, target=0.5)
    with torch.no_grad():  # heads that differ per token: random head scores around zero
        ipn.head_weight.copy_(torch.randn(ipn.head_weight.shape, generator=torch.Generator().manual_seed(0)))
        ipn.head_bias.zero_()
    calibrate_thresholds(llama, ipn, calibration_ids(llama, window=64, n_windows=4))
    chooser = IPNChooser(llama, ipn)
    out = sparse_generate(llama, prompt, chooser, N_NEW)
    assert chooser.chooses_heads and bool((out.heads < llama.geometry.n_heads).any())
    assert bool((out.heads == 0).any())  # a token with no head in a layer: the sub-block rule
    _assert_matches_gated_model(llama, out, prompt, apply_ipn(llama, ipn))


def test_an_ipn_for_another_model_is_refused(llama):
    other = IPN(llama.geometry.n_layers, llama.geometry.ffn_dim * 2, llama.geometry.hidden, llama.geometry.n_heads)
    with pytest.raises(IPNError, match="shaped for"):
        IPNChooser(llama, other)


# ------------------------------------------------------------------------ activations, biases, refusals


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_keeps_every_bias(prompt, backend):
    handle = _biased_llama()
    cats = calibrate(handle, "cats", 0.5, calibration_ids(handle, window=64, n_windows=2))
    out = sparse_generate(handle, prompt, cats, 6, backend=_backend(backend))
    _assert_matches_gated_model(handle, out, prompt, apply_rule(handle, cats), n=6)
    probe = ProbeChooser(handle)  # gate rows read per kept channel, with the gate bias
    out = sparse_generate(handle, prompt, probe, 6, backend=backend)
    _assert_matches_gated_model(handle, out, prompt, probe.gates(handle), n=6)


def test_another_activation_runs_the_torch_path_and_the_compiled_one_is_refused(prompt):
    handle = _biased_llama(hidden_act="gelu")
    assert not is_silu(handle.adapter.ffn_activation(0)) and is_silu(tiny_handle("llama").adapter.ffn_activation(0))
    probe = ProbeChooser(handle)
    out = sparse_generate(handle, prompt, probe, 6)
    assert out.ffn_path == "torch"
    _assert_matches_gated_model(handle, out, prompt, probe.gates(handle), n=6)
    with pytest.raises(ValueError, match="SiLU"):
        sparse_generate(handle, prompt, probe, 2, backend="compiled")
    g = handle.geometry  # CATS gives act(gate) itself: the fused kernels need no activation of their own
    cats = CatsChooser(handle, Thresholds.dense("cats", g.n_layers, g.ffn_dim))
    assert sparse_generate(handle, prompt, cats, 2).ffn_path in ("compiled", "torch")


def test_a_missing_build_falls_back_to_torch_and_says_so(llama, prompt, cats, monkeypatch, caplog):
    monkeypatch.setattr(compiled, "_LOADED", None)
    monkeypatch.setattr(compiled, "extension_path", lambda: compiled.extension_dir() / "missing" / "missing.so")
    monkeypatch.setattr(gathered_module, "_NOTICES", set())
    with caplog.at_level("WARNING", logger="headlab.engine.dynamic.gathered"):
        out = sparse_generate(llama, prompt, cats, 3)
    assert out.ffn_path == "torch"
    assert any("torch path" in r.message and "make setup" in r.message for r in caplog.records)
    with pytest.raises(CompiledKernelError, match="make setup"):
        sparse_generate(llama, prompt, cats, 2, backend="compiled")


def test_decoding_leaves_the_shared_model_unchanged_and_unhooked(llama, prompt, cats):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    hooks = _hook_count(llama.model)
    sparse_generate(llama, prompt, cats, 4)
    sparse_generate(llama, prompt, ProbeChooser(llama), 4)
    dense_generate(llama, prompt, 4)
    after = llama.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _hook_count(llama.model) == hooks == 0
    assert interleaved_ffn(llama) is interleaved_ffn(llama)  # made once per model


def test_other_rules_and_families_are_refused(llama, prompt):
    g = llama.geometry
    with pytest.raises(ThresholdsError, match="CATS"):
        sparse_generate(llama, prompt, Thresholds.dense("teal", g.n_layers, g.ffn_dim), 2)
    gpt2 = tiny_handle("gpt2")
    with pytest.raises(UnsupportedModelError, match="llama"):
        sparse_generate(gpt2, prompt, Thresholds.dense("cats", g.n_layers, g.ffn_dim), 2)
    with pytest.raises(UnsupportedModelError, match="llama"):
        dense_generate(gpt2, prompt, 2)
    with pytest.raises(ValueError, match="one kept set per layer"):
        FixedChooser(llama, [torch.arange(4)])
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        FixedChooser(llama, [torch.tensor([128])] * g.n_layers)


def test_teacher_forced_decode_nll_equals_the_gated_forward(llama, prompt):
    """sparse_nll (decode loop, KV cache, gathered kernels) scores a text like the hook-gated batched forward."""
    from headlab.engine.dynamic.choosers import IPNChooser
    from headlab.engine.dynamic.decode import sparse_nll
    from headlab.engine.dynamic.ipn import untrained_ipn
    from headlab.engine.runtime.evaluate import window_nll

    ipn = untrained_ipn(llama, 0.5, calibration_ids(llama, window=64, n_windows=4))
    chooser = IPNChooser(llama, ipn)
    total, count = sparse_nll(llama, prompt, chooser)
    with torch.no_grad(), chooser.gates(llama):
        ref, ref_count = window_nll(llama.model(input_ids=prompt).logits, prompt, torch.ones(1, dtype=torch.long))
    assert count == ref_count == prompt.shape[1] - 1
    assert abs(total - float(ref)) < 1e-3
