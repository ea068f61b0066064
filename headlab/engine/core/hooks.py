"""Temporary, thread-scoped forward hooks: the one way the engine touches a shared model.

Every hook registered through `temporary_hooks()` fires only in the thread that opened the
context (so two browser sessions running the same cached model concurrently never see each
other's hooks) and is removed in `finally`, also when the body raises.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any, Callable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet", "temporary_hooks", "private_copy"]


class HookSet:
    """Registers thread-scoped hooks and remembers them for removal."""

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self.handles: list[RemovableHandle] = []

    def _guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        owner = self.owner

        def guarded(*args: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            return fn(*args)

        return guarded

    def pre(self, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """fn(module, args[, kwargs]) -> new args (or (args, kwargs)) or None."""
        self.handles.append(module.register_forward_pre_hook(self._guard(fn), with_kwargs=with_kwargs))

    def post(self, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """fn(module, args[, kwargs], output) -> new output or None."""
        self.handles.append(module.register_forward_hook(self._guard(fn), with_kwargs=with_kwargs))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@contextlib.contextmanager
def temporary_hooks() -> Iterator[HookSet]:
    """A HookSet whose hooks exist only inside the `with` block."""
    hs = HookSet()
    try:
        yield hs
    finally:
        hs.remove()


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a shared model, without the temporary engine hooks a concurrent caller may have on it."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if "HookSet._guard" in getattr(fn, "__qualname__", "")]:
                del hooks[key]
    return copied
