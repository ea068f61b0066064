"""The errors a user can cause (bad input), gathered so front ends can show them plainly."""

from __future__ import annotations

from engine.adapters.base import UnsupportedModelError
from engine.importance import UnknownCriterionError
from engine.masks import MaskError
from engine.model import ModelLoadError
from engine.select import BudgetError
from engine.strategies.base import UnknownStrategyError
from engine.tokens import EmptyTextError

__all__ = ["USER_ERRORS"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    UnsupportedModelError,
    UnknownCriterionError,
    MaskError,
    ModelLoadError,
    BudgetError,
    EmptyTextError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
    UnknownStrategyError,
)
