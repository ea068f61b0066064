"""`python -m headlab score | prune`: every criterion for every head, and a criterion + budget -> mask file.

    python -m headlab score --out scores.csv    # all criteria for every head
    python -m headlab prune --criterion gradient --budget 0.2 --out mask.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from headlab.engine.cli.common import (
    Subparsers,
    add_calibration_args,
    add_model_args,
    add_protocol_args,
    calibration_from_args,
    count_or_fraction,
    load_handle,
    measure_perplexity,
    print_cost,
    progress_bar,
    protocol_from_args,
)
from headlab.engine.core.csvfile import write_rows
from headlab.engine.core.files import write_atomic_text
from headlab.engine.core.handle import ModelHandle
from headlab.engine.importance.capture import CaptureStats
from headlab.engine.importance.criteria import Scores
from headlab.engine.importance.registry import criterion_names, get_criterion, score
from headlab.engine.pruning.select import SCOPES, select

__all__ = ["register", "cmd_score", "cmd_prune", "score_table", "SCORE_COLUMNS"]

SCORE_COLUMNS = ("entropy", "entropy_normalized", "sink", "self_mass", "prev_mass", "local_mass", "mean_distance")


def score_table(handle: ModelHandle, scores: dict[str, Scores], stats: CaptureStats | None) -> list[dict[str, Any]]:
    """One row per head: every criterion's importance plus the attention statistics."""
    g = handle.geometry
    rows = []
    for layer in range(g.n_layers):
        for head in range(g.n_heads):
            row: dict[str, Any] = {"layer": layer, "head": head, "kv_head": g.kv_head_of(head)}
            for name, s in scores.items():
                if s.heads is not None:
                    row[f"{name}_importance"] = float(s.heads[layer, head])
            if stats is not None:
                for col in SCORE_COLUMNS:
                    row[col] = float(getattr(stats, col)[layer, head])
            rows.append(row)
    return rows


def cmd_score(args: argparse.Namespace) -> int:
    """Score every head with --criteria and write the table (CSV, or JSON by the suffix).

    Under torchrun the capture splits the texts and ablation the heads across the ranks (docs/scale.md);
    rank 0 writes the table once every rank has finished its share.
    """
    handle = load_handle(args)
    texts = calibration_from_args(args, handle).texts
    criteria = args.criteria.split(",")
    t = time.perf_counter()
    with progress_bar("scoring") as cb:
        scores, stats = score(handle, texts, criteria, progress=cb, batch_size=args.batch_size,
                              max_length=args.max_length, world=args.world)
    if not args.world.is_main:
        return 0
    rows = score_table(handle, scores, stats)
    out = Path(args.out)
    if out.suffix == ".json":
        write_atomic_text(out, json.dumps({"model": handle.name, "calibration": args.calibration,
                                           "n_texts": len(texts), "rows": rows}, indent=1))
    else:
        write_rows(rows, out)
    g = handle.geometry
    print(f"wrote {len(rows)} heads ({g.n_layers} layers x {g.n_heads} heads) x {len(criteria)} criteria to {out} "
          f"({len(texts)} {args.calibration} texts, {stats.n_tokens if stats else 0} tokens, "
          f"{time.perf_counter() - t:.1f} s)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Score with --criterion, select --budget units, report cost and perplexity, write the mask."""
    handle = load_handle(args)
    get_criterion(args.criterion)  # fail fast on a typo, before the slow pass
    budget = count_or_fraction(args.budget)
    texts = calibration_from_args(args, handle).texts
    with progress_bar(f"scoring ({args.criterion})") as cb:
        scores, _ = score(handle, texts, [args.criterion], progress=cb, batch_size=args.batch_size,
                          max_length=args.max_length)
    mask = select(handle.geometry, scores[args.criterion], budget, unit=args.unit, scope=args.scope,
                  kv_groups=args.kv_groups)
    mask.meta.update({"model": handle.name, "calibration": args.calibration, "n_texts": len(texts)})
    print_cost(handle, mask)
    if handle.is_causal_lm and not args.no_eval:
        protocol = protocol_from_args(args)
        dense = measure_perplexity(handle, None, protocol, "dense")
        pruned = measure_perplexity(handle, mask, protocol, "pruned")
        on = pruned.protocol.describe(pruned.tokenizer, pruned.n_tokens)
        mask.meta["perplexity"] = {"dense": dense.perplexity, "pruned": pruned.perplexity, "protocol": on}
        print(f"perplexity: dense {dense.perplexity:.2f} -> pruned {pruned.perplexity:.2f} "
              f"({pruned.perplexity / dense.perplexity:.2f}x) on {on}")
    out = mask.save(args.out)
    print(f"wrote mask to {out}")
    return 0


def register(sub: Subparsers) -> None:
    """Add the score and prune verbs."""
    p = sub.add_parser("score", help="score every head with several criteria (CSV or JSON)")
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--criteria", default="entropy,magnitude,gradient,activation",
                   help=f"comma-separated, from: {', '.join(criterion_names())}")
    p.add_argument("--out", default="scores.csv", help="output file (.csv or .json)")
    p.set_defaults(func=cmd_score, data_parallel=True)

    p = sub.add_parser("prune", help="criterion + budget -> mask file + perplexity")
    add_model_args(p)
    add_calibration_args(p)
    add_protocol_args(p)
    p.add_argument("--criterion", default="gradient", help=f"one of: {', '.join(criterion_names())}")
    p.add_argument("--budget", type=float, default=0.2, help="fraction in [0, 1) or a count >= 1")
    p.add_argument("--unit", default="heads", choices=["heads", "ffn", "blocks"])
    p.add_argument("--scope", default="global", choices=[s for s in SCOPES if s != "per_layer"])
    p.add_argument("--kv-groups", action="store_true", help="prune whole GQA groups")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    p.add_argument("--out", default="mask.json")
    p.set_defaults(func=cmd_prune)
