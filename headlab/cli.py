"""The `headlab` command (also `python -m headlab`): every engine verb (headlab/engine/cli/), plus `app`.

    headlab eval                               # dense WikiText-2 perplexity with its protocol
    headlab suggest --budget 0.2 --out mask.json
    headlab eval --mask mask.json              # dense vs masked perplexity
    headlab app                                # the browser app on 127.0.0.1:8501
    headlab app --address 0.0.0.0 -- --allow-remote-code

From a checkout without an install, `python -m headlab <verb>` is the same command.
"""

from __future__ import annotations

import argparse
import sys

from headlab import __version__, app

__all__ = ["build_parser", "main"]

_VERSION = f"headlab {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The engine's parser under the name `headlab`, with `--version` and the `app` verb."""
    # imported here, not above: `headlab app` and `headlab --version` start without loading torch
    from headlab.engine.cli.main import GROUPS
    from headlab.engine.cli.main import build_parser as engine_parser

    parser = engine_parser(prog="headlab", groups=(*GROUPS, app), description=__doc__)
    parser.add_argument("--version", action="version", version=_VERSION)
    return parser


def _app_parser() -> argparse.ArgumentParser:
    """`headlab app` alone: the same verb and flags, without the engine's verbs (and their imports)."""
    parser = argparse.ArgumentParser(prog="headlab")
    app.register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `headlab` script; user errors print one clear line and exit 2, as the engine's."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:
        print(_VERSION)
        return 0
    if argv[:1] == ["app"]:  # the server loads the engine itself, in its own process
        args = _app_parser().parse_args(argv)
        try:
            return args.func(args)
        except FileNotFoundError as e:  # no app files beside this package
            print(f"error: {e}", file=sys.stderr)
            return 2
    from headlab.engine.cli.common import run_command

    return run_command(build_parser().parse_args(argv))
