"""Run the kernels under TRITON_INTERPRET=1 even if triton was imported before it was set.

Triton decides at decoration time whether a `@triton.jit` function is compiled or
interpreted, and its own library (`tl.cdiv`, `tl.max`, `tl.sum`, `tl.zeros`, ...) is
decorated when triton is first imported. Importing transformers imports torch._dynamo,
which imports triton, so in this project the library is almost always compiled-mode by
the time a test sets TRITON_INTERPRET, and an interpreted kernel calling `tl.max` fails.
`interpretable_triton_library()` swaps those functions for interpreted twins while a
kernel runs, and restores them after. It does nothing when they are interpreted already.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from headlab.kernels.backend import interpreter_enabled

__all__ = ["interpretable_triton_library"]


def _library_namespaces() -> list[object]:
    """triton.language modules and the tensor class (its methods like `x.max()` are jit too)."""
    import triton.language as tl

    modules = [m for name, m in sys.modules.items() if name.startswith("triton.language") and m is not None]
    return [*modules, tl.tensor]


@contextlib.contextmanager
def interpretable_triton_library() -> Iterator[None]:
    """While active, triton's own jit'd library functions run under the interpreter."""
    if not interpreter_enabled():
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins: dict[int, InterpretedFunction] = {}  # one twin per function: keeps `is` checks true
    swapped: list[tuple[object, str, object]] = []
    for namespace in _library_namespaces():
        for name, value in list(vars(namespace).items()):
            if isinstance(value, JITFunction):
                twin = twins.setdefault(id(value), InterpretedFunction(value.fn))
                swapped.append((namespace, name, value))
                setattr(namespace, name, twin)
    try:
        yield
    finally:
        for namespace, name, value in reversed(swapped):
            setattr(namespace, name, value)
