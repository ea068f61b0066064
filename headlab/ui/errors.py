"""Engine errors a user can cause, shown as a plain message instead of a traceback."""

from __future__ import annotations

import contextlib
from typing import Iterator

import streamlit as st

from headlab.engine.core.errors import USER_ERRORS

__all__ = ["user_errors"]


@contextlib.contextmanager
def user_errors(stop: bool = True) -> Iterator[None]:
    """Show any engine USER_ERRORS raised in the body with st.error; stop the page unless `stop` is False."""
    try:
        yield
    except USER_ERRORS as e:
        st.error(str(e) or type(e).__name__, icon=":material/error:")
        if stop:
            st.stop()
