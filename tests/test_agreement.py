"""Top-1 and greedy agreement with the dense model (headlab.engine.runtime.agreement)."""

from __future__ import annotations

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.runtime.agreement import _common_prefix, agreement, dense_reference, greedy_tokens, top1_tokens
from tests.test_refit import refit_mask
from tests.tiny import tiny_handle


def _windows(n: int = 3, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(3))


def _pruned(g) -> PruneMask:
    m = PruneMask.dense(g)
    m.heads[0, 0] = 0.0
    m.heads[1, 1] = 0.0
    m.ffn[:, ::2] = 0.0
    return m


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_dense_model_agrees_with_itself_completely(family):
    h = tiny_handle(family)
    a = agreement(h, None, _windows(), n_prompts=2, prompt_tokens=8, n_new=6)
    assert (a.top1, a.greedy_prefix, a.greedy_tokens) == (1.0, 1.0, 1.0)
    assert a.n_positions == 3 * 23 and a.n_prompts == 2 and a.n_new == 6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_with_the_cache_equals_recomputing_the_whole_sequence(family):
    h = tiny_handle(family)
    mask = _pruned(h.geometry)
    prompts = _windows(2, 9)
    got = greedy_tokens(h, mask, prompts, 7)
    ids = prompts.clone()
    with torch.no_grad(), gates.apply(h, mask):
        for _ in range(7):
            ids = torch.cat([ids, h.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids[:, 9:])


def test_top1_agreement_counts_the_positions_where_the_argmax_matches():
    h = tiny_handle("llama")
    w, mask = _windows(), refit_mask(h.geometry)
    ref = dense_reference(h, w, n_prompts=3, prompt_tokens=10, n_new=5)
    a = agreement(h, mask, w, reference=ref)
    with torch.no_grad():
        dense = h.model(input_ids=w).logits[:, :-1].argmax(-1)
        with gates.apply(h, mask):
            pruned = h.model(input_ids=w).logits[:, :-1].argmax(-1)
    assert torch.equal(top1_tokens(h, mask, w), pruned)
    assert a.top1 == pytest.approx(float((dense == pruned).float().mean()))
    assert a.top1 < 1.0  # this mask changes the random model's choices
    assert 0.0 <= a.greedy_prefix <= a.greedy_tokens <= 1.0  # a common prefix is a subset of the matches


def test_common_prefix_stops_at_the_first_difference():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [9, 2, 3, 4]])
    b = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 4], [1, 2, 3, 4]])
    assert _common_prefix(a, b).tolist() == [4, 2, 0]


def test_bad_input_is_refused_clearly():
    h = tiny_handle("llama")
    with pytest.raises(ValueError, match=r"\[n, T\]"):
        top1_tokens(h, None, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_tokens"):
        agreement(h, None, _windows(2, 8), prompt_tokens=8)
    with pytest.raises(ValueError, match="reference was computed"):
        agreement(h, None, _windows(2, 8), reference=dense_reference(h, _windows(2, 9), prompt_tokens=4, n_new=2))
    with pytest.raises(ValueError, match="causal language model"):
        agreement(tiny_handle("bert"), None, _windows())
