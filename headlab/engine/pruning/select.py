"""Scores + a budget + a scope -> a PruneMask.

Budget: a fraction in [0, 1) of the units (rounded to the nearest count) or an int count.
Scope:
- "global":   one ranking over every unit of the model (layers lose different amounts);
- "uniform":  every layer loses the same number of units (keeps the architecture regular,
              so an export loads with the family's standard config);
- "per_layer": `budget` is a sequence with one fraction or count per layer.
Units with the lowest importance are pruned; ties break towards the lower index.
GQA: with `kv_groups=True` whole KV groups (a KV head and all query heads reading it) are
ranked by the mean importance of their query heads and pruned together, so surgery can
remove the K/V rows too.
A layer left with no head has its ATTN sub-block removed (PruneMask.normalized); pruning
every unit of the model is refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from headlab.engine.core.adapter import Geometry
from headlab.engine.core.errors import BudgetError
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.importance.criteria import Scores

__all__ = ["BudgetError", "select", "select_heads", "select_channels", "select_blocks", "count_from_budget", "lowest",
           "SCOPES"]

SCOPES = ("global", "uniform", "per_layer")


def count_from_budget(budget: float | int, total: int, what: str = "units") -> int:
    """How many of `total` units a budget removes (fraction -> rounded count)."""
    if isinstance(budget, bool):
        raise BudgetError("budget must be a number, not a bool")
    if isinstance(budget, int):
        if not 0 <= budget < total:
            raise BudgetError(f"budget of {budget} {what}: choose a count in [0, {total}) (pruning all is refused)")
        return budget
    if not isinstance(budget, float) or not 0.0 <= budget < 1.0:
        raise BudgetError(f"budget {budget!r}: a fraction must be in [0, 1), or pass an int count of {what}")
    return min(int(round(budget * total)), total - 1) if total > 1 else 0


def lowest(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [same shape]: the k lowest entries of `scores` among `allowed` (stable ties: lower index first)."""
    flat = scores.reshape(-1).float().clone()
    if allowed is not None:
        flat[~allowed.reshape(-1)] = float("inf")
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        out[torch.sort(flat, stable=True).indices[:k]] = True
    return out.view_as(scores)


def _keep_matrix(scores: torch.Tensor, budget: Any, scope: str, what: str) -> torch.Tensor:
    """Keep gates [L, N] (1 keep, 0 prune) for a score matrix [L, N]."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    L, N = scores.shape
    if not torch.isfinite(scores).all():
        raise ValueError(f"{what} scores contain NaN or inf")
    keep = torch.ones(L, N)
    if scope == "global":
        k = count_from_budget(budget, L * N, what)
        keep[lowest(scores, k)] = 0.0
        return keep
    if scope == "uniform":
        k_total = count_from_budget(budget, L * N, what)
        per = [k_total // L + (1 if i < k_total % L else 0) for i in range(L)] if isinstance(budget, int) else \
              [count_from_budget(float(budget), N, what)] * L
    else:
        if isinstance(budget, (int, float)) or len(budget) != L:
            raise BudgetError(f"scope 'per_layer' needs one budget per layer ({L} values)")
        per = [count_from_budget(b, N, f"{what} of layer {i}") if N > 1 else 0 for i, b in enumerate(budget)]
    for layer, k in enumerate(per):
        keep[layer, lowest(scores[layer], k)] = 0.0
    return keep


def select_heads(
    g: Geometry, head_scores: torch.Tensor, budget: Any, scope: str = "global", kv_groups: bool = False
) -> torch.Tensor:
    """Head keep-gates [L, H]."""
    if tuple(head_scores.shape) != (g.n_layers, g.n_heads):
        raise MaskError(f"head scores have shape {tuple(head_scores.shape)}, expected {(g.n_layers, g.n_heads)}")
    if not kv_groups or g.group_size == 1:
        return _keep_matrix(head_scores, budget, scope, "heads")
    group = head_scores.view(g.n_layers, g.n_kv_heads, g.group_size).mean(dim=-1)  # (L, H_kv)
    keep_groups = _keep_matrix(group, budget, scope, "KV groups")
    return keep_groups.repeat_interleave(g.group_size, dim=1)


def select_channels(g: Geometry, ffn_scores: torch.Tensor, budget: Any, scope: str = "uniform") -> torch.Tensor:
    """FFN channel keep-gates [L, F]."""
    if tuple(ffn_scores.shape) != (g.n_layers, g.ffn_dim):
        raise MaskError(f"FFN scores have shape {tuple(ffn_scores.shape)}, expected {(g.n_layers, g.ffn_dim)}")
    return _keep_matrix(ffn_scores, budget, scope, "FFN channels")


def select_blocks(g: Geometry, block_scores: torch.Tensor, budget: Any, kinds: Sequence[str] = ("attn", "ffn")) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn, ffn_block) keep-gates [L] each, ranking the chosen sub-block kinds together."""
    if tuple(block_scores.shape) != (g.n_layers, 2):
        raise MaskError(f"block scores have shape {tuple(block_scores.shape)}, expected {(g.n_layers, 2)}")
    cols = [i for i, k in enumerate(("attn", "ffn")) if k in kinds]
    if not cols:
        raise ValueError("kinds must include 'attn' and/or 'ffn'")
    sub = block_scores[:, cols]  # (L, len(cols))
    keep = torch.ones(g.n_layers, 2)
    k = count_from_budget(budget, sub.numel(), "sub-blocks")
    keep[:, cols] = (~lowest(sub, k)).float()
    return keep[:, 0].contiguous(), keep[:, 1].contiguous()


def select(
    g: Geometry,
    scores: Scores,
    budget: Any,
    *,
    unit: str = "heads",
    scope: str = "global",
    kv_groups: bool = False,
    base: PruneMask | None = None,
) -> PruneMask:
    """A mask pruning `budget` of `unit` ("heads", "ffn" or "blocks") by `scores`, on top of `base`."""
    mask = (base or PruneMask.dense(g)).clone()
    if unit == "heads":
        if scores.heads is None:
            raise ValueError(f"criterion {scores.criterion!r} gives no head scores")
        mask.heads = mask.heads * select_heads(g, scores.heads, budget, scope, kv_groups)
    elif unit == "ffn":
        if scores.ffn is None:
            raise ValueError(f"criterion {scores.criterion!r} gives no FFN channel scores")
        mask.ffn = mask.ffn * select_channels(g, scores.ffn, budget, scope)
    elif unit == "blocks":
        if scores.blocks is None:
            raise ValueError(f"criterion {scores.criterion!r} gives no sub-block scores")
        attn, ffn = select_blocks(g, scores.blocks, budget)
        mask.attn, mask.ffn_block = mask.attn * attn, mask.ffn_block * ffn
    else:
        raise ValueError(f"unit must be 'heads', 'ffn' or 'blocks', got {unit!r}")
    mask.meta.update({"criterion": scores.criterion, "budget": budget if isinstance(budget, (int, float)) else list(budget),
                      "unit": unit, "scope": scope, "kv_groups": kv_groups})
    return mask.normalized().check(g)
