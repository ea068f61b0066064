"""llama.cpp's perplexity protocol in HeadLab: second half of each chunk, chunks independent, BOS first if asked."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from headlab.engine.core.mask import PruneMask
from headlab.engine.runtime.half_window import half_window_perplexity
from tests.tiny import tiny_handle

IDS = [int(x) for x in torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0))]


@torch.no_grad()
def _by_hand(h, chunk: list[int]) -> tuple[float, int]:
    logits = h.model(torch.tensor([chunk])).logits[0].double()
    n = len(chunk)
    first = n // 2
    nll = F.cross_entropy(logits[first:n - 1], torch.tensor(chunk[first + 1:]), reduction="sum")
    return float(nll), n - 1 - first


def test_two_chunks_score_their_second_halves_independently():
    h = tiny_handle("llama")
    r = half_window_perplexity(h, IDS, 32)  # 70 tokens: 2 chunks of 32, the rest unused
    a, b = _by_hand(h, IDS[:32]), _by_hand(h, IDS[32:64])
    assert (r.chunks, r.scored_tokens) == (2, 30)
    assert r.perplexity == pytest.approx(math.exp((a[0] + b[0]) / (a[1] + b[1])), rel=1e-9)
    assert half_window_perplexity(h, IDS, 32, n_chunks=1).perplexity == pytest.approx(math.exp(a[0] / a[1]))


def test_bos_replaces_each_chunks_first_token_and_a_mask_applies():
    h = tiny_handle("llama")
    with_bos = half_window_perplexity(h, IDS, 32, bos_id=258, n_chunks=1)
    assert with_bos.perplexity == pytest.approx(math.exp(_by_hand(h, [258, *IDS[1:32]])[0] / 15))
    mask = PruneMask.dense(h.geometry).with_block(0, "attn", 0.0)
    assert half_window_perplexity(h, IDS, 32, mask=mask).perplexity != half_window_perplexity(h, IDS, 32).perplexity


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="no chunk of 512"):
        half_window_perplexity(tiny_handle("llama"), IDS, 512)
