"""The noise of a perplexity change: a paired, block bootstrap over the scored tokens."""

from __future__ import annotations

import math

import pytest
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.runtime.evaluate import perplexity
from headlab.engine.runtime.paired_bootstrap import change_interval
from headlab.engine.runtime.prefix_cache import PrefixCache, live_protocol
from tests.tiny import tiny_handle


def test_a_consistent_shift_is_beyond_the_noise_and_a_random_one_within():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1000, generator=gen) * 5
    up = change_interval(a, a + 0.05)
    expected = math.exp(float(a.double().mean()) + 0.05) - math.exp(float(a.double().mean()))
    assert up.significant and up.low > 0 and up.delta == pytest.approx(expected, rel=1e-5)
    noisy = change_interval(a, a + 0.5 * torch.randn(1000, generator=gen))
    assert not noisy.significant and noisy.low < 0 < noisy.high
    same = change_interval(a, a)
    assert same.delta == 0 and same.low == same.high == 0 and not same.significant
    assert "within the noise" in noisy.describe() and "beyond the noise" in up.describe()


def test_blocks_widen_the_interval_when_neighbouring_tokens_move_together():
    """Token-level draws treat a run of bad tokens as independent: blocks see it is one event."""
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2048, generator=gen) * 4
    runs = torch.randn(2048 // 64, generator=gen).repeat_interleave(64) * 0.3  # changes that come in runs of 64
    single, blocks = change_interval(a, a + runs, block=1), change_interval(a, a + runs, block=64)
    assert blocks.high - blocks.low > 2 * (single.high - single.low)


def test_mismatched_evaluations_are_refused():
    with pytest.raises(ValueError, match="same tokens"):
        change_interval(torch.ones(10), torch.ones(11))


def test_evaluations_keep_each_scored_tokens_nll_in_order():
    h = tiny_handle("llama")
    protocol = live_protocol(h)
    full = perplexity(h, None, protocol)
    cached = PrefixCache(h, protocol).perplexity(PruneMask.dense(h.geometry))
    for r in (full, cached):
        assert r.token_nll is not None and r.token_nll.numel() == r.n_tokens
        assert math.exp(float(r.token_nll.double().mean())) == pytest.approx(r.perplexity, rel=1e-6)
    assert torch.allclose(full.token_nll, cached.token_nll, atol=1e-4)


@pytest.mark.real_model
def test_the_live_protocol_is_the_pinned_protocols_first_window(smollm):
    from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, eval_windows

    live, pinned = eval_windows(smollm, live_protocol(smollm))[0], eval_windows(smollm, DEFAULT_PROTOCOL)[0]
    assert live.shape[0] == 1 and torch.equal(live[0], pinned[0])
