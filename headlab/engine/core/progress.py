"""How long-running engine calls report progress: `progress(done, total)` after each step."""

from __future__ import annotations

from typing import Callable

__all__ = ["Progress"]

Progress = Callable[[int, int], None]  # (steps done, steps in all); None where a call takes one means silence
