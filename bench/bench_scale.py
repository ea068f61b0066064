"""Ablation scoring on 1 vs N processes (torchrun): the speed-up against the ideal N x, and the result unchanged.

    python bench/bench_scale.py                              # SmolLM2, CPU: 1 process x 1 thread, 1 x 2, 2 x 1
    python bench/bench_scale.py --processes 1,2,4 --threads 1
    python bench/bench_scale.py --device cuda --processes 1,2,4,8   # NCCL, one GPU per process
    python bench/bench_scale.py --report                     # the table from bench/results/scale.csv

Each configuration is one `torchrun --standalone --nproc-per-node N` of this script in worker mode.
Every rank loads the model and records the same replay (replicated), then measures its share of
the heads' single-head mean-ablation KL (headlab.engine.importance.ablation.ablation_kl, world=); the time
reported is that of the scoring call alone, from a barrier before it to the gathered table after it
(load and start-up are reported apart, in `wall_s`). The KL table of every configuration is
compared with the first one's (`max_abs_diff`, expected 0). The default is short: 2 texts x 64
tokens, all 270 heads of SmolLM2 (under 2 minutes in all on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.machine import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.csv"
COLUMNS = ("model", "device", "processes", "threads_per_process", "heads", "tokens", "score_s", "speedup",
           "ideal", "efficiency", "load_s", "wall_s", "max_abs_diff", "cpu")


def worker(args: argparse.Namespace) -> None:
    """One rank: load, record the replay, time the ablation scoring of its share; rank 0 writes the JSON."""
    import torch

    from headlab.engine.data.datasets import calibration_texts
    from headlab.engine.distributed.world import open_world
    from headlab.engine.importance.ablation import ablation_kl
    from headlab.engine.importance.capture import capture
    from headlab.engine.models.load import load_model
    from headlab.engine.runtime.replay import LayerReplay

    torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    with open_world(args.device) as world:
        t = time.perf_counter()
        handle = load_model(args.model, device=device, progress=lambda m: None)
        texts = calibration_texts("wikitext", args.texts)
        means = capture(handle, texts, gradients=False, max_length=args.max_length).head_in_mean
        replay = LayerReplay(handle, texts, max_length=args.max_length)
        load_s = time.perf_counter() - t
        world.barrier()
        t = time.perf_counter()
        delta, _ = ablation_kl(handle, texts, means=means, replay=replay, world=world)
        score_s = time.perf_counter() - t
        if world.is_main:
            g = handle.geometry
            Path(args.json).write_text(json.dumps({"delta": delta.tolist(), "score_s": score_s, "load_s": load_s,
                                                   "heads": g.n_layers * g.n_heads, "tokens": replay.n_tokens}))


def run_config(args: argparse.Namespace, processes: int, threads: int) -> dict:
    """One torchrun of the worker; its JSON plus the wall time of the whole command."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(Path(__file__).resolve()), "--worker", "--json", str(out), "--model", args.model,
               "--texts", str(args.texts), "--max-length", str(args.max_length), "--threads", str(threads),
               "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t = time.perf_counter()
        r = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"{processes} x {threads}: torchrun failed ({r.returncode}):\n{r.stderr[-4000:]}")
        return {**json.loads(out.read_text()), "wall_s": wall}


def report(rows: list[dict]) -> None:
    print(f"{'device':>6} {'procs':>5} {'thr':>3} {'heads':>5} {'score s':>8} {'speed-up':>8} {'ideal':>5} "
          f"{'eff.':>5} {'load s':>6} {'wall s':>6} {'max|diff|':>9}")
    for r in rows:
        print(f"{r['device']:>6} {r['processes']:>5} {r['threads_per_process']:>3} {r['heads']:>5} "
              f"{float(r['score_s']):8.2f} {float(r['speedup']):7.2f}x {float(r['ideal']):4.0f}x "
              f"{float(r['efficiency']):5.0%} {float(r['load_s']):6.1f} {float(r['wall_s']):6.1f} "
              f"{float(r['max_abs_diff']):9.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--processes", default="1,2", help="comma-separated process counts (the first is the baseline)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--threaded-baseline", type=int, default=2,
                   help="also run 1 process with this many threads (0: skip): the same cores without torchrun")
    p.add_argument("--texts", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report", action="store_true", help="print the table of --out and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.report:
        with open(args.out) as f:
            report(list(csv.DictReader(f)))
        return
    counts = [int(n) for n in args.processes.split(",")]
    configs = [(n, args.threads) for n in counts]
    if args.threaded_baseline and args.device == "cpu":
        configs.insert(1, (1, args.threaded_baseline))
    print(f"ablation scoring of {args.model} on {args.device} ({cpu_name()}), {args.texts} texts x "
          f"{args.max_length} tokens", flush=True)
    base, rows = None, []
    for n, threads in configs:
        print(f"... {n} process(es) x {threads} thread(s)", flush=True)
        r = run_config(args, n, threads)
        base = base or r
        diff = max(abs(a - b) for ra, rb in zip(base["delta"], r["delta"]) for a, b in zip(ra, rb))
        speedup = base["score_s"] / r["score_s"]
        ideal = n * threads / (configs[0][0] * configs[0][1])  # in the baseline's units of work
        rows.append({"model": args.model, "device": args.device, "processes": n, "threads_per_process": threads,
                     "heads": r["heads"], "tokens": r["tokens"], "score_s": round(r["score_s"], 2),
                     "speedup": round(speedup, 3), "ideal": ideal, "efficiency": round(speedup / ideal, 3),
                     "load_s": round(r["load_s"], 2), "wall_s": round(r["wall_s"], 1), "max_abs_diff": diff,
                     "cpu": cpu_name() if args.device == "cpu" else "gpu"})
    report(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
