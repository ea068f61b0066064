"""Every importance criterion by name, listed in this one place, and `score`: several criteria, one capture pass.

    scores, stats = score(handle, texts, ["gradient", "entropy"])
    criteria_for("blocks")  # ("block_influence", "gradient", "random", "block_ppl", "taylor_plus")

A new criterion is a `Criterion` subclass (name, needs, units, description, `__call__`) added
to the tuple in `CRITERIA` below; nothing registers itself on import.
"""

from __future__ import annotations

from typing import Any, Sequence

from headlab.engine.core.errors import UnknownCriterionError
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import UNIT_KINDS
from headlab.engine.core.progress import Progress
from headlab.engine.distributed.world import SINGLE, World
from headlab.engine.importance.ablation import Ablation
from headlab.engine.importance.capture import CaptureStats, capture
from headlab.engine.importance.criteria import (
    Activation,
    BlockInfluence,
    Criterion,
    Entropy,
    Gradient,
    Magnitude,
    Random,
    Scores,
)
from headlab.engine.importance.depth import BlockPPL, TaylorPlus
from headlab.engine.importance.fluctuation import Fluctuation

__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERIA",
    "criterion_names",
    "criteria_for",
    "get_criterion",
    "score",
]

CRITERIA: dict[str, type[Criterion]] = {
    c.name: c
    for c in (Entropy, Magnitude, Gradient, Activation, Random, BlockInfluence, BlockPPL, TaylorPlus, Fluctuation,
              Ablation)
}

# Where each unit starts: Michel et al.'s gate gradient for heads and channels, ShortGPT's block influence for sub-blocks.
DEFAULT_CRITERIA = {"heads": "gradient", "ffn": "gradient", "blocks": "block_influence"}


def criterion_names() -> list[str]:
    """Every registered criterion name, sorted."""
    return sorted(CRITERIA)


def criteria_for(unit: str) -> tuple[str, ...]:
    """Names of the criteria that score `unit` (UNIT_KINDS): its default first, then in registry order."""
    if unit not in UNIT_KINDS:
        raise ValueError(f"unit must be one of {', '.join(UNIT_KINDS)}, got {unit!r}")
    names = [name for name, cls in CRITERIA.items() if unit in cls.units]
    return tuple(sorted(names, key=lambda name: name != DEFAULT_CRITERIA[unit]))  # stable: the rest keep their order


def get_criterion(name: str, **kwargs: Any) -> Criterion:
    """The criterion registered as `name`, or UnknownCriterionError listing the known names."""
    try:
        cls = CRITERIA[name]
    except KeyError:
        raise UnknownCriterionError(
            f"unknown criterion {name!r}; choose one of: {', '.join(criterion_names())}"
        ) from None
    return cls(**kwargs)


def score(
    handle: ModelHandle,
    texts: Sequence[str],
    criteria: Sequence[str] = ("entropy", "magnitude", "gradient", "activation"),
    *,
    stats: CaptureStats | None = None,
    progress: Progress | None = None,
    world: World = SINGLE,
    **capture_kwargs: Any,
) -> tuple[dict[str, Scores], CaptureStats | None]:
    """Score with several criteria from one shared capture pass (made here unless given).

    Under a data-parallel `world` the capture splits the texts and criteria that can (`splits_work`)
    split their own work; the others run on every rank alike.
    """
    chosen = [get_criterion(n, world=world) if n in CRITERIA and CRITERIA[n].splits_work else get_criterion(n)
              for n in criteria]
    needs = {c.needs for c in chosen}
    if stats is None and needs - {"none"}:
        stats = capture(handle, texts, gradients="gradients" in needs, progress=progress, world=world,
                        **capture_kwargs)
    return {c.name: c(handle, stats) for c in chosen}, stats
