"""Reach a parameter count by width or by depth, so the two can be compared at equal size.

    r = reach_size(handle, keep=0.8, route="depth")   # drop the least important whole layers
    r = reach_size(handle, keep=0.8, route="width")   # fewer heads and FFN channels in every layer

`keep` is the fraction of the dense model's parameters to keep (0 < keep < 1) or a count.
Sizes are headlab.engine.runtime.cost's params_kept, which is exactly what surgery produces.

- depth: whole layers ranked by a depth criterion (headlab.engine.importance.layer_importance: block_influence,
  block_ppl, taylor_plus); the k least important go, k chosen so the size is closest to the target.
- width: every layer loses the same units (so the export has a standard config): the same
  number of query heads from each KV group (or whole KV groups) and the same number of FFN
  channels, picked per layer by a criterion's head and channel scores (default: gradient,
  Michel et al. 2019, which holds perplexity far better than magnitude on the default
  model). Among the head counts that can reach the target, the one removing attention and
  FFN in the most similar proportion is taken. For families whose config cannot state fewer heads (GPT-2, BERT) only
  channels are pruned unless `prune_heads=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.importance.depth import calibration_or_default
from headlab.engine.importance.layer_importance import layer_importance
from headlab.engine.importance.registry import score
from headlab.engine.pruning.select import BudgetError
from headlab.engine.runtime.cost import cost

__all__ = ["SizeResult", "ROUTES", "target_params", "reach_size", "width_mask", "depth_mask"]

ROUTES = ("width", "depth")


@dataclass(frozen=True)
class SizeResult:
    """A mask reaching (about) a parameter target, and what it reached."""

    route: str
    criterion: str
    mask: PruneMask
    target: int
    params_total: int
    params_kept: int
    detail: str

    @property
    def kept_fraction(self) -> float:
        return self.params_kept / self.params_total

    @property
    def error(self) -> int:
        """params_kept - target (positive: slightly larger than asked)."""
        return self.params_kept - self.target

    def describe(self) -> str:
        return (f"{self.route} ({self.criterion}): {self.params_kept:,} of {self.params_total:,} parameters "
                f"({100 * self.kept_fraction:.1f}%), target {self.target:,}; {self.detail}")


def target_params(handle: ModelHandle, keep: float | int) -> int:
    """The parameter count `keep` asks for: a fraction of the dense count in (0, 1), or a count."""
    total = cost(handle).params_total
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise BudgetError(f"keep must be a fraction in (0, 1) or a parameter count, got {keep!r}")
    if isinstance(keep, float) and 0.0 < keep < 1.0:
        return round(keep * total)
    if isinstance(keep, int) and 0 < keep < total:
        return keep
    raise BudgetError(f"keep {keep!r}: give a fraction of the parameters in (0, 1) or a count below {total:,}")


def _head_options(g: Any, prune_heads: bool) -> list[tuple[str, int]]:
    """("per_group", j): j query heads out of every KV group; ("groups", k): k whole KV groups."""
    if not prune_heads:
        return [("per_group", 0)]
    opts = [("per_group", j) for j in range(g.group_size)]
    opts += [("groups", k) for k in range(1, g.n_kv_heads)]
    return opts


def _head_keep(g: Any, head_scores: torch.Tensor, option: tuple[str, int]) -> torch.Tensor:
    """Head keep-gates [L, H] pruning the same units from every layer, lowest scores first."""
    kind, n = option
    keep = torch.ones(g.n_layers, g.n_heads)
    grouped = head_scores.view(g.n_layers, g.n_kv_heads, g.group_size)  # (L, H_kv, G)
    for layer in range(g.n_layers):
        if kind == "per_group":
            for kv in range(g.n_kv_heads):
                low = torch.sort(grouped[layer, kv].float(), stable=True).indices[:n]
                keep[layer, kv * g.group_size + low] = 0.0
        else:
            low = torch.sort(grouped[layer].float().mean(dim=1), stable=True).indices[:n]
            for kv in low.tolist():
                keep[layer, kv * g.group_size:(kv + 1) * g.group_size] = 0.0
    return keep


def _channel_keep(g: Any, ffn_scores: torch.Tensor, c: int) -> torch.Tensor:
    keep = torch.ones(g.n_layers, g.ffn_dim)
    for layer in range(g.n_layers):
        keep[layer, torch.sort(ffn_scores[layer].float(), stable=True).indices[:c]] = 0.0
    return keep


def width_mask(
    handle: ModelHandle,
    target: int,
    head_scores: torch.Tensor | None,
    ffn_scores: torch.Tensor,
    *,
    prune_heads: bool | None = None,
) -> tuple[PruneMask, str]:
    """A uniform width mask whose params_kept is closest to `target` (see module doc)."""
    g = handle.geometry
    if prune_heads is None:
        prune_heads = handle.adapter.config_decouples_heads
    if prune_heads and head_scores is None:
        raise ValueError("width pruning of heads needs head scores; pass prune_heads=False for channels only")
    total = cost(handle).params_total
    best: tuple[float, int, PruneMask, str] | None = None
    for option in _head_options(g, prune_heads):
        heads = _head_keep(g, head_scores, option) if prune_heads else torch.ones(g.n_layers, g.n_heads)
        base = PruneMask.dense(g)
        base.heads = heads
        kept0 = cost(handle, base).params_kept
        one = base.clone()
        one.ffn = _channel_keep(g, ffn_scores, 1)
        slope = kept0 - cost(handle, one).params_kept  # parameters per channel removed in every layer
        c = round((kept0 - target) / slope) if slope > 0 else 0
        c = max(0, min(c, g.ffn_dim - 1))
        m = base.clone()
        m.ffn = _channel_keep(g, ffn_scores, c)
        kept = cost(handle, m).params_kept
        head_frac = 1.0 - float(heads.sum()) / heads.numel()
        balance = abs(head_frac - c / g.ffn_dim)
        # Prefer reaching the target (within one channel per layer), then the most balanced split.
        miss = abs(kept - target) > slope
        key = (miss, balance if not miss else abs(kept - target) / total)
        n_heads = int(heads[0].sum())
        detail = f"{n_heads} of {g.n_heads} heads and {g.ffn_dim - c} of {g.ffn_dim} FFN channels in every layer"
        if best is None or key < best[0]:
            best = (key, kept, m, detail)
    assert best is not None
    return best[2], best[3]


def depth_mask(handle: ModelHandle, target: int, layer_importance: torch.Tensor) -> tuple[PruneMask, str]:
    """A mask dropping the least important whole layers, as many as brings params_kept closest to `target`."""
    g = handle.geometry
    if tuple(layer_importance.shape) != (g.n_layers,):
        raise ValueError(f"layer scores have shape {tuple(layer_importance.shape)}, expected ({g.n_layers},)")
    order = torch.sort(layer_importance.float(), stable=True).indices.tolist()
    best: tuple[int, PruneMask, list[int]] | None = None
    mask = PruneMask.dense(g)
    for k in range(g.n_layers):
        if k:
            layer = order[k - 1]
            mask = mask.with_block(layer, "attn", 0.0).with_block(layer, "ffn", 0.0)
        gap = abs(cost(handle, mask).params_kept - target)
        if best is None or gap < best[0]:
            best = (gap, mask, sorted(order[:k]))
    assert best is not None
    dropped = best[2]
    return best[1], f"{len(dropped)} of {g.n_layers} layers dropped: {dropped}"


def reach_size(
    handle: ModelHandle,
    keep: float | int,
    *,
    route: str = "depth",
    criterion: str | None = None,
    texts: Sequence[str] | None = None,
    prune_heads: bool | None = None,
    stats: Any = None,
    progress: Progress | None = None,
) -> SizeResult:
    """A mask keeping about `keep` of the parameters by `route` ("width" or "depth"), scored by `criterion`."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    target = target_params(handle, keep)
    total = cost(handle).params_total
    if route == "depth":
        criterion = criterion or "block_influence"
        ls = layer_importance(handle, criterion, texts, stats=stats, progress=progress)
        mask, detail = depth_mask(handle, target, ls.layers)
        unit = "layers"
    else:
        criterion = criterion or "gradient"
        scores, _ = score(handle, calibration_or_default(texts, 32), [criterion], stats=stats, progress=progress)
        s = scores[criterion]
        if s.ffn is None:
            raise ValueError(f"criterion {criterion!r} gives no FFN channel scores; width pruning needs one "
                             "that scores heads and channels (magnitude, gradient, activation, random)")
        mask, detail = width_mask(handle, target, s.heads, s.ffn, prune_heads=prune_heads)
        unit = "heads+ffn"
    kept = cost(handle, mask).params_kept
    mask.meta.update({"criterion": criterion, "route": route, "unit": unit, "scope": "uniform" if route == "width"
                      else "global", "budget": 1.0 - kept / total, "target_params": target, "detail": detail})
    return SizeResult(route, criterion, mask, target, total, kept, detail)
