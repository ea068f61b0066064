"""Loss-drop importance: the KL to the dense model caused by removing each head alone.

This is the direct quantity every cheaper criterion tries to predict (Michel et al. 2019
approximate it to first order with |dL/dgate|). It costs one partial forward per head
(layers l..L-1 only, headlab.engine.runtime.replay) over a few calibration texts: 270 of them
for SmolLM2-135M, about a minute of one CPU core with 4 texts of 128 tokens.

With `means` (CaptureStats.head_in_mean) a head is *mean-ablated*: its output is replaced
by its calibration mean, which is what FLAP compensation does once the head is pruned, so
the score measures exactly the damage that pruning-with-compensation will do. Without, the
head is zeroed (plain pruning).

`base` scores heads on top of an already pruned mask (the re-scoring step of iterative
pruning); heads the base already prunes score 0 and are marked False in the returned `kept`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.distributed.world import SINGLE, World
from headlab.engine.importance.criteria import Criterion, Scores
from headlab.engine.importance.depth import calibration_or_default
from headlab.engine.importance.mean_ablation import mean_biases
from headlab.engine.runtime.replay import LayerReplay

__all__ = ["head_removal_mask", "ablation_kl", "Ablation"]


def head_removal_mask(handle: ModelHandle, base: PruneMask, layer: int, heads: Sequence[int],
                      means: torch.Tensor | None) -> PruneMask:
    """`base` with `heads` of `layer` pruned (normalized); with `means`, compensation biases recomputed."""
    m = base.clone()
    m.heads[layer, list(heads)] = 0.0
    return mean_biases(handle, m, head_means=means) if means is not None else m.normalized()


def ablation_kl(
    handle: ModelHandle,
    texts: Sequence[str],
    *,
    base: PruneMask | None = None,
    means: torch.Tensor | None = None,
    max_length: int = 128,
    batch_size: int = 4,
    replay: LayerReplay | None = None,
    progress: Progress | None = None,
    world: World = SINGLE,
    known: dict[tuple[int, int], float] | None = None,
    on_measured: Callable[[int, int, float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta [L, H], kept [L, H] bool): KL increase over `base` when each kept head is removed alone.

    Under a data-parallel `world` the heads are dealt round-robin to the ranks (each rank records the
    same replay) and the deltas gathered: every rank gets the whole table, exactly one process's.
    `progress` counts this rank's heads. `known`: (layer, head) -> delta an earlier, interrupted run
    measured (headlab.engine.importance.ablation_store); those heads are taken as they are and the progress
    starts after them. `on_measured(layer, head, delta)` is called after each head measured here.
    """
    g = handle.geometry
    replay = replay or LayerReplay(handle, texts, base=base, max_length=max_length, batch_size=batch_size)
    base = replay.base
    kept = base.heads_effective() > 0
    delta = torch.zeros(g.n_layers, g.n_heads)
    mine = world.shard([(l, h) for l in range(g.n_layers) for h in range(g.n_heads) if kept[l, h]])

    known = known or {}

    def run_share() -> None:
        todo = []
        for _, (layer, head) in mine:
            if (layer, head) in known:
                delta[layer, head] = known[(layer, head)]
            else:
                todo.append((layer, head))
        skipped = len(mine) - len(todo)
        if progress and skipped:
            progress(skipped, len(mine))
        for done, (layer, head) in enumerate(todo):
            m = head_removal_mask(handle, base, layer, [head], means)
            # Replays from the first layer `m` changes: usually `layer`, earlier when the layer's last
            # head goes and its mean folds into layer - 1.
            delta[layer, head] = replay.kl(m) - replay.base_kl
            if on_measured is not None:
                on_measured(layer, head, float(delta[layer, head]))
            if progress:
                progress(skipped + done + 1, len(mine))

    world.run("ablation scoring", run_share)
    # Each head was measured on one rank and is 0 on the others: the sum is that rank's value, exactly.
    return world.all_sum({"delta": delta})["delta"], kept


class Ablation(Criterion):
    name = "ablation"
    needs = "forward"  # the forward capture supplies the heads' mean outputs
    units = ("heads",)
    description = ("loss drop: KL to the dense model when each head alone is replaced by its mean output "
                   "(measured, not approximated); prune the smallest")

    splits_work = True  # takes world=: the heads are dealt to the ranks of a data-parallel job

    def __init__(self, texts: Sequence[str] | None = None, n_texts: int = 4, max_length: int = 128,
                 mean_ablation: bool = True, progress: Progress | None = None, world: World = SINGLE):
        self.texts, self.n_texts, self.max_length = texts, n_texts, max_length
        self.mean_ablation, self.progress, self.world = mean_ablation, progress, world

    def __call__(self, handle: ModelHandle, stats: Any) -> Scores:
        s = self._require(stats) if self.mean_ablation else stats
        texts = calibration_or_default(self.texts, self.n_texts)
        replay = LayerReplay(handle, texts, max_length=self.max_length)
        delta, _ = ablation_kl(handle, texts, means=s.head_in_mean if self.mean_ablation else None,
                               replay=replay, progress=self.progress, world=self.world)
        kind = "mean" if self.mean_ablation else "zero"
        return Scores(self.name, heads=delta,
                      note=f"KL(dense || {kind}-ablated) in nats/token over {replay.n_tokens} calibration tokens",
                      meta={"n_tokens": replay.n_tokens, "ablation": kind})
