"""Recover a physically pruned student by knowledge distillation from the dense teacher: the training loop.

    student = headlab.engine.export.surgery.prune(teacher, mask)   # a smaller private copy
    data = distill_data(teacher)                           # shipped text + the teacher's own answers
    result = distill(teacher, student, data, DistillConfig(steps=150), out_dir="runs/kd")

The objective is in losses.py, what trains in student.py, the data in data.py.

Determinism and resume: the student runs in eval mode (no dropout), the data order is a function
of (seed, step) and the learning rate of the step, so the loop draws no random numbers.
A checkpoint (checkpoint.py) is written every `checkpoint_every` steps, when `should_stop()` says
so and on Ctrl-C; `resume=True` continues the same run: k steps + resume to N equals N steps straight.

Data-parallel (`world=`, under torchrun): every rank holds the teacher and the same student; each
step's batch is split evenly across the ranks, the gradients are averaged (DistributedDataParallel's
reduction) before clipping and the step, so the students stay identical. The objective is the mean of
the shares' means (equal to the batch mean when the shares hold as many tokens). Replicated on every
rank: the held-out evaluations and the best-student copy; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.tokens import encode_batch
from headlab.engine.distributed.world import SINGLE, World
from headlab.engine.models.sentence import sentence_head
from headlab.engine.recovery.distill.checkpoint import (
    StepRecord,
    _fingerprint,
    _load_best,
    _load_checkpoint,
    _RunState,
    _save_best,
    _write_checkpoint,
    has_checkpoint,
)
from headlab.engine.recovery.distill.config import DistillConfig, DistillError
from headlab.engine.recovery.distill.data import DistillData
from headlab.engine.recovery.distill.losses import _batch_loss, _hidden_pairs, heldout_metric
from headlab.engine.recovery.distill.student import prepare_student_

__all__ = ["DistillResult", "distill"]

StepCallback = Callable[[StepRecord], None]


@dataclass
class DistillResult:
    steps_run: int  # the step counter at the end (a resumed run counts the steps before the stop too)
    steps_planned: int
    history: list[StepRecord]
    initial_heldout: float
    best_heldout: float
    best_step: int
    stopped_early: bool
    interrupted: bool
    wall_s: float  # training time, summed over resumed sessions
    trainable_params: int
    config: DistillConfig

    @property
    def final_heldout(self) -> float:
        evals = [r.heldout for r in self.history if r.heldout is not None]
        return evals[-1] if evals else self.initial_heldout

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("history", "config")}
        return {**d, "config": self.config.to_dict(), "history": [asdict(r) for r in self.history]}


def _lr(config: DistillConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
    progress = step / max(1, config.steps)
    floor = config.min_lr_ratio
    return config.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_texts(data: DistillData, config: DistillConfig, step: int) -> list[str]:
    """The texts of step `step`: a fresh seeded permutation of the training texts per epoch."""
    n, bs = len(data.train), config.batch_size
    texts, perms = [], {}
    start = (config.data_offset + step) * bs
    for pos in range(start, start + bs):
        epoch = pos // n
        if epoch not in perms:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        texts.append(data.train[perms[epoch][pos % n]])
    return texts


def _check_pair(teacher: ModelHandle, student: ModelHandle) -> None:
    if student.model is teacher.model:
        raise DistillError("the student must be a separate copy of the model (headlab.engine.export.surgery.prune makes one); "
                           "the shared teacher is never trained")
    gt, gs = teacher.geometry, student.geometry
    if (gt.vocab_size, gt.hidden, gt.causal) != (gs.vocab_size, gs.hidden, gs.causal):
        raise DistillError(f"{student.name} does not fit {teacher.name}: vocabulary, hidden size and causality must "
                           f"match (teacher {gt.vocab_size}/{gt.hidden}/{gt.causal}, student "
                           f"{gs.vocab_size}/{gs.hidden}/{gs.causal})")
    if teacher.adapter.has_lm_head != student.adapter.has_lm_head:
        raise DistillError("teacher and student must both have an LM head, or both be bare encoders")


def distill(
    teacher: ModelHandle,
    student: ModelHandle,
    data: DistillData,
    config: DistillConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    stage: str = "",
    world: World = SINGLE,
    resize: Callable[[list[StepRecord], DistillConfig], int | None] | None = None,
) -> DistillResult:
    """Train `student` (in place) to match `teacher` on `data`; see losses.py for the objective.

    world: the ranks of a data-parallel job (module docstring); should_stop must then answer alike on every rank.
    resize: called after every step with the history and the settings until it returns a length (more than the
    steps done): the run then has that many steps, the cosine schedule following the new length from the next
    step (budget.Rebudget sizes a wall-clock budget from the run's own steps). The checkpoint keeps the length, so
    a resumed run goes on with it; one process only (the ranks of a job would have to agree on it).
    """
    config = (config or DistillConfig()).check()
    data.check()
    _check_pair(teacher, student)
    if config.batch_size % world.size:
        raise DistillError(f"a batch of {config.batch_size} texts does not split evenly across {world.size} "
                           f"processes: make it a multiple of {world.size}")
    out = Path(out_dir) if out_dir is not None else None
    writes = out if world.is_main else None  # every rank may read a checkpoint; rank 0 alone writes
    if out is not None and has_checkpoint(out) and not resume:
        raise FileExistsError(f"{out} already holds a distillation checkpoint; resume it or choose another folder")
    if resume and not has_checkpoint(out):
        raise DistillError(f"nothing to resume: {out} holds no checkpoint")
    pairs = _hidden_pairs(student, teacher, config)
    params = prepare_student_(student, config)
    if not params:
        raise DistillError("the student has no trainable parameters in this mode")
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    fingerprint = _fingerprint(student, config, data, params)
    best: dict[str, torch.Tensor] | None = None
    # An encoder's sentence embeddings go through the teacher's own ST modules (Pooling, Normalize), read once.
    head = None if teacher.adapter.has_lm_head else sentence_head(teacher)
    eval_kwargs = {"batch_size": config.batch_size, "max_length": config.max_length, "head": head}
    if resize is not None and world.size > 1:
        raise DistillError("re-sizing a run from its own step times needs a single process (each rank would time "
                           "its own steps): size a data-parallel run by --steps")
    if resume:
        state = _load_checkpoint(out, params, opt, fingerprint)
        best = _load_best(out)
        if state.planned is not None:  # the length a re-size gave (the fingerprint holds the length asked for)
            config = replace(config, steps=state.planned)
    else:
        state = _RunState()
        state.initial = state.best = heldout_metric(teacher, student, data.heldout, **eval_kwargs)
        # The starting point is a candidate too: a run that only gets worse gives the student back unchanged.
        best = {n: p.detach().clone() for n, p in params.items()} if config.restore_best else None
        if writes is not None and best is not None:
            _save_best(writes, best)
        state.history.append(StepRecord(0, config.steps, None, None, None, 0.0, state.initial, 0.0, stage))
        if progress:
            progress(state.history[-1])
    tokenizer = teacher.tokenizer
    interrupted = False
    started = time.perf_counter() - state.wall_s
    try:
        while state.step < config.steps and not state.stopped_early:
            step = state.step
            lr = _lr(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            texts = _batch_texts(data, config, step)[world.rank :: world.size]  # this rank's share
            ids, am = encode_batch(tokenizer, texts, config.max_length, student.device)
            loss, kd, hid = _batch_loss(teacher, student, ids, am, config, pairs, head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            world.average_gradients(params.values())
            # The logged values are the batch's: the mean over the shares (one rank: its own).
            logged = torch.tensor([loss.item(), kd, hid], dtype=torch.float64)
            loss_value, kd, hid = (world.all_sum({"v": logged})["v"] / world.size).tolist()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
            opt.step()
            state.step = step + 1
            held = None
            if state.step % config.eval_every == 0 or state.step == config.steps:
                held = heldout_metric(teacher, student, data.heldout, **eval_kwargs)
                if held < state.best * (1 - config.min_improvement):
                    state.best, state.best_step, state.bad_evals = held, state.step, 0
                    best = {n: p.detach().clone() for n, p in params.items()} if config.restore_best else None
                    if writes is not None and best is not None:
                        _save_best(writes, best)
                else:
                    state.bad_evals += 1
                    state.stopped_early = bool(config.patience) and state.bad_evals >= config.patience
            state.wall_s = time.perf_counter() - started
            record = StepRecord(state.step, config.steps, loss_value, kd, hid, lr, held, state.wall_s, stage)
            state.history.append(record)
            if resize is not None and state.planned is None and state.step < config.steps:
                planned = resize(state.history, config)
                if planned is not None:
                    state.planned = max(int(planned), state.step + 1)
                    config = replace(config, steps=state.planned)
            if writes is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps
                                       or state.stopped_early):
                _write_checkpoint(writes, params, opt, state, fingerprint)
            if progress:
                progress(record)
            if should_stop is not None and state.step < config.steps and not state.stopped_early and should_stop():
                interrupted = True
                if writes is not None:
                    _write_checkpoint(writes, params, opt, state, fingerprint)
                break
    except KeyboardInterrupt:
        if writes is not None:
            _write_checkpoint(writes, params, opt, state, fingerprint)
        raise
    finally:
        for p in params.values():
            p.requires_grad_(False)
    if not interrupted and config.restore_best and best is not None and state.best_step < state.step:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best[name])
    return DistillResult(state.step, config.steps, state.history, state.initial, state.best, state.best_step,
                         state.stopped_early, interrupted, state.wall_s, sum(p.numel() for p in params.values()),
                         config)
