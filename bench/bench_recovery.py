"""Recovery by distillation, and 1-/2-bit students by single- vs multi-stage recipes, at equal steps.

    python bench/bench_recovery.py                 # both tables (the causal LM is slow on a CPU)
    python bench/bench_recovery.py --quick         # a smoke run: few steps, 4 perplexity windows
    python bench/bench_recovery.py --skip-lm --encoder-steps 300

Causal LM (the default SmolLM2-135M-Instruct): the student is the teacher pruned uniformly in
width to `--keep` of its parameters (headlab.engine.pruning.size_target, gradient criterion on WikiText-2
paragraphs from the end of the file), physically (headlab.engine.export.surgery). Rows: the dense teacher,
the student before recovery (full precision, and quantised at step 0), after full-precision KD,
and 2-/1-bit students by each recipe, every KD row with the same number of optimisation
steps. Perplexity uses the pinned protocol (the start of WikiText-2 test: never trained on).
Distillation data: WikiText-2 paragraphs from the end of the file + the teacher's greedy
answers to shipped training prompts.

MiniLM encoder: the same rows, measured by agreement with the teacher's sentence embeddings on
held-out prompts (never trained on): Spearman of pairwise cosines, nearest-neighbour agreement.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from headlab.engine.core.csvfile import write_rows
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.export.surgery import prune
from headlab.engine.models.load import load_model
from headlab.engine.recovery.distill import DistillConfig, distill_data, prompt_split
from headlab.engine.recovery.encoder_agreement import encoder_agreement
from headlab.engine.recovery.quantize import set_quantization_
from headlab.engine.recovery.recipes import recovery_student, run_recipe
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, PerplexityProtocol, perplexity

RUN_NAMES = {"fp32": ("fp32", None), "single2": ("single", 2), "multi2": ("multi", 2), "single1": ("single", 1),
             "multi1": ("multi", 1)}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(label: str) -> Callable[[Any], None]:
    def cb(rec: Any) -> None:
        if rec.heldout is not None or rec.step % 10 == 0:
            held = f" held-out {rec.heldout:.4f}" if rec.heldout is not None else ""
            loss = "" if rec.loss is None else f" loss {rec.loss:.4f}"
            _say(f"  [{label}] step {rec.step}/{rec.steps}{loss}{held} ({rec.elapsed_s:.0f} s) {rec.stage}")
    return cb


def _bits_label(bits: int | None) -> str:
    return "fp32" if bits is None else f"{bits}-bit"


def _recovery_name(recipe: str, result: Any) -> str:
    """The table's recovery column: "KD", "KD single-stage", or the multi-stage run's stages and steps."""
    name = "KD" if recipe == "fp32" else f"KD {recipe}-stage"
    if recipe == "multi":
        name += " (" + " -> ".join(f"{s.name} {s.steps}" for s, _ in result.stages) + ")"
    return name


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line([r[c] for c in cols]) for r in rows)])


def _quantised_copy(teacher: Any, mask: Any, bits: int) -> Any:
    student = prune(teacher, mask)
    set_quantization_(student.model, bits, "ternary" if bits == 2 else None)
    return student


def bench_lm(args: argparse.Namespace) -> list[dict[str, Any]]:
    protocol = PerplexityProtocol(n_windows=4) if args.quick else DEFAULT_PROTOCOL
    teacher = load_model(args.model)
    dense = perplexity(teacher, protocol=protocol)
    _say(f"dense perplexity {dense.perplexity:.3f}; {dense.protocol.describe(dense.tokenizer, dense.n_tokens)}")
    t = time.perf_counter()
    base, size = recovery_student(teacher, args.keep, texts=calibration_texts("wikitext", args.n_score_texts))
    _say(f"student: {size.describe()} ({time.perf_counter() - t:.0f} s to score)")
    mask = size.mask
    c = cost(teacher, mask)
    t = time.perf_counter()
    data = distill_data(teacher, n_wikitext=args.n_wikitext, n_prompts=args.n_prompts,
                        max_new_tokens=args.max_new_tokens)
    _say(f"data: {len(data.train)} train / {len(data.heldout)} held-out texts {data.sources} "
         f"({time.perf_counter() - t:.0f} s, teacher continuations cached)")
    config = DistillConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                           temperature=args.temperature, eval_every=max(1, args.steps // 4), patience=0,
                           warmup=max(1, args.steps // 10), restore_best=False)
    rows: list[dict[str, Any]] = []

    def row(model: str, recovery: str, ppl: float, steps: int = 0, wall: float = 0.0, held: float | None = None):
        rows.append({"model": model, "recovery": recovery, "steps": steps, "wall_s": round(wall),
                     "s_per_step": round(wall / steps, 1) if steps else "", "perplexity": round(ppl, 2),
                     "vs_teacher": round(ppl / dense.perplexity, 2),
                     "heldout_kl": "" if held is None else round(held, 4)})
        _say(f"{model:>26} | {recovery:<28} | ppl {ppl:,.2f}")

    row("teacher (dense)", "-", dense.perplexity)
    row("pruned fp32", "none", perplexity(base, protocol=protocol).perplexity)
    for bits in (2, 1):
        row(f"pruned {bits}-bit", "none (quantised, step 0)",
            perplexity(_quantised_copy(teacher, mask, bits), protocol=protocol).perplexity)
    for recipe, bits in args.runs:
        student = prune(teacher, mask)
        label = _bits_label(bits)
        r = run_recipe(teacher, student, data, recipe, bits, config=config, progress=_progress(f"{label} {recipe}"))
        name = _recovery_name(recipe, r)
        ppl = perplexity(student, protocol=protocol).perplexity
        row(f"pruned {label}", name, ppl, r.steps_run, r.wall_s, r.stages[-1][1].final_heldout)
        del student
    header = (f"# LM: {teacher.name}, {c.params_kept:,}/{c.params_total:,} parameters kept "
              f"({100 * c.params_removed_fraction:.1f}% removed: {size.detail}); KD {args.steps} steps x "
              f"{args.batch_size} x {args.max_length} tokens, lr {args.lr}, T {args.temperature}; "
              f"perplexity on {dense.protocol.describe(dense.tokenizer, dense.n_tokens)}")
    print(header)
    print(_table(rows, list(rows[0])))
    if not args.quick:
        write_rows(rows, Path(args.csv_prefix + "_lm.csv"))
    return rows


def bench_encoder(args: argparse.Namespace) -> list[dict[str, Any]]:
    teacher = load_model("minilm")
    heldout = prompt_split()[1][: args.n_heldout]
    base, size = recovery_student(teacher, args.encoder_keep, texts=calibration_texts("wikitext", args.n_score_texts))
    mask = size.mask
    c = cost(teacher, mask)
    _say(f"encoder student: {size.describe()}")
    data = distill_data(teacher, n_wikitext=args.n_wikitext, n_prompts=args.encoder_prompts)
    config = DistillConfig(steps=args.encoder_steps, batch_size=args.encoder_batch, max_length=args.max_length,
                           lr=args.encoder_lr, eval_every=max(1, args.encoder_steps // 4), patience=0,
                           warmup=max(1, args.encoder_steps // 10), restore_best=False)
    rows: list[dict[str, Any]] = []

    def row(model: str, recovery: str, student: Any, steps: int = 0, wall: float = 0.0):
        a = encoder_agreement(teacher, student, heldout)
        rows.append({"model": model, "recovery": recovery, "steps": steps, "wall_s": round(wall, 1),
                     "spearman": round(a.spearman, 4), "nn_agreement": round(a.nn_agreement, 3),
                     "mean_cosine": round(a.mean_cosine, 4)})
        _say(f"{model:>26} | {recovery:<28} | {a.describe()}")

    row("teacher (dense)", "-", teacher)
    row("pruned fp32", "none", base)
    for bits in (2, 1):
        row(f"pruned {bits}-bit", "none (quantised, step 0)", _quantised_copy(teacher, mask, bits))
    for recipe, bits in args.runs:
        student = prune(teacher, mask)
        label = _bits_label(bits)
        r = run_recipe(teacher, student, data, recipe, bits, config=config, progress=_progress(f"enc {label} {recipe}"))
        name = _recovery_name(recipe, r)
        row(f"pruned {label}", name, student, r.steps_run, r.wall_s)
    print(f"# encoder: {teacher.name}, {c.params_kept:,}/{c.params_total:,} parameters kept "
          f"({100 * c.params_removed_fraction:.1f}% removed: {size.detail}); KD {args.encoder_steps} steps x "
          f"{args.encoder_batch} x {args.max_length} tokens, lr {args.encoder_lr}; agreement on {len(heldout)} "
          f"held-out prompts ({len(data.train)} training texts)")
    print(_table(rows, list(rows[0])))
    if not args.quick:
        write_rows(rows, Path(args.csv_prefix + "_encoder.csv"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="causal LM (default: the shipped SmolLM2-135M-Instruct)")
    ap.add_argument("--keep", type=float, default=0.7, help="fraction of the LM's parameters the student keeps")
    ap.add_argument("--encoder-keep", type=float, default=0.7, help="the same for the MiniLM encoder")
    ap.add_argument("--steps", type=int, default=40, help="KD steps per LM recipe (all stages together)")
    ap.add_argument("--encoder-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--encoder-batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--encoder-lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--n-score-texts", type=int, default=32, help="calibration paragraphs for the pruning scores")
    ap.add_argument("--n-wikitext", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=48, help="prompts the teacher answers for the LM's data")
    ap.add_argument("--encoder-prompts", type=int, default=400, help="training prompts for the encoder")
    ap.add_argument("--n-heldout", type=int, default=200, help="held-out prompts for the encoder agreement")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", default=",".join(RUN_NAMES), help=f"KD runs, from: {', '.join(RUN_NAMES)}")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 4 perplexity windows, no CSV")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--csv-prefix", default="bench/results/recovery")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.encoder_steps, args.n_wikitext, args.n_prompts = 4, 6, 8, 4
        args.encoder_prompts, args.n_heldout, args.max_new_tokens, args.n_score_texts = 16, 24, 16, 4
    unknown = [r for r in args.runs.split(",") if r not in RUN_NAMES]
    if unknown:
        ap.error(f"unknown run(s) {unknown}; choose from {', '.join(RUN_NAMES)}")
    args.runs = [RUN_NAMES[r] for r in args.runs.split(",")]
    torch.set_num_threads(args.threads)
    print(f"# bench_recovery: {args.threads} threads on {platform.machine()} ({os.cpu_count()} cores), "
          f"torch {torch.__version__}; wall times are for this machine and its load")
    if not args.skip_lm:
        bench_lm(args)
    if not args.skip_encoder:
        bench_encoder(args)


if __name__ == "__main__":
    main()
