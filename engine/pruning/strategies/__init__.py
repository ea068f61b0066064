"""Pruning strategies that keep the model good: registry, budgets, calibration, and `suggest_mask`.

    from engine.pruning.strategies import Budget, Calibration, get_strategy
    calib = Calibration.shipped("wikitext", 32)
    mask = get_strategy("ablation-iterative+comp")(handle, Budget(heads=0.2), calib)

Importing this package registers the strategies (and the "fluctuation" and "ablation"
criteria in engine.importance.criteria).
"""

from engine.pruning.strategies import hardconcrete, iterative, oneshot  # noqa: F401  (registration)
from engine.pruning.strategies.base import (
    COMP_SUFFIX,
    STRATEGIES,
    Budget,
    Calibration,
    Strategy,
    UnknownStrategyError,
    get_strategy,
    parse_method,
    register_strategy,
    strategy_names,
)
from engine.pruning.strategies.suggest import MODE_METHODS, MODES, Suggestion, suggest_mask

__all__ = [
    "COMP_SUFFIX",
    "MODES",
    "MODE_METHODS",
    "Suggestion",
    "suggest_mask",
    "STRATEGIES",
    "Budget",
    "Calibration",
    "Strategy",
    "UnknownStrategyError",
    "get_strategy",
    "parse_method",
    "register_strategy",
    "strategy_names",
]
