"""Suggest mask as the app runs it, cold and warm, on the default model, with the plan's estimate beside it.

    python bench/bench_app_jobs.py [--budget 0.2] [--mode fast] [--threads 2]

What the Prune page's "Suggest mask" job does (headlab/ui/suggest.py), timed in one process:
- plan:     the estimate the page shows before the job (headlab.engine.runtime.plan.plan_job("suggest"), the
            page's job shape: the sidebar's default calibration, 16 texts x 128 tokens);
- cold:     a new calibration with an empty cost folder: the capture pass, every head's mean-ablation KL
            (headlab.engine.importance.ablation), the selection and the predicted / measured perplexity;
- warm:     the same calibration again at another budget (what a second click costs in the same server);
- restart:  a new calibration (a restarted server) whose per-head costs are read from the cost folder
            (headlab.engine.importance.ablation_store): the capture pass runs again, the ablation does not.
Results: bench/results/app_jobs.csv (one row per run, dated).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from headlab.engine.models.load import load_model  # noqa: E402
from headlab.engine.pruning.strategies import Budget, Calibration, suggest_mask  # noqa: E402
from headlab.engine.runtime.plan import JobShape, plan_job  # noqa: E402
from headlab.engine.runtime.prefix_cache import live_protocol  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "app_jobs.csv"
N_TEXTS, MAX_LENGTH = 16, 128  # the sidebar's default calibration (headlab.ui.scoring.DEFAULT_CALIBRATION)


def calibration(folder: Path) -> Calibration:
    c = Calibration.shipped("wikitext", N_TEXTS, max_length=MAX_LENGTH)
    c.persist_dir = folder
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.2, help="fraction of the heads")
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_model()
    shape = JobShape(n_texts=N_TEXTS, max_length=MAX_LENGTH, eval_tokens=2 * live_protocol(handle).window)
    plan = plan_job("suggest", handle=handle, shape=shape, probe_repeats=1)
    print(f"# bench_app_jobs: {handle.name} on {cpu_name()}, {args.threads} threads; plan: {plan.headline()}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        calib = calibration(Path(folder))
        for run, budget, c in (("cold", args.budget, calib), ("warm", args.budget + 0.1, calib),
                               ("restart", args.budget, calibration(Path(folder)))):
            t = time.perf_counter()
            mask, info = suggest_mask(handle, Budget(heads=budget), mode=args.mode, calib=c)
            seconds = time.perf_counter() - t
            rows.append({"run": run, "budget_heads": round(budget, 4), "mode": args.mode, "method": info.method,
                         "seconds": round(seconds, 1),
                         "plan_seconds": round(plan.estimated_seconds, 1) if run == "cold" else "",
                         "plan_vs_measured": round(plan.estimated_seconds / seconds, 2) if run == "cold" else "",
                         "heads_pruned": mask.summary()["heads_pruned"],
                         "measured_perplexity": round(info.measured_perplexity or 0.0, 3),
                         "threads": args.threads, "machine": cpu_name(), "measured": dt.date.today().isoformat()})
            print(rows[-1], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n| run | seconds | plan (s) | plan / measured |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']} | {r['plan_seconds']} | {r['plan_vs_measured']} |")


if __name__ == "__main__":
    main()
