"""Per-prompt masks (headlab.engine.dynamic.prompt_mask), their cache and the k-mask router, on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.dynamic import calibration_ids
from headlab.engine.dynamic.ipn import IPN, untrained_ipn
from headlab.engine.dynamic.mask_cache import MaskCache
from headlab.engine.dynamic.prompt_mask import RoutedMasks, keep_fractions, predict_prompt_mask, prompt_embedding
from tests.tiny import tiny_handle


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama")


@pytest.fixture(scope="module")
def ipn(llama):
    return untrained_ipn(llama, 0.5, calibration_ids(llama, window=64, n_windows=4))


@pytest.fixture(scope="module")
def prompts(llama):
    return list(calibration_ids(llama, window=24, n_windows=6).split(1))


def test_prompt_mask_keeps_the_per_token_average_per_layer(llama, ipn, prompts):
    fractions, _ = keep_fractions(llama, ipn, prompts[0])
    mask = predict_prompt_mask(llama, ipn, prompts[0])
    assert mask.channels.shape == (llama.geometry.n_layers, llama.geometry.ffn_dim) and mask.heads is None
    for layer in range(llama.geometry.n_layers):
        assert int(mask.channels[layer].sum()) == round(float(fractions[layer].sum()))
        # the kept channels are the most often kept ones
        kept, dropped = fractions[layer][mask.channels[layer]], fractions[layer][~mask.channels[layer]]
        assert float(kept.min()) >= float(dropped.max())
    assert 0.3 < mask.ffn_sparsity < 0.7


def test_prompt_mask_runs_as_a_static_mask(llama, ipn, prompts):
    mask = predict_prompt_mask(llama, ipn, prompts[0])
    pm = mask.to_prune_mask(llama)
    assert torch.equal(pm.ffn.bool(), mask.channels)
    with torch.no_grad():
        dense = llama.model(input_ids=prompts[1]).logits
        with gates.apply(llama, pm):
            masked = llama.model(input_ids=prompts[1]).logits
    assert not torch.allclose(dense, masked, atol=1e-4)


def test_a_network_that_keeps_everything_predicts_the_dense_mask(llama, prompts):
    keep_all = IPN.for_model(llama, adaptive=False)
    with torch.no_grad():
        keep_all.tau.fill_(-math.inf)
    mask = predict_prompt_mask(llama, keep_all, prompts[0])
    assert bool(mask.channels.all())


def test_heads_per_prompt_keep_at_least_one_head(llama, prompts):
    ipn = IPN.for_model(llama, heads=True, adaptive=False)
    with torch.no_grad():
        ipn.tau.fill_(-math.inf)
        ipn.head_bias.fill_(-10.0)  # per token every head would go
    mask = predict_prompt_mask(llama, ipn, prompts[0])
    assert mask.heads is not None and bool((mask.heads.sum(1) == 1).all())


def test_cache_returns_the_identical_mask_on_a_hit(llama, ipn, prompts):
    cache = MaskCache(capacity=2)
    calls = []

    def predict(p):
        calls.append(1)
        return predict_prompt_mask(llama, ipn, p)

    first, hit = cache.get_or_predict(prompts[0], lambda: predict(prompts[0]))
    assert not hit
    again, hit = cache.get_or_predict(prompts[0].clone(), lambda: predict(prompts[0]))
    assert hit and again is first and len(calls) == 1
    s = cache.stats()
    assert (s.hits, s.misses, s.size) == (1, 1, 1) and s.hit_rate == 0.5
    # eviction: least recently used goes beyond capacity
    cache.get_or_predict(prompts[1], lambda: predict(prompts[1]))
    cache.get_or_predict(prompts[2], lambda: predict(prompts[2]))
    assert cache.stats().size == 2
    assert cache.get(prompts[0]) is None


def test_cache_near_hits_by_embedding(llama, ipn, prompts):
    cache = MaskCache(min_cosine=0.999)
    mask = predict_prompt_mask(llama, ipn, prompts[0])
    cache.put(prompts[0], mask)
    shuffled = prompts[0][:, torch.randperm(prompts[0].shape[1], generator=torch.Generator().manual_seed(0))]
    # the same tokens in another order have the same mean embedding: a near hit
    assert cache.get(shuffled, lambda: prompt_embedding(llama, shuffled)) is mask
    assert cache.stats().near_hits == 1
    assert cache.get(prompts[3], lambda: prompt_embedding(llama, prompts[3])) is None
    with pytest.raises(ValueError, match="capacity"):
        MaskCache(capacity=0)


def test_router_of_k_masks(llama, ipn, prompts):
    routed = RoutedMasks.fit(llama, ipn, prompts, k=2)
    assert len(routed.masks) == 2 and routed.centroids.shape == (2, llama.geometry.hidden)
    for p in prompts:
        assert any(routed.route(llama, p) is m for m in routed.masks)
    with pytest.raises(ValueError, match="k must be"):
        RoutedMasks.fit(llama, ipn, prompts, k=7)
    with pytest.raises(ValueError, match="empty"):
        prompt_embedding(llama, torch.zeros(1, 0, dtype=torch.long))


def test_compensation_puts_back_the_dropped_channels_mean_on_the_prompt(llama, ipn, prompts):
    """With the bias, a mask's FFN output on the prompt matches the dense one on average over its tokens."""
    from headlab.engine.core.hooks import temporary_hooks

    mask = predict_prompt_mask(llama, ipn, prompts[0], compensate=True)
    bare = predict_prompt_mask(llama, ipn, prompts[0])
    assert bare.ffn_bias is None and torch.equal(mask.channels, bare.channels)
    outs = {}
    for name, m in (("dense", None), ("comp", mask), ("bare", bare)):
        seen = []
        with torch.no_grad(), gates.apply(llama, None if m is None else m.to_prune_mask(llama)):
            with temporary_hooks() as hooks:  # after the gates' own hooks: sees the output with their bias
                hooks.post(llama.adapter.projections(0)["down"], lambda mod, a, out, seen=seen: seen.append(out))
                llama.model(input_ids=prompts[0])
        outs[name] = seen[0][0].mean(0)  # layer 0's mean FFN output over the prompt (same input in all three)
    err_comp = (outs["comp"] - outs["dense"]).abs().max()
    err_bare = (outs["bare"] - outs["dense"]).abs().max()
    assert err_comp < 1e-4 < err_bare
