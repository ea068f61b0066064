"""Masked kernels' public entry points: check inputs, pick a backend, run.

Every function computes only the kept work and gives the same result as the dense op
with pruned heads/features zeroed. `backend`: "auto" (Triton on CUDA, else torch),
"triton" (forced; on CPU needs TRITON_INTERPRET=1 before the first such call), "torch".
The Triton path is forward-only; "auto" uses torch when autograd needs a backward.

Attention (q [B,H,T,D], k/v [B,Hkv,T,D], H % Hkv == 0; query head h reads KV head
h // (H // Hkv)):

    head_sparse_attention(q, k, v, head_keep, causal=True, scale=None, *,
                          merge_heads=False, kv_index=None, window=None, backend="auto") -> Tensor
        head_keep: bool [H] (all samples) or [B, H] (per sample). Returns [B,H,T,D]
        like torch SDPA, or [B,T,H*D] when merge_heads; pruned heads are exact zeros.
        scale defaults to 1/sqrt(D). kv_index: int [H] or [B, H], the KV head each query
        head reads (then H need not be a multiple of Hkv): compact heads of uneven GQA groups.
        window: a causal sliding window (query i reads keys i-window+1..i, as Gemma 3's, Mistral's
        and Qwen2's sliding layers do); the Triton kernel has none, so a window shorter than T
        runs the torch twin on any device.

Projections (weight [N_out, K_in] as in nn.Linear; keep_idx: 1-D int64 indices or a bool
mask over the features):

    row_sparse_linear(x, weight, bias, keep_idx, *, backend="auto") -> Tensor
        x [..., K_in] -> x @ weight[keep].T + bias[keep]: [..., len(keep)]   (Q/K/V, up/gate)
    col_sparse_linear(x, weight, bias, keep_idx, *, compact_input=False, backend="auto") -> Tensor
        x [..., K_in] (or compact [..., len(keep)]) -> x[..., keep] @ weight[:, keep].T + bias:
        [..., N_out]                                                       (O, FFN down)
    scatter_columns(y, keep_idx, width) -> Tensor     compact [..., len(keep)] -> [..., width]

Grouped (sample b of x [B, ..., K] uses mask group group_ids[b]; group_keep_idx is a
[G, Kmax] index right-padded with -1, a [G, F] bool mask, or a list of G keep indices;
see pad_keep_indices):

    grouped_row_sparse_linear(x, weight, bias, group_keep_idx, group_ids, *,
                              full_width=False, backend="auto") -> Tensor
        -> [B, ..., Kmax] (each group's kept columns first, then zeros), or
           [B, ..., N_out] with pruned columns zero when full_width
    grouped_col_sparse_linear(x, weight, bias, group_keep_idx, group_ids, *,
                              compact_input=False, backend="auto") -> Tensor
        x [B, ..., K_in] (or compact [B, ..., Kmax]) -> [B, ..., N_out]

A masked FFN is then: h = act(row(x, W_gate, k)) * row(x, W_up, k);
y = col(h, W_down, b, k, compact_input=True). For per-sample head masks, build the
[B, H] mask from the groups: head_keep = group_head_keep[group_ids].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import headlab.kernels.reference as reference
from headlab.kernels.backend import Backend, resolve_backend
from headlab.kernels.checks import check_attention, check_group_keep, check_keep_idx, check_linear
from headlab.kernels.indices import scatter_columns

__all__ = [
    "col_sparse_linear",
    "grouped_col_sparse_linear",
    "grouped_row_sparse_linear",
    "head_sparse_attention",
    "row_sparse_linear",
    "scatter_columns",
]

GroupKeep = torch.Tensor | Sequence[torch.Tensor]


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dim is contiguous (what the kernels vectorise over), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _as_samples(x: torch.Tensor, n_samples: int) -> torch.Tensor:
    """x [..., K] as [S, M, K] with unit feature stride: S samples of M rows sharing a mask."""
    rows = math.prod(x.shape[:-1]) // max(n_samples, 1)
    return _unit_last_stride(x.reshape(n_samples, rows, x.shape[-1]))  # (S, M, K)


def _single_group(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-mask case as a grouped problem: keep [1, K], counts [1], group_ids [1] (int32)."""
    counts = torch.full((1,), keep.numel(), dtype=torch.int32, device=keep.device)
    group_ids = torch.zeros(1, dtype=torch.int32, device=keep.device)
    return keep.to(torch.int32)[None], counts, group_ids  # (1, K)


def _int32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Index tensors as the int32 the kernels load (kept counts are far below 2**31)."""
    return tuple(t.to(torch.int32) for t in tensors)


def head_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_keep: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    merge_heads: bool = False,
    kv_index: torch.Tensor | None = None,
    window: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention computed for kept heads only; pruned heads output zeros."""
    head_keep, kv_index = check_attention(q, k, v, head_keep, kv_index)
    windowed = causal and window is not None and window < q.shape[2]
    if windowed or resolve_backend(backend, q, k, v) == "torch":
        return reference.head_sparse_attention(q, k, v, head_keep, causal, scale, merge_heads, kv_index, window)
    from headlab.kernels.attention import launch_head_sparse_attention  # imports triton

    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return launch_head_sparse_attention(q, k, v, head_keep, causal, scale, merge_heads, kv_index)


def row_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep_idx: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """x @ weight[keep].T + bias[keep], reading only the kept weight rows."""
    check_linear(x, weight, bias)
    keep = check_keep_idx(keep_idx, weight.shape[0], x.device)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    if resolve_backend(backend, x, weight, bias) == "torch":
        return reference.row_sparse_linear(x, weight, bias, keep)
    from headlab.kernels.linear import launch_row_sparse_linear  # imports triton

    x3 = _as_samples(x, 1)  # (1, M, K_in): all rows share one mask
    y = launch_row_sparse_linear(x3, _unit_last_stride(weight), bias, *_single_group(keep), full_width=False)
    return y.reshape(*x.shape[:-1], keep.numel())  # (..., len(keep))


def col_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep_idx: torch.Tensor,
    *,
    compact_input: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor:
    """x[..., keep] @ weight[:, keep].T + bias, reading only the kept weight columns."""
    check_linear(x, weight, bias)
    keep = check_keep_idx(keep_idx, weight.shape[1], x.device)
    expected = keep.numel() if compact_input else weight.shape[1]
    if x.shape[-1] != expected:
        what = "len(keep_idx) (compact_input=True)" if compact_input else "weight's in_features"
        raise ValueError(f"x has {x.shape[-1]} features but {what} is {expected}")
    if resolve_backend(backend, x, weight, bias) == "torch":
        return reference.col_sparse_linear(x, weight, bias, keep, compact_input)
    from headlab.kernels.linear import launch_col_sparse_linear  # imports triton

    x3 = _as_samples(x, 1)  # (1, M, K): all rows share one mask
    w = _unit_last_stride(weight)
    y = launch_col_sparse_linear(x3, w, bias, *_single_group(keep), compact_input=compact_input)
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., N_out)


def _check_grouped_x(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"grouped x must be [B, ..., features] with B samples, got shape {tuple(x.shape)}")


def grouped_row_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_keep_idx: GroupKeep,
    group_ids: torch.Tensor,
    *,
    full_width: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor:
    """row_sparse_linear where sample b keeps the rows of mask group group_ids[b]."""
    check_linear(x, weight, bias)
    _check_grouped_x(x)
    keep, counts, group_ids = check_group_keep(group_keep_idx, group_ids, weight.shape[0], x.shape[0], x.device)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    if resolve_backend(backend, x, weight, bias) == "torch":
        return reference.grouped_row_sparse_linear(x, weight, bias, keep, group_ids, full_width)
    from headlab.kernels.linear import launch_row_sparse_linear  # imports triton

    x3 = _as_samples(x, x.shape[0])  # (B, M, K_in): one mask per sample
    y = launch_row_sparse_linear(x3, _unit_last_stride(weight), bias, *_int32(keep, counts, group_ids), full_width)
    return y.reshape(*x.shape[:-1], y.shape[-1])  # (B, ..., Kmax or N_out)


def grouped_col_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_keep_idx: GroupKeep,
    group_ids: torch.Tensor,
    *,
    compact_input: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor:
    """col_sparse_linear where sample b keeps the columns of mask group group_ids[b]."""
    check_linear(x, weight, bias)
    _check_grouped_x(x)
    keep, counts, group_ids = check_group_keep(group_keep_idx, group_ids, weight.shape[1], x.shape[0], x.device)
    expected = keep.shape[1] if compact_input else weight.shape[1]
    if x.shape[-1] != expected:
        what = "Kmax of group_keep_idx (compact_input=True)" if compact_input else "weight's in_features"
        raise ValueError(f"x has {x.shape[-1]} features but {what} is {expected}")
    if resolve_backend(backend, x, weight, bias) == "torch":
        return reference.grouped_col_sparse_linear(x, weight, bias, keep, group_ids, compact_input)
    from headlab.kernels.linear import launch_col_sparse_linear  # imports triton

    x3 = _as_samples(x, x.shape[0])  # (B, M, K): one mask per sample
    w = _unit_last_stride(weight)
    y = launch_col_sparse_linear(x3, w, bias, *_int32(keep, counts, group_ids), compact_input)
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (B, ..., N_out)
