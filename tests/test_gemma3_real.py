"""The shipped Gemma 3 270M: its geometry, a dense perplexity in the range of a 270M base model, the kernel path."""

from __future__ import annotations

import pytest
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    from headlab.engine.models.load import load_model

    return load_model("gemma3-270m")


def test_the_shipped_gemma_has_gemma3_270ms_shape(gemma):
    g = gemma.geometry
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden, g.ffn_dim, g.vocab_size) == (
        18, 4, 1, 256, 640, 2048, 262144)
    cfg = gemma.model.config
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert cfg.sliding_window == 512 and cfg.query_pre_attn_scalar == 256
    assert gemma.tokenizer("Hello")["input_ids"][0] == gemma.tokenizer.bos_token_id == 2


def test_dense_perplexity_of_one_window_is_that_of_a_small_base_model(gemma):
    r = perplexity(gemma, None, PerplexityProtocol(n_windows=1))
    # measured: python -m headlab eval --model gemma3-270m --windows 1 (32.39 without the BOS Gemma expects)
    assert r.perplexity == pytest.approx(14.54, abs=0.05) and "BOS first" in r.tokenizer


def test_the_kernel_path_equals_the_hooks_past_the_sliding_window(gemma):
    g = gemma.geometry
    gen = torch.Generator().manual_seed(0)
    m = PruneMask.dense(g)
    m.heads = (torch.rand(g.n_layers, g.n_heads, generator=gen) > 0.25).float()
    m.heads[:, 0] = 1.0
    m.ffn = (torch.rand(g.n_layers, g.ffn_dim, generator=gen) > 0.1).float()
    protocol = PerplexityProtocol(window=640, stride=640, n_windows=1)  # 640 tokens: the 512-token window acts
    hooks = perplexity(gemma, m, protocol, use_kernels=False).perplexity
    assert perplexity(gemma, m, protocol, use_kernels=True).perplexity == pytest.approx(hooks, rel=1e-4)
