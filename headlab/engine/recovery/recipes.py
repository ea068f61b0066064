"""Recovery recipes at an equal step budget: full precision, single-stage and multi-stage low-bit.

    student, size = recovery_student(teacher, keep=0.7)            # uniform width pruning to 70% of the parameters
    result = run_recipe(teacher, student, data, "single", bits=1, config=DistillConfig(steps=150))

Recipes (`steps` is the total over all stages, so recipes compare at equal compute):
- "fp32":   one KD run in full precision (the recovered pruned model; `bits` is ignored);
- "single": XTC (Wu et al., NeurIPS 2022): start from the full-precision student, quantise to the
            target bits at step 0, distil once for all the steps;
- "multi":  BinaryBERT-style (Bai et al., ACL 2021): full-precision KD, then 2-bit (ternary) KD,
            then 1-bit KD, each stage starting from the previous one's weights; the steps are
            split evenly (1-bit: thirds; 2-bit: halves). BinaryBERT's ternary weight splitting
            (which doubles the width before the 1-bit stage) is not done: the 1-bit stage
            starts from the ternary stage's latent weights.
With an `out_dir`, each stage keeps its own checkpoint folder; `resume=True` skips finished
stages (reloading their final weights) and resumes the interrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.jobs import FAILED, PENDING, Job
from headlab.engine.core.progress import Progress
from headlab.engine.distributed.world import SINGLE, World
from headlab.engine.export.surgery import prune
from headlab.engine.pruning.size_target import reach_size
from headlab.engine.pruning.strategies import Calibration
from headlab.engine.pruning.strategies.reconstruct import REFIT_TEXTS, width_by_reconstruction
from headlab.engine.recovery.distill import (
    DistillConfig,
    DistillData,
    DistillError,
    DistillResult,
    StepRecord,
    distill,
    distill_data,
    has_checkpoint,
    prepare_student_,
    prompt_split,
    with_bits,
)
from headlab.engine.recovery.distill.budget import Rebudget, probe_step_time, steps_for_budget
from headlab.engine.recovery.encoder_agreement import encoder_agreement
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, perplexity

__all__ = ["RECIPES", "Stage", "RecipeResult", "RecoveryJob", "plan_stages", "recovery_student", "run_recipe"]

RECIPES = ("fp32", "single", "multi")
_DONE = "done.json"
_FINAL = "final.safetensors"


@dataclass(frozen=True)
class Stage:
    name: str
    bits: int | None
    steps: int
    scheme: str | None = None


def plan_stages(recipe: str, bits: int | None, steps: int, scheme: str | None = None) -> list[Stage]:
    """The stages of `recipe` for a target of `bits`, splitting `steps` between them (module doc)."""
    if recipe not in RECIPES:
        raise DistillError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if not isinstance(steps, int) or steps < 1:
        raise DistillError(f"the step budget must be a positive integer, got {steps!r}")
    if recipe == "fp32":
        return [Stage("fp32", None, steps)]
    if bits not in (1, 2):
        raise DistillError(f"recipe {recipe!r} needs a target of 1 or 2 bits, got {bits!r}")
    if recipe == "single":
        return [Stage(f"{bits}bit", bits, steps, scheme if bits == 2 else None)]
    ladder = [None, 2, 1] if bits == 1 else [None, 2]
    if steps < len(ladder):
        raise DistillError(f"a multi-stage recipe to {bits} bit needs at least {len(ladder)} steps, got {steps}")
    share = steps // len(ladder)
    counts = [share] * (len(ladder) - 1) + [steps - share * (len(ladder) - 1)]
    # A 1-bit target goes through ternary (BinaryBERT); a 2-bit target uses the scheme asked for.
    two_bit = scheme if bits == 2 else "ternary"
    return [Stage("fp32" if b is None else f"{b}bit", b, n, two_bit if b == 2 else None)
            for b, n in zip(ladder, counts)]


def recovery_student(teacher: ModelHandle, keep: float = 0.7, *, criterion: str = "obs",
                     texts: Sequence[str] | None = None, prune_heads: bool = True,
                     progress: Progress | None = None) -> tuple[Any, Any]:
    """(student, size result): `teacher` pruned uniformly in width to `keep` of its parameters.

    The same number of query heads per KV group and FFN channels goes in every layer, so the student
    keeps its family's standard config. `criterion`:
    - "obs" (the default): chosen and re-fitted by structured OBS
      (headlab.engine.pruning.strategies.reconstruct.width_by_reconstruction, uniform layout: the kept O and
      down columns re-solved by least squares on WikiText-2 paragraphs from the end of the file;
      `texts` are used when there are at least 128 of them). It starts distillation from a far
      better student (bench/bench_quality.py, width20);
    - "gradient", "magnitude", "activation": headlab.engine.pruning.size_target's width route on `texts`
      (WikiText-2 calibration paragraphs by default), no re-fit.
    Then headlab.engine.export.surgery.prune: a physically smaller copy.
    """
    if criterion == "obs":
        if not prune_heads:
            raise ValueError("criterion 'obs' chooses heads and channels together; use another criterion "
                             "to keep every head")
        # too few texts to fit on: the shipped paragraphs (reconstruction reads 128 of them)
        enough = texts is not None and len(texts) >= REFIT_TEXTS
        calib = Calibration(list(texts)) if enough else Calibration.shipped("wikitext", 32)
        size = width_by_reconstruction(teacher, keep, calib, uniform=True, progress=progress)
    else:
        size = reach_size(teacher, keep, route="width", criterion=criterion, texts=texts, prune_heads=prune_heads,
                          progress=progress)
    return prune(teacher, size.mask), size


@dataclass
class RecipeResult:
    recipe: str
    bits: int | None
    stages: list[tuple[Stage, DistillResult]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def steps_planned(self) -> int:
        return sum(r.steps_planned for _, r in self.stages)  # a re-sized run's length, else the stage's

    @property
    def steps_run(self) -> int:
        return sum(r.steps_run for _, r in self.stages)

    @property
    def wall_s(self) -> float:
        return sum(r.wall_s for _, r in self.stages)

    @property
    def history(self) -> list[StepRecord]:
        """Every stage's records on one step axis (a stage's step 0 is the previous stage's last step)."""
        out, offset = [], 0
        for _, r in self.stages:
            out += [StepRecord(**{**rec.__dict__, "step": rec.step + offset, "steps": self.steps_planned})
                    for rec in r.history]
            offset += r.steps_run
        return out

    @property
    def label(self) -> str:
        return "fp32" if self.recipe == "fp32" else f"{self.bits}-bit {self.recipe}-stage"

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "bits": self.bits, "steps_planned": self.steps_planned,
                "steps_run": self.steps_run, "wall_s": self.wall_s, "interrupted": self.interrupted,
                "stages": [{"stage": s.__dict__, **{k: v for k, v in r.to_dict().items() if k != "history"}}
                           for s, r in self.stages]}


def _finish_stage(folder: Path, student: ModelHandle, stage: Stage, result: DistillResult) -> None:
    from safetensors.torch import save_file

    trainable = {n: p.detach().cpu().contiguous() for n, p in _stage_params(student).items()}
    save_file(trainable, str(folder / _FINAL))
    summary = {k: v for k, v in result.to_dict().items()}
    tmp = folder / f".{_DONE}.tmp"
    tmp.write_text(json.dumps({"stage": stage.__dict__, "result": summary}))
    os.replace(tmp, folder / _DONE)


def _stage_params(student: ModelHandle) -> dict[str, torch.Tensor]:
    """Every parameter of the student (a stage may have changed any trainable one; tied ones once)."""
    return dict(student.model.named_parameters())


def _reload_stage(folder: Path, student: ModelHandle, config: DistillConfig) -> tuple[Stage, DistillResult]:
    from safetensors.torch import load_file

    done = json.loads((folder / _DONE).read_text())
    prepare_student_(student, config)
    weights = load_file(str(folder / _FINAL))
    params = _stage_params(student)
    missing = set(params) - set(weights)
    if missing:
        raise DistillError(f"{folder / _FINAL} does not fit this student (missing {sorted(missing)[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
            p.requires_grad_(False)
    r = done["result"]
    history = [StepRecord(**h) for h in r.pop("history", [])]
    r.pop("config", None)
    return Stage(**done["stage"]), DistillResult(history=history, config=config, **r)


def run_recipe(
    teacher: ModelHandle,
    student: ModelHandle,
    data: DistillData,
    recipe: str,
    bits: int | None = 1,
    *,
    config: DistillConfig | None = None,
    scheme: str | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Callable[[StepRecord], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    world: World = SINGLE,
    resize: Callable[[list[StepRecord], DistillConfig], int | None] | None = None,
) -> RecipeResult:
    """Run `recipe` on `student` (in place) with `config.steps` steps in total (module doc).

    Under a data-parallel `world` every stage's distillation splits its batches across the ranks and
    rank 0 alone writes the stage folders. `resize` (a one-stage recipe): distill's, the run's length sized again
    from its own steps (budget.Rebudget).
    """
    config = config or DistillConfig()
    stages = plan_stages(recipe, bits, config.steps, scheme)
    if resize is not None and len(stages) > 1:
        raise DistillError(f"recipe {recipe!r} has {len(stages)} stages: a run re-sized from its own steps has one "
                           "(give --steps)")
    result = RecipeResult(recipe, None if recipe == "fp32" else bits)
    out = Path(out_dir) if out_dir is not None else None
    offset, planned = 0, 0
    for i, stage in enumerate(stages):
        # Each stage continues the data order where the previous one's budget ended, as one long run would.
        stage_config = with_bits(config, stage.bits, stage.steps, stage.scheme, config.data_offset + planned)
        planned += stage.steps
        folder = out / f"stage{i + 1}-{stage.name}" if out is not None else None
        if folder is not None and (folder / _DONE).is_file():
            if not resume:
                raise FileExistsError(f"{out} already holds a finished stage; resume it or choose another folder")
            result.stages.append(_reload_stage(folder, student, stage_config))
            offset += result.stages[-1][1].steps_run
            continue
        label = f"{i + 1}/{len(stages)} {stage.name}"

        def shifted(rec: StepRecord, offset: int = offset) -> None:
            if progress:
                planned = config.steps if resize is None else rec.steps  # a re-sized run's own length
                progress(StepRecord(**{**rec.__dict__, "step": rec.step + offset, "steps": planned}))

        r = distill(teacher, student, data, stage_config, out_dir=folder,
                    resume=resume and folder is not None and has_checkpoint(folder),
                    progress=shifted, should_stop=should_stop, stage=label, world=world, resize=resize)
        result.stages.append((stage, r))
        offset += r.steps_run
        if r.interrupted:
            result.interrupted = True
            break
        if folder is not None and world.is_main:
            _finish_stage(folder, student, stage, r)
    return result


def _sized(config: DistillConfig, steps: int) -> DistillConfig:
    """`config` at `steps` steps, its warm-up and evaluation spacing the same fractions of them."""
    scale = steps / config.steps
    return replace(config, steps=steps, warmup=min(steps, round(config.warmup * scale)),
                   eval_every=max(1, round(config.eval_every * scale)))


@dataclass
class RecoveryJob:
    """Prune by `mask`, distil by `recipe` and measure before / after, as an headlab.engine.core.jobs.Job.

    For front ends that must stay responsive: read `status`, `history` (grows step by step),
    `before` / `after` (metrics of the teacher, the un-recovered and the recovered student:
    perplexity under `protocol` for a causal LM, headlab.engine.recovery.encoder_agreement on held-out prompts
    for an encoder), `error`; `stop()` ends the run after the current step (with an `out_dir`,
    at a checkpoint that `resume=True` continues). `student` is the private trained copy.
    """

    teacher: ModelHandle
    mask: Any
    recipe: str = "fp32"
    bits: int | None = 1
    config: DistillConfig = field(default_factory=DistillConfig)
    scheme: str | None = None
    protocol: Any = None  # perplexity protocol (causal LM); None = headlab.engine.runtime.evaluate's default
    n_wikitext: int = 64
    n_prompts: int = 48
    max_new_tokens: int = 64
    pack: int = 0  # WikiText as running-text windows of this many tokens (distill_data); 0: paragraphs
    n_heldout: int = 100
    out_dir: str | os.PathLike | None = None
    resume: bool = False
    # fp32 only: as many steps as fit this many minutes of training (distill.budget), instead of config.steps;
    # the warm-up and the evaluation spacing keep their fractions of the steps
    minutes: float | None = None
    history: list[StepRecord] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] | None = None
    result: RecipeResult | None = None
    student: ModelHandle | None = None

    def __post_init__(self) -> None:
        plan_stages(self.recipe, self.bits, self.config.check().steps, self.scheme)  # refuse bad settings now
        if self.minutes is not None and (self.minutes <= 0 or self.recipe != "fp32" or self.resume):
            raise ValueError(f"a budget in minutes sizes a new full-precision run (got {self.minutes} minutes, "
                             f"recipe {self.recipe}{', resumed' if self.resume else ''}); give steps instead")
        self.job: Job[RecipeResult] = Job(self._work, name="distill")

    @property
    def status(self) -> str:
        """What the job is doing ("not started", "pruning", ..., "done", "stopped" or "failed")."""
        if self.job.state == PENDING:
            return "not started"
        if self.job.state == FAILED:
            return "failed"
        return self.job.stage or ("stopped" if self.job.finished else "starting")

    @property
    def error(self) -> str | None:
        return self.job.error

    @property
    def running(self) -> bool:
        return self.job.running

    @property
    def finished(self) -> bool:
        return self.job.finished

    def stop(self) -> None:
        """Ask the run to stop after the current step."""
        self.job.cancel()

    def _measure(self, model: Any, heldout: list[str]) -> dict[str, Any]:
        if self.teacher.is_causal_lm:
            return perplexity(model, protocol=self.protocol or DEFAULT_PROTOCOL).to_dict()
        return encoder_agreement(self.teacher, model, heldout).to_dict()

    def _work(self, job: Job) -> RecipeResult:
        job.set_stage("pruning")
        self.student = prune(self.teacher, self.mask)
        job.set_stage("preparing data (the teacher answers the training prompts once, then it is cached)")
        data = distill_data(self.teacher, n_wikitext=self.n_wikitext, n_prompts=self.n_prompts,
                            max_new_tokens=self.max_new_tokens, pack=self.pack)
        heldout = prompt_split()[1][: self.n_heldout]
        job.set_stage("measuring the teacher and the un-recovered student")
        self.before = {"teacher": self._measure(self.teacher, heldout),
                       "student": self._measure(self.student, heldout)}
        resize = None
        if self.minutes is not None:
            job.set_stage(f"timing a few steps to fit {self.minutes:g} minutes")
            model = probe_step_time(self.teacher, self.mask, data, self.config)
            self.config = _sized(self.config, steps_for_budget(
                self.teacher.tokenizer, data, self.config, self.minutes * 60, model,
                checkpoints=self.out_dir is not None))
            resize = Rebudget(self.teacher.tokenizer, data, self.minutes * 60, model,
                              checkpoints=self.out_dir is not None)
        job.set_stage("distilling")
        self.result = run_recipe(self.teacher, self.student, data, self.recipe, self.bits,
                                 config=self.config, scheme=self.scheme, out_dir=self.out_dir,
                                 resume=self.resume, progress=self.history.append,
                                 should_stop=job.cancel_requested, resize=resize)
        job.set_stage("measuring the recovered student")
        self.after = self._measure(self.student, heldout)
        job.set_stage("stopped" if self.result.interrupted else "done")
        return self.result

    def run(self) -> None:
        """The whole job in the calling thread (start() runs it in a background one); failures land in `error`."""
        self._claim()
        self.job.run()

    def start(self) -> "RecoveryJob":
        """Run the job in a daemon thread; returns self."""
        self._claim()
        self.job.start()
        return self

    def _claim(self) -> None:
        if self.job.state != PENDING:
            raise DistillError("this job was already started")
