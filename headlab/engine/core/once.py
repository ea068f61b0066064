"""A function cache under which concurrent first calls with the same arguments compute once.

    @computed_once(maxsize=8)
    def _wikitext_ids(tokenizer) -> torch.Tensor: ...

`functools.lru_cache` lets every thread that misses compute the value at the same time: four
app sessions opening at once tokenised the evaluation text four times (~190 MB of peak memory
each for SmolLM2). Here the first caller of a key computes while later callers of that key
wait for its value; callers of other keys are not held up. Arguments are the key (hashed as
lru_cache hashes them, objects by identity), least recently used values are dropped beyond
`maxsize`, and a call that raises caches nothing (the next caller computes again).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Any, Callable, TypeVar

__all__ = ["computed_once"]

T = TypeVar("T")


def computed_once(maxsize: int = 8) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: an LRU cache of `maxsize` values, each computed once however many threads ask at once."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        values: OrderedDict[Any, T] = OrderedDict()
        computing: dict[Any, threading.Lock] = {}
        guard = threading.Lock()  # held only to read or change the two dicts, never while computing

        @functools.wraps(fn)
        def cached(*args: Any, **kwargs: Any) -> T:
            key = (args, tuple(sorted(kwargs.items()))) if kwargs else args
            while True:
                with guard:
                    if key in values:
                        values.move_to_end(key)
                        return values[key]
                    lock = computing.get(key)
                    if lock is None:
                        lock = computing[key] = threading.Lock()
                        lock.acquire()
                        break
                with lock:  # another thread is computing this key: wait for it, then look again
                    pass
            try:
                value = fn(*args, **kwargs)
                with guard:
                    values[key] = value
                    while len(values) > maxsize:
                        values.popitem(last=False)
                return value
            finally:
                with guard:
                    del computing[key]
                lock.release()

        def cache_clear() -> None:
            with guard:
                values.clear()

        cached.cache_clear = cache_clear  # type: ignore[attr-defined]
        return cached

    return decorate
