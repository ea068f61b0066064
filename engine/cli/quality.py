"""`python -m engine suggest | diagnose`: masks that keep the model good, and why heads score as they do.

    python -m engine suggest --budget 0.2 --out mask.json                  # best fast method (+ compensation)
    python -m engine suggest --budget 0.3 --mode measured                  # iterative, re-measured
    python -m engine suggest --budget 0.2 --method hardconcrete+comp       # any strategy by name
    python -m engine suggest --budget 0.27 --ffn 0.27 --method flap        # heads and FFN channels
    python -m engine suggest --list                                        # every strategy, with its paper
    python -m engine diagnose --out heads.csv                              # kind and reasons per head
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any, Callable, Iterator

from engine.core.csvfile import write_rows

__all__ = ["_build_suggest", "_build_diagnose", "cmd_suggest", "cmd_diagnose"]


@contextlib.contextmanager
def _phased_bar(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A progress(done, total) callback for several phases in a row: a new total starts the bar over."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", file=sys.stderr, leave=False)
    try:
        def update(done: int, total: int) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.n = done
            bar.refresh()

        yield update
    finally:
        bar.close()


def _budget(x: float) -> Any:
    return int(x) if x >= 1 else float(x)


def _print_methods() -> None:
    from engine.pruning.strategies import MODE_METHODS, STRATEGIES

    modes = {m: k for k, m in MODE_METHODS.items()}
    for name in sorted(STRATEGIES):
        cls = STRATEGIES[name]
        comp = " (always compensates)" if cls.always_compensates else "; add +comp for FLAP compensation"
        mode = "".join(f" [--mode {modes[n]} runs {n}]" for n in (name, name + "+comp") if n in modes)
        print(f"{name:>20}  {cls.description}{comp}{mode}\n{'':>22}{cls.cost_hint}; {cls.reference}")


def cmd_suggest(args: argparse.Namespace) -> int:
    from engine.cli.main import _load, _print_cost, _protocol
    from engine.pruning.strategies import Budget, Calibration, get_strategy, suggest_mask

    if args.list:
        _print_methods()
        return 0
    if args.budget is None:
        raise ValueError("give --budget (a fraction of the heads in [0, 1) or a count), or --list")
    if args.method:
        get_strategy(args.method)  # fail fast on a typo, before loading anything
    handle = _load(args)
    budget = Budget(heads=_budget(args.budget), ffn=_budget(args.ffn))
    budget.counts(handle.geometry)
    calib = Calibration.shipped(args.calibration, args.n_texts, max_length=args.max_length)
    t = time.perf_counter()
    with _phased_bar(f"suggest ({args.method or args.mode})") as cb:
        mask, info = suggest_mask(handle, budget, mode=args.mode, method=args.method, calib=calib,
                                  protocol=_protocol(args), measure=not args.no_eval, progress=cb)
    mask.meta.update({"model": handle.name, "calibration": args.calibration, "n_texts": args.n_texts})
    print(f"method {info.method} ({info.budget}; {info.calibration}; {time.perf_counter() - t:.0f} s)")
    _print_cost(handle, mask)
    if mask.has_bias:
        print("compensation: pruned units replaced by their calibration means (biases stored in the mask file)")
    if info.measured_perplexity is not None:
        pred = (f"predicted {info.predicted_perplexity:.2f}, " if info.predicted_perplexity is not None else "")
        print(f"perplexity: dense {info.dense_perplexity:.2f} -> {pred}measured {info.measured_perplexity:.2f} "
              f"({info.measured_ratio:.2f}x) on {info.protocol}")
    out = mask.save(args.out)
    print(f"wrote mask to {out}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from engine.cli.main import _load, progress_bar
    from engine.data.datasets import calibration_texts
    from engine.importance.capture import capture
    from engine.importance.diagnostics import diagnose, diagnosis_rows, kind_counts

    handle = _load(args)
    texts = calibration_texts(args.calibration, args.n_texts)
    with progress_bar("capture") as cb:
        stats = capture(handle, texts, gradients=False, batch_size=args.batch_size, max_length=args.max_length,
                        progress=cb)
    ablation = None
    if args.ablation:
        from engine.pruning.strategies import Calibration
        from engine.pruning.strategies.scores import ablation_scores

        calib = Calibration(texts, max_length=args.max_length, name=args.calibration)
        calib.set_stats(stats)
        with _phased_bar("ablation") as cb:
            ablation, _ = ablation_scores(handle, calib, mean=True, progress=cb)
    d = diagnose(handle, stats, ablation)
    counts = kind_counts(d)
    print(f"{len(d)} heads on {len(texts)} {args.calibration} texts: "
          + ", ".join(f"{n} {k}" for k, n in counts.items()))
    for k in counts:
        heads = [x for x in d if x.kind == k]
        if heads:
            x = heads[0]
            print(f"  e.g. L{x.layer}H{x.head} ({k}): {x.reason}\n      {x.why_entropy}")
    rows = diagnosis_rows(d)
    out = write_rows(rows, args.out)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


def _build_suggest(sub) -> None:
    from engine.cli.main import _add_calibration_args, _add_model_args, _add_protocol_args
    from engine.pruning.strategies import MODES, strategy_names

    p = sub.add_parser("suggest", help="the best mask for a budget (measured methods, compensation) + perplexity")
    _add_model_args(p)
    _add_calibration_args(p)
    _add_protocol_args(p)
    p.add_argument("--budget", type=float, default=None, help="heads to remove: fraction in [0, 1) or a count")
    p.add_argument("--ffn", type=float, default=0.0, help="FFN channels to remove: fraction or count")
    p.add_argument("--mode", default="fast", choices=MODES, help="fast (one-shot), measured (iterative), optimise")
    p.add_argument("--method", default=None, help=f"override the mode: {', '.join(strategy_names(with_comp=True))}")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    p.add_argument("--list", action="store_true", help="list every strategy with its reference, then exit")
    p.add_argument("--out", default="mask.json")
    p.set_defaults(func=cmd_suggest)


def _build_diagnose(sub) -> None:
    from engine.cli.main import _add_calibration_args, _add_model_args

    p = sub.add_parser("diagnose", help="per head: sink / previous-token / local / broad, and why criteria rank it")
    _add_model_args(p)
    _add_calibration_args(p)
    p.add_argument("--ablation", action="store_true", help="also measure each head's mean-ablation KL (minutes)")
    p.add_argument("--out", default="heads_diagnosis.csv")
    p.set_defaults(func=cmd_diagnose)
