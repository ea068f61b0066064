"""Llama-family models with sliding-window attention (a Qwen2 with use_sliding_window, a Mistral) end to end.

Score, select a mask, evaluate it (kernels against hooks, the prefix cache against both), prune it, export it
and reload the export with plain transformers, generate past the window with the KV cache: every step equals
the masked model, with inputs longer than the window so the window is in force.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.dynamic import FixedChooser, dense_generate, sparse_generate
from headlab.engine.export.surgery import prune
from headlab.engine.export.write import export
from headlab.engine.importance.registry import score
from headlab.engine.models.wrap import wrap_model
from headlab.engine.pruning.select import select
from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity
from headlab.engine.runtime.prefix_cache import PrefixCache
from headlab.engine.runtime.sparse_forward import sparse_logits, sparse_refusal
from tests.tiny import VOCAB, finish_tiny, tiny_tokenizer

WINDOW = 5
PROTOCOL = PerplexityProtocol(window=32, stride=32, n_windows=3)
TEXTS = ["Sliding windows forget what lies further back than a few tokens.",
         "Every mask kind must agree with the gated model on long inputs."]
TOL = {"atol": 1e-4, "rtol": 0}


def _model(family: str, window: int | None = WINDOW) -> torch.nn.Module:
    """The same seeded weights whatever the window."""
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=96, max_position_embeddings=128, vocab_size=VOCAB, sliding_window=window)
    if family == "qwen2":  # layer 0 global, layer 1 sliding (max_window_layers=1)
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=window is not None, max_window_layers=1, **common))
    else:  # Mistral: the window on every layer
        model = MistralForCausalLM(MistralConfig(**common))
    return finish_tiny(model)


@pytest.fixture(params=["qwen2", "mistral"])
def sliding(request):
    handle = wrap_model(_model(request.param), tiny_tokenizer(), name=f"tiny-{request.param}-sliding")
    handle.meta["family"] = request.param
    return handle


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(3))


def _scored_mask(handle) -> PruneMask:
    scores, _ = score(handle, TEXTS, ["gradient"])
    s = scores["gradient"]
    # Whole KV groups, as many per layer: a layout the family's standard config can state.
    mask = select(handle.geometry, s, 0.5, unit="heads", scope="uniform", kv_groups=True)
    return select(handle.geometry, s, 0.25, unit="ffn", scope="uniform", base=mask)


def test_the_window_is_in_force_on_these_inputs(sliding):
    unwindowed = _model(sliding.meta["family"], window=None)
    ids = _ids()
    with torch.no_grad():
        assert not torch.allclose(sliding.model(input_ids=ids).logits, unwindowed(input_ids=ids).logits, **TOL)


def test_scored_mask_runs_through_the_kernels_the_hooks_and_the_prefix_cache_alike(sliding):
    assert sparse_refusal(sliding) is None
    mask = _scored_mask(sliding)
    assert 0 < int((mask.heads == 0).sum()) and 0 < int((mask.ffn == 0).sum())
    ids = _ids()
    with torch.no_grad(), gates.apply(sliding, mask):
        ref = sliding.model(input_ids=ids).logits
    torch.testing.assert_close(sparse_logits(sliding, ids, mask), ref, **TOL)
    hooks = perplexity(sliding, mask, PROTOCOL, use_kernels=False).perplexity
    assert perplexity(sliding, mask, PROTOCOL, use_kernels=True).perplexity == pytest.approx(hooks, rel=1e-5)
    cache = PrefixCache(sliding, PROTOCOL)
    cache.perplexity(None)
    assert cache.perplexity(mask).perplexity == pytest.approx(hooks, rel=1e-5)


@torch.no_grad()
def test_scored_mask_exports_and_reloads_with_plain_transformers(sliding, tmp_path):
    mask = _scored_mask(sliding)
    r = export(sliding, mask, tmp_path / "out", evaluate=False)
    assert r.layout == "uniform"
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.sliding_window == WINDOW
    ids = _ids()
    with gates.apply(sliding, mask):
        ref = token_logits(sliding, ids, torch.ones_like(ids))
    torch.testing.assert_close(plain(input_ids=ids).logits, ref, **TOL)


@torch.no_grad()
def test_generation_of_the_pruned_model_matches_the_gated_model_past_the_window(sliding):
    mask = _scored_mask(sliding).with_block(1, "ffn", 0.0)
    ids = torch.tensor([[5, 9, 77, 100, 3, 41]])
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 10, "do_sample": False, "pad_token_id": 256,
          "output_scores": True, "return_dict_in_generate": True}
    with gates.apply(sliding, mask):
        ref = sliding.model.generate(input_ids=ids, **kw)
    got = prune(sliding, mask).model.generate(input_ids=ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), **TOL)


def test_cached_decoding_of_chosen_heads_and_channels_matches_the_gated_model_past_the_window(sliding):
    g = sliding.geometry
    prompt = torch.randint(0, 256, (1, WINDOW + 2), generator=torch.Generator().manual_seed(5))
    chooser = FixedChooser(sliding, [torch.arange(0, g.ffn_dim, 2)] * g.n_layers, [torch.tensor([1, 2])] * 2)
    with torch.no_grad():
        ids = prompt
        for _ in range(8):  # dense greedy, re-reading the prefix: no cache
            ids = torch.cat([ids, sliding.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(dense_generate(sliding, prompt, 8).ids, ids)
    out = sparse_generate(sliding, prompt, chooser, 8)
    T = prompt.shape[1]
    with torch.no_grad(), chooser.gates(sliding):
        for step in range(8):
            ref = sliding.model(input_ids=out.ids[:, : T + step]).logits[0, -1]
            torch.testing.assert_close(out.logits[step], ref, **TOL)
