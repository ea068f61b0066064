"""`python -m engine cluster | train-masks | route`: input-dependent pruning from the command line.

    python -m engine cluster --k 4 --out clusters.json                  # silhouette for k=2..10, purity
    python -m engine train-masks --clusters clusters.json --remove 8 --out router/ --eval
    python -m engine route "Write a Python function that reverses a list" --router router/ --generate
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any, Callable, Iterator

__all__ = ["_build_cluster", "_build_train_masks", "_build_route", "cmd_cluster", "cmd_train_masks", "cmd_route"]


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _encoder(args: argparse.Namespace):
    from engine.routing.embeddings import SentenceEncoder

    t = time.perf_counter()
    enc = SentenceEncoder.load(args.encoder)
    _err(f"encoder {enc.name}: {enc.dim}-d sentence embeddings ({time.perf_counter() - t:.1f} s to load)")
    return enc


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    from engine.routing.clusters import PROMPT_SOURCES

    p.add_argument("--encoder", default="minilm", help="sentence encoder (alias or folder of a BERT-style model)")
    p.add_argument("--sources", default=",".join(PROMPT_SOURCES), help="comma-separated prompt sets")
    p.add_argument("--per-source", type=int, default=80, help="at most this many prompts per set (0: all)")
    p.add_argument("--held-out", type=float, default=0.25, help="fraction held out per source and category")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--k", type=int, default=4, help="number of clusters")
    p.add_argument("--seed", type=int, default=0, help="seed of K-means (and of mask training)")


def _cluster(args: argparse.Namespace, enc) -> Any:
    from engine.cli.main import progress_bar
    from engine.routing.clusters import cluster_prompts

    with progress_bar("embedding prompts") as cb:
        return cluster_prompts(enc, args.k, sources=[s for s in args.sources.split(",") if s],
                               per_source=args.per_source or None, held_out=args.held_out,
                               split_seed=args.split_seed, kmeans_seed=args.seed, progress=cb)


def _print_clusters(run) -> None:
    pur = run.purity()
    print(f"{len(run.prompts)} training prompts ({len(run.split.held_out)} held out), k = {run.clustering.k}, "
          f"purity against the categories {pur.overall:.3f}")
    print(f"{'cluster':>7}  {'size':>4}  {'majority':<14} {'share':>5}  categories")
    for c, (size, maj, frac, counts) in enumerate(zip(run.clustering.sizes(), pur.majority, pur.majority_fraction,
                                                       pur.counts)):
        cats = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"{c:>7}  {size:>4}  {maj:<14} {frac:>5.2f}  {cats}")


def cmd_cluster(args: argparse.Namespace) -> int:
    from engine.routing.clusters import silhouette_scores

    enc = _encoder(args)
    run = _cluster(args, enc)
    if not args.no_silhouette:
        scores = silhouette_scores(run.embeddings, range(2, 11), args.seed)
        best = max(scores, key=scores.get)
        print("silhouette (cosine) by k: " + "  ".join(f"k={k}: {s:.3f}" for k, s in scores.items())
              + f"   (best k = {best})")
    _print_clusters(run)
    if args.out:
        print(f"wrote {run.save(args.out)}")
    return 0


@contextlib.contextmanager
def _training_bar() -> Iterator[Callable[[str, Any], None]]:
    """A tqdm bar per trained mask, showing loss, expected sparsity and the multipliers."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(name: str, log) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=log.steps, desc=f"mask {name}", unit="step", file=sys.stderr, leave=True)
        bar.n = log.step
        sparsity = " ".join(f"{k} {v:.3f}->{log.target_sparsity[k]:.3f}" for k, v in log.expected_sparsity.items())
        bar.set_postfix_str(f"KL/LM {log.objective:.3f} sparsity {sparsity}", refresh=True)
        if log.step == log.steps:
            bars.pop(name).close()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def _print_heldout(rows) -> None:
    print(f"{'cluster':>7}  {'prompts':>7}  {'tokens':>6}  {'dense':>8}  {'static':>8}  {'routed':>8}  routed/static")
    for r in rows:
        name = "all" if r.cluster is None else str(r.cluster)
        static = f"{r.static:8.2f}" if r.static is not None else f"{'-':>8}"
        ratio = f"{r.routed / r.static:.3f}" if r.static else "-"
        print(f"{name:>7}  {r.n_prompts:>7}  {r.n_tokens:>6}  {r.dense:8.2f}  {static}  {r.routed:8.2f}  {ratio}")


def cmd_train_masks(args: argparse.Namespace) -> int:
    from engine.cli.main import _load, progress_bar
    from engine.pruning.softmask import MaskTarget, TrainConfig
    from engine.routing.clusters import ClusterRun
    from engine.routing.router import heldout_perplexity, pruned_blocks, train_router

    def count(x: float | None) -> int | float | None:
        return None if x is None else (int(x) if x >= 1 else float(x))

    target = MaskTarget(blocks=count(args.remove), heads=count(args.remove_heads))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         objective=args.objective, lr=args.lr, seed=args.seed, constraint=args.constraint)
    enc = _encoder(args)
    run = ClusterRun.load(args.clusters, enc) if args.clusters else _cluster(args, enc)
    handle = _load(args)
    target.removed(handle.geometry)  # fail fast on an impossible budget, before any training
    _print_clusters(run)
    t = time.perf_counter()
    with _training_bar() as cb:
        router = train_router(handle, enc, run.prompts, run.embeddings, run.clustering, target, config,
                              distance=args.distance, static=not args.no_static, progress=cb)
    router.meta["clusters"] = {"settings": run.settings, "held_out_keys": [p.key for p in run.split.held_out]}
    print(f"trained {router.k + (router.static_mask is not None)} masks, {args.steps} steps each, "
          f"in {time.perf_counter() - t:.0f} s")
    for c, m in enumerate(router.masks):
        print(f"cluster {c}: removes {', '.join(pruned_blocks(m)) or 'no sub-block'}")
    if router.static_mask is not None:
        print(f"static:    removes {', '.join(pruned_blocks(router.static_mask)) or 'no sub-block'}")
    written = router.export(args.out)
    print(f"wrote {len(written)} files to {args.out} (router.safetensors, router.json, masks/*.json)")
    if args.eval:
        with progress_bar("held-out perplexity") as cb:
            rows = heldout_perplexity(handle, router, enc, run.split.held_out, max_length=args.max_length,
                                      progress=cb)
        print(f"held-out prompts, token-weighted perplexity per routed cluster "
              f"(texts cut at {args.max_length} tokens):")
        _print_heldout(rows)
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from engine.routing.router import Router, pruned_blocks, routed_generate

    router = Router.load(args.router)  # a bad folder fails before the slow loads
    enc = _encoder(args)
    handle = None
    if args.generate:
        from engine.cli.main import _load

        handle = _load(args)
        router = Router.load(args.router, handle.geometry)
    for route in router.route(enc, args.prompts):
        dist = ", ".join(f"{d:.3f}" for d in route.distances)
        maj = router.meta.get("purity", {}).get("majority", [])
        label = f" (mostly {maj[route.cluster]})" if route.cluster < len(maj) else ""
        print(f"prompt: {route.text[:80]!r}")
        print(f"  cluster {route.cluster}{label}; {router.distance} distances to the pool: [{dist}]")
        print(f"  pruned: {', '.join(pruned_blocks(route.mask)) or 'nothing'}")
        if route.notice:
            print(f"  note: {route.notice}")
        if handle is not None:
            out = routed_generate(handle, router, enc, route.text, max_new_tokens=args.max_new_tokens)
            for n in out.notices[1 if route.notice else 0 :]:
                print(f"  note: {n}")
            print(f"  generation: {out.text.strip() or '(whitespace only)'}")
    return 0


def _build_cluster(sub) -> None:
    p = sub.add_parser("cluster", help="embed the calibration prompts, K-means them, report silhouette and purity")
    _add_cluster_args(p)
    p.add_argument("--no-silhouette", action="store_true", help="skip the silhouette scan over k = 2..10")
    p.add_argument("--out", default="clusters.json", help="clusters file for train-masks ('' to skip)")
    p.set_defaults(func=cmd_cluster)


def _build_train_masks(sub) -> None:
    from engine.cli.main import _add_model_args
    from engine.routing.router import DISTANCES

    p = sub.add_parser("train-masks", help="train one hard-concrete mask per cluster (+ a static one) -> router")
    _add_model_args(p)
    _add_cluster_args(p)
    p.add_argument("--clusters", help="clusters file from `cluster` (default: cluster now with --k etc.)")
    p.add_argument("--remove", type=float, default=8, help="ATTN/FFN sub-blocks to remove: count or fraction")
    p.add_argument("--remove-heads", type=float, default=None, help="also gate heads: count or fraction to remove")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128, help="tokens per training text")
    p.add_argument("--objective", default="kl", choices=["kl", "lm"], help="KL to the dense model, or LM loss")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the gates' log_alpha")
    p.add_argument("--constraint", default="lagrangian", choices=["lagrangian", "project"],
                   help="lagrangian: the multipliers (a soft pull in short runs; the final top-k is exact); "
                        "project: hold the expected sparsity at the target every step (docs/router.md)")
    p.add_argument("--distance", default="euclidean", choices=DISTANCES)
    p.add_argument("--no-static", action="store_true", help="skip the static (all-data) baseline mask")
    p.add_argument("--eval", action="store_true", help="held-out perplexity: dense, static and routed")
    p.add_argument("--out", default="router", help="output folder")
    p.set_defaults(func=cmd_train_masks)


def _build_route(sub) -> None:
    from engine.cli.main import _add_model_args

    p = sub.add_parser("route", help="which cluster (and mask) a prompt routes to; optionally generate under it")
    _add_model_args(p)
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--router", required=True, help="folder written by train-masks")
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--generate", action="store_true", help="load the model and generate under the routed mask")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=cmd_route)
