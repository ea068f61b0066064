"""Iterative pruning: remove the budget in steps, re-scoring what is left after each step.

Michel, Levy & Neubig, NeurIPS 2019 (sec. 4.2) prune heads in steps by |dL/dgate|,
re-estimating importance after each step, because removing one head changes how much the
others matter (two heads that back each other up both look unimportant in one shot).

- `gradient-iterative`: their recipe; re-scoring is one backward pass under the current mask
  (with "+comp", the gradient of mean-ablation under the compensated mask).
- `ablation-iterative`: the same schedule with *measured* re-scoring: after each step, the
  heads closest to the cut (`pool` times the next step's size) are re-measured by replaying
  the calibration batches under the current mask (headlab.engine.runtime.replay). Heads far from
  the cut keep their earlier, larger scores: measuring them again cannot change the choice
  unless the model changed drastically, and it costs one partial forward each.

With steps=1 both equal their one-shot counterparts exactly (the tests check it).
"""

from __future__ import annotations

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.importance.ablation import head_removal_mask
from headlab.engine.importance.fluctuation import ffn_fluctuation
from headlab.engine.importance.gate_gradients import gate_gradients
from headlab.engine.importance.mean_ablation import mean_biases
from headlab.engine.pruning.select import lowest
from headlab.engine.pruning.strategies.base import Budget, Calibration, Strategy
from headlab.engine.pruning.strategies.oneshot import finish
from headlab.engine.pruning.strategies.scores import ablation_scores, gradient_scores
from headlab.engine.runtime.replay import LayerReplay

__all__ = ["IterativeGradient", "IterativeAblation", "schedule"]


def schedule(total: int, steps: int) -> list[int]:
    """How many units each step removes: `steps` near-equal parts summing to `total`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    marks = [round(total * i / steps) for i in range(steps + 1)]
    return [b - a for a, b in zip(marks, marks[1:])]


def _cut(mask: PruneMask, scores: torch.Tensor, k: int, unit: str) -> PruneMask:
    """`mask` with the k lowest-scoring still-kept units of `unit` ("heads" or "ffn") pruned."""
    m = mask.clone()
    gates = m.heads if unit == "heads" else m.ffn
    gates[lowest(scores, k, allowed=gates > 0)] = 0.0
    return m.normalized()


class IterativeGradient(Strategy):
    name = "gradient-iterative"
    description = "Michel et al.: prune by |dL/dgate| in steps, re-scoring under the pruned mask after each"
    reference = "Michel, Levy & Neubig, 'Are Sixteen Heads Really Better than One?', NeurIPS 2019, sec. 4.2"
    cost_hint = "measured"

    def __init__(self, steps: int = 4, compensate: bool = False, rescore_texts: int = 8, rescore_length: int = 128):
        self.steps, self.compensate = steps, compensate
        # Re-scoring runs once per step: a subset of the calibration keeps it to seconds per step.
        self.rescore_texts, self.rescore_length = rescore_texts, rescore_length

    def __call__(self, handle: ModelHandle, budget: Budget, calib: Calibration, *, progress=None) -> PruneMask:
        g = handle.geometry
        h, f = self.check_budget(handle, budget)
        stats = calib.stats(handle, progress)
        means = (stats.head_in_mean, stats.ffn_mean) if self.compensate else (None, None)
        mask = PruneMask.dense(g)
        for i, (kh, kf) in enumerate(zip(schedule(h, self.steps), schedule(f, self.steps))):
            if i == 0:
                head_s, ffn_s = gradient_scores(handle, calib, compensate=self.compensate, progress=progress)
            else:
                head_s, ffn_s = gate_gradients(handle, calib.texts[: self.rescore_texts], mask, head_means=means[0],
                                               ffn_means=means[1], batch_size=calib.batch_size,
                                               max_length=min(calib.max_length, self.rescore_length))
            mask = _cut(mask, head_s, kh, "heads")
            mask = _cut(mask, ffn_s, kf, "ffn")
        return finish(handle, mask, calib, self.compensate,
                      {"method": self.name + ("+comp" if self.compensate else ""), "steps": self.steps,
                       "reference": self.reference}, progress)


class IterativeAblation(Strategy):
    name = "ablation-iterative"
    description = ("measured KL of removing each head, in steps: after each step the heads nearest the cut "
                   "are re-measured under the pruned model")
    reference = ("Michel et al. 2019 (iterative schedule) with measured loss-drop re-scoring; "
                 "mean-ablation under '+comp' as in FLAP (An et al. 2024)")
    supports_ffn = True  # channels: one-shot fluctuation (too many to measure one by one)
    cost_hint = "measured"

    def __init__(self, steps: int = 4, pool: float = 3.0, compensate: bool = False):
        if pool < 1:
            raise ValueError(f"pool must be >= 1 (a multiple of each step's size), got {pool}")
        self.steps, self.pool, self.compensate = steps, pool, compensate

    def __call__(self, handle: ModelHandle, budget: Budget, calib: Calibration, *, progress=None) -> PruneMask:
        g = handle.geometry
        h, f = self.check_budget(handle, budget)
        stats = calib.stats(handle, progress)
        means = stats.head_in_mean if self.compensate else None
        scores, texts = ablation_scores(handle, calib, mean=self.compensate, progress=progress)
        scores = scores.clone()
        mask = PruneMask.dense(g)
        for i, k in enumerate(schedule(h, self.steps)):
            if i > 0 and k > 0:
                kept = mask.heads_effective() > 0
                pool = lowest(scores, min(int(self.pool * k), int(kept.sum())), allowed=kept)
                replay = LayerReplay(handle, texts, base=mask, max_length=min(calib.max_length, 128))
                for layer, head in pool.nonzero().tolist():
                    m = head_removal_mask(handle, mask, layer, [head], means)
                    scores[layer, head] = replay.kl(m) - replay.base_kl  # replayed from m's first changed layer
            mask = _cut(mask, scores, k, "heads")
            if means is not None:  # the next replay runs the compensated model
                mask = mean_biases(handle, mask, head_means=means)
        if f:
            mask = _cut(mask, ffn_fluctuation(handle.adapter, stats), f, "ffn")
        return finish(handle, mask, calib, self.compensate,
                      {"method": self.name + ("+comp" if self.compensate else ""), "steps": self.steps,
                       "pool": self.pool, "reference": self.reference}, progress)
