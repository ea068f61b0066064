"""The perplexity protocol with a tokenizer that starts every text with BOS (Gemma's): BOS first in every window."""

from __future__ import annotations

import math

import pytest
import torch

from headlab.engine.runtime.evaluate import (
    PerplexityProtocol,
    _wikitext_ids,
    eval_windows,
    leading_bos,
    perplexity,
    text_windows,
    window_nll,
)
from tests.tiny import tiny_handle, tiny_tokenizer


class _BosFirst:
    """A tokenizer that adds its BOS to every text by default, like Gemma's (wraps the tiny byte tokenizer)."""

    def __init__(self) -> None:
        self.inner = tiny_tokenizer()
        self.bos_token_id = self.inner.bos_token_id

    def __call__(self, text, add_special_tokens: bool = True, **kw):
        ids = self.inner(text, add_special_tokens=False, **kw)["input_ids"]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_only_tokenizers_that_start_with_bos_get_it():
    assert leading_bos(tiny_tokenizer()) is None  # adds no BOS, like SmolLM2's and GPT-2's
    assert leading_bos(_BosFirst()) == tiny_tokenizer().bos_token_id


def test_text_windows_with_bos_stay_contiguous_and_score_the_same_count():
    ids = torch.arange(100)
    plain = text_windows(ids, 10, 10, 3, None)
    assert plain.tolist() == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    with_bos = text_windows(ids, 10, 10, 3, 999, start=5)
    assert with_bos[:, 0].tolist() == [999] * 3
    text = with_bos[:, 1:].reshape(-1).tolist()
    assert text == list(range(5, 5 + 27)), "9 text tokens per window, no gap and no overlap"
    with pytest.raises(ValueError, match="needs"):
        text_windows(ids, 50, 50, 3, 999)


def test_overlapping_windows_with_bos_score_each_text_token_once():
    h = tiny_handle("llama")
    h.tokenizer = _BosFirst()
    p = PerplexityProtocol(window=16, stride=8, n_windows=3)
    windows, score_from = eval_windows(h, p)
    assert (windows[:, 0] == h.tokenizer.bos_token_id).all()
    text = _wikitext_ids(h.tokenizer)
    scored = []
    for w, s in zip(windows, score_from.tolist()):
        scored += w[s:].tolist()
    assert scored == text[: len(scored)].tolist(), "every text token scored exactly once, in order"
    r = perplexity(h, None, p)
    assert r.n_tokens == len(scored) and "BOS first" in r.tokenizer
    with torch.no_grad():
        total, count = window_nll(h.model(input_ids=windows).logits, windows, score_from)
    assert r.perplexity == pytest.approx(math.exp(float(total) / count))
