"""Tables of per-head scores for the Heads page (pure pandas, no Streamlit).

Every criterion's score is an importance (higher = keep). Tables show each criterion's
natural statistic (entropy in nats; the others are already their statistic) and a rank in
which 1 is the least useful head, the first one that criterion would prune.
"""

from __future__ import annotations

import pandas as pd
import torch

from headlab.engine.core.adapter import Geometry
from headlab.engine.core.mask import PruneMask
from headlab.engine.importance.criteria import Scores

__all__ = ["STATISTIC_LABELS", "display_statistic", "heads_table", "criteria_correlation", "least_useful_rank",
           "head_hover"]

STATISTIC_LABELS = {
    "entropy": "entropy (nats)",
    "magnitude": "weight norm",
    "gradient": "|dL/dgate|",
    "activation": "output norm",
}


def display_statistic(scores: Scores) -> torch.Tensor:
    """The number people read for a criterion [L, H]: entropy in nats (the importance is its negative)."""
    assert scores.heads is not None
    return -scores.heads if scores.criterion == "entropy" else scores.heads


def least_useful_rank(importance: torch.Tensor) -> torch.Tensor:
    """Rank of every head [L, H], 1 = lowest importance (pruned first); ties break by index."""
    flat = importance.reshape(-1).float()
    order = torch.sort(flat, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, flat.numel() + 1)
    return rank.view_as(importance)


def heads_table(scores: dict[str, Scores], mask: PruneMask, g: Geometry, rank_by: str) -> pd.DataFrame:
    """One row per head: layer, head, KV group, gate, each criterion's statistic, and the rank by `rank_by`."""
    layer, head = torch.meshgrid(torch.arange(g.n_layers), torch.arange(g.n_heads), indexing="ij")
    gate = mask.heads_effective()
    data: dict[str, object] = {
        "layer": layer.reshape(-1).numpy(),
        "head": head.reshape(-1).numpy(),
        "KV group": (head // g.group_size).reshape(-1).numpy(),
        "gate": gate.reshape(-1).numpy(),
    }
    for name, s in scores.items():
        if s.heads is not None and name in STATISTIC_LABELS:
            data[STATISTIC_LABELS[name]] = display_statistic(s).reshape(-1).numpy()
    rank_col = f"rank by {rank_by} (1 = least useful)"
    data[rank_col] = least_useful_rank(scores[rank_by].heads).reshape(-1).numpy()
    return pd.DataFrame(data).sort_values(rank_col, kind="stable").reset_index(drop=True)


def criteria_correlation(scores: dict[str, Scores], names: list[str]) -> pd.DataFrame:
    """Spearman rank correlation between the head importances of `names` (1 = same ranking)."""
    frame = pd.DataFrame({n: scores[n].heads.reshape(-1).numpy() for n in names if scores[n].heads is not None})
    return frame.corr(method="spearman")


def head_hover(scores: Scores, g: Geometry, mask: PruneMask) -> list[list[str]]:
    """Hover text of every head [L][H]: statistic, rank (1 = least useful), KV group, pruned or not."""
    values = display_statistic(scores)
    rank = least_useful_rank(scores.heads)
    gate = mask.heads_effective()
    label = STATISTIC_LABELS.get(scores.criterion, scores.criterion)
    n = g.n_layers * g.n_heads
    return [[f"layer {l}, head {h} (KV group {g.kv_head_of(h)})\n{label}: {float(values[l, h]):.4g}"
             f"\nrank {int(rank[l, h])} of {n} (1 = least useful)"
             f"\n{'PRUNED - click to restore' if gate[l, h] == 0 else 'kept - click to prune'}"
             for h in range(g.n_heads)] for l in range(g.n_layers)]
