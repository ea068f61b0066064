"""headlab.engine.core.once.computed_once: an LRU cache whose concurrent first calls per key compute once."""

from __future__ import annotations

import threading
import time

import pytest

from headlab.engine.core.once import computed_once


def test_concurrent_first_calls_with_the_same_arguments_compute_once_and_all_get_the_value():
    calls = []

    @computed_once(maxsize=4)
    def slow_square(x: int) -> int:
        calls.append(x)
        time.sleep(0.2)
        return x * x

    results = []
    threads = [threading.Thread(target=lambda: results.append(slow_square(3))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [9] * 6 and calls == [3]


def test_other_keys_are_not_held_up_by_a_key_being_computed():
    release = threading.Event()

    @computed_once()
    def value(key: str) -> str:
        if key == "slow":
            release.wait(10)
        return key

    slow = threading.Thread(target=value, args=("slow",))
    slow.start()
    t0 = time.monotonic()
    assert value("fast") == "fast" and time.monotonic() - t0 < 1
    release.set()
    slow.join(10)


def test_a_failure_is_not_cached_and_least_recently_used_values_are_dropped():
    calls = []

    @computed_once(maxsize=2)
    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("first call fails")
        return x

    with pytest.raises(RuntimeError):
        flaky(1)
    assert flaky(1) == 1 and flaky(1) == 1 and calls == [1, 1]
    flaky(2), flaky(3)  # 1 is now the least recently used of three: dropped
    flaky(1)
    assert calls == [1, 1, 2, 3, 1]
    flaky.cache_clear()
    flaky(3)
    assert calls[-1] == 3 and len(calls) == 6
