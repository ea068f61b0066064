"""Perplexity after one-shot head pruning by each classic criterion (which one to trust?).

    python bench/bench_criteria.py [--budgets 0.1,0.2,0.3] [--csv bench/results/criteria.csv]

Scores come from one capture pass over WikiText-2 calibration paragraphs taken from the end
of the file; perplexity uses the pinned protocol on its start (printed), so the two never
overlap. Heads are ranked globally (one threshold over all layers), no recovery training.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from headlab.engine.core.csvfile import write_rows
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.importance.registry import score
from headlab.engine.models.load import load_model
from headlab.engine.pruning.select import select
from headlab.engine.runtime.evaluate import perplexity

CRITERIA = ("random", "magnitude", "entropy", "activation", "gradient")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--budgets", default="0.1,0.2,0.3")
    ap.add_argument("--n-texts", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--csv", default="bench/results/criteria.csv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]

    handle = load_model(args.model)
    t0 = time.perf_counter()
    scores, stats = score(handle, calibration_texts("wikitext", args.n_texts), CRITERIA,
                          max_length=args.max_length)
    t_score = time.perf_counter() - t0
    dense = perplexity(handle)
    print(f"# bench_criteria: {handle.name}; calibration {args.n_texts} WikiText-2 paragraphs (end of file) x "
          f"{args.max_length} tokens, scored in {t_score:.0f} s; {args.threads} threads on "
          f"{platform.machine()} ({os.cpu_count()} cores)")
    print(f"# protocol: {dense.protocol.describe(dense.tokenizer, dense.n_tokens)}")
    print(f"# dense perplexity {dense.perplexity:.2f}; global head ranking, no recovery\n")
    rows = []
    for b in budgets:
        for c in CRITERIA:
            mask = select(handle.geometry, scores[c], b, unit="heads", scope="global")
            ppl = perplexity(handle, mask).perplexity
            rows.append({"criterion": c, "heads_removed": b, "n_heads": mask.summary()["heads_pruned"],
                         "perplexity": round(ppl, 3), "vs_dense": round(ppl / dense.perplexity, 3)})
            print(f"  {c:>10} @ {b:.0%}: {ppl:,.1f}", flush=True)
    print("\n| heads removed | " + " | ".join(CRITERIA) + " |")
    print("|---|" + "---|" * len(CRITERIA))
    for b in budgets:
        cells = [next(r for r in rows if r["criterion"] == c and r["heads_removed"] == b) for c in CRITERIA]
        print(f"| {b:.0%} | " + " | ".join(f"{r['perplexity']:,.1f} ({r['vs_dense']:.2f}x)" for r in cells) + " |")
    print(f"\nwrote {write_rows(rows, args.csv)}")


if __name__ == "__main__":
    main()
