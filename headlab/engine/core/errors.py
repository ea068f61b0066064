"""The errors a user can cause (bad input), defined in one place so front ends can show them plainly.

Each module raises the one that fits and re-exports it; `USER_ERRORS` is the tuple the CLI
turns into one clear line (exit status 2) and the app into an `st.error` box.
"""

from __future__ import annotations

__all__ = [
    "UnsupportedModelError",
    "UnknownCriterionError",
    "UnknownStrategyError",
    "MaskError",
    "ModelLoadError",
    "BudgetError",
    "EmptyTextError",
    "USER_ERRORS",
]


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


class _NameError(KeyError):
    """A name missing from a registry; prints its message without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownCriterionError(_NameError):
    """A criterion name that is not in the registry."""


class UnknownStrategyError(_NameError):
    """A strategy name that is not in the registry."""


class MaskError(ValueError):
    """A mask that does not fit its model or would leave nothing to run."""


class ModelLoadError(RuntimeError):
    """The model could not be opened; the message says why and what to do."""


class BudgetError(ValueError):
    """A budget that is not a fraction in [0, 1) or a count that fits."""


class EmptyTextError(ValueError):
    """Text with nothing to run the model on."""


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
