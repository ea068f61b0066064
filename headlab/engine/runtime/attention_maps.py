"""Attention maps of one layer for one prompt, dense or under a mask, small enough to draw.

How layer l's map is computed (headlab.engine.runtime.layer_inputs, headlab.engine.runtime.attention_blocks):
the layers before l run with SDPA attention (no probabilities are formed) through a per-call
view of the shared model, recording every layer's input; then only layer l's probabilities
are formed, from its own Q and K (`Adapter.attention_qk`), a block of query rows at a time,
each block reduced straight into the drawn map. Memory stays O(block x T), never H x T x T.
With a `LayerInputCache` (one per browser session) the inputs of every layer are kept, so a
switch of layer, head, window or pooling costs one layer's Q.K, not a forward.

Long inputs are reduced on the server so a browser never receives T x T cells for large T:
- `window=(start, size)`: the square block of query and key positions start..start+size-1;
- then, when more than `max_bins` positions remain, positions are pooled into `max_bins`
  contiguous bins. `reduce="mass"` (default) averages query rows and sums keys inside a
  bin, so each pooled row is still a distribution over key bins (sums to 1 without a
  window); `reduce="max"` keeps the largest probability in each cell (shows sharp heads).
A head pruned by the mask still computes its probabilities (gates act on the head's
output), so the masked map of a layer differs from the dense one only through pruning in
earlier layers; `head_gates` says which heads of the layer the mask removes.

Prompts are cut to `token_limit(handle)`: the model's context, or fewer tokens when the layer
inputs of two prompts (the dense and the masked view) would not fit in the cache's budget.
`eager_layer_probs` is the reference: the model's own eager probabilities of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import EmptyTextError, context_length
from headlab.engine.runtime.attention_blocks import DEFAULT_BLOCK_BYTES, HeadStatistics, head_statistics, pooled_map
from headlab.engine.runtime.layer_inputs import DEFAULT_MAX_BYTES, LayerInputCache, PromptLayers, record_prompt_layers

__all__ = [
    "AttentionMap",
    "PromptHeadStatistics",
    "attention_map",
    "attention_map_pair",
    "eager_layer_probs",
    "pool_attention",
    "prompt_head_statistics",
    "token_labels",
    "token_limit",
    "prompt_length",
    "REDUCTIONS",
]

REDUCTIONS = ("mass", "max")


class _Stop(Exception):
    """Raised by the reference's hook once its layer has run: later layers are wasted work."""


@dataclass(frozen=True)
class AttentionMap:
    """Attention probabilities of every head of one layer, possibly windowed and pooled."""

    layer: int
    probs: torch.Tensor  # [H, Q, K] float32, Q and K <= max_bins
    query_labels: list[str]  # Q axis labels: "12 the" per token, "12-23" per bin
    key_labels: list[str]
    query_hover: list[str]  # the text each row covers (for hover)
    key_hover: list[str]
    tokens: list[str]  # every input token's label, before windowing
    span: tuple[int, int]  # token positions [start, stop) shown on both axes
    bin_size: float  # tokens per row/column (1.0 when not pooled)
    reduce: str
    head_gates: torch.Tensor  # [H] gates of this layer's heads under the mask (ones when dense)
    truncated: bool  # the prompt was cut to `token_limit`
    masked: bool

    @property
    def n_heads(self) -> int:
        return self.probs.shape[0]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def pooled(self) -> bool:
        return self.bin_size > 1.0


def _clean(piece: str) -> str:
    stripped = piece.strip()
    return stripped if stripped else repr(piece)


def token_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """A readable, unique label per token: its position and its text ("3 the", "7 '\\n'")."""
    return [f"{i} {_clean(tokenizer.decode([t]))}" for i, t in enumerate(ids)]


def _bin_edges(n: int, bins: int) -> list[int]:
    bins = max(1, min(bins, n))
    return [round(k * n / bins) for k in range(bins + 1)]


def pool_attention(p: torch.Tensor, max_bins: int, reduce: str = "mass") -> tuple[torch.Tensor, list[int]]:
    """Pool a map [H, T, T] into at most `max_bins` contiguous bins per axis; returns (map, bin edges)."""
    _check_reduce(reduce)
    if max_bins < 1:
        raise ValueError(f"max_bins must be >= 1, got {max_bins}")
    H, T, _ = p.shape
    edges = _bin_edges(T, max_bins)
    if len(edges) - 1 == T:
        return p, edges
    n = len(edges) - 1
    bin_of = torch.zeros(T, dtype=torch.long)
    for b in range(n):
        bin_of[edges[b] : edges[b + 1]] = b
    size = torch.tensor([edges[b + 1] - edges[b] for b in range(n)], dtype=p.dtype)  # (n,)
    if reduce == "mass":
        rows = torch.zeros(H, n, T, dtype=p.dtype).index_add_(1, bin_of, p) / size[None, :, None]  # (H, n, T)
        return torch.zeros(H, n, n, dtype=p.dtype).index_add_(2, bin_of, rows), edges  # (H, n, n)
    rows = torch.zeros(H, n, T, dtype=p.dtype).scatter_reduce_(
        1, bin_of[None, :, None].expand(H, T, T), p, "amax", include_self=False
    )  # (H, n, T)
    out = torch.zeros(H, n, n, dtype=p.dtype).scatter_reduce_(
        2, bin_of[None, None, :].expand(H, n, T), rows, "amax", include_self=False
    )  # (H, n, n)
    return out, edges


def _check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")


def token_limit(handle: ModelHandle, budget_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """The longest prompt a map covers: the model's context, or what lets two prompts' layer inputs fit in `budget_bytes`."""
    g = handle.geometry
    per_token = 2 * g.n_layers * g.hidden * torch.finfo(handle.dtype).bits // 8
    return max(1, min(context_length(handle.model), budget_bytes // max(1, per_token)))


def _encode(handle: ModelHandle, text: str, max_tokens: int | None) -> tuple[torch.Tensor, bool]:
    if not isinstance(text, str) or not text.strip():
        raise EmptyTextError("the prompt is empty: type some text to see what each head attends to")
    limit = token_limit(handle) if max_tokens is None else min(max_tokens, context_length(handle.model))
    ids = handle.tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
    if ids.shape[1] == 0:
        raise EmptyTextError("the tokenizer produced no tokens for this prompt")
    return ids[:, :limit], ids.shape[1] > limit


def prompt_length(handle: ModelHandle, text: str, max_tokens: int | None = None) -> tuple[int, bool]:
    """(tokens an attention map of `text` covers, whether the text was cut to fit)."""
    ids, truncated = _encode(handle, text, max_tokens)
    return ids.shape[1], truncated


def _prompt_layers(handle: ModelHandle, ids: torch.Tensor, last: int, mask: PruneMask | None,
                   cache: LayerInputCache | None) -> PromptLayers:
    """Layer inputs of `ids` under `mask`: from the cache (filled in the background), or recorded here up to `last`."""
    if cache is not None:
        return cache.prompt_layers(handle, ids, mask)
    entry = PromptLayers(handle, ids, mask)
    record_prompt_layers(handle, entry, last=last)
    return entry


def _queries_keys(handle: ModelHandle, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled queries [1, H, T, hd] and keys [1, H_kv, T, hd] of `layer` from its input [1, T, d]."""
    if handle.adapter.is_subblock_removed(layer, "attn"):
        raise ValueError(f"layer {layer} has no attention (it was removed from this model), so it has no map")
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]  # (1, T): one unpadded sequence
    with torch.no_grad():
        return handle.adapter.attention_qk(layer, hidden, positions)


def _check_layer(handle: ModelHandle, layer: int) -> None:
    n = handle.geometry.n_layers
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} does not exist: this model has layers 0..{n - 1}")


def _hover(labels: list[str], edges: list[int], offset: int, limit: int = 60) -> list[str]:
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        text = " ".join(lbl.split(" ", 1)[1] for lbl in labels[offset + a : offset + b])
        out.append(f"tokens {offset + a}-{offset + b - 1}: {text[:limit]}{'…' if len(text) > limit else ''}")
    return out


def attention_map(
    handle: ModelHandle,
    text: str,
    layer: int,
    *,
    mask: PruneMask | None = None,
    max_bins: int = 64,
    window: tuple[int, int] | None = None,
    reduce: str = "mass",
    max_tokens: int | None = None,
    cache: LayerInputCache | None = None,
    progress: Progress | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> AttentionMap:
    """The attention map of every head of `layer` for `text`, under `mask` when given.

    `cache` keeps every layer's input for the next call (see module doc); `progress(done, total)`
    follows the layers run before this one (the first call for a prompt only); one block of
    query rows' scores takes at most `block_bytes` (attention_blocks.pass_bytes_bound).
    """
    g = handle.geometry
    _check_layer(handle, layer)
    _check_reduce(reduce)
    if max_bins < 1:
        raise ValueError(f"max_bins must be >= 1, got {max_bins}")
    if mask is not None:
        mask.check(g)
    ids, truncated = _encode(handle, text, max_tokens)
    labels = token_labels(handle.tokenizer, ids[0].tolist())
    T = ids.shape[1]
    start, stop = 0, T
    if window is not None:
        w_start, w_size = int(window[0]), int(window[1])
        if w_size < 1 or not 0 <= w_start < T:
            raise ValueError(f"window {window}: start must be in [0, {T}) and size >= 1")
        start, stop = w_start, min(T, w_start + w_size)
    n = stop - start
    edges = _bin_edges(n, max_bins)
    hidden, attn_mask = _prompt_layers(handle, ids, layer, mask, cache).layer(layer, progress)
    q, k = _queries_keys(handle, layer, hidden)
    probs = pooled_map(q, k, (start, stop), edges, reduce, causal=g.causal, attn_mask=attn_mask,
                       block_bytes=block_bytes)
    if len(edges) - 1 == n:
        axis = labels[start:stop]
    else:
        axis = [f"{start + a}-{start + b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    hover = _hover(labels, edges, start)
    gates_row = mask.heads_effective()[layer].clone() if mask is not None else torch.ones(g.n_heads)
    return AttentionMap(
        layer=layer,
        probs=probs,
        query_labels=axis,
        key_labels=list(axis),
        query_hover=hover,
        key_hover=list(hover),
        tokens=labels,
        span=(start, stop),
        bin_size=n / (len(edges) - 1),
        reduce=reduce,
        head_gates=gates_row,
        truncated=truncated,
        masked=mask is not None,
    )


def attention_map_pair(
    handle: ModelHandle, text: str, layer: int, mask: PruneMask | None, **kwargs: Any
) -> tuple[AttentionMap, AttentionMap]:
    """(dense, masked) maps of `layer` for the same text, for before/after comparisons."""
    dense = attention_map(handle, text, layer, mask=None, **kwargs)
    masked = attention_map(handle, text, layer, mask=mask if mask is not None else PruneMask.dense(handle.geometry),
                           **kwargs)
    return dense, masked


@dataclass(frozen=True)
class PromptHeadStatistics(HeadStatistics):
    """HeadStatistics of every layer over one prompt: each field [L, H], plus the prompt's length."""

    n_tokens: int = 0
    truncated: bool = False


def prompt_head_statistics(
    handle: ModelHandle,
    text: str,
    *,
    local_window: int,
    mask: PruneMask | None = None,
    max_tokens: int | None = None,
    cache: LayerInputCache | None = None,
    progress: Progress | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> PromptHeadStatistics:
    """Sink, self, previous-token and local mass, mean distance and entropy of every head for `text`.

    One SDPA forward records every layer's input, then each layer's probabilities are formed
    blockwise from its Q and K and reduced on the fly. `progress(done, 2 L)`: L steps for the
    forward, L for the layers' passes.
    """
    g = handle.geometry
    if mask is not None:
        mask.check(g)
    ids, truncated = _encode(handle, text, max_tokens)
    L = g.n_layers
    entry = _prompt_layers(handle, ids, L - 1, mask, cache)
    per_layer = []
    for layer in range(L):
        hidden, attn_mask = entry.layer(layer, (lambda d, t: progress(d, 2 * L)) if progress else None)
        q, k = _queries_keys(handle, layer, hidden)
        per_layer.append(head_statistics(q, k, causal=g.causal, attn_mask=attn_mask, local_window=local_window,
                                         block_bytes=block_bytes))
        if progress:
            progress(L + layer + 1, 2 * L)
    stack = {f.name: torch.stack([getattr(s, f.name) for s in per_layer]) for f in fields(HeadStatistics)}
    return PromptHeadStatistics(**stack, n_tokens=ids.shape[1], truncated=truncated)


@torch.no_grad()
def eager_layer_probs(handle: ModelHandle, ids: torch.Tensor, layer: int, mask: PruneMask | None = None) -> torch.Tensor:
    """Reference: the model's own probabilities [H, T, T] of `layer` for ids [1, T], by an eager forward that stops there.

    The model must run eager attention (the default load): SDPA returns no probabilities.
    This is the path the blockwise maps replace; tests and bench/bench_attention.py compare against it.
    """
    _check_layer(handle, layer)
    captured: list[torch.Tensor] = []

    def on_attention(module: torch.nn.Module, args: tuple, output: Any) -> None:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if probs is None:
            raise ValueError("the attention module returned no probabilities: load the model with "
                             "attn_implementation='eager' (SDPA/flash kernels do not expose them)")
        captured.append(probs[0].detach().float().cpu())  # (H, T, T)
        raise _Stop

    ids = ids.to(handle.device)
    with temporary_hooks() as hooks, gates.apply(handle, mask):
        hooks.post(handle.adapter.attention(layer), on_attention)
        try:
            handle.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except _Stop:
            pass
    return captured[0]
