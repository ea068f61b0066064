"""Every pruning strategy by name, listed in this one place; "+comp" names add FLAP compensation.

A new strategy is a `Strategy` subclass (name, description, reference, `__call__`) added to
the tuple in `STRATEGIES` below; nothing registers itself on import.
"""

from __future__ import annotations

from typing import Any

from headlab.engine.core.errors import UnknownStrategyError
from headlab.engine.pruning.strategies.base import COMP_SUFFIX, Strategy, parse_method
from headlab.engine.pruning.strategies.hardconcrete import HardConcreteMask
from headlab.engine.pruning.strategies.iterative import IterativeAblation, IterativeGradient
from headlab.engine.pruning.strategies.oneshot import (
    AblationStrategy,
    EntropyStrategy,
    FlapStrategy,
    FluctuationStrategy,
    GradientStrategy,
    MagnitudeStrategy,
    RandomStrategy,
)
from headlab.engine.pruning.strategies.reconstruct import (
    AblationRefitStrategy,
    FlapRefitStrategy,
    HardConcreteRefitStrategy,
    ObsStrategy,
)

__all__ = ["STRATEGIES", "strategy_names", "get_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s
    for s in (RandomStrategy, MagnitudeStrategy, EntropyStrategy, GradientStrategy, FluctuationStrategy, FlapStrategy,
              AblationStrategy, IterativeGradient, IterativeAblation, HardConcreteMask, ObsStrategy, FlapRefitStrategy,
              HardConcreteRefitStrategy,
              AblationRefitStrategy)
}


def strategy_names(with_comp: bool = False) -> list[str]:
    """Registered names, sorted (and their "+comp" variants when `with_comp`)."""
    names = sorted(STRATEGIES)
    if not with_comp:
        return names
    return names + [n + COMP_SUFFIX for n in names if not STRATEGIES[n].always_compensates]


def get_strategy(method: str, **kwargs: Any) -> Strategy:
    """The strategy registered as `method` (a "+comp" suffix adds compensation)."""
    name, comp = parse_method(method)
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown pruning method {method!r}; choose one of: {', '.join(strategy_names(with_comp=True))}"
        ) from None
    if comp:
        if cls.always_compensates:
            raise UnknownStrategyError(f"{name!r} always compensates: drop the {COMP_SUFFIX!r} suffix")
        kwargs["compensate"] = True
    return cls(**kwargs)
