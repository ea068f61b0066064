"""`python -m headlab eval | generate`: perplexity and greedy text, dense or under a mask file.

    python -m headlab eval                      # dense WikiText-2 perplexity with its protocol
    python -m headlab eval --mask mask.json     # dense vs masked perplexity
    python -m headlab generate "What is a transformer?" --mask mask.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headlab.engine.cli.common import (
    Subparsers,
    add_model_args,
    add_protocol_args,
    load_handle,
    load_mask,
    measure_perplexity,
    print_cost,
    protocol_from_args,
)
from headlab.engine.runtime.evaluate import generate

__all__ = ["register", "cmd_eval", "cmd_generate"]


def cmd_eval(args: argparse.Namespace) -> int:
    """Dense perplexity, and with --mask the masked one and what the mask removes."""
    handle = load_handle(args)
    protocol = protocol_from_args(args)
    mask = load_mask(args.mask, handle)
    dense = measure_perplexity(handle, None, protocol, "dense")
    print(f"dense:  {dense.describe()}")
    result = {"dense": dense.to_dict()}
    if mask is not None:
        masked = measure_perplexity(handle, mask, protocol, "masked")
        print(f"masked: {masked.describe()}  ({masked.perplexity / dense.perplexity:.3f}x dense)")
        print_cost(handle, mask)
        result["masked"] = masked.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy continuation of the prompt, dense or under --mask."""
    handle = load_handle(args)
    mask = load_mask(args.mask, handle)
    print(generate(handle, args.prompt, mask, max_new_tokens=args.max_new_tokens, chat=not args.raw))
    return 0


def register(sub: Subparsers) -> None:
    """Add the eval and generate verbs."""
    p = sub.add_parser("eval", help="perplexity with the pinned protocol, dense and under a mask")
    add_model_args(p)
    add_protocol_args(p)
    p.add_argument("--mask", help="mask JSON written by `prune` or the app")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation, dense or under a mask")
    add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--mask")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=cmd_generate)
