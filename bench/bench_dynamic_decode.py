"""Batch-1 decode speed with per-token CATS FFN sparsity vs dense, and how much of the ideal it reaches.

    python bench/bench_dynamic_decode.py [--threads 1] [--sparsities 0.25,0.5,0.7] [--new 128]

One process, one model: CATS thresholds are calibrated per target sparsity on the default
calibration set (engine.dynamic.calibrate, all cores), then timing runs on `--threads` torch
threads: greedy decoding of `--new` tokens after a `--prompt`-token WikiText prompt with the
KV cache, dense (engine.dynamic.dense_generate) and sparse (sparse_generate, which reads only
each token's kept up rows and down columns), round-robin over `--repeats` so CPU drifts hit all
alike. tokens/s count the cached decode steps only (the prefill is excluded). Ideal speedup =
weight bytes read per token, dense / sparse (engine.dynamic.decode_weight_bytes: embedding row,
attention and gate in full, kept up rows and down columns at the mean kept count per layer
measured in the same decode, final norm, LM head).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.machine import cpu_name
from engine.core.csvfile import write_rows
from engine.data.datasets import read_wikitext
from engine.dynamic import calibrate, decode_weight_bytes, dense_generate, sparse_generate
from engine.models.load import load_model


def _prompt(handle, n: int) -> torch.Tensor:
    """n tokens from the second half of the WikiText-2 test file (the calibration set is its first part)."""
    text = read_wikitext()
    ids = handle.tokenizer(text[len(text) // 2:], add_special_tokens=False)["input_ids"][:n]
    return torch.tensor(ids)[None]


def _same_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading new tokens two continuations share."""
    diff = (a != b).nonzero()
    return int(diff[0]) if diff.numel() else a.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    ap.add_argument("--sparsities", default="0.25,0.5,0.7", help="CATS target FFN sparsities")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--csv", default="bench/results/dynamic_decode.csv")
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    handle = load_model(args.model, dtype="float32")
    prompt = _prompt(handle, args.prompt)
    targets = [float(s) for s in args.sparsities.split(",")]
    thresholds = {s: calibrate(handle, "cats", s) for s in targets}
    t_setup = time.perf_counter() - t

    torch.set_num_threads(args.threads)
    runs = {"dense": lambda n: dense_generate(handle, prompt, n)}
    runs.update({f"cats {s:.0%}": (lambda n, th=th: sparse_generate(handle, prompt, th, n))
                 for s, th in thresholds.items()})
    target = {"dense": 0.0, **{f"cats {s:.0%}": s for s in thresholds}}
    for run in runs.values():  # warm-up; also makes the channel-major down copies
        run(4)
    results: dict[str, list] = {label: [] for label in runs}
    for _ in range(args.repeats):
        for label, run in runs.items():
            results[label].append(run(args.new))

    g = handle.geometry
    dense_bytes = decode_weight_bytes(handle)
    dense_tps = statistics.median(r.decode_tokens_per_s for r in results["dense"])
    dense_new = results["dense"][0].new_tokens
    rows = []
    for label, gens in results.items():
        first = gens[0]
        tps = statistics.median(r.decode_tokens_per_s for r in gens)
        kept = first.kept
        sparse_bytes = decode_weight_bytes(handle, kept) if kept is not None else dense_bytes
        ideal = dense_bytes / sparse_bytes
        speedup = tps / dense_tps
        rows.append({
            "config": label,
            "target_sparsity": target[label],
            "decode_ffn_sparsity": 0.0 if kept is None else 1.0 - float(kept.float().mean()) / g.ffn_dim,
            "tokens_per_s": tps,
            "speedup": speedup,
            "weight_mb_per_token": sparse_bytes / 2**20,
            "ideal_speedup": ideal,
            "fraction_of_ideal": (speedup - 1) / (ideal - 1) if ideal > 1 else float("nan"),
            "same_tokens_as_dense": _same_prefix(first.new_tokens, dense_new),
            "new_tokens": args.new,
            "prompt_tokens": args.prompt,
            "threads": args.threads,
            "repeats": args.repeats,
            "model": handle.name,
        })

    print(f"\n# bench_dynamic_decode: {handle.name}, fp32, batch 1, {args.threads} torch thread(s) on {cpu_name()}")
    print(f"# {args.prompt}-token prompt + {args.new} greedy tokens with the KV cache; median of {args.repeats} runs "
          f"(decode steps only); setup (load + CATS calibration) {t_setup:.0f} s")
    print("# ideal = weight bytes read per token, dense / sparse; fraction of ideal = (speedup - 1) / (ideal - 1)")
    print("# timings on a shared machine are noisy: compare ratios within this run only\n")
    print("| config | FFN sparsity in decode | tok/s | speedup | MB read/token | ideal | fraction of ideal | "
          "new tokens equal to dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = "-" if r["config"] == "dense" else f"{r['fraction_of_ideal']:.0%}"
        print(f"| {r['config']} | {r['decode_ffn_sparsity']:.1%} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['weight_mb_per_token']:.0f} | {r['ideal_speedup']:.2f}x | {frac} | "
              f"{r['same_tokens_as_dense']}/{args.new} |")
    print(f"\nwrote {write_rows(rows, args.csv)}")


if __name__ == "__main__":
    main()
