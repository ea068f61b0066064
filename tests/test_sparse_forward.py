"""The kernel inference path equals the gated model, for hard masks on Llama-family models."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend="triton" run on the CPU

import pytest

from engine.core import gates
from engine.core.mask import MaskError, PruneMask
from engine.runtime.sparse_forward import sparse_logits, supports_sparse
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


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_path_matches_gated_model_for_random_masks(family, seed):
    h = tiny_handle(family)
    m = random_mask(h.geometry, seed)
    assert torch.allclose(sparse_logits(h, IDS, m), gated(h, m), **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
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
    with pytest.raises(NotImplementedError, match="engine.core.gates.apply"):
        sparse_logits(gpt2, IDS, PruneMask.dense(gpt2.geometry))


def test_perplexity_through_kernels_equals_the_hook_path():
    from engine.runtime.evaluate import PerplexityProtocol, perplexity

    h = tiny_handle("llama")
    m = random_mask(h.geometry, 7)
    protocol = PerplexityProtocol(window=64, stride=48, n_windows=3)
    hooks = perplexity(h, m, protocol, use_kernels=False)
    kernel = perplexity(h, m, protocol, use_kernels=True)
    assert kernel.n_tokens == hooks.n_tokens
    assert kernel.perplexity == pytest.approx(hooks.perplexity, rel=1e-5)
