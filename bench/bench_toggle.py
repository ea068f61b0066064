"""Toggle-to-perplexity latency with the prefix cache vs a full recompute, on the default model.

    python bench/bench_toggle.py [--model NAME] [--toggles 16] [--windows 2] [--window 256] [--threads N]

A simulated user toggles one head at a time in a random layer (the mask accumulates, as
in the app). For each toggle every path runs in the same process, one after the other,
on the same windows and the same mask:
- prefix:  PrefixCache.perplexity (layers l..L-1 from cached inputs under the gate hooks, LM head);
- full:    headlab.engine.runtime.evaluate.perplexity(..., use_kernels=False): the whole model under the same
           gate hooks (the same arithmetic; the baseline of the goal);
- kernels: headlab.engine.runtime.evaluate.perplexity as the CLI runs it (hard masks on Llama-family models
           go through the masked kernels).
The table gives per-toggle timings and the median ratio prefix / full (goal <= 0.6).
The LM head runs in every path, so the ratio cannot fall below its share of a full pass.
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

from headlab.engine.core.mask import PruneMask  # noqa: E402
from headlab.engine.models.load import load_model  # noqa: E402
from headlab.engine.runtime.evaluate import perplexity  # noqa: E402
from headlab.engine.runtime.prefix_cache import LIVE_WINDOW, LIVE_WINDOWS, PrefixCache, live_protocol  # noqa: E402


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
    perplexity(handle, None, protocol, use_kernels=False)  # warm the full paths too
    perplexity(handle, PruneMask.dense(g).toggle_head(0, 0), protocol)

    rng = random.Random(args.seed)
    mask = PruneMask.dense(g)
    rows = []
    header = ("toggle", "layer", "head", "prefix s", "full s", "kernels s", "ratio", "ppl", "|diff|")
    widths = (6, 5, 4, 9, 8, 9, 6, 10, 8)
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
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
        full = perplexity(handle, mask, protocol, use_kernels=False)
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        perplexity(handle, mask, protocol)
        kernels_s = time.perf_counter() - t
        diff = abs(fast.perplexity - full.perplexity)
        rows.append((prefix_s, full_s, kernels_s))
        print(f"{i:>6} {layer:>5} {head:>4} {prefix_s:>9.3f} {full_s:>8.3f} {kernels_s:>9.3f} "
              f"{prefix_s / full_s:>6.2f} {fast.perplexity:>10.3f} {diff:>8.1e}")

    med = [statistics.median(r[k] for r in rows) for k in range(3)]
    print("\n| path | median toggle-to-perplexity (s) | ratio vs full |")
    print("|---|---|---|")
    print(f"| full recompute, gate hooks (`perplexity(..., use_kernels=False)`) | {med[1]:.3f} | 1.00 |")
    print(f"| full recompute, engine default (`perplexity(...)`) | {med[2]:.3f} | {med[2] / med[1]:.2f} |")
    print(f"| prefix cache (layers l..L-1) | {med[0]:.3f} | {med[0] / med[1]:.2f} |")
    print(f"\nmedian of per-toggle ratios prefix / full: {statistics.median(p / f for p, f, _ in rows):.2f} "
          f"(goal <= 0.6); prefix / engine default: {statistics.median(p / k for p, _, k in rows):.2f}; "
          f"cache holds {len(cache)} masks, {cache.nbytes / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
