"""The compiled CPU decode kernel for tests: built by the same builder as `make setup`, skipped only without tools."""

from __future__ import annotations

from types import ModuleType

import pytest

from headlab.kernels.compiled import build, missing_build_tools


def compiled_kernel() -> ModuleType:
    """The built kernel module (built now, into the cache folder, when not built yet); a skip only if no compiler."""
    missing = missing_build_tools()
    if missing:
        pytest.skip(f"the compiled decode kernel cannot be built here: {missing}")
    return build()  # a failed build with the tools present is a failure, not a skip
