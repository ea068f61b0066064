"""Depth pruning at a parameter target: which whole layers to drop, measured rather than guessed.

Baselines rank layers by a criterion (ShortGPT's block influence, Men et al. 2024; the
summed gradient, magnitude or entropy of a layer's units; random). The measured methods
replay the calibration batches without each layer (headlab.engine.runtime.replay) and drop the
layers whose removal moves the output distribution least (KL to the dense model); the
iterative one removes them one at a time, re-measuring the rest under the pruned model.

With compensation a dropped layer is replaced by its mean contribution (FLAP's bias, An et
al. 2024), folded into the output bias of the nearest kept sub-block before it
(headlab.engine.importance.mean_ablation.mean_biases): exact for pre-LN models, and an exported model carries
at most one extra hidden-size bias per projection that had none.
"""

from __future__ import annotations

from typing import Any

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.importance.criteria import ffn_magnitude, head_magnitude
from headlab.engine.importance.mean_ablation import mean_biases
from headlab.engine.pruning.size_target import target_params
from headlab.engine.pruning.strategies.base import Calibration, parse_method
from headlab.engine.pruning.strategies.scores import ABLATION_MAX_LENGTH, ABLATION_TEXTS, criterion_scores
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.replay import LayerReplay

__all__ = ["DEPTH_METHODS", "layer_removal_mask", "depth_method_scores", "depth_prune", "layers_for_target"]

DEPTH_METHODS = ("random", "magnitude", "entropy", "gradient", "block_influence", "ablation", "ablation+comp",
                 "ablation-iterative", "ablation-iterative+comp")


def layer_removal_mask(handle: ModelHandle, base: PruneMask, layer: int, stats: Any = None) -> PruneMask:
    """`base` without `layer`; with `stats`, its mean output folded into the preceding kept sub-block."""
    m = base.with_block(layer, "attn", 0.0).with_block(layer, "ffn", 0.0)
    return mean_biases(handle, m, stats.head_in_mean, stats.ffn_mean) if stats is not None else m


def _baseline_layer_scores(handle: ModelHandle, name: str, calib: Calibration, progress: Progress | None) -> torch.Tensor:
    """Importance [L] of each layer by a criterion (higher = keep)."""
    g = handle.geometry
    if name == "random":
        return torch.rand(g.n_layers, generator=torch.Generator().manual_seed(0))
    if name == "magnitude":
        return head_magnitude(handle.adapter).sum(1) + ffn_magnitude(handle.adapter).sum(1)
    if name == "entropy":
        return -calib.stats(handle, progress).entropy.mean(1)  # broadest layers go first, as for heads
    if name == "gradient":
        return calib.stats(handle, progress).block_grad.sum(1)
    if name == "block_influence":
        return criterion_scores(handle, "block_influence", calib, progress).blocks.sum(1)
    raise ValueError(f"unknown depth method {name!r}; choose one of {', '.join(DEPTH_METHODS)}")


def layers_for_target(handle: ModelHandle, keep: float) -> int:
    """How many layers to drop so that params_kept is closest to `keep` of the dense count."""
    g = handle.geometry
    target = target_params(handle, keep)
    best = (float("inf"), 0)
    mask = PruneMask.dense(g)
    for k in range(g.n_layers):
        if k:
            mask = mask.with_block(k - 1, "attn", 0.0).with_block(k - 1, "ffn", 0.0)
        best = min(best, (abs(cost(handle, mask).params_kept - target), k))
    return best[1]


def depth_method_scores(handle: ModelHandle, method: str, calib: Calibration, *, base: PruneMask | None = None,
                        progress: Progress | None = None) -> torch.Tensor:
    """Layer importance [L] by depth `method`: a criterion's, or the measured KL of dropping each from `base`."""
    name, comp = parse_method(method)
    if name not in ("ablation", "ablation-iterative"):
        return _baseline_layer_scores(handle, name, calib, progress)
    g = handle.geometry
    stats = calib.stats(handle, progress) if comp else None
    replay = LayerReplay(handle, calib.texts[:ABLATION_TEXTS], base=base,
                         max_length=min(calib.max_length, ABLATION_MAX_LENGTH))
    base = replay.base
    out = torch.full((g.n_layers,), float("inf"))
    alive = [l for l in range(g.n_layers) if base.attn[l] > 0 or base.ffn_block[l] > 0]
    for i, layer in enumerate(alive):
        m = layer_removal_mask(handle, base, layer, stats)
        out[layer] = replay.kl(m) - replay.base_kl  # replayed from m's first change (layer, or where its mean folds)
        if progress:
            progress(i + 1, len(alive))
    return out


def depth_prune(handle: ModelHandle, keep: float, method: str, calib: Calibration, *,
                progress: Progress | None = None) -> PruneMask:
    """Drop whole layers by `method` (DEPTH_METHODS) until about `keep` of the parameters remain."""
    if method not in DEPTH_METHODS:
        raise ValueError(f"unknown depth method {method!r}; choose one of {', '.join(DEPTH_METHODS)}")
    g = handle.geometry
    k = layers_for_target(handle, keep)
    name, comp = parse_method(method)
    stats = calib.stats(handle, progress) if comp else None
    mask = PruneMask.dense(g)
    steps = k if name == "ablation-iterative" else 1
    dropped: list[int] = []
    for step in range(steps):
        scores = depth_method_scores(handle, method, calib, base=mask, progress=progress)
        scores[dropped] = float("inf")
        take = 1 if steps > 1 else k
        for layer in torch.sort(scores, stable=True).indices[:take].tolist():
            mask = layer_removal_mask(handle, mask, layer, stats)
            dropped.append(layer)
    mask.meta.update({"method": method, "route": "depth", "layers_dropped": sorted(dropped),
                      "calibration": calib.describe()})
    return mask
