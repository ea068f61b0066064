"""`headlab ...` (or `python -m headlab ...` from a checkout): every engine capability from the command line.

    headlab eval                      # dense WikiText-2 perplexity with its protocol
    headlab score --out scores.csv    # all criteria for every head
    headlab prune --criterion gradient --budget 0.2 --out mask.json
    headlab eval --mask mask.json     # dense vs masked perplexity
    headlab generate "What is a transformer?" --mask mask.json
    headlab plan --job score          # memory, device layout and time of a long job, before it runs
"""

from __future__ import annotations

import argparse

from headlab.engine.cli import distill, dynamic, evaluate, export, plan, quality, routing, scoring
from headlab.engine.cli.common import run_command

__all__ = ["main", "build_parser", "GROUPS"]

GROUPS = (evaluate, scoring, export, routing, distill, quality, dynamic, plan)  # each adds its verbs: register(subparsers)


def build_parser(prog: str = "headlab", groups: tuple = GROUPS,
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
