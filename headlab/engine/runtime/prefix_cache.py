"""Perplexity under a mask, recomputing only the layers a mask change can reach.

The input of layer i depends only on layers 0..i-1, so two masks that agree on layers
0..l-1 give identical inputs to layers 0..l. A PrefixCache runs the model once over a fixed
set of evaluation windows, recording every layer's input and call arguments
(headlab.engine.runtime.replay.record_layers). A later mask whose first layer that differs from a
cached mask is l re-runs only layers l..L-1 under that mask (`LayerInputs.run_from`), then
the final norm, the LM head and `window_token_nll`, exactly as a full forward would.

Each evaluated mask keeps its layer inputs, so successive toggles reuse the longest common
prefix of any cached mask (entries are keyed by `PruneMask.layer_keys()`). Entries share the
tensors of their common prefix (no copies); memory is bounded by `max_bytes` with
least-recently-used eviction, the first entry (the root every other one derives from)
pinned. The model is never mutated: masks act through `gates.apply` for the duration of a
call. A cache belongs to one caller (one browser session); a lock makes concurrent calls on
the same cache safe, not parallel.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask, first_difference
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import context_length
from headlab.engine.runtime.evaluate import (
    PerplexityProtocol,
    PerplexityResult,
    eval_windows,
    tokenizer_label,
    window_token_nll,
)
from headlab.engine.runtime.replay import LayerInputs, final_logits, record_layers

__all__ = [
    "PrefixCache",
    "PrefixRun",
    "LIVE_WINDOW",
    "LIVE_WINDOWS",
    "live_protocol",
]

# The first window of the pinned protocol (headlab.engine.runtime.evaluate.DEFAULT_PROTOCOL: 12 windows of 512):
# the same tokens, scored in the same context, as its first 511; about a second per toggle for SmolLM2-135M.
LIVE_WINDOW = 512
LIVE_WINDOWS = 1
DEFAULT_MAX_BYTES = 384 * 2**20

LayerKey = tuple[bytes, ...]


def live_protocol(handle: ModelHandle, n_windows: int = LIVE_WINDOWS, window: int = LIVE_WINDOW) -> PerplexityProtocol:
    """The short protocol used for live feedback: `n_windows` windows of `window` tokens; a model whose context is
    shorter gets windows of its context, as many as cover the same number of tokens."""
    w = min(window, context_length(handle.model))
    return PerplexityProtocol(window=w, stride=w, n_windows=math.ceil(n_windows * window / w))


@dataclass(frozen=True)
class PrefixRun:
    """What one `PrefixCache.perplexity` call did."""

    start_layer: int  # first layer re-run (n_layers when the result was already cached)
    layers_run: int
    seconds: float
    reused_result: bool


@dataclass
class _Entry:
    key: LayerKey
    record: LayerInputs  # every layer's input under this entry's mask
    result: PerplexityResult


class PrefixCache:
    """Perplexity of many masks over fixed windows, re-running only layers from the first changed one."""

    def __init__(
        self,
        handle: ModelHandle,
        protocol: PerplexityProtocol | None = None,
        *,
        batch_size: int = 4,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if not handle.is_causal_lm:
            raise ValueError(
                f"perplexity needs a causal language model; {handle.name} is an encoder without an LM head"
            )
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.handle = handle
        self.protocol = protocol or live_protocol(handle)
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        windows, score_from = eval_windows(handle, self.protocol)
        self._ids = [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]
        self._score_from = [score_from[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]
        self._entries: OrderedDict[LayerKey, _Entry] = OrderedDict()
        self._root: LayerKey | None = None
        self._lock = threading.Lock()
        self.last_run: PrefixRun | None = None

    # --- public ------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.handle.geometry.n_layers

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by cached hidden states (shared prefixes counted once)."""
        seen: dict[int, int] = {}
        for e in self._entries.values():
            for per_batch in e.record.hidden:
                for t in per_batch:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def clear(self) -> None:
        """Drop every cached entry (the next call runs a full pass again)."""
        with self._lock:
            self._entries.clear()
            self._root, self.last_run = None, None

    @torch.no_grad()
    def perplexity(self, mask: PruneMask | None = None, *, progress: Progress | None = None) -> PerplexityResult:
        """Perplexity under `mask` (None = dense) on this cache's windows, reusing cached layer inputs."""
        g = self.handle.geometry
        mask = (mask if mask is not None else PruneMask.dense(g)).check(g)
        key = mask.layer_keys()
        t0 = time.perf_counter()
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.last_run = PrefixRun(self.n_layers, 0, time.perf_counter() - t0, reused_result=True)
                return self._entries[key].result
            if self._root is None:
                entry = self._full_pass(mask, key, progress)
                self._root = key
                start = 0
            else:
                parent, start = self._best_parent(key)
                entry = self._derive(parent, start, mask, key, progress)
            self._entries[key] = entry
            self._evict(keep=key)
            self.last_run = PrefixRun(start, self.n_layers - start, time.perf_counter() - t0, reused_result=False)
            return entry.result

    # --- internals -----------------------------------------------------------------------
    def _best_parent(self, key: LayerKey) -> tuple[_Entry, int]:
        """The cached entry sharing the longest layer prefix with `key`, and that prefix length."""
        best, best_l = None, -1
        for e in self._entries.values():
            l = first_difference(e.key, key)
            if l > best_l:
                best, best_l = e, l
        assert best is not None
        self._entries.move_to_end(best.key)
        return best, best_l

    def _full_pass(self, mask: PruneMask, key: LayerKey, progress: Progress | None) -> _Entry:
        """Run the whole model once, recording every layer's input and call arguments."""
        n_b = len(self._ids)
        inputs = [{"input_ids": ids.to(self.handle.device)} for ids in self._ids]
        nlls: list[torch.Tensor] = []

        def score(b: int, out: Any) -> None:
            nlls.append(window_token_nll(out.logits, inputs[b]["input_ids"], self._score_from[b]).cpu())
            if progress:
                progress(b + 1, n_b)

        record = record_layers(self.handle, mask, inputs, each=score)
        return _Entry(key, record, self._result(torch.cat(nlls)))

    def _derive(
        self, parent: _Entry, start: int, mask: PruneMask, key: LayerKey, progress: Progress | None
    ) -> _Entry:
        """Layers start..L-1 under `mask` from the parent's input of layer `start`."""
        record = parent.record.run_from(start, mask, progress=progress)
        nlls = [window_token_nll(final_logits(self.handle, hidden), self._ids[b].to(hidden.device),
                                 self._score_from[b]).cpu() for b, hidden in enumerate(record.outputs)]
        return _Entry(key, record, self._result(torch.cat(nlls)))

    def _result(self, token_nll: torch.Tensor) -> PerplexityResult:
        return PerplexityResult.from_token_nll(token_nll, self.protocol, tokenizer_label(self.handle))

    def _evict(self, keep: LayerKey) -> None:
        """Drop least-recently-used entries (never the root nor `keep`) until under max_bytes."""
        while self.nbytes > self.max_bytes:
            victim = next((k for k in self._entries if k not in (self._root, keep)), None)
            if victim is None:
                return
            del self._entries[victim]

