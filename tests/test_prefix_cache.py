"""The prefix cache gives the full-forward perplexity while re-running only the changed layers."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import Gemma3ForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import PruneMask
from headlab.engine.models.wrap import wrap_model
from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity
from headlab.engine.runtime.prefix_cache import PrefixCache, live_protocol
from headlab.engine.runtime.replay import LayerReplay, record_layers
from tests.tiny import tiny_model, tiny_tokenizer

CAUSAL = ("gpt2", "llama", "qwen2", "gemma3")
MODEL_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM,
                 "gemma3": Gemma3ForCausalLM}
PROTOCOL = PerplexityProtocol(window=64, stride=64, n_windows=5)  # 2 batches of 4: batching is exercised


@pytest.fixture(scope="module")
def tokenizer():
    # One tokenizer object for every handle: the evaluation text is tokenised once per tokenizer (seconds).
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=CAUSAL)
def causal(request, tokenizer):
    """A tiny causal model of each family, with 4 layers so toggles land in different prefixes."""
    cfg = tiny_model(request.param).config
    # tiny.py builds 2 layers; 4 give prefix lengths 0..3 to test.
    cfg.num_hidden_layers = 4
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = (cfg.layer_types * 4)[:4]  # Gemma 3: sliding, full, sliding, full
    torch.manual_seed(1)
    model = MODEL_CLASSES[request.param](cfg).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # non-zero biases, as in tiny.py, so bias paths are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return wrap_model(model, tokenizer, name=f"tiny-{request.param}")


def full_forward(handle, mask, protocol=PROTOCOL):
    """The whole model under `mask` through the gate hooks: the same operations the cache re-runs."""
    return perplexity(handle, mask, protocol, use_kernels=False)


def _random_mask(g, gen: torch.Generator) -> PruneMask:
    m = PruneMask.dense(g)
    m.heads = (torch.rand(g.n_layers, g.n_heads, generator=gen) > 0.3).float()
    m.ffn = (torch.rand(g.n_layers, g.ffn_dim, generator=gen) > 0.2).float()
    if torch.rand(1, generator=gen) < 0.5:
        m.ffn_block[int(torch.randint(g.n_layers, (1,), generator=gen))] = 0.0
    return m.normalized()


def test_prefix_cached_perplexity_equals_full_forward_for_random_masks_and_toggles(causal):
    g = causal.geometry
    cache = PrefixCache(causal, PROTOCOL)
    gen = torch.Generator().manual_seed(0)
    masks = [PruneMask.dense(g), _random_mask(g, gen), _random_mask(g, gen)]
    m = masks[-1]
    for _ in range(6):  # toggles in random layers, accumulating like a user clicking heads
        layer = int(torch.randint(g.n_layers, (1,), generator=gen))
        m = m.toggle_head(layer, int(torch.randint(g.n_heads, (1,), generator=gen)))
        masks.append(m)
    soft = PruneMask.dense(g)
    soft.heads = torch.rand(g.n_layers, g.n_heads, generator=gen)  # soft gates go through the same path
    masks.append(soft)
    for mask in masks:
        fast = cache.perplexity(mask)
        full = full_forward(causal, mask)
        assert fast.n_tokens == full.n_tokens
        assert fast.perplexity == pytest.approx(full.perplexity, abs=1e-5)


def test_prefix_cache_agrees_with_the_masked_kernel_path_to_float_precision(causal):
    mask = PruneMask.dense(causal.geometry).toggle_head(2, 1).toggle_head(3, 0)
    cache = PrefixCache(causal, PROTOCOL)
    cache.perplexity(None)
    # evaluate.perplexity may run hard masks through masked kernels: other float sums, same maths.
    kernels = perplexity(causal, mask, PROTOCOL)
    assert cache.perplexity(mask).perplexity == pytest.approx(kernels.perplexity, rel=1e-5)


def test_prefix_cache_matches_full_forward_across_batch_sizes(causal):
    cache = PrefixCache(causal, PROTOCOL, batch_size=2)
    mask = PruneMask.dense(causal.geometry).toggle_head(2, 1)
    cache.perplexity(None)
    # Different batch shapes reorder float sums; the values agree to float32 precision.
    assert cache.perplexity(mask).perplexity == pytest.approx(full_forward(causal, mask).perplexity, rel=1e-5)


def test_toggle_in_layer_l_reruns_only_layers_l_to_last(causal):
    g = causal.geometry
    cache = PrefixCache(causal, PROTOCOL)
    cache.perplexity(None)
    assert cache.last_run.start_layer == 0 and cache.last_run.layers_run == g.n_layers
    for layer in (3, 1, 2):
        cache.perplexity(PruneMask.dense(g).toggle_head(layer, 0))
        assert cache.last_run.start_layer == layer
        assert cache.last_run.layers_run == g.n_layers - layer


def test_successive_toggles_reuse_the_longest_common_prefix(causal):
    g = causal.geometry
    cache = PrefixCache(causal, PROTOCOL)
    a = PruneMask.dense(g).toggle_head(1, 0)
    cache.perplexity(None)
    cache.perplexity(a)
    b = a.toggle_head(3, 1)  # differs from the dense root at layer 1, from `a` only at layer 3
    cache.perplexity(b)
    assert cache.last_run.start_layer == 3


def test_a_mask_seen_before_returns_its_result_without_running_a_layer(causal):
    cache = PrefixCache(causal, PROTOCOL)
    mask = PruneMask.dense(causal.geometry).toggle_head(2, 2)
    first = cache.perplexity(mask)
    cache.perplexity(None)
    again = cache.perplexity(mask)
    assert again == first
    assert cache.last_run.reused_result and cache.last_run.layers_run == 0


def test_cache_memory_stays_under_its_bound_and_keeps_the_root(causal):
    g = causal.geometry
    probe = PrefixCache(causal, PROTOCOL)
    probe.perplexity(None)
    root_bytes = probe.nbytes
    cache = PrefixCache(causal, PROTOCOL, max_bytes=int(root_bytes * 1.6))
    dense = cache.perplexity(None)
    for h in range(g.n_heads):
        cache.perplexity(PruneMask.dense(g).toggle_head(0, h))  # each adds a full set of layer inputs
        assert cache.nbytes <= int(root_bytes * 1.6) or len(cache) == 2
    assert len(cache) < g.n_heads + 1
    assert cache.perplexity(None) == dense and cache.last_run.reused_result


def test_model_weights_are_unchanged_after_cached_evaluations(causal):
    before = {k: v.clone() for k, v in causal.model.state_dict().items()}
    cache = PrefixCache(causal, PROTOCOL)
    cache.perplexity(PruneMask.dense(causal.geometry).toggle_head(1, 1))
    cache.perplexity(PruneMask.dense(causal.geometry).with_block(2, "attn", 0.0))
    after = causal.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in causal.model.modules())


def test_two_threads_with_their_own_caches_get_their_own_perplexities(causal):
    g = causal.geometry
    masks = {"a": PruneMask.dense(g).toggle_head(0, 0), "b": PruneMask.dense(g).with_block(1, "ffn", 0.0)}
    expected = {k: full_forward(causal, m).perplexity for k, m in masks.items()}
    got: dict[str, list[float]] = {"a": [], "b": []}

    def session(name: str) -> None:
        cache = PrefixCache(causal, PROTOCOL)
        for _ in range(3):
            got[name].append(cache.perplexity(masks[name]).perplexity)
            cache.clear()

    threads = [threading.Thread(target=session, args=(k,)) for k in masks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert expected["a"] != pytest.approx(expected["b"], abs=1e-6)
    for k in masks:
        assert got[k] == pytest.approx([expected[k]] * 3, abs=1e-5)


def test_first_changed_layer_names_the_earliest_differing_layer(llama_handle):
    g = llama_handle.geometry
    dense = PruneMask.dense(g)
    assert dense.first_changed_layer(dense.clone()) == g.n_layers
    assert dense.first_changed_layer(dense.toggle_head(1, 3)) == 1
    assert dense.first_changed_layer(dense.with_block(0, "ffn", 0.0).toggle_head(1, 0)) == 0


def test_live_protocol_fits_the_model_context(llama_handle):
    p = live_protocol(llama_handle)
    assert p.window == 128  # the tiny model's context, below the 512 default
    assert p.stride == p.window and p.n_windows == 4  # the default's 512 tokens


def test_prefix_cache_refuses_an_encoder_with_a_clear_message(tokenizer):
    from tests.tiny import tiny_handle

    with pytest.raises(ValueError, match="causal language model"):
        PrefixCache(tiny_handle("bert"), PROTOCOL)


def test_prefix_cache_rejects_a_mask_of_another_model(causal):
    from headlab.engine.core.mask import MaskError

    cache = PrefixCache(causal, PROTOCOL)
    other = PruneMask.dense(causal.geometry)
    other.heads = torch.ones(1, 1)
    with pytest.raises(MaskError, match="shape"):
        cache.perplexity(other)


@pytest.mark.real_model
def test_prefix_cache_matches_the_full_forward_on_the_shipped_model(smollm):
    protocol = live_protocol(smollm)
    cache = PrefixCache(smollm, protocol)
    dense = cache.perplexity(None)
    mask = PruneMask.dense(smollm.geometry).toggle_head(20, 4).toggle_head(27, 0)
    fast = cache.perplexity(mask)
    assert cache.last_run.start_layer == 20 and cache.last_run.layers_run == 10
    assert fast.perplexity == pytest.approx(full_forward(smollm, mask, protocol).perplexity, abs=1e-5)
    assert fast.perplexity != pytest.approx(dense.perplexity, abs=1e-3)


def test_masks_differing_only_in_compensation_biases_are_told_apart(causal):
    g = causal.geometry
    base = PruneMask.dense(g).toggle_head(1, 0)
    biased = base.clone()
    biased.attn_bias = torch.zeros(g.n_layers, g.hidden)
    # Acts in layer 2 only; not a constant vector, which LayerNorm's mean-centring would cancel (GPT-2).
    biased.attn_bias[2] = torch.randn(g.hidden, generator=torch.Generator().manual_seed(0)) * 0.1
    assert base.first_changed_layer(biased) == 2
    zero_bias = base.clone()
    zero_bias.attn_bias = torch.zeros(g.n_layers, g.hidden)
    assert base.first_changed_layer(zero_bias) == g.n_layers  # a zero bias changes nothing
    cache = PrefixCache(causal, PROTOCOL)
    cache.perplexity(base)
    fast = cache.perplexity(biased)
    assert cache.last_run.start_layer == 2
    assert fast.perplexity == pytest.approx(full_forward(causal, biased).perplexity, abs=1e-5)
    assert fast.perplexity != pytest.approx(cache.perplexity(base).perplexity, abs=1e-6)


def test_run_from_a_layer_equals_recording_under_the_new_mask_and_shares_the_prefix(causal):
    g = causal.geometry
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    inputs = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    dense = record_layers(causal, None, inputs)
    mask = PruneMask.dense(g).toggle_head(2, 1).with_block(3, "ffn", 0.0)
    replayed = dense.run_from(2, mask)
    fresh = record_layers(causal, mask, inputs)
    assert all(replayed.hidden[i] is dense.hidden[i] for i in range(3)), "the unchanged prefix is shared, not copied"
    for got, want in zip(replayed.outputs, fresh.outputs):
        assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(replayed.outputs[0], dense.outputs[0], atol=1e-4)


def test_run_until_shows_hooks_what_a_full_run_does_and_skips_the_rest(causal):
    g, adapter = causal.geometry, causal.adapter
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    record = record_layers(causal, None, [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}])
    mask = PruneMask.dense(g).toggle_head(1, 0)
    mask.ffn[1, ::2] = 0.0
    o, down = adapter.head_output_proj(1), adapter.ffn_output_proj(1)

    def capture(run) -> tuple[list, list]:
        seen_o, calls_down = [], []
        with temporary_hooks() as hooks:
            hooks.pre(o, lambda mod, args: seen_o.append(args[0].clone()))
            hooks.post(down, lambda mod, args, out: calls_down.append(out))
            run()
        return seen_o, calls_down

    full_o, full_down = capture(lambda: record.run_from(1, mask, stop=2))
    n_hooks = len(o._forward_pre_hooks)
    early_o, early_down = capture(lambda: record.run_until(1, mask, o, pre=True))
    assert len(o._forward_pre_hooks) == n_hooks, "its stop hook is removed"
    assert len(full_down) == 2 and not early_down, "the FFN after O is not computed"
    for got, want in zip(early_o, full_o, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="did not run inside layer 0"):
        record.run_until(0, None, adapter.head_output_proj(1), pre=True)


def test_recording_only_the_first_layer_keeps_every_call_and_replays_the_same(causal):
    g = causal.geometry
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(2))
    inputs = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]
    full = record_layers(causal, None, inputs)
    first = record_layers(causal, None, inputs, keep=(0,))
    assert all(len(h) == 2 for h in full.hidden) and [len(h) for h in first.hidden] == [2] + [0] * g.n_layers
    assert [len(c) for c in first.calls] == [2] * g.n_layers
    for got, want in zip(first.run_from(0, None).outputs, full.outputs, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="outside 0"):
        record_layers(causal, None, inputs, keep=(g.n_layers + 1,))


def test_layer_replay_starts_at_the_first_changed_layer_and_refuses_a_later_start(llama_handle):
    texts = ["The quick brown fox jumps over the lazy dog.", "a b c d e f g h i j"]
    replay = LayerReplay(llama_handle, texts, max_length=32, batch_size=1)
    mask = PruneMask.dense(llama_handle.geometry).toggle_head(1, 2)
    assert replay.kl(mask) == pytest.approx(replay.kl(mask, 0), rel=1e-5)
    assert replay.kl(mask) > replay.base_kl
    with pytest.raises(ValueError, match="differs from the replay's base at layer 1"):
        replay.kl(mask, 2)
