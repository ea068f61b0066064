"""How many steps fit a wall-clock budget, from the tokens of the batches the run will draw.

A step's time follows its padded batch (texts x longest text), and a run's batches differ: with one 512-token
window per step, a step that draws a short answer costs a third of one that draws a window. Timing a few steps
and dividing the budget by their mean then sizes the schedule by whichever texts those steps happened to draw
(a run sized that way reached step 530 of 659). Here the probe's steps give a step-time model,
seconds = fixed + per_token x padded tokens, and the schedule gets the steps whose predicted times, summed over
the batches `loop._batch_texts` will really draw, fill the budget. The probe also times one held-out evaluation
and one checkpoint write, and the schedule counts each where the run will do it (every `eval_every` and
`checkpoint_every` steps, and after the last): a 15-minute run that left them out ended at step 262 of 272.

    model = probe_step_time(teacher, mask, data, config)   # trains a throwaway copy pruned by `mask`
    steps = steps_for_budget(teacher.tokenizer, data, config, 15 * 60, model)
    distill(teacher, student, data, replace(config, steps=steps),
            resize=Rebudget(teacher.tokenizer, data, 15 * 60, model))   # re-sized once from its own steps

A probe's eight steps can still be off: on a 2-core machine its timed steps ran at 5.05 s a window while the
run's averaged 4.50 s (the first steps of a process are the slowest), and a 15-minute run sized from them
trained for 12.2 minutes. `Rebudget` re-fits the model once, after `fraction` of the planned steps, on the
later half of the steps the run has done (its own batches, on the machine as it is now), and the remaining
steps are sized from what is left of the budget; the cosine schedule follows the new length from there on
(the run's checkpoints keep it, so a resumed run goes on with the same length).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.export.surgery import prune
from headlab.engine.recovery.distill.checkpoint import StepRecord
from headlab.engine.recovery.distill.config import DistillConfig
from headlab.engine.recovery.distill.data import DistillData
from headlab.engine.recovery.distill.loop import _batch_texts, distill

__all__ = ["Rebudget", "StepTime", "fit_step_time", "probe_step_time", "step_tokens", "steps_for_budget"]

PROBE_STEPS = 8  # the first is warm-up and the last also evaluates: the steps between are timed
PROBE_CHECKPOINT = 4  # the probe's checkpoint after step 4 lands in step 5's wall time: step 5 times the write


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one training step: fixed + per_token x its padded tokens; a held-out evaluation
    and a checkpoint write cost eval_s and checkpoint_s on top of the step they follow."""

    fixed_s: float
    per_token_s: float
    eval_s: float = 0.0
    checkpoint_s: float = 0.0

    def predict(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens


def step_tokens(tokenizer: Any, data: DistillData, config: DistillConfig, steps: Iterable[int]) -> list[int]:
    """Padded token slots (texts x longest, cut at max_length) of each step's batch, as the run draws it."""
    out = []
    for step in steps:
        texts = _batch_texts(data, config, step)
        enc = tokenizer(list(texts), truncation=True, max_length=config.max_length)
        lengths = [len(ids) for ids in enc["input_ids"]]
        out.append(len(texts) * max(lengths))
    return out


def fit_step_time(walls: Sequence[float], tokens: Sequence[int]) -> StepTime:
    """Least squares of walls on tokens, neither term negative; one token count (or one step) gives the mean rate."""
    if len(walls) != len(tokens) or not walls:
        raise ValueError(f"need one wall time per step's token count (got {len(walls)} and {len(tokens)})")
    if min(walls) <= 0 or min(tokens) <= 0:
        raise ValueError("step times and token counts must be positive")
    n = len(walls)
    mt, mw = sum(tokens) / n, sum(walls) / n
    var = sum((t - mt) ** 2 for t in tokens)
    if var > 0:
        slope = sum((t - mt) * (w - mw) for t, w in zip(tokens, walls)) / var
        fixed = mw - slope * mt
        if slope > 0 and fixed >= 0:
            return StepTime(fixed, slope)
    return StepTime(0.0, sum(walls) / sum(tokens))  # proportional: the fit's terms would not both be physical


def probe_step_time(teacher: ModelHandle, mask: PruneMask, data: DistillData, config: DistillConfig) -> StepTime:
    """The step-time model from PROBE_STEPS steps of `config` on a throwaway student pruned by `mask` (the steps
    train it; its checkpoints go to a temporary folder). The probe draws the run's first batches (same seed and
    offset), so their token counts are the run's."""
    walls: list[float] = []
    with tempfile.TemporaryDirectory(prefix="headlab-probe-") as tmp:
        distill(teacher, prune(teacher, mask), data,
                replace(config, steps=PROBE_STEPS, eval_every=10 * PROBE_STEPS, checkpoint_every=PROBE_CHECKPOINT),
                out_dir=tmp, progress=lambda rec: walls.append(rec.elapsed_s))
    # walls[0]: step 0 (the untrained student's held-out metric); walls[i]: after step i, which drew batch i - 1
    tokens = step_tokens(teacher.tokenizer, data, config, range(PROBE_STEPS))
    wall = {i: walls[i] - walls[i - 1] for i in range(1, PROBE_STEPS + 1)}
    timed = [i for i in range(2, PROBE_STEPS) if i != PROBE_CHECKPOINT + 1]
    model = fit_step_time([wall[i] for i in timed], [tokens[i - 1] for i in timed])
    # what the checkpoint write (in step 5's wall) and the last step's evaluation add to their steps' predicted times
    extra = {i: max(0.0, wall[i] - model.predict(tokens[i - 1])) for i in (PROBE_CHECKPOINT + 1, PROBE_STEPS)}
    return replace(model, checkpoint_s=extra[PROBE_CHECKPOINT + 1], eval_s=extra[PROBE_STEPS])


def steps_for_budget(tokenizer: Any, data: DistillData, config: DistillConfig, seconds: float, model: StepTime,
                     *, minimum: int = 1, limit: int = 1_000_000, checkpoints: bool = True, start: int = 0,
                     spent: float = 0.0) -> int:
    """The number of steps whose predicted times, over the batches the run draws from step 0, fill `seconds`, with
    a held-out evaluation every `config.eval_every` steps and a checkpoint every `config.checkpoint_every` (when
    the run writes them: `checkpoints`), and both after the last step.

    `start`, `spent`: a run that has done `start` steps in `spent` seconds; the steps after it are predicted and
    the count returned is the run's whole length (at least `start`)."""
    if seconds <= 0:
        raise ValueError(f"the budget must be positive, got {seconds} s")
    ckpt = model.checkpoint_s if checkpoints else 0.0
    total, step = float(spent), int(start)
    while step < limit:
        n = step + 1  # the run's step count if this step is its last
        (tokens,) = step_tokens(tokenizer, data, config, [step])
        total += model.predict(tokens)
        periodic = (model.eval_s if n % config.eval_every == 0 else 0.0) + (ckpt if n % config.checkpoint_every == 0
                                                                            else 0.0)
        final = (model.eval_s if n % config.eval_every else 0.0) + (ckpt if n % config.checkpoint_every else 0.0)
        if total + periodic + final > seconds:
            break
        total += periodic
        step += 1
    return max(minimum, step)


@dataclass
class Rebudget:
    """The run's length sized again, once, from its own steps (module doc); `distill(..., resize=...)` calls it
    after every step and takes the length it returns (None: not yet).

    After `max(min_steps, fraction x planned)` steps, the steps in the later half of those (but step 1, a step
    that evaluated and one that carries a checkpoint write) give a new StepTime (fit_step_time); the evaluation
    and checkpoint costs stay `model`'s, the probe's. `clock(record)`: the budget's seconds at a step (default
    the run's wall time; a benchmark whose curve evaluations run inside the training passes its own clock that
    leaves them out). `refit` keeps the model it fitted, for a report.
    """

    tokenizer: Any
    data: DistillData
    seconds: float
    model: StepTime
    fraction: float = 0.2
    min_steps: int = 10
    checkpoints: bool = True
    clock: Callable[[StepRecord], float] | None = None
    refit: StepTime | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction must lie strictly between 0 and 1, got {self.fraction}")
        if self.seconds <= 0:
            raise ValueError(f"the budget must be positive, got {self.seconds} s")

    def at(self, planned: int) -> int:
        """The step after which a run planned at `planned` steps is re-sized."""
        return max(self.min_steps, round(self.fraction * planned))

    def __call__(self, history: Sequence[StepRecord], config: DistillConfig) -> int | None:
        done = history[-1].step
        if done != self.at(config.steps) or done >= config.steps:
            return None
        clock = self.clock or (lambda r: r.elapsed_s)
        when = {r.step: clock(r) for r in history}
        evaluated = {r.step for r in history if r.step and r.heldout is not None}
        every = config.checkpoint_every if self.checkpoints else 0

        def clean(i: int) -> bool:  # step i's wall is one training step and nothing else
            carries_write = bool(every) and i > 1 and (i - 1) % every == 0
            return i >= 2 and i - 1 in when and i in when and i not in evaluated and not carries_write

        steps = [i for i in range(done // 2 + 1, done + 1) if clean(i)]
        if len(steps) < 3:
            return config.steps  # too few clean steps to say better than the probe
        tokens = step_tokens(self.tokenizer, self.data, config, [i - 1 for i in steps])
        walls = [when[i] - when[i - 1] for i in steps]
        if min(walls) <= 0:
            return config.steps
        self.refit = replace(fit_step_time(walls, tokens), eval_s=self.model.eval_s,
                             checkpoint_s=self.model.checkpoint_s)
        return steps_for_budget(self.tokenizer, self.data, config, self.seconds, self.refit, minimum=done + 1,
                                checkpoints=self.checkpoints, start=done, spent=when[done])
