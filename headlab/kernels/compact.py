"""Compact keep sets of a batch: one for every row, or one per mask group of rows.

A model run through the masked kernels keeps its activations compact (kept features only)
from one projection to the next. `KeepIndex.rows` computes only the kept output features
of a projection; `KeepIndex.cols` reads such a compact input. `HeadKeep` says which compact
query-head slots hold a head and which compact KV head each reads, for
`head_sparse_attention`. The same calls run one mask for the whole batch (the plain
kernels) or one mask per group of rows (the grouped kernels, group_ids[b] naming row b's).

Grouped, the compact width is the widest group's (`Kmax`): each row's kept features come
first, then zeros, and a group's padding slots are pruned heads in `HeadKeep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headlab.kernels.backend import Backend
from headlab.kernels.dispatch import (
    col_sparse_linear,
    grouped_col_sparse_linear,
    grouped_row_sparse_linear,
    head_sparse_attention,
    row_sparse_linear,
)
from headlab.kernels.indices import pad_keep_indices

__all__ = ["HeadKeep", "KeepIndex"]


@dataclass(frozen=True)
class KeepIndex:
    """Kept features of a projection: idx [K] for every row, or [G, Kmax] (padded) with group_ids [B]."""

    idx: torch.Tensor
    group_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, keeps: Sequence[torch.Tensor], group_ids: torch.Tensor | None = None) -> "KeepIndex":
        """One int64 keep index per mask group; a single group without group_ids is shared by every row."""
        if group_ids is None:
            if len(keeps) != 1:
                raise ValueError(f"{len(keeps)} keep indices need group_ids saying which row uses which")
            return cls(keeps[0])
        return cls(pad_keep_indices(list(keeps)), group_ids)

    @property
    def width(self) -> int:
        """Features of the compact tensors (Kmax when grouped)."""
        return self.idx.shape[-1]

    def rows(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
             backend: Backend = "auto") -> torch.Tensor:
        """x [B, ..., K_in] -> [B, ..., width]: only the kept output features of x @ weight.T + bias."""
        if self.group_ids is None:
            return row_sparse_linear(x, weight, bias, self.idx, backend=backend)
        return grouped_row_sparse_linear(x, weight, bias, self.idx, self.group_ids, backend=backend)

    def cols(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
             backend: Backend = "auto") -> torch.Tensor:
        """Compact x [B, ..., width] -> [B, ..., N_out]: x @ weight[:, kept].T + bias."""
        if self.group_ids is None:
            return col_sparse_linear(x, weight, bias, self.idx, compact_input=True, backend=backend)
        return grouped_col_sparse_linear(x, weight, bias, self.idx, self.group_ids, compact_input=True,
                                         backend=backend)


@dataclass(frozen=True)
class HeadKeep:
    """Compact query-head slots: which hold a kept head ([H] or [B, H] bool), and the compact KV head each reads.

    kv_index None: slot h reads KV head h // (H // Hkv), as repeat_kv pairs them.
    """

    valid: torch.Tensor
    kv_index: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None,
               causal: bool = True, window: int | None = None, backend: Backend = "auto") -> torch.Tensor:
        """Attention of compact q [B, H, T, D] over compact k/v [B, Hkv, T, D]: merged heads [B, T, H * D].

        `window`: a causal sliding window in tokens (None: every earlier token)."""
        return head_sparse_attention(q, k, v, self.valid, causal=causal, scale=scale, merge_heads=True,
                                     kv_index=self.kv_index, window=window, backend=backend)
