"""Attention maps of one layer for one prompt, dense or under a mask, small enough to draw.

One forward with a temporary hook on `adapter.attention(layer)` (eager attention returns
the probabilities as output[1]) keeps only that layer's [H, T, T] map; the forward stops
right after that layer, since later layers cannot change it. Long inputs are reduced on
the server so a browser never receives T x T cells for large T:
- `window=(start, size)`: the square block of query and key positions start..start+size-1;
- then, when more than `max_bins` positions remain, positions are pooled into `max_bins`
  contiguous bins. `reduce="mass"` (default) averages query rows and sums keys inside a
  bin, so each pooled row is still a distribution over key bins (sums to 1 without a
  window); `reduce="max"` keeps the largest probability in each cell (shows sharp heads).
A head pruned by the mask still computes its probabilities (gates act on the head's
output), so the masked map of a layer differs from the dense one only through pruning in
earlier layers; `head_gates` says which heads of the layer the mask removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.core import gates
from engine.core.handle import ModelHandle
from engine.core.hooks import temporary_hooks
from engine.core.mask import PruneMask
from engine.core.tokens import EmptyTextError, context_length

__all__ = [
    "AttentionMap",
    "attention_map",
    "attention_map_pair",
    "pool_attention",
    "token_labels",
    "prompt_length",
    "REDUCTIONS",
    "MAX_TOKENS",
]

REDUCTIONS = ("mass", "max")
MAX_TOKENS = 1024  # longer prompts are cut: eager attention at T tokens holds H x T x T floats per layer


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
    truncated: bool  # the prompt was cut to the model's / MAX_TOKENS' limit
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


class _Stop(Exception):
    """Raised by the capture hook once the requested layer has run: later layers are wasted work."""


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
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
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


def _encode(handle: ModelHandle, text: str, max_tokens: int) -> tuple[torch.Tensor, bool]:
    if not isinstance(text, str) or not text.strip():
        raise EmptyTextError("the prompt is empty: type some text to see what each head attends to")
    limit = min(max_tokens, context_length(handle.model))
    ids = handle.tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
    if ids.shape[1] == 0:
        raise EmptyTextError("the tokenizer produced no tokens for this prompt")
    return ids[:, :limit], ids.shape[1] > limit


def prompt_length(handle: ModelHandle, text: str, max_tokens: int = MAX_TOKENS) -> tuple[int, bool]:
    """(tokens an attention map of `text` covers, whether the text was cut to fit)."""
    ids, truncated = _encode(handle, text, max_tokens)
    return ids.shape[1], truncated


@torch.no_grad()
def _layer_probs(handle: ModelHandle, ids: torch.Tensor, layer: int, mask: PruneMask | None) -> torch.Tensor:
    """Attention probabilities [H, T, T] of `layer` for a single sequence."""
    adapter = handle.adapter
    captured: list[torch.Tensor] = []

    def on_attention(module: torch.nn.Module, args: tuple, output: Any) -> None:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if probs is None:
            raise ValueError(
                "the attention module returned no probabilities: load the model with "
                "attn_implementation='eager' (SDPA/flash kernels do not expose them)"
            )
        captured.append(probs[0].detach().float().cpu())  # (H, T, T)
        raise _Stop

    ids = ids.to(handle.device)
    with temporary_hooks() as hooks, gates.apply(handle, mask):
        hooks.post(adapter.attention(layer), on_attention)
        try:
            handle.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except _Stop:
            pass
    return captured[0]


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
    max_tokens: int = MAX_TOKENS,
) -> AttentionMap:
    """The attention map of every head of `layer` for `text`, under `mask` when given."""
    g = handle.geometry
    if not 0 <= layer < g.n_layers:
        raise ValueError(f"layer {layer} does not exist: this model has layers 0..{g.n_layers - 1}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
    if mask is not None:
        mask.check(g)
    ids, truncated = _encode(handle, text, max_tokens)
    labels = token_labels(handle.tokenizer, ids[0].tolist())
    p = _layer_probs(handle, ids, layer, mask)  # (H, T, T)
    T = p.shape[-1]
    start, stop = 0, T
    if window is not None:
        w_start, w_size = int(window[0]), int(window[1])
        if w_size < 1 or not 0 <= w_start < T:
            raise ValueError(f"window {window}: start must be in [0, {T}) and size >= 1")
        start, stop = w_start, min(T, w_start + w_size)
        p = p[:, start:stop, start:stop]
    pooled, edges = pool_attention(p, max_bins, reduce)
    n = stop - start
    if len(edges) - 1 == n:
        axis = labels[start:stop]
    else:
        axis = [f"{start + a}-{start + b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    hover = _hover(labels, edges, start)
    gates_row = mask.heads_effective()[layer].clone() if mask is not None else torch.ones(g.n_heads)
    return AttentionMap(
        layer=layer,
        probs=pooled,
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
