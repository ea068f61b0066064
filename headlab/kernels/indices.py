"""Keep-index helpers shared by both backends: masks -> indices, padding, scattering back.

A *keep index* lists the kept features (heads' channels, FFN channels) in the order the
compact tensors store them. A *padded group keep index* [G, Kmax] holds one keep index per
mask group (as a router produces), right-padded with -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["PAD_INDEX", "aligned_run_length", "head_features", "keep_indices", "pad_keep_indices", "scatter_columns"]

PAD_INDEX = -1  # marks unused slots of a padded group keep index


def keep_indices(keep: torch.Tensor) -> torch.Tensor:
    """Int64 keep index from a 1-D bool mask (integer indices pass through as int64)."""
    if keep.dtype == torch.bool:
        return keep.nonzero().squeeze(1)
    return keep.to(torch.int64)


def head_features(heads: torch.Tensor | Sequence[int], head_dim: int) -> torch.Tensor:
    """Feature indices [n * head_dim] of `heads` (int indices, in order) in a concatenated-heads axis."""
    h = torch.as_tensor(heads, dtype=torch.int64)
    if h.dim() != 1:
        h = h.reshape(-1)
    return (h[:, None] * head_dim + torch.arange(head_dim, device=h.device)).reshape(-1)  # (n * head_dim,)


def pad_keep_indices(keeps: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Padded [G, Kmax] int64 keep index from a [G, F] bool mask or a list of keep indices."""
    if isinstance(keeps, torch.Tensor):
        if keeps.dtype != torch.bool or keeps.dim() != 2:
            raise ValueError(
                f"pad_keep_indices takes a [G, F] bool mask or a list of 1-D index tensors, "
                f"got a tensor of shape {tuple(keeps.shape)} and dtype {keeps.dtype}"
            )
        keeps = list(keeps)
    if len(keeps) == 0:
        raise ValueError("pad_keep_indices needs at least one group")
    rows = [keep_indices(k) for k in keeps]
    width = max(r.numel() for r in rows)
    padded = torch.full((len(rows), width), PAD_INDEX, dtype=torch.int64, device=rows[0].device)
    for g, row in enumerate(rows):
        padded[g, : row.numel()] = row
    return padded


def scatter_columns(y: torch.Tensor, keep_idx: torch.Tensor, width: int) -> torch.Tensor:
    """Full-width [..., width] copy of compact y [..., len(keep_idx)], zeros where pruned."""
    keep_idx = keep_indices(keep_idx)
    if y.shape[-1] != keep_idx.numel():
        raise ValueError(f"y has {y.shape[-1]} columns but keep_idx has {keep_idx.numel()} entries")
    out = y.new_zeros(*y.shape[:-1], width)
    return out.index_copy_(-1, keep_idx.to(y.device), y)


def aligned_run_length(keep: torch.Tensor, counts: torch.Tensor, candidates: tuple[int, ...] = (16, 8, 4)) -> int:
    """Largest R in candidates such that every group keeps whole aligned runs r*R .. r*R+R-1, else 1.

    keep [G, Kmax] padded index, counts [G] kept per group. Heads pruned as wholes give
    runs of head_dim; knowing it lets the Triton kernels vectorise their gathers.
    """
    if keep.numel() == 0:
        return 1
    col = torch.arange(keep.shape[1], device=keep.device)  # (Kmax,)
    valid = col[None, :] < counts[:, None]  # (G, Kmax)
    flags = []
    for r in candidates:
        offset = col % r  # position inside a run
        run_start = keep[:, col - offset]  # (G, Kmax) index at the start of each run
        ok = (keep == run_start + offset) & (run_start % r == 0)
        flags.append((ok | ~valid).all() & (counts % r == 0).all() & (counts.max() >= r))
    for r, fits in zip(candidates, torch.stack(flags).tolist()):  # one host sync for all
        if fits:
            return r
    return 1
