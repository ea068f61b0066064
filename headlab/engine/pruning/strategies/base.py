"""What every pruning strategy shares: the budget, the calibration data, the base class, method names.

A strategy turns (model, budget, calibration text) into a PruneMask. Unlike a criterion
(headlab.engine.importance.criteria: one score table, then one cut), a strategy may re-score between steps,
measure, optimise, or add compensation biases. Names may carry the suffix "+comp": the
same selection, then FLAP compensation biases for every pruned head and channel
(headlab.engine.pruning.compensation). Everything expensive a strategy computes on calibration data is kept
in the `Calibration` object, so several strategies and budgets share one capture pass.
The strategies by name: headlab.engine.pruning.strategies.registry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.data.datasets import CALIBRATION_SETS, calibration_texts
from headlab.engine.importance.capture import CaptureStats, capture
from headlab.engine.pruning.select import BudgetError, count_from_budget
from headlab.engine.runtime.continuations import MIXED, mixed_texts

__all__ = [
    "CALIBRATION_CHOICES",
    "Budget",
    "Calibration",
    "Strategy",
    "parse_method",
    "COMP_SUFFIX",
]

COMP_SUFFIX = "+comp"
# the shipped sets, and "mixed": WikiText paragraphs and the model's own answers to training prompts
CALIBRATION_CHOICES = (*CALIBRATION_SETS, MIXED)


@dataclass(frozen=True)
class Budget:
    """How many heads and FFN channels to remove: fractions in [0, 1) or int counts."""

    heads: float | int = 0.0
    ffn: float | int = 0.0

    def counts(self, g: Any) -> tuple[int, int]:
        """(heads removed, channels removed), checked against the model's sizes."""
        return (count_from_budget(self.heads, g.n_layers * g.n_heads, "heads"),
                count_from_budget(self.ffn, g.n_layers * g.ffn_dim, "FFN channels"))

    def describe(self, g: Any) -> str:
        h, f = self.counts(g)
        parts = [f"{h} of {g.n_layers * g.n_heads} heads"]
        if f:
            parts.append(f"{f} of {g.n_layers * g.ffn_dim} FFN channels")
        return " and ".join(parts)


@dataclass
class Calibration:
    """Calibration texts plus everything computed from them, cached for reuse.

    `stats()` is one dense capture pass with gradients (entropy, moments for compensation,
    Michel gradients); `cache` holds what strategies measure (e.g. per-head ablation KL),
    keyed by the strategy, so a second budget reuses the first one's measurements.
    `persist_dir`: where slow measurements are kept on disk: per-head ablation costs as they are measured
    (`ablation/`, headlab.engine.importance.ablation_store), so an interrupted measurement resumes, and the
    measured-KL allocations (`kl_costs/`, headlab.engine.pruning.reconstruct.measured); None keeps them in
    memory only.
    """

    texts: list[str]
    max_length: int = 256
    batch_size: int = 4
    name: str = "custom"
    _stats: CaptureStats | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    persist_dir: Path | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    @classmethod
    def shipped(cls, name: str = "wikitext", n: int = 32, max_length: int = 256,
                handle: ModelHandle | None = None, progress: Progress | None = None) -> "Calibration":
        """A calibration over one of the shipped sets (headlab.engine.data.datasets.calibration_texts), or "mixed"
        (headlab.engine.runtime.continuations.mixed_texts: half of it the model's own answers, so `handle` is
        needed; they are generated once and cached, `progress` reporting the generation)."""
        if name == MIXED:
            if handle is None:
                raise ValueError("the mixed calibration set holds the model's own answers: pass the model (handle=)")
            return cls(mixed_texts(handle, n, progress=progress), max_length=max_length, name=name)
        return cls(calibration_texts(name, n), max_length=max_length, name=name)

    def stats(self, handle: ModelHandle, progress: Progress | None = None) -> CaptureStats:
        """The dense capture (with gradients) over the texts, computed once."""
        if self._stats is None:
            self._stats = capture(handle, self.texts, gradients=True, batch_size=self.batch_size,
                                  max_length=self.max_length, progress=progress)
        return self._stats

    def set_stats(self, stats: CaptureStats) -> None:
        """Reuse a capture made elsewhere on the same texts (e.g. the app's scores)."""
        self._stats = stats

    def describe(self) -> str:
        return f"{len(self.texts)} {self.name} texts x {self.max_length} tokens"


class Strategy:
    """Base: `strategy(handle, budget, calibration) -> PruneMask`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    supports_ffn: ClassVar[bool] = True
    cost_hint: ClassVar[str] = "fast"  # "fast" (scores only), "measured" (partial forwards), "optimised" (training)
    always_compensates: ClassVar[bool] = False  # compensation is part of the method (no "+comp" variant)

    def __call__(self, handle: ModelHandle, budget: Budget, calib: Calibration, *,
                 progress: Progress | None = None) -> PruneMask:
        raise NotImplementedError

    def check_budget(self, handle: ModelHandle, budget: Budget) -> tuple[int, int]:
        h, f = budget.counts(handle.geometry)
        if f and not self.supports_ffn:
            raise BudgetError(f"strategy {self.name!r} prunes heads only; use ffn=0 or another strategy")
        return h, f


def parse_method(method: str) -> tuple[str, bool]:
    """("base name", compensate) from a method name like "gradient+comp"."""
    if method.endswith(COMP_SUFFIX):
        return method[: -len(COMP_SUFFIX)], True
    return method, False
