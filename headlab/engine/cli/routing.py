"""`python -m headlab cluster | train-masks | route`: input-dependent pruning from the command line.

    python -m headlab cluster --k 4 --out clusters.json                  # silhouette for k=2..10, purity
    python -m headlab train-masks --clusters clusters.json --remove 8 --out router/ --eval
    python -m headlab route "Write a Python function that reverses a list" --router router/ --generate
    python -m headlab cluster --encoder out/minilm-pruned          # any sentence-transformers folder or hub id
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Callable, Iterator

from tqdm import tqdm

from headlab.engine.cli.common import (
    Subparsers,
    add_model_args,
    count_or_fraction,
    is_main_process,
    load_handle,
    progress_bar,
    say,
)
from headlab.engine.core.handle import ModelHandle
from headlab.engine.models.load import ENCODER_MODEL
from headlab.engine.pruning.softmask import MaskTarget, StepLog, TrainConfig
from headlab.engine.routing.clusters import PROMPT_SOURCES, ClusterRun, cluster_prompts, silhouette_scores
from headlab.engine.routing.embeddings import SentenceEncoder
from headlab.engine.routing.router import (
    DISTANCES,
    ClusterPerplexity,
    Router,
    heldout_perplexity,
    pruned_blocks,
    routed_generate,
    train_router,
)

__all__ = ["register", "cmd_cluster", "cmd_train_masks", "cmd_route"]

ENCODER_HELP = ("sentence encoder: a sentence-transformers folder (with modules.json; a HeadLab export of one "
                "counts), a hub id, or the alias minilm (the shipped all-MiniLM-L6-v2, the default)")


def _encoder(args: argparse.Namespace) -> SentenceEncoder:
    """The --encoder sentence encoder, with one line about it on stderr."""
    t = time.perf_counter()
    enc = SentenceEncoder.load(args.encoder)
    say(f"encoder {enc.name}: {enc.dim}-d sentence embeddings ({time.perf_counter() - t:.1f} s to load)")
    return enc


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default=ENCODER_MODEL, help=ENCODER_HELP)
    p.add_argument("--sources", default=",".join(PROMPT_SOURCES), help="comma-separated prompt sets")
    p.add_argument("--per-source", type=int, default=80, help="at most this many prompts per set (0: all)")
    p.add_argument("--held-out", type=float, default=0.25, help="fraction held out per source and category")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--k", type=int, default=4, help="number of clusters")
    p.add_argument("--seed", type=int, default=0, help="seed of K-means (and of mask training)")


def _cluster(args: argparse.Namespace, enc: SentenceEncoder) -> ClusterRun:
    """Embed and K-means the calibration prompts as the cluster flags say."""
    with progress_bar("embedding prompts") as cb:
        return cluster_prompts(enc, args.k, sources=[s for s in args.sources.split(",") if s],
                               per_source=args.per_source or None, held_out=args.held_out,
                               split_seed=args.split_seed, kmeans_seed=args.seed, progress=cb)


def _print_clusters(run: ClusterRun) -> None:
    pur = run.purity()
    print(f"{len(run.prompts)} training prompts ({len(run.split.held_out)} held out), k = {run.clustering.k}, "
          f"purity against the categories {pur.overall:.3f}")
    print(f"{'cluster':>7}  {'size':>4}  {'majority':<14} {'share':>5}  categories")
    for c, (size, maj, frac, counts) in enumerate(zip(run.clustering.sizes(), pur.majority, pur.majority_fraction,
                                                       pur.counts)):
        cats = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"{c:>7}  {size:>4}  {maj:<14} {frac:>5.2f}  {cats}")


def cmd_cluster(args: argparse.Namespace) -> int:
    """Cluster the prompts, print silhouette and purity, write the clusters file."""
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
def _training_bar() -> Iterator[Callable[[str, StepLog], None]]:
    """A tqdm bar per trained mask, showing loss, expected sparsity and the multipliers."""
    bars: dict[str, tqdm] = {}

    def update(name: str, log: StepLog) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=log.steps, desc=f"mask {name}", unit="step", file=sys.stderr, leave=True,
                                    disable=not is_main_process())  # under torchrun: rank 0's masks
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


def _print_heldout(rows: list[ClusterPerplexity]) -> None:
    print(f"{'cluster':>7}  {'prompts':>7}  {'tokens':>6}  {'dense':>8}  {'static':>8}  {'routed':>8}  routed/static")
    for r in rows:
        name = "all" if r.cluster is None else str(r.cluster)
        static = f"{r.static:8.2f}" if r.static is not None else f"{'-':>8}"
        ratio = f"{r.routed / r.static:.3f}" if r.static else "-"
        print(f"{name:>7}  {r.n_prompts:>7}  {r.n_tokens:>6}  {r.dense:8.2f}  {static}  {r.routed:8.2f}  {ratio}")


def cmd_train_masks(args: argparse.Namespace) -> int:
    """Train one mask per cluster (+ a static one), write the router, optionally its held-out perplexity."""
    heads = None if args.remove_heads is None else count_or_fraction(args.remove_heads)
    target = MaskTarget(blocks=count_or_fraction(args.remove), heads=heads)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         objective=args.objective, lr=args.lr, seed=args.seed, constraint=args.constraint)
    enc = _encoder(args)
    run = ClusterRun.load(args.clusters, enc) if args.clusters else _cluster(args, enc)
    handle = load_handle(args)
    target.removed(handle.geometry)  # fail fast on an impossible budget, before any training
    _print_clusters(run)
    t = time.perf_counter()
    with _training_bar() as cb:
        router = train_router(handle, enc, run.prompts, run.embeddings, run.clustering, target, config,
                              distance=args.distance, static=not args.no_static, progress=cb, world=args.world)
    if not args.world.is_main:  # under torchrun every rank has the router; rank 0 reports and writes it
        return 0
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
    """Print the cluster, distances and mask each prompt routes to; with --generate, the text under it."""
    router = Router.load(args.router)  # a bad folder fails before the slow loads
    enc = _encoder(args)
    handle: ModelHandle | None = None
    if args.generate:
        handle = load_handle(args)
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


def register(sub: Subparsers) -> None:
    """Add the cluster, train-masks and route verbs."""
    p = sub.add_parser("cluster", help="embed the calibration prompts, K-means them, report silhouette and purity")
    _add_cluster_args(p)
    p.add_argument("--no-silhouette", action="store_true", help="skip the silhouette scan over k = 2..10")
    p.add_argument("--out", default="clusters.json", help="clusters file for train-masks ('' to skip)")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("train-masks", help="train one hard-concrete mask per cluster (+ a static one) -> router")
    add_model_args(p)
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
    p.set_defaults(func=cmd_train_masks, data_parallel=True)

    p = sub.add_parser("route", help="which cluster (and mask) a prompt routes to; optionally generate under it")
    add_model_args(p)
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--router", required=True, help="folder written by train-masks")
    p.add_argument("--encoder", default=ENCODER_MODEL, help=ENCODER_HELP + "; the one the router was built with")
    p.add_argument("--generate", action="store_true", help="load the model and generate under the routed mask")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=cmd_route)
