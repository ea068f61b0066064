"""Whole-layer importance by one criterion: what depth pruning at a size target ranks layers by.

A depth criterion (headlab.engine.importance.depth) scores whole layers itself; block influence reads
the capture's whole-layer influence; any other criterion with sub-block scores gives a layer
the sum of its two sub-blocks. Higher = keep, as everywhere in headlab.engine.importance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.progress import Progress
from headlab.engine.importance.capture import capture
from headlab.engine.importance.depth import DEPTH_CRITERIA, calibration_or_default
from headlab.engine.importance.registry import get_criterion, score

__all__ = ["LayerScores", "layer_importance"]


@dataclass(frozen=True)
class LayerScores:
    """Whole-layer importance [L] by one criterion (higher = keep)."""

    criterion: str
    layers: torch.Tensor
    note: str


def layer_importance(
    handle: ModelHandle,
    criterion: str = "block_influence",
    texts: Sequence[str] | None = None,
    *,
    stats: Any = None,
    progress: Progress | None = None,
) -> LayerScores:
    """Importance of each whole layer by `criterion` (a depth criterion, or any criterion with sub-block scores)."""
    if criterion == "block_influence":
        if stats is None:
            stats = capture(handle, calibration_or_default(texts, 32), gradients=False, progress=progress)
        return LayerScores(criterion, stats.layer_influence.clone(),
                           "ShortGPT block influence of the whole layer, 1 - cos(h_in, h_out)")
    if criterion in ("block_ppl", "taylor_plus"):
        s = get_criterion(criterion, texts=texts, progress=progress)(handle, None)
        return LayerScores(criterion, s.meta["layers"], s.note)
    scores, _ = score(handle, calibration_or_default(texts, 32), [criterion], stats=stats, progress=progress)
    s = scores[criterion]
    if s.blocks is None:
        raise ValueError(f"criterion {criterion!r} gives no block scores; choose one of {', '.join(DEPTH_CRITERIA)}")
    return LayerScores(criterion, s.blocks.sum(dim=1), f"{s.note} (layer = sum of its two sub-blocks)")
