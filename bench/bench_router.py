"""Routed (per-cluster) masks vs one static mask at equal sparsity, on held-out prompts.

    python bench/bench_router.py                       # default model, k = 4, remove 4 and 8 of 60 sub-blocks
    python bench/bench_router.py --steps 20 --remove 8 # quicker

For each number of removed ATTN/FFN sub-blocks: one hard-concrete mask is trained per K-means
cluster of the training prompts and one static mask on all of them (same steps, same
budget, KL to the dense model). Held-out prompts are routed to their nearest centroid and
scored (token-weighted perplexity of their score texts, see headlab/engine/routing/clusters.py) dense,
under the static mask and under their routed mask. Then the routing overhead: one encoder
call per prompt against one forward of the pruned model over the same prompt.
Timings on a shared CPU are noisy; the ratios in one process are what to compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from headlab.engine.core import gates
from headlab.engine.core.objective import token_logits
from headlab.engine.core.tokens import encode_batch
from headlab.engine.models.load import load_model
from headlab.engine.pruning.softmask import MaskTarget, TrainConfig
from headlab.engine.routing.clusters import cluster_prompts
from headlab.engine.routing.embeddings import SentenceEncoder
from headlab.engine.routing.router import heldout_perplexity, pruned_blocks, train_router


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(rows, removed: int, total: int) -> str:
    lines = [f"removed {removed}/{total} sub-blocks",
             "| cluster | majority category | held-out prompts | tokens | dense | static | routed | routed/static |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = "**all**" if r["cluster"] is None else str(r["cluster"])
        lines.append(f"| {name} | {r['majority']} | {r['n_prompts']} | {r['n_tokens']} | {r['dense']:.2f} | "
                     f"{r['static']:.2f} | {r['routed']:.2f} | {r['routed'] / r['static']:.3f} |")
    return "\n".join(lines)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def routing_overhead(handle, encoder, router, prompts, n: int) -> dict:
    """Median encoder call vs median pruned-model forward, per prompt (batch of one each)."""
    enc_t, fwd_t = [], []
    for p in prompts[:n]:
        mask = router.route(encoder, p.text)[0].mask
        enc_t.append(median_seconds(lambda text=p.text: encoder.encode([text]), 3))
        ids, attn = encode_batch(handle.tokenizer, [p.text], 512, handle.device)

        def forward(mask=mask, ids=ids, attn=attn):
            with torch.no_grad(), gates.apply(handle, mask):
                token_logits(handle, ids, attn)

        fwd_t.append(median_seconds(forward, 3))
    enc, fwd = statistics.median(enc_t), statistics.median(fwd_t)
    return {"prompts": len(enc_t), "encoder_s": enc, "pruned_forward_s": fwd, "fraction": enc / fwd}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--remove", default="4,8", help="comma-separated sub-block counts to remove")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--per-source", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--overhead-prompts", type=int, default=20)
    ap.add_argument("--json", help="also write every number to this file")
    ap.add_argument("--save-routers", help="folder to export the trained routers into")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    handle = load_model(args.model)
    encoder = SentenceEncoder.load()
    run = cluster_prompts(encoder, args.k, per_source=args.per_source, kmeans_seed=args.seed)
    pur = run.purity()
    total = 2 * handle.geometry.n_layers
    log(f"{len(run.prompts)} training / {len(run.split.held_out)} held-out prompts; k = {args.k}; "
        f"sizes {run.clustering.sizes()}; majority {pur.majority}; purity {pur.overall:.3f}")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    results = {"model": handle.name, "k": args.k, "train": config.to_dict(), "cluster_sizes": run.clustering.sizes(),
               "majority": list(pur.majority), "purity": pur.overall, "n_train": len(run.prompts),
               "n_held_out": len(run.split.held_out), "runs": []}
    tables = []
    router = None
    for removed in [int(x) for x in args.remove.split(",")]:
        t = time.perf_counter()

        def progress(name, step_log, removed=removed):
            if step_log.step % 10 == 0 or step_log.step == step_log.steps:
                s = step_log.expected_sparsity["blocks"]
                log(f"  [{removed} removed] mask {name}: step {step_log.step}/{step_log.steps} "
                    f"KL {step_log.objective:.3f} expected sparsity {s:.3f} (target {removed / total:.3f})")

        router = train_router(handle, encoder, run.prompts, run.embeddings, run.clustering,
                              MaskTarget(blocks=removed), config, progress=progress)
        train_s = time.perf_counter() - t
        if args.save_routers:
            router.export(Path(args.save_routers) / f"remove{removed}")
        rows = heldout_perplexity(handle, router, encoder, run.split.held_out, max_length=args.max_length)
        rows = [{**r.to_dict(), "majority": "(all)" if r.cluster is None else pur.majority[r.cluster]} for r in rows]
        masks = {f"cluster {c}": pruned_blocks(m) for c, m in enumerate(router.masks)}
        masks["static"] = pruned_blocks(router.static_mask)
        results["runs"].append({"removed": removed, "train_seconds": train_s, "rows": rows, "masks": masks})
        tables.append(table(rows, removed, total))
        print(tables[-1])
        for name, blocks in masks.items():
            print(f"  {name}: {', '.join(blocks)}")
        print(flush=True)

    overhead = routing_overhead(handle, encoder, router, run.split.held_out, args.overhead_prompts)
    results["overhead"] = overhead
    results["seconds"] = time.perf_counter() - start
    print(f"routing overhead: encoder {overhead['encoder_s'] * 1e3:.1f} ms vs pruned forward "
          f"{overhead['pruned_forward_s'] * 1e3:.1f} ms per prompt (median of {overhead['prompts']} held-out "
          f"prompts, batch 1, {args.threads} threads) = {100 * overhead['fraction']:.1f}% of the forward")
    print(f"settings: {args.steps} steps x batch {args.batch_size} x {args.max_length} tokens per mask, "
          f"KL to dense; total {results['seconds'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
