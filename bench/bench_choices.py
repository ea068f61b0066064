"""Every setting the reconstruction methods default to, chosen on validation text.

    python bench/bench_choices.py                  # SmolLM2; hours on a shared CPU, resumable
    python bench/bench_choices.py --quick          # smoke run

For each configuration (20% of the parameters by width, 30% of the heads), candidates are compared by
perplexity on the VALIDATION region of WikiText-2 test (headlab.engine.runtime.regions: 8 windows of 512
tokens from token 75,000), never on the main protocol's windows or the held-out ones, in stages; each
stage keeps the previous stages' winners:

1. inputs: the input side re-fitted or not (RefitConfig.inputs: none / pruned / all);
2. allocation: how many units each layer loses (flap, ablation, owl, global, kl: global's OBS costs in units of
   the measured KL; joint and kl-joint also split the parameters between heads and channels);
3. damping: the ridge damping of every solve (width20 compares it again at the text budget chosen: "fit damp");
4. target: each projection's own dense output, or the dense residual stream (a sub-block also corrects
   the error its input carries; width20 compares it again on the whole fit region: "fit target");
5. calibration: WikiText alone, or mixed (WikiText and the model's own answers to training prompts). Every
   candidate is also scored on the out-of-domain part of validation (`vood_nll`: mean NLL on the chat items in
   front of the scored ones, headlab.engine.runtime.regions.ood_validation_items); the choice is made on the
   WikiText validation perplexity, the table's measure, and the trade is stated where the two disagree;
6. texts: how many texts the re-fits read (128 paragraphs: ~20,000 tokens; 512: ~80,000; or the whole fit
   region, everything after the held-out windows, as running text in windows of 512 tokens: ~146,000). This
   is a compute budget more than a setting: the re-fit's time grows with it (about 17 against 46 minutes on 2
   cores for the first two), so the library keeps 128 (REFIT_TEXTS, interactive) and the quality table names
   `n_texts=` (and `window=`) where it uses more;
7. calibration texts: the statistics FLAP's per-layer counts are measured on, 32 paragraphs or 512;
8. kl points: the fractions of a layer's units removed alone to measure its KL (width20's "kl points").
heads30 takes width20's input mode and compares allocations and re-fit text counts; heads50 compares the
allocation, the target, re-solving the FFNs that lose nothing, and the re-fit texts; depth20 (the iterative
ablation's layers, their neighbours re-fitted: ablation-iterative-refit) compares the input mode, the re-fit
texts and then the damping at that text budget. Its candidates share one layer search (bench_quality
.layer_search: the ablation-iterative mask cached for depth20, its time counted in each candidate's selection
time).

Masks are chosen under the regions guard (nothing a method reads may hold main, validation, held-out
or out-of-domain text) and cached with bench_quality's, so bench_quality reuses the winners' masks.
Results: bench/results/choices.csv (one row per candidate, `chosen` marks each stage's winner); the
defaults in headlab.engine.pruning.strategies.reconstruct (AUTO_ALLOCATION, DEFAULT_INPUTS,
GLOBAL_NORMALISATION) are these winners, which tests/test_regions.py checks.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_quality import (
    bench_cache,
    cached_mask_path,
    load_cached_mask,
    load_stats,
    make_mask,
    results_csv,
    save_stats,
)
from headlab.engine.core.csvfile import write_rows
from headlab.engine.core.files import write_atomic_text
from headlab.engine.models.load import load_model
from headlab.engine.pruning.strategies import Calibration
from headlab.engine.pruning.strategies.reconstruct import AUTO_ALLOCATION, GLOBAL_NORMALISATION, REFIT_TEXTS
from headlab.engine.runtime.regions import (
    REGIONS,
    fit_paragraphs,
    ood_nll,
    ood_validation_items,
    region_perplexity,
    region_windows,
)

# every paragraph that starts after the held-out windows (regions.fit_paragraphs: 694 for SmolLM2), as the running
# text of their span in 512-token windows; "n_texts=fit" becomes that count for the model being run
WHOLE_FIT = "n_texts=fit,window=512"
# stage -> the candidates' settings, each added to the winners of the stages before
STAGES = {
    "width20": [
        ("inputs", ["inputs=none", "inputs=all"]),
        ("allocation", ["allocation=flap", "allocation=global", "allocation=joint", "allocation=owl",
                        "allocation=kl", "allocation=kl-joint"]),
        ("normalisation", []),  # filled when "global" or "joint" wins: the same with the other normalisation
        ("damp", ["damp=0.01", "damp=0.001", "damp=0.1"]),
        ("target", ["target=output", "target=residual"]),
        ("calibration", ["calibration=wikitext", "calibration=mixed"]),
        ("texts", ["n_texts=128", "n_texts=512", WHOLE_FIT]),
        ("calibration texts", ["calib_texts=32", "calib_texts=512"]),
        # the ridge again at the text budget chosen (the damp stage above ran at 128 texts): depth's stand-ins went
        # from 1.815x to 1.593x by lowering it there
        ("fit damp", ["damp=0.01", "damp=0.001", "damp=0.0001"]),
        # the measured allocation's points: kl-joint takes up to two thirds of a middle FFN's channels, past the
        # default points (a quarter and half of a layer's units removed alone), where each layer's scale is
        # extrapolated; a third point at three quarters measures it there
        ("kl points", ["kl_fractions=0.25/0.5", "kl_fractions=0.25/0.5/0.75"]),
        # the target again on the whole fit region: at 128 texts the residual stream lost by 0.01, within what
        # more text can turn (a sub-block correcting the error its input carries has more to fit)
        ("fit target", ["target=output", "target=residual"]),
    ],
    "heads30": [
        ("inputs", ["inputs=all"]),  # width20's choice, carried over (not compared here: CPU time)
        ("allocation", ["allocation=ablation", "allocation=global", "allocation=kl"]),
        ("texts", ["n_texts=128", "n_texts=512", WHOLE_FIT]),
    ],
    # the texts the re-fits read, for the two rows furthest from their targets (heads50 takes width20's inputs=all;
    # depth's stand-ins compare it with none: on main text depth was 2.47x with it, 2.32x without)
    "heads50": [
        ("inputs", ["inputs=all"]),
        # half the heads gone: the allocation (global's OBS costs against the measured KL), and whether the intact
        # FFN behind each attention also corrects the error attention leaves in the stream (residual targets)
        ("allocation", ["allocation=global", "allocation=kl"]),
        ("target", ["target=output", "target=residual"]),
        # ... and whether those FFNs, which lose nothing, are re-solved on their shifted inputs too
        ("unpruned", ["refit_unpruned=false", "refit_unpruned=true"]),
        ("texts", ["n_texts=128", WHOLE_FIT]),
    ],
    "depth20": [
        ("inputs", ["inputs=none", "inputs=all"]),
        ("texts", ["n_texts=128", WHOLE_FIT]),
        # at the text budget chosen: the stand-ins' ridge, downwards (0.001 beat 0.01 by 0.19 there; at 128 texts
        # width's 0.1 had lost to 0.01 by 0.45)
        ("damp", ["damp=0.01", "damp=0.001", "damp=0.0001"]),
    ],
}
# the method a configuration's candidates are settings of (default obs): depth20's stand-ins are re-fitted around
# the layers the iterative ablation drops (bench_quality's best depth method)
BASE = {"depth20": "ablation-iterative-refit"}


# Settings equal to what obs does without them today, dropped from a candidate's name so one mask is never chosen
# twice under two names. "auto" allocations follow the code (AUTO_ALLOCATION); a cached mask or result made when
# "auto" meant another allocation is stale (bench_quality.stale_reason) and is made again.
_COMMON = {"damp=0.01", f"normalise={GLOBAL_NORMALISATION}", "target=output", f"n_texts={REFIT_TEXTS}",
           "refit_unpruned=false"}
IMPLIED = {"width20": {f"allocation={AUTO_ALLOCATION['width']}", *_COMMON, "calibration=wikitext", "calib_texts=32",
                       "kl_fractions=0.25/0.5"},
           "heads30": {f"allocation={AUTO_ALLOCATION['heads']}", *_COMMON},
           "heads50": {f"allocation={AUTO_ALLOCATION['heads']}", *_COMMON},
           "depth20": {f"n_texts={REFIT_TEXTS}", "damp=0.01"}}


def spec(settings: list[str], config: str | None = None) -> str:
    kept = [s for s in settings if s not in IMPLIED.get(config, set())]
    base = BASE.get(config, "obs")
    return f"{base}[" + ",".join(kept) + "]" if kept else base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", default="width20,heads30")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", default=None,
                    help="comma-separated stages to run (default: all); a stage left out keeps no winner, so the "
                         "later ones build on the stages run")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--remeasure", action="store_true",
                    help="make and score every candidate whose mask is not cached, even when the CSV already has "
                         "its validation scores (by default those are taken from the CSV)")
    args = ap.parse_args()
    csv_path = results_csv("choices", args.model, args.quick, args.csv)
    known = {stage for stages in STAGES.values() for stage, _ in stages}
    wanted = set(args.stages.split(",")) if args.stages else known
    if wanted - known:
        raise SystemExit(f"--stages: unknown {sorted(wanted - known)}; the stages are {sorted(known)}")
    args.iter_steps, args.hc_steps = 4, 80
    torch.set_num_threads(args.threads)
    handle = load_model(args.model)
    cache_dir = bench_cache(args.model, args.quick)
    (cache_dir / "masks").mkdir(parents=True, exist_ok=True)
    calib = (Calibration.shipped("wikitext", 8, max_length=128) if args.quick
             else Calibration.shipped("wikitext", 32, max_length=256))
    stats_path = cache_dir / "stats.safetensors"
    stats = load_stats(stats_path)
    if stats is None:
        stats = calib.stats(handle)
        save_stats(stats, stats_path)
    calib.set_stats(stats)
    val = region_windows(handle, "validation", n=2 if args.quick else None, window=256 if args.quick else None)
    fit_span = fit_paragraphs(handle)
    results_path = cache_dir / "choices.json"
    results: dict[str, dict] = json.loads(results_path.read_text()) if results_path.exists() else {}
    recorded = recorded_results(csv_path)  # candidates the CSV already scored (a fresh cache need not redo them)
    dense = region_perplexity(handle, None, val)
    vood_items = ood_validation_items(1) if args.quick else ood_validation_items()
    dense_vood = ood_nll(handle, None, vood_items)["all"]
    print(f"# bench_choices: {handle.name}; {REGIONS['validation'].describe()}; dense validation perplexity "
          f"{dense:.3f}; out-of-domain validation: {len(vood_items)} chat items, dense NLL {dense_vood:.3f}\n",
          flush=True)
    rows = []
    for config in args.configs.split(","):
        winners: list[str] = []
        for stage, options in STAGES[config]:
            if stage not in wanted:
                continue
            if stage == "normalisation":
                if "allocation=global" not in winners and "allocation=joint" not in winners:
                    continue
                options = ["normalise=stream", "normalise=output"]
            scored = []
            for option in options:
                option = option.replace("n_texts=fit", f"n_texts={fit_span}")
                settings = winners + [option]
                method = spec(settings, config)
                key = f"{method}@{config}"
                path = cached_mask_path(cache_dir, method, config)
                cached = load_cached_mask(path, method, config, handle.geometry, results)
                if cached is None and (args.remeasure or not results.get(key, {}).get("from_csv")):
                    results.pop(key, None)  # a result whose mask is gone is measured again with its mask
                if key not in results and cached is None and key in recorded and not args.remeasure:
                    results[key] = recorded[key]
                if key not in results:
                    t = time.perf_counter()
                    if cached is not None:
                        mask = cached
                    else:
                        mask = make_mask(handle, method, config, calib, args, cache_dir)
                        # a cached layer search (bench_quality.layer_search) counts as long as it took
                        mask.meta["bench_select_seconds"] = (time.perf_counter() - t
                                                             + mask.meta.get("layer_search_reused_s", 0.0))
                        mask.save(path)
                    results[key] = {"ppl_validation": region_perplexity(handle, mask, val),
                                    "vood_nll": ood_nll(handle, mask, vood_items)["all"],
                                    "select_s": round(mask.meta.get("bench_select_seconds", float("nan")), 1),
                                    "measured": time.strftime("%Y-%m-%d")}
                    save_result(results_path, results, key)
                r = results[key]
                if "vood_nll" not in r:  # cached before the column existed
                    r["vood_nll"] = ood_nll(handle, cached, vood_items)["all"]
                    save_result(results_path, results, key)
                scored.append((r["ppl_validation"], option))
                print(f"  {config} {stage:>13} {method:>60}: validation {r['ppl_validation']:8.3f} "
                      f"({r['ppl_validation'] / dense:.3f}x)  out-of-domain NLL {r['vood_nll']:.3f} "
                      f"({r['vood_nll'] - dense_vood:+.3f})  select {r['select_s']:.0f} s", flush=True)
                rows.append({"config": config, "stage": stage, "candidate": option, "method": method,
                             "ppl_validation": round(r["ppl_validation"], 3),
                             "ratio_validation": round(r["ppl_validation"] / dense, 4),
                             "vood_nll": round(r["vood_nll"], 4), "vood_delta": round(r["vood_nll"] - dense_vood, 4),
                             "chosen": False,
                             "select_s": r["select_s"], "measured": r["measured"]})
            best = min(scored)[1]
            for row in rows:
                if row["config"] == config and row["stage"] == stage and row["candidate"] == best:
                    row["chosen"] = True
            winners.append(best)
        print(f"# {config}: chosen {spec(winners, config)}\n", flush=True)
    write_rows(merged_rows(csv_path, rows), csv_path)
    print(f"wrote {csv_path}")


def save_result(path: Path, results: dict[str, dict], key: str) -> None:
    """Write `results[key]` into the JSON at `path` over what the file holds now: runs of other configurations
    in parallel each add their own candidates and keep the others' (the file is read again, not overwritten from
    this run's copy), and the file is replaced whole, never left half-written."""
    on_disk = json.loads(path.read_text()) if path.exists() else {}
    on_disk[key] = results[key]
    results.update(on_disk)
    write_atomic_text(path, json.dumps(on_disk, indent=1))


def recorded_results(csv_path: Path) -> dict[str, dict]:
    """"method@config" -> the validation scores the CSV holds for it, for a run whose cache lacks that mask.

    A name means what it meant when it was measured: when a default changes (AUTO_ALLOCATION), the CSV's rows
    whose names relied on it are relabelled with the setting they used (tests/test_regions.py checks that the
    chosen rows name today's defaults).
    """
    if not csv_path.exists():
        return {}
    out = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("ppl_validation") and r.get("vood_nll"):
                out[f"{r['method']}@{r['config']}"] = {
                    "ppl_validation": float(r["ppl_validation"]), "vood_nll": float(r["vood_nll"]),
                    "select_s": float(r["select_s"]) if r.get("select_s") else float("nan"),
                    "measured": r["measured"], "from_csv": True}
    return out


def merged_rows(csv_path: Path, rows: list[dict]) -> list[dict]:
    """`rows` with the rows already in `csv_path` of every (configuration, stage) this run did not measure, in
    STAGES's order: a run of some configurations or stages leaves the others' rows in place."""
    ran = {(r["config"], r["stage"]) for r in rows}
    if not csv_path.exists():
        return rows
    with open(csv_path, newline="") as f:
        kept = [r for r in csv.DictReader(f) if (r["config"], r["stage"]) not in ran]
    order = {(config, stage): (i, j) for i, config in enumerate(STAGES)
             for j, (stage, _) in enumerate(STAGES[config])}
    return sorted(kept + rows, key=lambda r: order.get((r["config"], r["stage"]), (len(order), 0)))  # stable


if __name__ == "__main__":
    sys.exit(main())
