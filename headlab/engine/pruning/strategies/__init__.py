"""Pruning strategies that keep the model good: registry, budgets, calibration, and `suggest_mask`.

    from headlab.engine.pruning.strategies import Budget, Calibration, get_strategy
    calib = Calibration.shipped("wikitext", 32)
    mask = get_strategy("ablation-iterative+comp")(handle, Budget(heads=0.2), calib)

The strategies are listed by name in headlab.engine.pruning.strategies.registry.
"""

from headlab.engine.core.errors import UnknownStrategyError
from headlab.engine.pruning.strategies.base import (
    CALIBRATION_CHOICES,
    COMP_SUFFIX,
    Budget,
    Calibration,
    Strategy,
    parse_method,
)
from headlab.engine.pruning.strategies.registry import STRATEGIES, get_strategy, strategy_names
from headlab.engine.pruning.strategies.suggest import (
    MODE_METHODS,
    MODES,
    ROUTES,
    SIZE_METHODS,
    Suggestion,
    suggest_mask,
    suggest_size,
)

__all__ = [
    "CALIBRATION_CHOICES",
    "COMP_SUFFIX",
    "MODES",
    "MODE_METHODS",
    "ROUTES",
    "SIZE_METHODS",
    "Suggestion",
    "suggest_mask",
    "suggest_size",
    "STRATEGIES",
    "Budget",
    "Calibration",
    "Strategy",
    "UnknownStrategyError",
    "get_strategy",
    "parse_method",
    "strategy_names",
]
