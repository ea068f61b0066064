"""`python -m engine ...`: every engine capability from the command line.

    python -m engine eval                      # dense WikiText-2 perplexity with its protocol
    python -m engine score --out scores.csv    # all criteria for every head
    python -m engine prune --criterion gradient --budget 0.2 --out mask.json
    python -m engine eval --mask mask.json     # dense vs masked perplexity
    python -m engine generate "What is a transformer?" --mask mask.json
    python -m engine plan --job score          # memory, device layout and time of a long job, before it runs
"""

from __future__ import annotations

import argparse

from engine.cli import distill, dynamic, evaluate, export, plan, quality, routing, scoring
from engine.cli.common import run_command

__all__ = ["main", "build_parser", "GROUPS"]

GROUPS = (evaluate, scoring, export, routing, distill, quality, dynamic, plan)  # each adds its verbs: register(subparsers)


def build_parser(prog: str = "python -m engine", groups: tuple = GROUPS,
                 description: str | None = __doc__) -> argparse.ArgumentParser:
    """The parser with every group's verbs, in `groups` order (the `headlab` command adds its own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in groups:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit 2."""
    return run_command(build_parser().parse_args(argv))
