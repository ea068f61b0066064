"""`python -m engine ...`: every engine capability from the command line.

    python -m engine eval                      # dense WikiText-2 perplexity with its protocol
    python -m engine score --out scores.csv    # all criteria for every head
    python -m engine prune --criterion gradient --budget 0.2 --out mask.json
    python -m engine eval --mask mask.json     # dense vs masked perplexity
    python -m engine generate "What is a transformer?" --mask mask.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.core.csvfile import write_rows
from engine.core.handle import ModelHandle

__all__ = ["main", "build_parser", "COMMANDS"]


@contextlib.contextmanager
def progress_bar(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="alias (smollm2-135m-instruct, minilm), local HF folder or hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_protocol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--windows", type=int, default=12, help="number of evaluation windows")


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    from engine.data.datasets import CALIBRATION_SETS

    p.add_argument("--calibration", default="wikitext", choices=CALIBRATION_SETS)
    p.add_argument("--n-texts", type=int, default=32, help="number of calibration texts")
    p.add_argument("--max-length", type=int, default=256, help="tokens per calibration text")
    p.add_argument("--batch-size", type=int, default=4)


def _load(args: argparse.Namespace):
    import torch

    from engine.models.load import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    handle = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    g = handle.geometry
    print(
        f"model {handle.name}: {handle.adapter.family}, {g.n_layers} layers x {g.n_heads} heads "
        f"({g.n_kv_heads} KV heads), FFN {g.ffn_dim} ({time.perf_counter() - t:.1f} s to load)",
        file=sys.stderr,
    )
    return handle


def _protocol(args: argparse.Namespace):
    from engine.runtime.evaluate import PerplexityProtocol

    return PerplexityProtocol(window=args.window, stride=args.stride, n_windows=args.windows)


def _load_mask(path: str | None, handle: ModelHandle):
    from engine.core.mask import PruneMask

    return None if path is None else PruneMask.load(path, handle.geometry)


def _print_cost(handle: ModelHandle, mask) -> None:
    from engine.runtime.cost import cost

    c = cost(handle, mask)
    s = mask.summary()
    print(
        f"pruned: {s['heads_pruned']}/{s['heads_total']} heads, {s['ffn_channels_pruned']}/{s['ffn_channels_total']} "
        f"FFN channels, {s['attn_blocks_pruned']} ATTN + {s['ffn_blocks_pruned']} FFN sub-blocks; "
        f"parameters {c.params_kept:,}/{c.params_total:,} ({100 * c.params_removed_fraction:.1f}% removed), "
        f"FLOPs/token {100 * c.flops_removed_fraction:.1f}% removed"
    )


def _ppl(handle: ModelHandle, mask, protocol, label: str):
    from engine.runtime.evaluate import perplexity

    with progress_bar(f"perplexity ({label})") as cb:
        return perplexity(handle, mask, protocol, progress=cb)


def cmd_eval(args: argparse.Namespace) -> int:
    handle = _load(args)
    protocol = _protocol(args)
    mask = _load_mask(args.mask, handle)
    dense = _ppl(handle, None, protocol, "dense")
    print(f"dense:  {dense.describe()}")
    result = {"dense": dense.to_dict()}
    if mask is not None:
        masked = _ppl(handle, mask, protocol, "masked")
        print(f"masked: {masked.describe()}  ({masked.perplexity / dense.perplexity:.3f}x dense)")
        _print_cost(handle, mask)
        result["masked"] = masked.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


SCORE_COLUMNS = ("entropy", "entropy_normalized", "sink", "self_mass", "prev_mass", "local_mass", "mean_distance")


def score_table(handle: ModelHandle, scores: dict, stats) -> list[dict[str, Any]]:
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
    from engine.data.datasets import calibration_texts
    from engine.importance.criteria import score

    handle = _load(args)
    texts = calibration_texts(args.calibration, args.n_texts)
    criteria = args.criteria.split(",")
    t = time.perf_counter()
    with progress_bar("scoring") as cb:
        scores, stats = score(handle, texts, criteria, progress=cb, batch_size=args.batch_size,
                              max_length=args.max_length)
    rows = score_table(handle, scores, stats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(json.dumps({"model": handle.name, "calibration": args.calibration,
                                   "n_texts": len(texts), "rows": rows}, indent=1))
    else:
        write_rows(rows, out)
    g = handle.geometry
    print(f"wrote {len(rows)} heads ({g.n_layers} layers x {g.n_heads} heads) x {len(criteria)} criteria to {out} "
          f"({len(texts)} {args.calibration} texts, {stats.n_tokens if stats else 0} tokens, "
          f"{time.perf_counter() - t:.1f} s)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from engine.data.datasets import calibration_texts
    from engine.importance.criteria import get_criterion, score
    from engine.pruning.select import select

    handle = _load(args)
    get_criterion(args.criterion)  # fail fast on a typo, before the slow pass
    budget: Any = int(args.budget) if args.budget >= 1 else float(args.budget)
    texts = calibration_texts(args.calibration, args.n_texts)
    with progress_bar(f"scoring ({args.criterion})") as cb:
        scores, _ = score(handle, texts, [args.criterion], progress=cb, batch_size=args.batch_size,
                          max_length=args.max_length)
    mask = select(handle.geometry, scores[args.criterion], budget, unit=args.unit, scope=args.scope,
                  kv_groups=args.kv_groups)
    mask.meta.update({"model": handle.name, "calibration": args.calibration, "n_texts": len(texts)})
    _print_cost(handle, mask)
    if handle.is_causal_lm and not args.no_eval:
        protocol = _protocol(args)
        dense = _ppl(handle, None, protocol, "dense")
        pruned = _ppl(handle, mask, protocol, "pruned")
        mask.meta["perplexity"] = {"dense": dense.perplexity, "pruned": pruned.perplexity,
                                   "protocol": pruned.protocol.describe(pruned.tokenizer, pruned.n_tokens)}
        print(f"perplexity: dense {dense.perplexity:.2f} -> pruned {pruned.perplexity:.2f} "
              f"({pruned.perplexity / dense.perplexity:.2f}x) on {pruned.protocol.describe(pruned.tokenizer, pruned.n_tokens)}")
    out = mask.save(args.out)
    print(f"wrote mask to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.runtime.evaluate import generate

    handle = _load(args)
    mask = _load_mask(args.mask, handle)
    print(generate(handle, args.prompt, mask, max_new_tokens=args.max_new_tokens, chat=not args.raw))
    return 0


def _build_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity with the pinned protocol, dense and under a mask")
    _add_model_args(p)
    _add_protocol_args(p)
    p.add_argument("--mask", help="mask JSON written by `prune` or the app")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)


def _build_score(sub) -> None:
    from engine.importance.criteria import criterion_names

    p = sub.add_parser("score", help="score every head with several criteria (CSV or JSON)")
    _add_model_args(p)
    _add_calibration_args(p)
    p.add_argument("--criteria", default="entropy,magnitude,gradient,activation",
                   help=f"comma-separated, from: {', '.join(criterion_names())}")
    p.add_argument("--out", default="scores.csv", help="output file (.csv or .json)")
    p.set_defaults(func=cmd_score)


def _build_prune(sub) -> None:
    from engine.importance.criteria import criterion_names
    from engine.pruning.select import SCOPES

    p = sub.add_parser("prune", help="criterion + budget -> mask file + perplexity")
    _add_model_args(p)
    _add_calibration_args(p)
    _add_protocol_args(p)
    p.add_argument("--criterion", default="gradient", help=f"one of: {', '.join(criterion_names())}")
    p.add_argument("--budget", type=float, default=0.2, help="fraction in [0, 1) or a count >= 1")
    p.add_argument("--unit", default="heads", choices=["heads", "ffn", "blocks"])
    p.add_argument("--scope", default="global", choices=[s for s in SCOPES if s != "per_layer"])
    p.add_argument("--kv-groups", action="store_true", help="prune whole GQA groups")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    p.add_argument("--out", default="mask.json")
    p.set_defaults(func=cmd_prune)


def _build_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation, dense or under a mask")
    _add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--mask")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=cmd_generate)


COMMANDS: list[Callable[[Any], None]] = [_build_eval, _build_score, _build_prune, _build_generate]

from engine.cli.export import _build_export  # noqa: E402  (its module reuses the helpers above)

COMMANDS.append(_build_export)

from engine.cli.routing import _build_cluster, _build_route, _build_train_masks  # noqa: E402

COMMANDS += [_build_cluster, _build_train_masks, _build_route]

from engine.cli.distill import _build_distill  # noqa: E402

COMMANDS.append(_build_distill)

from engine.cli.quality import _build_diagnose, _build_suggest  # noqa: E402

COMMANDS += [_build_suggest, _build_diagnose]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for build in COMMANDS:
        build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit 2."""
    from engine.core.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
