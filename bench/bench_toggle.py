"""Toggle-to-perplexity latency with the prefix cache vs a full recompute, on the default model.

    python bench/bench_toggle.py [--model NAME] [--toggles 16] [--windows 2] [--window 256] [--threads N]

A simulated user toggles one head at a time in a random layer (the mask accumulates, as
in the app). For each toggle both paths run in the same process, alternately, on the
same windows and the same mask:
- full:   engine.evaluate.perplexity (embeddings, every layer, LM head);
- prefix: PrefixCache.perplexity (layers l..L-1 from cached inputs, LM head).
The table gives per-toggle timings and the median ratio prefix / full (goal <= 0.6).
The LM head runs in both paths, so the ratio cannot fall below its share of a full pass.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from engine.evaluate import perplexity  # noqa: E402
from engine.masks import PruneMask  # noqa: E402
from engine.model import load_model  # noqa: E402
from engine.prefix_cache import LIVE_WINDOW, LIVE_WINDOWS, PrefixCache, live_protocol  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="alias, folder or hub id (default: the shipped SmolLM2)")
    ap.add_argument("--toggles", type=int, default=16)
    ap.add_argument("--windows", type=int, default=LIVE_WINDOWS)
    ap.add_argument("--window", type=int, default=LIVE_WINDOW)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    handle = load_model(args.model)
    g = handle.geometry
    protocol = live_protocol(handle, n_windows=args.windows, window=args.window)
    cache = PrefixCache(handle, protocol)
    t = time.perf_counter()
    dense = cache.perplexity(None)
    build_s = time.perf_counter() - t
    print(f"model {handle.name}: {g.n_layers} layers x {g.n_heads} heads; torch threads {torch.get_num_threads()}")
    print(f"protocol: {protocol.describe(handle.name, dense.n_tokens)}")
    print(f"cache build (one full pass, dense): {build_s:.2f} s, perplexity {dense.perplexity:.3f}")
    perplexity(handle, None, protocol)  # warm the full path too

    rng = random.Random(args.seed)
    mask = PruneMask.dense(g)
    rows = []
    header = ("toggle", "layer", "head", "prefix s", "full s", "ratio", "ppl", "|diff|")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (6, 5, 4, 9, 8, 6, 10, 8))))
    for i in range(args.toggles):
        layer, head = rng.randrange(g.n_layers), rng.randrange(g.n_heads)
        mask = mask.toggle_head(layer, head)
        if mask.heads_effective().sum() == 0:
            mask = mask.toggle_head(layer, head)
            continue
        t = time.perf_counter()
        fast = cache.perplexity(mask)
        prefix_s = time.perf_counter() - t
        t = time.perf_counter()
        full = perplexity(handle, mask, protocol)
        full_s = time.perf_counter() - t
        diff = abs(fast.perplexity - full.perplexity)
        rows.append((prefix_s, full_s))
        print(f"{i:>6} {layer:>5} {head:>4} {prefix_s:>9.3f} {full_s:>8.3f} {prefix_s / full_s:>6.2f} "
              f"{fast.perplexity:>10.3f} {diff:>8.1e}")

    med_prefix = statistics.median(r[0] for r in rows)
    med_full = statistics.median(r[1] for r in rows)
    print("\n| path | median toggle-to-perplexity (s) | ratio vs full |")
    print("|---|---|---|")
    print(f"| full recompute (engine.evaluate.perplexity) | {med_full:.3f} | 1.00 |")
    print(f"| prefix cache (layers l..L-1) | {med_prefix:.3f} | {med_prefix / med_full:.2f} |")
    print(f"\nmedian ratio of per-toggle timings: {statistics.median(p / f for p, f in rows):.2f} (goal <= 0.6); "
          f"cache holds {len(cache)} masks, {cache.nbytes / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
