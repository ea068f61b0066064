"""What the person who started the server allowed, read from its command line and environment.

    streamlit run app.py -- --allow-remote-code     # or HEADLAB_ALLOW_REMOTE_CODE=1 make app

Visitors of the page cannot change these: a browser can only use what the server allows.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["ALLOW_REMOTE_CODE_FLAG", "ALLOW_REMOTE_CODE_ENV", "remote_code_allowed", "ICON"]

ALLOW_REMOTE_CODE_FLAG = "--allow-remote-code"
ALLOW_REMOTE_CODE_ENV = "HEADLAB_ALLOW_REMOTE_CODE"
ICON = str(Path(__file__).resolve().parent / "assets" / "icon.png")  # local: no font CDN at run time


def remote_code_allowed(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> bool:
    """True only if the server was started with --allow-remote-code or HEADLAB_ALLOW_REMOTE_CODE=1."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    return ALLOW_REMOTE_CODE_FLAG in argv or environ.get(ALLOW_REMOTE_CODE_ENV, "") in ("1", "true", "yes")
