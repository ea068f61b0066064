"""`python -m headlab suggest | diagnose`: masks that keep the model good, and why heads score as they do.

    python -m headlab suggest --budget 0.2 --out mask.json                  # best fast method (+ compensation)
    python -m headlab suggest --budget 0.3 --mode measured                  # iterative, re-measured
    python -m headlab suggest --budget 0.2 --method hardconcrete+comp       # any strategy by name
    python -m headlab suggest --budget 0.27 --ffn 0.27 --method flap        # heads and FFN channels
    python -m headlab suggest --keep 0.8 --route width                      # a parameter budget: the route's best
    python -m headlab suggest --list                                        # every strategy, with its paper
    python -m headlab diagnose --out heads.csv                              # kind and reasons per head
"""

from __future__ import annotations

import argparse
import time

from headlab.engine.cli.common import (
    Subparsers,
    add_calibration_args,
    add_model_args,
    add_protocol_args,
    count_or_fraction,
    load_handle,
    print_cost,
    progress_bar,
    protocol_from_args,
)
from headlab.engine.core.csvfile import write_rows
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.importance.capture import capture
from headlab.engine.importance.diagnostics import diagnose, diagnosis_rows, kind_counts
from headlab.engine.pruning.strategies import (
    MODE_METHODS,
    MODES,
    ROUTES,
    SIZE_METHODS,
    STRATEGIES,
    Budget,
    Calibration,
    get_strategy,
    strategy_names,
    suggest_mask,
    suggest_size,
)
from headlab.engine.pruning.strategies.scores import ablation_scores

__all__ = ["register", "cmd_suggest", "cmd_diagnose"]


def _print_methods() -> None:
    """Every strategy with its description, cost and reference."""
    modes = {m: k for k, m in MODE_METHODS.items()}
    for name in sorted(STRATEGIES):
        cls = STRATEGIES[name]
        comp = " (always compensates)" if cls.always_compensates else "; add +comp for FLAP compensation"
        mode = "".join(f" [--mode {modes[n]} runs {n}]" for n in (name, name + "+comp") if n in modes)
        print(f"{name:>20}  {cls.description}{comp}{mode}\n{'':>22}{cls.cost_hint}; {cls.reference}")


def cmd_suggest(args: argparse.Namespace) -> int:
    """The best mask for --budget by --mode or --method, with cost and perplexity; or --list the strategies."""
    if args.list:
        _print_methods()
        return 0
    if args.keep is not None:
        return _suggest_size(args)
    if args.budget is None:
        raise ValueError("give --budget (a fraction of the heads in [0, 1) or a count), --keep with --route, or --list")
    if args.method:
        get_strategy(args.method)  # fail fast on a typo, before loading anything
    handle = load_handle(args)
    budget = Budget(heads=count_or_fraction(args.budget), ffn=count_or_fraction(args.ffn))
    budget.counts(handle.geometry)
    calib = Calibration.shipped(args.calibration, args.n_texts, max_length=args.max_length, handle=handle)
    t = time.perf_counter()
    with progress_bar(f"suggest ({args.method or args.mode})") as cb:
        mask, info = suggest_mask(handle, budget, mode=args.mode, method=args.method, calib=calib,
                                  protocol=protocol_from_args(args), measure=not args.no_eval, progress=cb)
    mask.meta.update({"model": handle.name, "calibration": args.calibration, "n_texts": args.n_texts})
    print(f"method {info.method} ({info.budget}; {info.calibration}; {time.perf_counter() - t:.0f} s)")
    print_cost(handle, mask)
    if mask.has_bias:
        print("compensation: pruned units replaced by their calibration means (biases stored in the mask file)")
    if info.measured_perplexity is not None:
        pred = (f"predicted {info.predicted_perplexity:.2f}, " if info.predicted_perplexity is not None else "")
        print(f"perplexity: dense {info.dense_perplexity:.2f} -> {pred}measured {info.measured_perplexity:.2f} "
              f"({info.measured_ratio:.2f}x) on {info.protocol}")
    out = mask.save(args.out)
    print(f"wrote mask to {out}")
    return 0


def _suggest_size(args: argparse.Namespace) -> int:
    """--keep K --route R: about K of the parameters by the route's best method, with cost and perplexity."""
    if args.budget is not None or args.method:
        raise ValueError("--keep asks for a parameter budget by --route; drop --budget / --method "
                         "(or drop --keep to choose heads by a method)")
    handle = load_handle(args)
    calib = Calibration.shipped(args.calibration, args.n_texts, max_length=args.max_length, handle=handle)
    t = time.perf_counter()
    with progress_bar(f"suggest ({SIZE_METHODS[args.route]})") as cb:
        mask, info = suggest_size(handle, args.keep, args.route, calib=calib, protocol=protocol_from_args(args),
                                  measure=not args.no_eval, progress=cb)
    mask.meta.update({"model": handle.name, "calibration": args.calibration, "n_texts": args.n_texts})
    print(f"method {info.method} ({info.budget}; {info.calibration}; {time.perf_counter() - t:.0f} s)")
    print_cost(handle, mask)
    if info.measured_perplexity is not None:
        print(f"perplexity: dense {info.dense_perplexity:.2f} -> measured {info.measured_perplexity:.2f} "
              f"({info.measured_ratio:.2f}x) on {info.protocol}")
    out = mask.save(args.out)
    print(f"wrote mask to {out} (re-solved weights beside it); `python -m headlab export --mask {out}` writes the model")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Kind and reasons per head (with --ablation, its mean-ablation KL too), written as CSV."""
    handle = load_handle(args)
    texts = calibration_texts(args.calibration, args.n_texts)
    with progress_bar("capture") as cb:
        stats = capture(handle, texts, gradients=False, batch_size=args.batch_size, max_length=args.max_length,
                        progress=cb)
    ablation = None
    if args.ablation:
        calib = Calibration(texts, max_length=args.max_length, name=args.calibration)
        calib.set_stats(stats)
        with progress_bar("ablation") as cb:
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


def register(sub: Subparsers) -> None:
    """Add the suggest and diagnose verbs."""
    p = sub.add_parser("suggest", help="the best mask for a budget (measured methods, compensation) + perplexity")
    add_model_args(p)
    add_calibration_args(p)
    add_protocol_args(p)
    p.add_argument("--budget", type=float, default=None, help="heads to remove: fraction in [0, 1) or a count")
    p.add_argument("--ffn", type=float, default=0.0, help="FFN channels to remove: fraction or count")
    p.add_argument("--mode", default="fast", choices=MODES,
                   help="fast (one-shot), measured (iterative), optimise, reconstruct (structured OBS)")
    p.add_argument("--keep", type=float, default=None,
                   help="or a parameter budget: keep this fraction of the parameters, by --route")
    p.add_argument("--route", default="width", choices=ROUTES,
                   help=f"with --keep: width ({SIZE_METHODS['width']}) or depth ({SIZE_METHODS['depth']})")
    p.add_argument("--method", default=None, help=f"override the mode: {', '.join(strategy_names(with_comp=True))}")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    p.add_argument("--list", action="store_true", help="list every strategy with its reference, then exit")
    p.add_argument("--out", default="mask.json")
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser("diagnose", help="per head: sink / previous-token / local / broad, and why criteria rank it")
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--ablation", action="store_true", help="also measure each head's mean-ablation KL (minutes)")
    p.add_argument("--out", default="heads_diagnosis.csv")
    p.set_defaults(func=cmd_diagnose)
