"""A cache of per-prompt masks for frequently seen inputs, with hit-rate statistics.

A prompt seen before (the same token ids) or nearly so (its mean input embedding within
`min_cosine` of a cached prompt's) gets the cached mask back, identical, without running the
prompt through the model. Least recently used entries go first beyond `capacity`. Safe to share
between threads (the app's sessions share one per model and network).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from headlab.engine.dynamic.prompt_mask import PromptMask

__all__ = ["CacheStats", "MaskCache"]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    near_hits: int  # hits by embedding similarity, not the exact ids
    misses: int
    size: int

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def describe(self) -> str:
        return (f"{self.hits} hits ({self.near_hits} by similarity), {self.misses} misses, hit rate "
                f"{self.hit_rate:.0%}, {self.size} masks cached")


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.reshape(-1).to(torch.int64).cpu().numpy().tobytes()).hexdigest()


class MaskCache:
    """Per-prompt masks by prompt: exact ids first, then the nearest embedding within `min_cosine`."""

    def __init__(self, capacity: int = 256, min_cosine: float = 0.99):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if not -1.0 <= min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
        self.capacity, self.min_cosine = capacity, min_cosine
        self._entries: OrderedDict[str, PromptMask] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._near = self._misses = 0

    def get(self, ids: torch.Tensor, embedding: Callable[[], torch.Tensor] | torch.Tensor | None = None
            ) -> PromptMask | None:
        """The cached mask for these prompt ids (or a near one, when `embedding` is given), counting hit or miss."""
        key = _digest(ids)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self._hits += 1
                return self._entries[key]
            if embedding is not None and self._entries:
                e = embedding() if callable(embedding) else embedding
                keys = list(self._entries)
                sims = torch.stack([self._entries[k].embedding for k in keys]) @ e
                best = int(sims.argmax())
                if float(sims[best]) >= self.min_cosine:
                    self._entries.move_to_end(keys[best])
                    self._hits += 1
                    self._near += 1
                    return self._entries[keys[best]]
            self._misses += 1
            return None

    def put(self, ids: torch.Tensor, mask: PromptMask) -> None:
        with self._lock:
            self._entries[_digest(ids)] = mask
            self._entries.move_to_end(_digest(ids))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get_or_predict(self, ids: torch.Tensor, predict: Callable[[], PromptMask],
                       embedding: Callable[[], torch.Tensor] | None = None) -> tuple[PromptMask, bool]:
        """(mask, hit): the cached mask, or `predict()`'s, stored."""
        cached = self.get(ids, embedding)
        if cached is not None:
            return cached, True
        mask = predict()
        self.put(ids, mask)
        return mask, False

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._near, self._misses, len(self._entries))
