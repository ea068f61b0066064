"""Engine calls whose results are pure functions of (model, inputs, mask), cached for every session.

Masks are passed unhashed (`_mask`) next to their digest, so equal masks hit the same entry
whichever session asks; the model is passed unhashed next to its key.

Attention maps live in a SharedCache (not st.cache_resource: computing one may draw a progress
bar, and Streamlit replays elements drawn inside a cached function): each is computed once in a
worker while the asking session draws the progress. What makes a new map cheap is the asking
session's LayerInputCache (every layer's input for its recent prompts), which lives in
st.session_state and goes with the session.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import streamlit as st

from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.importance.diagnostics import PromptDiagnosis, prompt_diagnosis
from headlab.engine.models.load import ModelHandle
from headlab.engine.pruning.strategies import Calibration
from headlab.engine.pruning.strategies.reconstruct import width_by_reconstruction
from headlab.engine.runtime.agreement import Agreement, agreement, dense_reference
from headlab.engine.runtime.attention_maps import AttentionMap, attention_map
from headlab.engine.runtime.cost import Cost, cost
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, PerplexityResult, eval_windows, generate, perplexity
from headlab.engine.runtime.layer_inputs import LayerInputCache
from headlab.ui import keys
from headlab.ui.shared_cache import shared_cache

__all__ = ["attention_maps", "layer_inputs", "long_prompt_diagnosis", "generation", "full_perplexity",
           "known_full_perplexity", "full_agreement", "known_full_agreement", "reconstructed_width_mask",
           "mask_cost"]


def digest(mask: PruneMask | None) -> str:
    """The cache key of a mask ("dense" for none)."""
    return "dense" if mask is None else mask.digest()


def layer_inputs() -> LayerInputCache:
    """This session's cache of every layer's input for its recent prompts (headlab.engine.runtime.layer_inputs)."""
    if keys.ATTN_LAYER_INPUTS not in st.session_state:
        st.session_state[keys.ATTN_LAYER_INPUTS] = LayerInputCache()
    return st.session_state[keys.ATTN_LAYER_INPUTS]


def attention_maps(handle: ModelHandle, model_key: str, text: str, layer: int, mask: PruneMask | None, *,
                   max_bins: int, window: tuple[int, int] | None, reduce: str,
                   progress: Progress | None = None) -> AttentionMap:
    """The (cached) attention map of `layer` for `text` under `mask` (None = dense); `progress` follows a first forward."""
    text_id = hashlib.sha1(text.encode()).hexdigest()
    key = f"{model_key}|{text_id}|{layer}|{digest(mask)}|{max_bins}|{window}|{reduce}"
    cache = layer_inputs()
    return shared_cache("attention_maps", 64).get_or_compute(
        key, lambda report: attention_map(handle, text, layer, mask=mask, max_bins=max_bins, window=window,
                                          reduce=reduce, cache=cache, progress=report), progress)


def long_prompt_diagnosis(handle: ModelHandle, text: str, mask: PruneMask | None,
                          progress: Progress | None = None) -> PromptDiagnosis:
    """Each head's kind and statistics on `text` (up to the model's context), through this session's layer inputs."""
    return prompt_diagnosis(handle, text, mask=mask, cache=layer_inputs(), progress=progress)


@st.cache_data(max_entries=256, show_spinner=False)
def _generation(_handle: ModelHandle, model_key: str, prompt: str, _mask: PruneMask | None, digest: str,
                max_new_tokens: int) -> str:
    return generate(_handle, prompt, _mask, max_new_tokens=max_new_tokens)


def generation(handle: ModelHandle, model_key: str, prompt: str, mask: PruneMask | None, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` under `mask` (cached: equal inputs give equal text)."""
    return _generation(handle, model_key, prompt, mask, digest(mask), max_new_tokens)


def full_perplexity(handle: ModelHandle, model_key: str, mask: PruneMask | None,
                    progress: Callable[[int, int], None]) -> PerplexityResult:
    """Perplexity on the pinned full protocol (12 windows x 512 tokens), computed once per mask."""
    return shared_cache("full_perplexity", 64).get_or_compute(
        f"{model_key}|{digest(mask)}", lambda report: perplexity(handle, mask, DEFAULT_PROTOCOL, progress=report),
        progress)


def known_full_perplexity(model_key: str, mask: PruneMask | None) -> PerplexityResult | None:
    """The full-protocol perplexity of `mask` if some session already computed it, else None."""
    return shared_cache("full_perplexity", 64).get(f"{model_key}|{digest(mask)}")


def full_agreement(handle: ModelHandle, model_key: str, mask: PruneMask | None,
                   progress: Callable[[int, int], None]) -> Agreement:
    """Top-1 and greedy agreement with the dense model on the full protocol's windows, computed once per mask.

    The dense side (its top-1 tokens and greedy continuations) is computed once per model.
    """
    def run(report: Progress) -> Agreement:
        windows, _ = eval_windows(handle, DEFAULT_PROTOCOL)
        reference = shared_cache("dense_reference", 4).get_or_compute(
            model_key, lambda _report: dense_reference(handle, windows))
        return agreement(handle, mask, windows, reference=reference, progress=report)

    return shared_cache("full_agreement", 64).get_or_compute(f"{model_key}|{digest(mask)}", run, progress)


def known_full_agreement(model_key: str, mask: PruneMask | None) -> Agreement | None:
    """The agreement of `mask` with the dense model if some session already computed it, else None."""
    return shared_cache("full_agreement", 64).get(f"{model_key}|{digest(mask)}")


def reconstructed_width_mask(handle: ModelHandle, model_key: str, keep: float,
                             progress: Callable[[int, int], None]) -> PruneMask:
    """About `keep` of the parameters, the same units in every layer, chosen and re-fitted by structured OBS.

    Computed once per (model, keep) for every session, in a worker a page reload does not cancel.
    """
    def run(report: Progress) -> PruneMask:
        calib = Calibration.shipped("wikitext", 32)
        return width_by_reconstruction(handle, keep, calib, uniform=True, progress=report).mask

    return shared_cache("reconstructed_width", 16).get_or_compute(f"{model_key}|{keep:.4f}", run, progress)


@st.cache_data(max_entries=512, show_spinner=False)
def _cost(_handle: ModelHandle, model_key: str, _mask: PruneMask, digest: str) -> Cost:
    return cost(_handle, _mask)


def mask_cost(handle: ModelHandle, model_key: str, mask: PruneMask) -> Cost:
    """Parameters and FLOPs kept under `mask` (cached per mask)."""
    return _cost(handle, model_key, mask, digest(mask))
