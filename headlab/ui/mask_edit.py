"""What the app draws of a mask (no Streamlit here); edits and digests are PruneMask methods."""

from __future__ import annotations

import torch

from headlab.engine.core.mask import PruneMask

__all__ = ["head_grid_values"]


def head_grid_values(mask: PruneMask) -> torch.Tensor:
    """Gate of every head [L, H] with sub-block removal folded in (what the model runs with)."""
    return mask.heads_effective().detach().float()
