"""Blockwise attention maps: equal to the eager map pooled the same way, bounded in memory, cached per prompt."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import PruneMask
from headlab.engine.importance.capture import LOCAL_WINDOW, capture
from headlab.engine.models.load import ModelHandle
from headlab.engine.models.wrap import wrap_model
from headlab.engine.runtime.attention_blocks import block_rows, pass_bytes_bound, pooled_map
from headlab.engine.runtime.attention_maps import (
    attention_map,
    eager_layer_probs,
    pool_attention,
    prompt_head_statistics,
    prompt_length,
    token_limit,
)
from headlab.engine.runtime.layer_inputs import LayerInputCache, PromptLayers, prompt_layers_bytes, record_prompt_layers
from tests.tiny import VOCAB, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Attention maps of long inputs, a block of rows at a time."  # 57 byte tokens: not a multiple of 7
CASES = [  # (max_bins, window, reduce)
    (128, None, "mass"),  # one bin per token
    (7, None, "mass"),
    (7, None, "max"),
    (5, (3, 30), "max"),
    (8, (3, 30), "mass"),
    (64, (50, 30), "mass"),  # a window past the end is cut to the prompt
]


def _ids(handle: ModelHandle, text: str = TEXT) -> torch.Tensor:
    return handle.tokenizer(text, return_tensors="pt")["input_ids"]


def _earlier_layer_pruned(handle: ModelHandle) -> PruneMask:
    return PruneMask.dense(handle.geometry).toggle_head(0, 1).with_block(0, "attn", 0.0).toggle_head(1, 0)


def _seven_row_blocks(handle: ModelHandle, n_tokens: int) -> int:
    block = 4 * handle.geometry.n_heads * n_tokens * 7
    assert block_rows(handle.geometry.n_heads, n_tokens, block) == 7
    return block


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("max_bins,window,reduce", CASES)
def test_blockwise_map_equals_the_eager_map_pooled_the_same_way(handle, masked, max_bins, window, reduce):
    mask = _earlier_layer_pruned(handle) if masked else None
    ids = _ids(handle)
    T = ids.shape[1]
    for layer in range(handle.geometry.n_layers):
        ref = eager_layer_probs(handle, ids, layer, mask)  # (H, T, T), the model's own probabilities
        if window is not None:
            ref = ref[:, window[0] : window[0] + window[1], window[0] : window[0] + window[1]]
        expected, _ = pool_attention(ref, max_bins, reduce)
        m = attention_map(handle, TEXT, layer, mask=mask, max_bins=max_bins, window=window, reduce=reduce,
                          block_bytes=_seven_row_blocks(handle, T))
        assert m.probs.shape == expected.shape
        torch.testing.assert_close(m.probs, expected, atol=2e-6, rtol=1e-5)


def test_pruning_an_earlier_layer_changes_the_blockwise_map(handle):
    dense = attention_map(handle, TEXT, 1)
    masked = attention_map(handle, TEXT, 1, mask=_earlier_layer_pruned(handle))
    assert not torch.allclose(dense.probs, masked.probs)
    assert masked.head_gates[0] == 0 and dense.head_gates[0] == 1  # head 0 of layer 1 is shown as pruned


def test_a_sliding_window_model_masks_as_its_eager_attention_does():
    torch.manual_seed(0)
    cfg = MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                        intermediate_size=128, max_position_embeddings=128, sliding_window=8, vocab_size=VOCAB)
    model = MistralForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    handle = wrap_model(model, tiny_tokenizer())
    ref = eager_layer_probs(handle, _ids(handle), 1)
    assert float(ref[:, 30, :20].abs().max()) == 0.0  # the window: nothing 8+ tokens back
    m = attention_map(handle, TEXT, 1, max_bins=128, block_bytes=_seven_row_blocks(handle, ref.shape[-1]))
    torch.testing.assert_close(m.probs, ref, atol=2e-6, rtol=1e-5)


def test_an_sdpa_loaded_model_gives_the_same_map(llama_handle):
    expected = attention_map(llama_handle, TEXT, 1, max_bins=16)
    llama_handle.model.config._attn_implementation = "sdpa"
    try:
        torch.testing.assert_close(attention_map(llama_handle, TEXT, 1, max_bins=16).probs, expected.probs)
    finally:
        llama_handle.model.config._attn_implementation = "eager"


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_blockwise_head_statistics_equal_the_capture_pass(handle, masked):
    mask = _earlier_layer_pruned(handle) if masked else None
    ref = capture(handle, [TEXT], gradients=False, mask=mask)
    got = prompt_head_statistics(handle, TEXT, local_window=LOCAL_WINDOW, mask=mask,
                                 block_bytes=_seven_row_blocks(handle, _ids(handle).shape[1]))
    for name in ("entropy", "entropy_normalized", "sink", "self_mass", "prev_mass", "local_mass", "mean_distance"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=1e-5, msg=name)
    assert got.n_tokens == _ids(handle).shape[1] and not got.truncated


def test_statistics_progress_covers_the_forward_and_every_layer(llama_handle):
    seen: list[tuple[int, int]] = []
    prompt_head_statistics(llama_handle, TEXT, local_window=LOCAL_WINDOW, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (4, 4) and all(t == 4 for _, t in seen)


def test_pooled_map_refuses_edges_that_do_not_cover_the_span():
    q, k = torch.zeros(1, 2, 10, 4), torch.zeros(1, 1, 10, 4)
    with pytest.raises(ValueError, match="do not cover"):
        pooled_map(q, k, (0, 10), [0, 5, 9], causal=True)


# --- memory ------------------------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import json, re, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from headlab.engine.models.wrap import wrap_model
from headlab.engine.runtime.attention_blocks import head_statistics, pooled_map
from headlab.engine.runtime.attention_maps import attention_map, eager_layer_probs
from headlab.engine.runtime.layer_inputs import PromptLayers, record_prompt_layers
from tests.tiny import VOCAB, tiny_tokenizer

T, BLOCK, LAYER = 4096, 4 * 2**20, 1
torch.manual_seed(0)
cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=128, max_position_embeddings=T, vocab_size=VOCAB)
model = LlamaForCausalLM(cfg)
model.config._attn_implementation = "eager"
handle = wrap_model(model, tiny_tokenizer())
text = "ab" * T
ids = handle.tokenizer(text, return_tensors="pt")["input_ids"][:, :T]


def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def grown(fn):
    # Peak resident memory while fn runs, above what was resident before (VmHWM reset through clear_refs).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    fn()
    return max(0, status("VmHWM") - before)


attention_map(handle, text[:256], LAYER, block_bytes=BLOCK)  # warm up code paths and the allocator
entry = PromptLayers(handle, ids, None)
record_prompt_layers(handle, entry)
hidden, _ = entry.layer(LAYER)
with torch.no_grad():
    q, k = handle.adapter.attention_qk(LAYER, hidden, torch.arange(T)[None, :])
edges = [round(i * T / 64) for i in range(65)]
one_pass = grown(lambda: (pooled_map(q, k, (0, T), edges, "mass", causal=True, block_bytes=BLOCK),
                          pooled_map(q, k, (0, T), edges, "max", causal=True, block_bytes=BLOCK),
                          head_statistics(q, k, causal=True, local_window=4, block_bytes=BLOCK)))
whole_map = grown(lambda: attention_map(handle, text, LAYER, max_bins=64, block_bytes=BLOCK))
eager = grown(lambda: eager_layer_probs(handle, ids, LAYER))
print(json.dumps({"one_pass": one_pass, "whole_map": whole_map, "eager": eager, "heads": 4, "tokens": T,
                  "block": BLOCK}))
"""


def test_memory_of_one_layers_pass_stays_within_its_stated_bound():
    """Peak RSS growth at 4,096 tokens on a tiny model: one layer's blockwise pass (map + statistics) within
    pass_bytes_bound + 4 MiB, the whole map call (SDPA forward to the layer, then the pass) within 24 MiB more.

    A fixed glibc mmap threshold makes RSS follow live allocations: with the default dynamic threshold,
    freed blocks stay in the heap and the growth measured depends on the allocator's history (up to
    about twice the bound for the same allocations).
    """
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    full_map = got["heads"] * got["tokens"] ** 2 * 4  # one layer's H x T x T float32 probabilities: 256 MiB
    bound = pass_bytes_bound(got["heads"], got["tokens"], got["block"]) + 4 * 2**20  # three blocks: 12 MiB here
    assert got["one_pass"] <= bound, (got, bound)
    assert got["whole_map"] <= bound + 24 * 2**20, (got, bound)  # + hidden states, q/k, MLP activations
    assert got["eager"] >= full_map, got  # the measurement sees a full map when there is one


# --- the layer-input cache -----------------------------------------------------------------------

def test_a_switch_of_layer_window_or_pooling_runs_no_forward(llama_handle, monkeypatch):
    import headlab.engine.runtime.layer_inputs as layer_inputs

    real, forwards = layer_inputs.record_prompt_layers, []
    monkeypatch.setattr(layer_inputs, "record_prompt_layers", lambda *a, **k: (forwards.append(1), real(*a, **k)))
    cache = LayerInputCache()
    first = attention_map(llama_handle, TEXT, 0, cache=cache)
    for layer, window, reduce in ((1, None, "mass"), (0, (2, 9), "max"), (1, (5, 40), "mass")):
        m = attention_map(llama_handle, TEXT, layer, cache=cache, window=window, reduce=reduce, max_bins=8)
        assert m.n_tokens == first.n_tokens
        torch.testing.assert_close(m.probs, attention_map(llama_handle, TEXT, layer, window=window, reduce=reduce,
                                                          max_bins=8).probs)
    assert len(forwards) == 1 and len(cache) == 1


def test_the_cache_fills_every_layer_once_and_serves_later_calls_from_it(llama_handle):
    cache = LayerInputCache()
    entry = cache.prompt_layers(llama_handle, _ids(llama_handle), None)
    entry.wait()
    assert entry.finished and entry.n_ready == llama_handle.geometry.n_layers
    assert cache.prompt_layers(llama_handle, _ids(llama_handle), None) is entry
    dense_mask = PruneMask.dense(llama_handle.geometry)
    assert cache.prompt_layers(llama_handle, _ids(llama_handle), dense_mask) is entry  # keeps everything = dense
    other = cache.prompt_layers(llama_handle, _ids(llama_handle), _earlier_layer_pruned(llama_handle))
    assert other is not entry and len(cache) == 2
    assert cache.nbytes <= cache.max_bytes


def test_the_cache_stays_within_its_byte_bound_and_drops_the_least_recently_used(llama_handle):
    one = prompt_layers_bytes(llama_handle, _ids(llama_handle).shape[1])
    cache = LayerInputCache(max_bytes=2 * one)
    texts = [TEXT, TEXT.upper(), TEXT[::-1]]  # same length, three prompts
    entries = []
    for text in texts:
        entries.append(cache.prompt_layers(llama_handle, _ids(llama_handle, text), None))
        cache.wait()
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 2
    assert cache.prompt_layers(llama_handle, _ids(llama_handle, texts[2]), None) is entries[2]
    assert cache.prompt_layers(llama_handle, _ids(llama_handle, texts[0]), None) is not entries[0]  # was evicted


def test_asking_for_a_new_prompt_stops_the_unfinished_fill_of_the_previous_one(llama_handle, monkeypatch):
    release, real_add = threading.Event(), PromptLayers._add
    first_ids, second_ids = _ids(llama_handle), _ids(llama_handle, TEXT.upper())

    def held_add(self, hidden, mask):  # the first prompt's fill waits at layer 0 until released
        if self.n_ready == 0 and torch.equal(self.ids, first_ids):
            release.wait(10)
        real_add(self, hidden, mask)

    monkeypatch.setattr(PromptLayers, "_add", held_add)
    cache = LayerInputCache()
    first = cache.prompt_layers(llama_handle, first_ids, None)
    second = cache.prompt_layers(llama_handle, second_ids, None)
    release.set()
    with pytest.raises(RuntimeError, match="another prompt"):
        first.wait()
    second.wait()
    assert first.n_ready < llama_handle.geometry.n_layers and second.n_ready == llama_handle.geometry.n_layers
    assert len(cache) == 1 and cache.prompt_layers(llama_handle, second_ids, None) is second


def test_a_failed_fill_reaches_the_caller_and_is_retried(llama_handle, monkeypatch):
    import headlab.engine.runtime.layer_inputs as layer_inputs

    cache = LayerInputCache()
    real = layer_inputs.sdpa_view
    monkeypatch.setattr(layer_inputs, "sdpa_view", lambda h: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        attention_map(llama_handle, TEXT, 1, cache=cache)
    monkeypatch.setattr(layer_inputs, "sdpa_view", real)
    assert attention_map(llama_handle, TEXT, 1, cache=cache).n_tokens == _ids(llama_handle).shape[1]


def test_the_first_map_reports_progress_of_the_layers_before_it(llama_handle):
    seen: list[tuple[int, int]] = []
    attention_map(llama_handle, TEXT, 1, cache=LayerInputCache(), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (2, 2)


# --- the SDPA view and the shared model ------------------------------------------------------------

def test_the_sdpa_view_runs_sdpa_on_shared_weights_and_leaves_the_model_untouched(handle):
    model = handle.model
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    seen: list[bool] = []
    with temporary_hooks() as hooks:
        for layer in range(handle.geometry.n_layers):
            hooks.post(handle.adapter.attention(layer), lambda m, a, out: seen.append(out[1] is None))
        entry = PromptLayers(handle, _ids(handle), None)
        record_prompt_layers(handle, entry)
    assert seen and all(seen)  # the view's attention returned no probabilities: SDPA ran
    assert model.config._attn_implementation == "eager"
    assert all(m.config._attn_implementation == "eager" for m in model.modules() if hasattr(m, "config"))
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == params
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # the recorded inputs are the eager model's own hidden states
    out = model(input_ids=_ids(handle), output_hidden_states=True)
    for layer in range(handle.geometry.n_layers):
        torch.testing.assert_close(entry.layer(layer)[0], out.hidden_states[layer], atol=1e-5, rtol=1e-5)


def test_an_eager_forward_in_another_thread_keeps_its_probabilities_while_maps_are_computed(llama_handle):
    ids, errors, stop = _ids(llama_handle), [], threading.Event()
    expected = eager_layer_probs(llama_handle, ids, 1)

    def eager_loop() -> None:
        while not stop.is_set():
            try:
                torch.testing.assert_close(eager_layer_probs(llama_handle, ids, 1), expected)
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)
                return

    worker = threading.Thread(target=eager_loop)
    worker.start()
    try:
        for i in range(20):
            mask = PruneMask.dense(llama_handle.geometry).toggle_head(0, i % 4)
            attention_map(llama_handle, TEXT, 1, mask=mask, max_bins=8)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors[0]


def test_two_threads_with_their_own_masks_get_their_own_maps(llama_handle):
    masks = [None, _earlier_layer_pruned(llama_handle)]
    expected = [attention_map(llama_handle, TEXT, 1, mask=m).probs for m in masks]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(i: int) -> None:
        cache = LayerInputCache()
        for layer in (1, 0, 1):
            results[i].append(attention_map(llama_handle, TEXT, layer, mask=masks[i], cache=cache).probs)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        torch.testing.assert_close(results[i][0], expected[i])
        torch.testing.assert_close(results[i][2], expected[i])


# --- the prompt limit ----------------------------------------------------------------------------------

def test_the_token_limit_is_the_context_or_what_two_prompts_of_layer_inputs_fit_in_the_budget(llama_handle):
    assert token_limit(llama_handle) == 128  # the tiny model's context
    per_token = prompt_layers_bytes(llama_handle, 1)
    assert token_limit(llama_handle, budget_bytes=2 * per_token * 50) == 50
    assert prompt_length(llama_handle, "x" * 300) == (128, True)
