"""Recovery within a wall-clock budget: a reconstructed 20%-smaller model, then distillation for N minutes.

    python bench/bench_recovery_budget.py                       # 30 minutes of training (resumable)
    python bench/bench_recovery_budget.py --minutes 2 --quick --lrs 1e-4   # smoke run

Student: the shipped SmolLM2 with ~20% of its parameters removed by width (the same fraction of
heads and FFN channels), chosen and re-fitted by structured OBS (headlab.engine.pruning.strategies
.reconstruct, the `obs` row of bench_quality's width20: its cached mask is reused when present),
then physically pruned (headlab.engine.export.surgery; the re-solved weights are in the copy). Then
full-parameter distillation (headlab.engine.recovery.distill: KL to the dense teacher's logits, AdamW,
cosine schedule sized to the budget: a timed probe gives seconds per step as fixed + per padded token,
summed over the batches the run will draw, headlab.engine.recovery.distill.budget, and after a fifth of the
steps the run sizes itself again from its own steps' training time, budget.Rebudget) until `--minutes` of
training have passed.
Data: WikiText-2 paragraphs from the END of the file (checked to lie after the held-out windows)
and the teacher's greedy answers to the shipped training prompts (never an out-of-domain item;
headlab.engine.runtime.regions.check_fit_texts checks every text). The learning rate is chosen on the
VALIDATION windows (tokens 75,000-79,096): each of `--lrs` trains a fresh student for `--probe-minutes`
(cosine sized to that; on the WikiText shape `--packs` gives when it gives one, else on paragraphs), and the
lowest validation perplexity trains the full run.

The curve: perplexity on the pinned protocol (the START of the file) and on the held-out windows
(tokens 150,000-156,144, as in bench_quality), at 0 minutes and every `--every` minutes of
training; evaluation time is not counted as training time. At the end, top-1 and greedy
agreement with the dense model on the held-out windows (headlab.engine.runtime.agreement). The curve
and the distillation checkpoint are cached under ~/.cache/headlab/bench/recovery_budget/, so an
interrupted run resumes where it stopped; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench.bench_quality import (
    AGREE_NEW,
    AGREE_PROMPTS,
    HELDOUT_OFFSET,
    bench_cache,
    cached_mask_path,
    heldout_perplexity,
    heldout_windows,
    make_mask,
)
from headlab.engine.core.csvfile import write_rows
from headlab.engine.core.mask import PruneMask
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.export.surgery import prune
from headlab.engine.models.load import DEFAULT_MODEL, load_model
from headlab.engine.models.load import cache_dir as cache_dir_root
from headlab.engine.pruning.strategies import Calibration
from headlab.engine.recovery.distill import DistillConfig, distill, distill_data
from headlab.engine.recovery.distill.budget import Rebudget, StepTime, probe_step_time, steps_for_budget
from headlab.engine.recovery.distill.checkpoint import has_checkpoint
from headlab.engine.runtime.agreement import agreement, dense_reference
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, PerplexityProtocol, perplexity
from headlab.engine.runtime.regions import check_fit_texts, guard, region_perplexity, region_windows


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def student_mask(teacher: Any, model: str | None, method: str, config: str, quick: bool) -> PruneMask:
    """bench_quality's cached mask for (method, config) when it exists, else the same strategy run now."""
    cached = cached_mask_path(bench_cache(model, quick), method, config)
    if cached.exists():
        _say(f"mask: bench_quality's cached {method}@{config} ({cached})")
        return PruneMask.load(cached, teacher.geometry)
    calib = Calibration.shipped("wikitext", 8 if quick else 32, max_length=128 if quick else 256)
    _say(f"mask: running {method} for {config} (minutes)...")
    args = argparse.Namespace(iter_steps=4, hc_steps=80)
    return make_mask(teacher, method, config, calib, args)


def timed_probe(teacher: Any, mask: PruneMask, data: Any, config: DistillConfig) -> dict[str, float]:
    """The step-time model (budget.StepTime as a dict), from steps on a throwaway copy of the student."""
    return asdict(probe_step_time(teacher, mask, data, config))


def budget_steps(teacher: Any, data: Any, config: DistillConfig, minutes: float, model: dict[str, float],
                 minimum: int = 5) -> int:
    """The steps whose predicted times (the model, over the batches the run will draw) fill `minutes`."""
    return steps_for_budget(teacher.tokenizer, data, config, minutes * 60, StepTime(**model), minimum=minimum)


def choose_lr(teacher: Any, mask: PruneMask, data: Any, config: DistillConfig, lrs: list[float], minutes: float,
              step_time: dict[str, float], val: torch.Tensor, state: dict[str, Any], save: Any) -> float:
    """The learning rate whose `minutes`-long run (cosine sized to it) scores best on the VALIDATION windows."""
    probes = state.setdefault("lr_probe", {})
    steps = budget_steps(teacher, data, config, minutes, step_time)
    for lr in lrs:
        if str(lr) in probes:
            continue
        student = prune(teacher, mask)
        with guard(teacher):  # the training reads fit text only
            distill(teacher, student, data, replace(config, lr=lr, steps=steps, warmup=max(1, steps // 20)))
        probes[str(lr)] = region_perplexity(student, None, val)
        save()
        _say(f"  lr {lr:g}: {steps} steps, validation perplexity {probes[str(lr)]:.3f}")
        del student
    return float(min(lrs, key=lambda lr: probes[str(lr)]))


def step_shape(config: DistillConfig, pack: int) -> DistillConfig:
    """`config` for WikiText windows of `pack` tokens (0: paragraphs, unchanged): as many tokens per step."""
    if not pack:
        return config
    return replace(config, batch_size=max(1, config.batch_size * config.max_length // pack), max_length=pack)


def shape_name(pack: int) -> str:
    return f"windows of {pack} tokens" if pack else "paragraphs"


class FitData:
    """The distillation data for each WikiText shape (0: paragraphs; N: running-text windows of N tokens).

    Each shape is built once (the teacher answers the prompts) and checked against every reserved
    region once; calling again returns the same (data, where).
    """

    def __init__(self, teacher: Any, args: argparse.Namespace) -> None:
        self.teacher, self.args = teacher, args
        self._made: dict[int, tuple[Any, str]] = {}

    def __call__(self, pack: int) -> tuple[Any, str]:
        if pack not in self._made:
            data = distill_data(self.teacher, n_wikitext=self.args.n_wikitext, n_prompts=self.args.n_prompts,
                                pack=pack)
            label = f"distillation (windows of {pack})" if pack else "distillation"
            self._made[pack] = (data, check_fit_texts(self.teacher, [*data.train, *data.heldout], label))
        return self._made[pack]


def choose_pack(teacher: Any, mask: PruneMask, config: DistillConfig, packs: list[int], fit: FitData,
                probe_minutes: float, val: torch.Tensor, state: dict[str, Any], save: Any) -> int:
    """The WikiText shape (0: paragraphs; N: windows of N tokens) whose probe scores best on VALIDATION.

    Every shape gets its step-time model (the paragraphs' is state["step_time"]). With more than one
    shape, each gets a run of `probe_minutes` at the chosen rate; the paragraphs' run is the
    learning-rate probe at that rate when there was one.
    """
    probes = state.setdefault("pack_probe", {})
    timed = state.setdefault("step_time_pack", {})
    lr_probes = state.get("lr_probe", {})
    for pack in packs:
        if pack and str(pack) not in timed:
            timed[str(pack)] = timed_probe(teacher, mask, fit(pack)[0], step_shape(config, pack))
            save()
        if len(packs) == 1 or probes.get(str(pack)) is not None:
            continue
        if not pack and str(config.lr) in lr_probes:  # that probe already ran this shape at this rate
            probes["0"] = lr_probes[str(config.lr)]
            save()
            continue
        cfg = step_shape(config, pack)
        model = timed[str(pack)] if pack else state["step_time"]
        steps = budget_steps(teacher, fit(pack)[0], cfg, probe_minutes, model)
        student = prune(teacher, mask)
        with guard(teacher):  # the training reads fit text only
            distill(teacher, student, fit(pack)[0], replace(cfg, steps=steps, warmup=max(1, steps // 20)))
        probes[str(pack)] = region_perplexity(student, None, val)
        save()
        _say(f"  WikiText {shape_name(pack)} (batch {cfg.batch_size} x "
             f"{cfg.max_length}): {steps} steps, validation perplexity {probes[str(pack)]:.3f}")
        del student
    return packs[0] if len(packs) == 1 else min(packs, key=lambda p: probes[str(p)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--method", default="obs", help="bench_quality method that makes the student")
    ap.add_argument("--config", default="width20", help="bench_quality configuration (width20: ~20%% of parameters)")
    ap.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget")
    ap.add_argument("--every", type=float, default=5.0, help="minutes of training between curve points")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3",
                    help="learning rates compared by a short run each on the VALIDATION windows; the best trains")
    ap.add_argument("--probe-minutes", type=float, default=3.0, help="training minutes of each learning-rate probe")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--n-wikitext", type=int, default=512, help="WikiText-2 paragraphs (end of the file)")
    ap.add_argument("--n-prompts", type=int, default=160, help="training prompts answered by the teacher")
    ap.add_argument("--packs", default="0,512",
                    help="WikiText as one text per paragraph (0) or as running-text windows of N tokens "
                         "(batch shrunk to keep batch x length tokens per step): each is probed at the chosen "
                         "learning rate on the VALIDATION windows and the best trains")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="short protocols, the quick quality cache")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--csv", default="bench/results/recovery_budget.csv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher = load_model(args.model)
    protocol = PerplexityProtocol(window=256, stride=256, n_windows=2) if args.quick else DEFAULT_PROTOCOL
    ho = heldout_windows(teacher, HELDOUT_OFFSET, 256 if args.quick else 512, 2 if args.quick else 12)
    work = cache_dir_root() / "bench" / ("recovery_budget_quick" if args.quick else "recovery_budget") / (
        f"{(args.model or DEFAULT_MODEL).replace('/', '_')}_{args.method}_{args.config}_{args.minutes:g}min_"
        f"{args.n_wikitext}w{args.n_prompts}p_lrs{args.lrs}_{args.probe_minutes:g}"
        + (f"_packs{args.packs}" if args.packs != "0" else "")).replace("[", "(").replace("]", ")")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    curve_path = work / "curve.json"
    state: dict[str, Any] = json.loads(curve_path.read_text()) if curve_path.exists() else {}

    dense = perplexity(teacher, None, protocol).perplexity
    dense_ho = heldout_perplexity(teacher, None, ho)
    dense_val = region_perplexity(teacher, None, region_windows(
        teacher, "validation", n=2 if args.quick else None, window=256 if args.quick else None))
    mask = student_mask(teacher, args.model, args.method, args.config, args.quick)
    c = cost(teacher, mask)
    fit = FitData(teacher, args)
    data = fit(0)[0]
    calibration_where = check_fit_texts(teacher, calibration_texts("wikitext", args.n_wikitext), "calibration")
    val = region_windows(teacher, "validation", n=2 if args.quick else None, window=256 if args.quick else None)
    config = DistillConfig(steps=1, batch_size=args.batch_size, max_length=args.max_length,
                           temperature=args.temperature, patience=0, restore_best=False, checkpoint_every=25,
                           eval_every=10_000)
    def save() -> None:
        curve_path.write_text(json.dumps(state, indent=1))

    if "step_time" not in state:
        state["step_time"] = timed_probe(teacher, mask, data, config)
        save()
    lrs = [float(x) for x in args.lrs.split(",")]
    packs = [int(x) for x in args.packs.split(",")]
    # the learning-rate probes train the shape that will train when one is given (else paragraphs, and the shapes
    # are compared at the chosen rate)
    lr_pack = packs[0] if len(packs) == 1 else 0
    if lr_pack and str(lr_pack) not in state.setdefault("step_time_pack", {}):
        state["step_time_pack"][str(lr_pack)] = timed_probe(teacher, mask, fit(lr_pack)[0],
                                                            step_shape(config, lr_pack))
        save()
    lr = lrs[0] if len(lrs) == 1 else choose_lr(
        teacher, mask, fit(lr_pack)[0], step_shape(config, lr_pack), lrs, args.probe_minutes,
        state["step_time_pack"][str(lr_pack)] if lr_pack else state["step_time"], val, state, save)
    state["lr"] = lr
    config = replace(config, lr=lr)
    pack = choose_pack(teacher, mask, config, packs, fit, args.probe_minutes, val, state, save)
    data, fit_where = fit(pack)
    config = step_shape(config, pack)
    where = f"{calibration_where}; {fit_where}"
    state["pack"] = pack
    step_time = state["step_time_pack"][str(pack)] if pack else state["step_time"]
    steps = budget_steps(teacher, data, config, args.minutes, step_time, minimum=10)
    config = replace(config, steps=steps, warmup=max(1, steps // 20))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    _say(f"# {teacher.name}: {c.params_kept:,}/{c.params_total:,} parameters kept ({100 * c.params_removed_fraction:.1f}% "
         f"removed) by {args.method}@{args.config}; {args.threads} thread(s), load {load:.1f}; data {data.sources} "
         f"({where}); batch {config.batch_size} x {config.max_length} tokens; probe {step_time['fixed_s']:.2f} s + "
         f"{1e3 * step_time['per_token_s']:.2f} ms/token a step (+{step_time.get('checkpoint_s', 0.0):.1f} s a "
         f"checkpoint), over the run's batches -> {steps} steps for "
         f"{args.minutes:g} minutes; lr {lr:g} "
         + (f"chosen on validation ({state.get('lr_probe', {})}, each trained on {shape_name(lr_pack)})"
            if len(lrs) > 1 else "given (--lrs, no probe)")
         + f"; WikiText as {shape_name(pack)}, "
         + (f"chosen on validation ({state.get('pack_probe', {})})" if len(packs) > 1 else "given (--packs, no probe)"))

    student = prune(teacher, mask)
    points: list[dict[str, Any]] = state.setdefault("points", [])
    state.setdefault("eval_in_training_s", 0.0)  # curve evaluations run inside the distillation's wall time

    def point(step: int, train_s: float, in_training: bool = False) -> None:
        t = time.perf_counter()
        ppl = perplexity(student, None, protocol).perplexity
        ppl_ho = heldout_perplexity(student, None, ho)
        ppl_val = region_perplexity(student, None, val)
        if in_training:
            state["eval_in_training_s"] += time.perf_counter() - t
        points.append({"minutes": round(train_s / 60, 2), "step": step, "ppl_main": round(ppl, 3),
                       "ratio_main": round(ppl / dense, 3), "ppl_heldout": round(ppl_ho, 3),
                       "ratio_heldout": round(ppl_ho / dense_ho, 3), "ppl_validation": round(ppl_val, 3),
                       "ratio_validation": round(ppl_val / dense_val, 3)})
        curve_path.write_text(json.dumps(state, indent=1))
        _say(f"  {train_s / 60:5.1f} min, step {step:4d}: main {ppl:.2f} ({ppl / dense:.3f}x), "
             f"held-out {ppl_ho:.2f} ({ppl_ho / dense_ho:.3f}x)")

    if not points:
        point(0, 0.0)
    records: list[Any] = []
    trained: dict[int, float] = {}  # step -> training seconds when it ended (the curve's evaluations after it left out)

    def train_s(rec: Any) -> float:
        """Training time: the run's wall time (kept across resumes by the checkpoint) less the curve's evaluations."""
        return rec.elapsed_s - state["eval_in_training_s"]

    def on_step(rec: Any) -> None:
        if not records and rec.step:  # resumed from a checkpoint: points past it are measured again
            points[:] = [p for p in points if p["step"] < rec.step]
        records.append(rec)
        trained[rec.step] = train_s(rec)
        if rec.step and train_s(rec) >= len(points) * args.every * 60:
            point(rec.step, train_s(rec), in_training=True)
        if rec.step % 25 == 0 and rec.loss is not None:
            _say(f"  step {rec.step}/{rec.steps} loss {rec.loss:.4f} ({train_s(rec) / 60:.1f} min of training)")

    if not state.get("done"):
        # the run sizes itself again after a fifth of its steps, from those steps' training time (budget.Rebudget)
        resize = Rebudget(teacher.tokenizer, data, args.minutes * 60, StepTime(**step_time),
                          clock=lambda r: trained.get(r.step, train_s(r)))
        result = distill(teacher, student, data, config, out_dir=work / "distill",
                         resume=has_checkpoint(work / "distill"), progress=on_step, resize=resize,
                         should_stop=lambda: bool(records) and train_s(records[-1]) >= args.minutes * 60)
        if resize.refit is not None:
            state["step_time_run"] = asdict(resize.refit)
            _say(f"  re-sized after step {resize.at(steps)}: {resize.refit.fixed_s:.2f} s + "
                 f"{1e3 * resize.refit.per_token_s:.2f} ms/token a step -> {result.steps_planned} steps")
        state["steps_planned"] = result.steps_planned
        if points[-1]["step"] != result.steps_run:
            point(result.steps_run, train_s(records[-1]))
        a = agreement(student, None, ho, reference=dense_reference(teacher, ho, n_prompts=AGREE_PROMPTS, n_new=AGREE_NEW))
        state.update(done=True, steps=result.steps_run, top1_heldout=round(a.top1, 4),
                     greedy_heldout=round(a.greedy_prefix, 4))
        curve_path.write_text(json.dumps(state, indent=1))
    print(f"# recovery within {args.minutes:g} minutes: {teacher.name}, {args.method}@{args.config} "
          f"({100 * c.params_removed_fraction:.1f}% of parameters removed), {args.threads} thread(s) on "
          f"{platform.machine()} ({os.cpu_count()} cores); dense main {dense:.3f}, held-out {dense_ho:.3f}; "
          f"after training: top-1 agreement {state['top1_heldout']:.1%}, greedy {state['greedy_heldout']:.1%}")
    print("| minutes | step | main | x dense | held-out | x dense |\n|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['minutes']:.1f} | {p['step']} | {p['ppl_main']:.2f} | {p['ratio_main']:.3f} | "
              f"{p['ppl_heldout']:.2f} | {p['ratio_heldout']:.3f} |")
    if not args.quick:
        student = f"{args.method}@{args.config}"
        rows = [{"student": student, "budget_minutes": args.minutes, **p, "lr": lr, "pack": pack,
                 "top1_heldout": state["top1_heldout"],
                 "measured": state.setdefault("measured", time.strftime("%Y-%m-%d"))} for p in points]
        write_rows(merge_curves(Path(args.csv), rows, student, args.minutes), Path(args.csv))
        curve_path.write_text(json.dumps(state, indent=1))
        print(f"wrote {args.csv}")


def merge_curves(path: Path, rows: list[dict[str, Any]], student: str, budget: float = 30.0) -> list[dict[str, Any]]:
    """The CSV's curves with `student`'s at this `budget` (minutes the schedule was sized to) replaced by `rows`:
    one curve per student and budget, each row dated (a row from before the column existed had 30 minutes)."""
    import csv

    def same(r: dict[str, Any]) -> bool:
        return r.get("student") == student and float(r.get("budget_minutes") or 30.0) == float(budget)

    old = [r for r in (csv.DictReader(path.open()) if path.exists() else []) if not same(r)]
    for r in old:
        r["budget_minutes"] = r.get("budget_minutes") or 30.0
    cols = list(dict.fromkeys([*rows[0], *(k for r in old for k in r)])) if rows else []
    return [{k: r.get(k, "") for k in cols} for r in [*old, *rows]]


if __name__ == "__main__":
    sys.exit(main())
