"""`headlab app`: the browser app with `make app`'s safe defaults, from any folder.

Streamlit reads .streamlit/config.toml only from the folder it is started in, so every setting of
that file is passed on the command line instead (SERVER_DEFAULTS; tests/test_install.py keeps the
two equal): the server listens on 127.0.0.1:8501 unless --address/--port (or HEADLAB_ADDRESS /
HEADLAB_PORT, as for `make app`) say otherwise. What follows `--` reaches the app's own command
line, e.g. `headlab app -- --allow-remote-code` (headlab/ui/server_options.py).

The app's files come from the installed package (headlab/_app, copied there by setup.py when a
wheel is built) or, in a checkout or an editable install, from the repository root.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

__all__ = ["ALLOW_REMOTE_CODE_FLAG", "DEFAULT_ADDRESS", "DEFAULT_PORT", "SERVER_DEFAULTS", "app_root", "register",
           "streamlit_command"]

ALLOW_REMOTE_CODE_FLAG = "--allow-remote-code"  # headlab/ui/server_options.py reads it (this package imports no app module)
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 8501
#: .streamlit/config.toml, less server.address and server.port (flags of their own), as `--section.key value`.
SERVER_DEFAULTS = {
    "server.headless": "true",
    "server.fileWatcherType": "none",
    "browser.gatherUsageStats": "false",
    "browser.serverAddress": DEFAULT_ADDRESS,
    "client.toolbarMode": "minimal",
}
_PACKAGE = Path(__file__).resolve().parent
_ROOTS = (_PACKAGE / "_app", _PACKAGE.parent)  # the wheel's copy, then the checkout this package sits in
_NEEDED = ("app.py", "pages/heads.py")


def app_root(roots: tuple[Path, ...] | None = None) -> Path:
    """The folder holding app.py and pages/: the installed copy, else the checkout."""
    roots = _ROOTS if roots is None else roots
    for root in roots:
        if all((root / f).is_file() for f in _NEEDED):
            return root
    raise FileNotFoundError(f"the app's files (app.py, pages/) are in none of {[str(r) for r in roots]}: "
                            "reinstall HeadLab (pip install .) or run `make app` from a checkout")


def streamlit_command(address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT, app_args: list[str] | None = None,
                      root: Path | None = None) -> list[str]:
    """The command line that serves the app: this Python's streamlit, every server setting explicit."""
    cmd = [sys.executable, "-m", "streamlit", "run", str((root or app_root()) / "app.py"),
           "--server.address", address, "--server.port", str(port)]
    for key, value in SERVER_DEFAULTS.items():
        cmd += [f"--{key}", value]
    if app_args:
        cmd += ["--", *app_args]
    return cmd


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def _run(args: argparse.Namespace) -> int:
    app_args = list(args.app_args)
    if args.allow_remote_code and ALLOW_REMOTE_CODE_FLAG not in app_args:
        app_args.append(ALLOW_REMOTE_CODE_FLAG)
    cmd = streamlit_command(args.address, args.port, app_args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"HeadLab on http://{args.address}:{args.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)  # the server takes this process over: Ctrl-C and exit status are its own


def register(sub) -> None:
    """The `app` verb (the `headlab` command's only verb that `python -m headlab` lacks)."""
    p = sub.add_parser("app", help="start the browser app (127.0.0.1:8501 unless told otherwise)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("HEADLAB_ADDRESS") or DEFAULT_ADDRESS,
                   help="address to listen on (default 127.0.0.1, or $HEADLAB_ADDRESS); 0.0.0.0 exposes the app "
                        "to the network, and the sidebar can open any model folder on this machine")
    p.add_argument("--port", type=_port, default=os.environ.get("HEADLAB_PORT") or DEFAULT_PORT,
                   help="port (default 8501, or $HEADLAB_PORT)")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="let the sidebar allow a model's own code (trust_remote_code); the same as "
                        "`-- --allow-remote-code`")
    p.add_argument("--dry-run", action="store_true", help="print the streamlit command line instead of running it")
    p.add_argument("app_args", nargs="*", metavar="-- APP_ARGS",
                   help="after `--`: the app's own options, e.g. `-- --allow-remote-code`")
    p.set_defaults(func=_run)
