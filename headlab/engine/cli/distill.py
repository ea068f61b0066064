"""`python -m headlab distill`: prune, then recover by distillation (optionally to a 1-/2-bit student).

    python -m headlab distill --keep 0.7 --out runs/kd                        # FP32 KD of a 30%-smaller student
    python -m headlab distill --mask mask.json --recipe single --bits 1 --out runs/xtc
    python -m headlab distill --keep 0.7 --recipe multi --bits 1 --steps 300 --out runs/bb
    python -m headlab distill ... --out runs/bb --resume                      # after Ctrl-C: same run, continued
    python -m headlab distill --keep 0.8 --minutes 15 --out runs/kd15         # as many steps as fit 15 minutes
    python -m headlab distill --model minilm --keep 0.8 --out runs/minilm     # the sentence encoder

--minutes sizes the run (its step count, and so its cosine schedule) to a wall-clock budget of training: a
timed probe on a throwaway copy gives seconds per step as fixed + per padded token, summed over the batches the
run will draw (headlab.engine.recovery.distill.budget), and after a fifth of those steps the run sizes itself
again from its own steps (budget.Rebudget: a probe's few steps can be 10-20% off). The probe is kept in the
folder and the length in the checkpoint, so --resume continues the same schedule.

The folder gets the mask, each stage's checkpoints, `result.json` (metrics before / after, the
step history) and `student/`: the dequantised Hugging Face model (+ int8 codes and scales for a
quantised student, see headlab.engine.recovery.quantize.export_student).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable

from headlab.engine.cli.common import (
    Subparsers,
    add_model_args,
    add_protocol_args,
    load_handle,
    progress_bar,
    protocol_from_args,
    say,
)
from headlab.engine.core.files import write_atomic_text
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.export.surgery import prune
from headlab.engine.recovery.distill import MODES, DistillConfig, StepRecord, distill_data, prompt_split
from headlab.engine.recovery.distill.budget import Rebudget, StepTime, probe_step_time, steps_for_budget
from headlab.engine.recovery.encoder_agreement import encoder_agreement
from headlab.engine.recovery.quantize import export_student
from headlab.engine.recovery.recipes import RECIPES, plan_stages, recovery_student, run_recipe
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.evaluate import perplexity

__all__ = ["register", "cmd_distill"]


def _step_printer(every: int) -> Callable[[StepRecord], None]:
    """A progress callback printing every `every`-th step and every held-out evaluation."""
    def show(rec: StepRecord) -> None:
        if rec.heldout is None and rec.step % every:
            return
        held = f", held-out {rec.heldout:.4f}" if rec.heldout is not None else ""
        loss = "" if rec.loss is None else f" loss {rec.loss:.4f}"  # a stage's step 0 is an evaluation only
        say(f"  step {rec.step}/{rec.steps}{loss}{held} [{rec.stage}, {rec.elapsed_s:.0f} s]")
    return show


def _student(args: argparse.Namespace, handle: ModelHandle, out: Path) -> tuple[ModelHandle, PruneMask]:
    """(student, mask): from --mask, from a saved mask when resuming, or by width pruning to --keep."""
    saved = out / "mask.json"
    if args.mask or (args.resume and saved.exists()):
        mask = PruneMask.load(args.mask or saved, handle.geometry)
        return prune(handle, mask), mask
    with progress_bar("reconstructing (obs)" if args.criterion == "obs" else f"scoring ({args.criterion})") as cb:
        student, size = recovery_student(handle, args.keep, criterion=args.criterion,
                                         texts=calibration_texts("wikitext", args.n_score_texts), progress=cb)
    print(f"student: {size.describe()}")
    return student, size.mask


def _measure(args: argparse.Namespace, teacher: ModelHandle, model: ModelHandle,
             heldout: list[str]) -> dict[str, Any]:
    """Perplexity of `model` for a causal LM teacher, else its embeddings' agreement with the teacher's."""
    if teacher.is_causal_lm:
        return perplexity(model, protocol=protocol_from_args(args)).to_dict()
    return encoder_agreement(teacher, model, heldout).to_dict()


def _describe(m: dict[str, Any], base: dict[str, Any] | None) -> str:
    """One phrase for a _measure result, relative to `base` (the teacher's) when given."""
    if "perplexity" in m:
        ratio = f" ({m['perplexity'] / base['perplexity']:.2f}x teacher)" if base else ""
        return f"perplexity {m['perplexity']:,.2f}{ratio}"
    return (f"Spearman {m['spearman']:.4f}, nearest neighbour kept {100 * m['nn_agreement']:.1f}%, "
            f"mean cosine {m['mean_cosine']:.4f}")


def _budget_steps(args: argparse.Namespace, teacher: ModelHandle, mask: PruneMask, data: Any,
                  config: DistillConfig, out: Path) -> tuple[int, StepTime]:
    """The steps that fill --minutes of training (module doc) and the step-time model they come from, probed once
    and kept in out/budget.json."""
    saved = out / "budget.json"
    if args.resume and saved.exists():
        kept = json.loads(saved.read_text())
        if kept.get("minutes") == args.minutes:
            return int(kept["steps"]), StepTime(**{f.name: kept[f.name] for f in fields(StepTime) if f.name in kept})
        raise ValueError(f"{out} was sized to {kept.get('minutes')} minutes; resume it with that --minutes")
    say(f"timing a few steps to fit {args.minutes:g} minutes ...")
    model = probe_step_time(teacher, mask, data, config)
    steps = steps_for_budget(teacher.tokenizer, data, config, args.minutes * 60, model)
    write_atomic_text(saved, json.dumps({"minutes": args.minutes, "steps": steps, **asdict(model)}, indent=1))
    print(f"budget: {steps} steps fit {args.minutes:g} minutes ({model.fixed_s:.2f} s + "
          f"{1e3 * model.per_token_s:.3f} ms per padded token a step; {model.eval_s:.1f} s an evaluation, "
          f"{model.checkpoint_s:.1f} s a checkpoint)")
    return steps, model


def cmd_distill(args: argparse.Namespace) -> int:
    """Prune to the student, distil it by --recipe (resumable), measure it and write the run folder.

    Under torchrun each rank builds the same student, the training splits every batch across the ranks
    (headlab.engine.recovery.distill.loop), and rank 0 alone measures and writes the run folder.
    """
    world = args.world
    if (args.mask is None) == (args.keep is None) and not (args.resume and args.keep is None):
        raise ValueError("give exactly one of --mask (a mask file) or --keep (a size target, e.g. 0.7)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty: pass --resume to continue the run there, or choose a new --out")
    world.barrier()  # every rank has looked at --out before rank 0 writes into it
    if args.pack and args.max_length < args.pack:  # a window longer than the text length would be cut
        raise SystemExit(f"--pack {args.pack} needs --max-length {args.pack} or more (got {args.max_length})")
    if args.minutes is not None and (args.minutes <= 0 or world.size > 1 or args.recipe != "fp32"):
        raise SystemExit("--minutes takes a positive budget and sizes a single-process fp32 run; under torchrun "
                         "or for the 1-/2-bit recipes give --steps")
    config = DistillConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                           temperature=args.temperature, hidden_weight=args.hidden_weight, mode=args.mode,
                           lora_rank=args.lora_rank, eval_every=args.eval_every, patience=args.patience,
                           checkpoint_every=args.checkpoint_every, warmup=args.warmup).check()
    stages = plan_stages(args.recipe, args.bits, args.steps, args.scheme)  # fail before any slow work
    teacher = load_handle(args)
    student, mask = _student(args, teacher, out)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        mask.save(out / "mask.json")
    c = cost(teacher, mask)
    print(f"student: {c.params_kept:,}/{c.params_total:,} parameters ({100 * c.params_removed_fraction:.1f}% "
          f"removed); recipe {args.recipe}: " + (f"steps sized to {args.minutes:g} minutes" if args.minutes else
                                                   " -> ".join(f"{s.name} x {s.steps} steps" for s in stages)))
    for turn in (True, False):  # rank 0 generates the teacher's answers; the other ranks then read its cache
        if world.is_main == turn:
            with progress_bar("teacher answers") as cb:
                data = distill_data(teacher, n_wikitext=args.n_wikitext, n_prompts=args.n_prompts,
                                    max_new_tokens=args.max_new_tokens, pack=args.pack, progress=cb)
        world.barrier()
    print(f"data: {len(data.train)} training / {len(data.heldout)} held-out texts {data.sources}")
    resize = None
    if args.minutes is not None:
        steps, model = _budget_steps(args, teacher, mask, data, config, out)
        config = replace(config, steps=steps)
        resize = Rebudget(teacher.tokenizer, data, args.minutes * 60, model)
        print(f"the run sizes itself again from its own steps after step {resize.at(steps)}")
    heldout = prompt_split()[1][: args.n_heldout]
    before = {}
    if not args.no_eval and world.is_main:
        before = {"teacher": _measure(args, teacher, teacher, heldout),
                  "student_before": _measure(args, teacher, student, heldout)}
        print(f"teacher:              {_describe(before['teacher'], None)}")
        print(f"student, no recovery: {_describe(before['student_before'], before['teacher'])}")
    t = time.perf_counter()
    try:
        result = run_recipe(teacher, student, data, args.recipe, args.bits, config=config, scheme=args.scheme,
                            out_dir=out / "stages", resume=args.resume, resize=resize,
                            progress=_step_printer(max(1, args.eval_every // 5)), world=world)
    except KeyboardInterrupt:
        say(f"\ninterrupted: the checkpoint is in {out / 'stages'}; add --resume to the same command to continue")
        return 130
    world.settle(None, "distillation")  # every rank finished before rank 0 writes the student and the result
    if not world.is_main:
        return 0
    print(f"{result.label}: {result.steps_run}/{result.steps_planned} steps in {time.perf_counter() - t:.0f} s "
          f"(training {result.wall_s:.0f} s)")
    summary: dict[str, Any] = {**before, "recipe": result.to_dict(), "steps_run": result.steps_run,
                               "data": data.sources, "params": c.to_dict()}
    if not args.no_eval:
        summary["student_after"] = _measure(args, teacher, student, heldout)
        print(f"student, {result.label} ({result.steps_run} steps): "
              f"{_describe(summary['student_after'], before['teacher'])}")
    folder = export_student(student, out / "student", overwrite=args.resume,
                            manifest={k: v for k, v in summary.items() if k != "recipe"} | {"recipe": args.recipe,
                                      "bits": None if args.recipe == "fp32" else args.bits, "source": teacher.name})
    write_atomic_text(out / "result.json", json.dumps(summary, indent=1, default=str))
    print(f"wrote the student to {folder} and the run to {out / 'result.json'}")
    return 0


def register(sub: Subparsers) -> None:
    """Add the distill verb."""
    p = sub.add_parser("distill", help="prune, then recover by distillation (optionally 1-/2-bit)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_protocol_args(p)
    p.add_argument("--mask", help="mask JSON to prune by (written by `prune` or the app)")
    p.add_argument("--keep", type=float, help="or: keep this fraction of the parameters (uniform width pruning)")
    p.add_argument("--criterion", default="obs",
                   help="how --keep chooses heads and FFN channels: obs (structured OBS with the kept weights "
                        "re-solved, the default) or gradient, magnitude, activation (no re-fit)")
    p.add_argument("--n-score-texts", type=int, default=32, help="calibration paragraphs for --keep's scores")
    p.add_argument("--recipe", default="fp32", choices=RECIPES, help="fp32 KD, single-stage (XTC) or multi-stage")
    p.add_argument("--bits", type=int, default=1, choices=[1, 2], help="target bits of single/multi recipes")
    p.add_argument("--scheme", default=None, choices=["ternary", "uniform"], help="2-bit scheme")
    p.add_argument("--mode", default="full", choices=MODES, help="full fine-tuning or LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=150, help="total optimisation steps (all stages)")
    p.add_argument("--minutes", type=float, default=None,
                   help="or: as many steps as fit this many minutes of training (fp32, one process; module doc)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128, help="tokens per training text")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the matched hidden-state MSE")
    p.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every N steps")
    p.add_argument("--patience", type=int, default=3, help="stop after N evaluations without improvement (0: never)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--n-wikitext", type=int, default=64, help="WikiText-2 paragraphs (end of file) to train on")
    p.add_argument("--pack", type=int, default=0,
                   help="WikiText as the file's running text in windows of N tokens, across paragraph boundaries "
                        "(0: one text per paragraph); set --max-length to N and --batch-size to keep the tokens "
                        "per step")
    p.add_argument("--n-prompts", type=int, default=48, help="training prompts (answered by the teacher for an LM)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="length of the teacher's answers")
    p.add_argument("--n-heldout", type=int, default=200, help="held-out prompts for the encoder agreement")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after measurements")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    p.add_argument("--out", default="runs/distill", help="run folder (checkpoints, result.json, student/)")
    p.set_defaults(func=cmd_distill, data_parallel=True)
