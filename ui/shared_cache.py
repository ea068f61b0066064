"""A process-wide store for results that take long to compute and are the same for every session.

Unlike st.cache_resource around the computation itself, the computation runs outside any
cached function, so it may draw progress bars (Streamlit replays elements drawn inside a
cached function, which fails for elements placed in outer containers). One lock per key:
two sessions asking for the same missing result compute it once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

import streamlit as st

__all__ = ["SharedCache", "shared_cache"]


class SharedCache:
    """Key -> value, computed once under a per-key lock, least recently used dropped beyond `max_entries`."""

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._values: OrderedDict[Hashable, Any] = OrderedDict()
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._guard:
            return self._values.get(key)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The stored value for `key`, computing it first (once, whoever asks concurrently)."""
        with self._guard:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._values:
                    return self._values[key]
            value = compute()
            with self._guard:
                self._values[key] = value
                while len(self._values) > self.max_entries:
                    self._values.popitem(last=False)
                self._locks.pop(key, None)
            return value


@st.cache_resource(show_spinner=False)
def shared_cache(name: str, max_entries: int = 16) -> SharedCache:
    """The process-wide SharedCache called `name`."""
    return SharedCache(max_entries)
