"""Time and peak memory of a full scoring pass against a plain forward+backward.

    python bench/bench_scoring.py [--model M] [--n-texts 16] [--max-length 256] [--batch-size 4]

Scoring = one pass computing entropy + attention-position statistics + activation moments
(forward hooks) and |dL/dgate| for every head, channel and sub-block (backward to the gates),
plus magnitude from the weights. Baselines over the same texts and batches: a plain forward,
and a plain forward+backward with weight gradients (a training step without the update).
Each mode runs in its own process so peak RSS is its own. Goal: scoring <= 1.5x fwd+bwd.

`--app` times what the app does when the Heads page and the Prune page's suggest panel open on a
model, on the sidebar's default calibration set (16 wikitext texts x 128 tokens): before, the Heads
page scored (one capture pass) and the suggest panel ran its own capture pass again; now one
engine Calibration is captured once and both read it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.machine import cpu_name  # noqa: E402

MODES = ("forward", "forward+backward", "scoring")
APP_MODES = ("app: two capture passes (before)", "app: one shared capture pass (now)")
APP_CRITERIA = ("entropy", "magnitude", "gradient", "activation")


def _run(mode: str, args: argparse.Namespace, out: mp.Queue) -> None:
    import torch

    from headlab.engine.core.objective import lm_loss
    from headlab.engine.core.tokens import batches, encode_batch
    from headlab.engine.data.datasets import calibration_texts
    from headlab.engine.importance.registry import score
    from headlab.engine.models.load import load_model
    from headlab.engine.pruning.strategies.base import Calibration
    from headlab.engine.pruning.strategies.scores import criterion_scores

    torch.set_num_threads(args.threads)
    handle = load_model(args.model, progress=lambda m: None)
    texts = calibration_texts("wikitext", args.n_texts)
    encoded = [encode_batch(handle.tokenizer, list(c), args.max_length) for c in batches(texts, args.batch_size)]
    if mode == "forward+backward":
        for p in handle.model.parameters():
            p.requires_grad_(True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def once() -> None:
        if mode in APP_MODES:
            calib = Calibration.shipped("wikitext", args.n_texts, max_length=args.max_length)
            if mode == APP_MODES[0]:
                score(handle, calib.texts, APP_CRITERIA, batch_size=calib.batch_size, max_length=args.max_length)
            calib.stats(handle)
            if mode == APP_MODES[1]:
                for name in APP_CRITERIA:
                    criterion_scores(handle, name, calib)
            return
        if mode == "scoring":
            score(handle, texts, ("entropy", "magnitude", "gradient", "activation"),
                  batch_size=args.batch_size, max_length=args.max_length)
            return
        for ids, mask in encoded:
            with torch.set_grad_enabled(mode != "forward"):
                loss, _ = lm_loss(handle, ids, mask)
                if mode != "forward":
                    loss.backward()
        handle.model.zero_grad(set_to_none=True)

    once()  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put((mode, statistics.median(times), (peak - rss0) / 1024, peak / 1024))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-texts", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--app", action="store_true", help="time the app's capture passes instead (see above)")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    results = {}
    modes = APP_MODES if args.app else MODES
    for mode in modes:
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(mode, args, q))
        p.start()
        mode_, t, rss_delta, rss_peak = q.get()
        p.join()
        results[mode_] = (t, rss_delta, rss_peak)

    from headlab.engine.models.load import load_model

    if args.app:
        before, now = results[APP_MODES[0]][0], results[APP_MODES[1]][0]
        print(f"# bench_scoring --app: {args.model or 'smollm2-135m-instruct'}, {args.n_texts} wikitext texts x "
              f"{args.max_length} tokens, {args.threads} threads, median of {args.repeats}")
        print("| opening Heads + suggest panel | time (s) | peak RSS growth (MiB) |")
        print("|---|---|---|")
        for mode in APP_MODES:
            t, d, _ = results[mode]
            print(f"| {mode} | {t:.2f} | {d:.0f} |")
        print(f"\nsaved: {before - now:.2f} s ({1 - now / before:.0%}) per model and calibration set")
        return
    g = load_model(args.model, progress=lambda m: None).geometry
    full_maps_mb = g.n_layers * args.batch_size * g.n_heads * args.max_length**2 * 4 / 2**20
    print(f"# bench_scoring: {args.model or 'smollm2-135m-instruct'}, {args.n_texts} wikitext texts x "
          f"{args.max_length} tokens, batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores, torch CPU")
    base = results["forward+backward"][0]
    print("| mode | time (s) | vs fwd+bwd | peak RSS growth (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        t, d, peak = results[mode]
        print(f"| {mode} | {t:.2f} | {t / base:.2f}x | {d:.0f} | {peak:.0f} |")
    print(f"\nattention maps retained by scoring: none (reduced per layer inside a hook); keeping every layer's "
          f"maps for one batch would take {full_maps_mb:.0f} MiB.")


if __name__ == "__main__":
    main()
