"""Mask edits the app makes on a click, and a stable digest of a mask (no Streamlit here)."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from engine.core.mask import PruneMask

__all__ = ["toggle_heads", "reset_unit", "mask_digest", "head_grid_values", "UNITS"]

UNITS = ("heads", "ffn", "blocks")


def toggle_heads(mask: PruneMask, cells: Iterable[tuple[int, int]]) -> PruneMask:
    """Flip each (layer, head) between kept and pruned, keeping the ATTN sub-block rule consistent.

    Turning a head on in a layer whose ATTN sub-block is removed brings the sub-block back
    (otherwise the click would have no effect); turning off the last head of a layer removes
    the sub-block (PruneMask.normalized's rule), so the live model never runs an empty attention.
    """
    m = mask.clone()
    for layer, head in cells:
        turning_on = bool(m.heads_effective()[layer, head] == 0)
        m.heads[layer, head] = 1.0 if turning_on else 0.0
        if turning_on:
            m.attn[layer] = 1.0
        elif bool((m.heads[layer] == 0).all()):
            m.attn[layer] = 0.0
    return m


def reset_unit(mask: PruneMask, unit: str) -> PruneMask:
    """The mask with one unit kind back to dense, the others untouched (the base for re-selecting it).

    "heads" clears head gates and the ATTN sub-blocks removed only because all their heads
    were; "ffn" does the same for channels; "blocks" restores sub-blocks that still have units.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    m = mask.clone()
    if unit == "heads":
        m.attn[(m.heads == 0).all(dim=1)] = 1.0
        m.heads.fill_(1.0)
    elif unit == "ffn":
        m.ffn_block[(m.ffn == 0).all(dim=1)] = 1.0
        m.ffn.fill_(1.0)
    else:
        m.attn[(m.heads > 0).any(dim=1)] = 1.0
        m.ffn_block[(m.ffn > 0).any(dim=1)] = 1.0
    return m


def mask_digest(mask: PruneMask | None) -> str:
    """A short hex digest of every gate and bias; equal masks give equal digests ("dense" for None)."""
    if mask is None:
        return "dense"
    h = hashlib.sha1()
    for t in (mask.heads, mask.ffn, mask.attn, mask.ffn_block):
        h.update(t.detach().float().contiguous().numpy().tobytes())
    for name in ("attn_bias", "ffn_bias"):  # compensation biases change what the model computes too
        bias = getattr(mask, name, None)
        h.update(b"-" if bias is None else bias.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def head_grid_values(mask: PruneMask) -> torch.Tensor:
    """Gate of every head [L, H] with sub-block removal folded in (what the model runs with)."""
    return mask.heads_effective().detach().float()
