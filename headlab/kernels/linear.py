"""Channel-sparse projections in Triton: only kept features are read and multiplied.

Both kernels work on a batch of samples x [S, M, K_in] where sample s uses mask group
group_ids[s], whose kept features are keep[g, :count[g]] (a padded [G, Kmax] index).
The plain (one-mask) case is S = 1, G = 1; the weight is read through the index, never
copied (no W[keep] is materialised).

    launch_row_sparse_linear(x3, weight, bias, keep, counts, group_ids, full_width)
        y[s, m, j] = x[s, m] . W[keep[g, j]] + b[keep[g, j]]   (Q/K/V, FFN up/gate)
        -> [S, M, Kmax] (columns past count[g] are zero) or [S, M, N_out] (pruned zero)
    launch_col_sparse_linear(x3, weight, bias, keep, counts, group_ids, compact_input)
        y[s, m, n] = sum_j x[s, m, keep[g, j]] * W[n, keep[g, j]] + b[n]   (O, FFN down)
        x3 is full width [S, M, K_in], or compact [S, M, Kmax] when compact_input

x3, weight and the output have unit stride along features (dispatch ensures it). Inputs
must already be checked (`checks.py`); use `dispatch` for the public API.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headlab.kernels.backend import interpreter_enabled
from headlab.kernels.dot import dot_acc, dot_options
from headlab.kernels.indices import aligned_run_length
from headlab.kernels.interpreter import interpretable_triton_library

__all__ = ["launch_col_sparse_linear", "launch_row_sparse_linear"]


def _configs(interpreted: bool) -> list[triton.Config]:
    """Autotuning space (the Triton matmul tutorial's); one small config when interpreted."""
    if interpreted:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 256, 64, 8, 3),
        (64, 256, 32, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (128, 32, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (32, 64, 32, 2, 5),
        (16, 64, 64, 2, 4),  # decode-like batches of a few rows
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# Powers-of-two buckets, not exact sizes: every toggle changes the kept count, and an
# exact key would re-benchmark every config on each one.
_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "HAS_BIAS"]


@triton.jit
def _tile_ids(M, N_COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped so neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N_COLS, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _load_keep(keep_row_ptr, offs, mask, KEEP_RUN: tl.constexpr):
    """Keep indices at offs (0 where masked), with the launcher's promise of aligned runs."""
    idx = tl.load(keep_row_ptr + offs, mask=mask, other=0)
    if KEEP_RUN > 1:
        # kept features come in aligned runs of KEEP_RUN consecutive indices (e.g. whole
        # heads): telling the compiler lets gathers through idx become vector loads
        idx = tl.max_contiguous(tl.multiple_of(idx, KEEP_RUN), KEEP_RUN)
    return idx.to(tl.int64)


@triton.autotune(configs=_configs(interpreter_enabled()), key=_KEY)
@triton.jit
def _row_sparse_linear_kernel(
    x_ptr, w_ptr, b_ptr, keep_ptr, count_ptr, group_ptr, out_ptr,
    M, N_COLS, K_IN, M_BUCKET, N_BUCKET, K_BUCKET,  # N_COLS = Kmax; *_BUCKET only key the autotuning
    stride_xs, stride_xm, stride_wn, stride_keep, stride_os, stride_om,  # features: unit stride
    HAS_BIAS: tl.constexpr, FULL_WIDTH: tl.constexpr, KEEP_RUN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N_COLS, BLOCK_M, BLOCK_N, GROUP_M)
    s = tl.program_id(1).to(tl.int64)
    g = tl.load(group_ptr + s)
    count = tl.load(count_ptr + g)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_kept = offs_n < count
    idx = _load_keep(keep_ptr + g * stride_keep, offs_n, n_kept, KEEP_RUN)

    # A tile lying wholly in this group's padding does no reduction: its loop is empty.
    k_end = tl.where(pid_n * BLOCK_N < count, K_IN, 0)
    x_ptrs = x_ptr + s * stride_xs + offs_m[:, None] * stride_xm + offs_k[None, :]
    # the kept rows of W, gathered through the index: tile [BLOCK_N, BLOCK_K] of W[idx]
    w_ptrs = w_ptr + idx[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = offs_k < K_IN - k0
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_kept[:, None] & k_ok[None, :], other=0.0)
        acc = dot_acc(a, tl.trans(w), acc, DOT_PRECISION, DOT_UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + idx, mask=n_kept, other=0.0).to(tl.float32)[None, :]

    out_rows = out_ptr + s * stride_os + offs_m[:, None] * stride_om
    if FULL_WIDTH:
        # scatter to the kept columns; the launcher zero-filled the pruned ones
        tl.store(out_rows + idx[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_kept[None, :])
    else:
        # compact: write padding columns too (as zeros), so the output needs no zero fill
        tl.store(out_rows + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_n < N_COLS)[None, :])


@triton.autotune(configs=_configs(interpreter_enabled()), key=_KEY)
@triton.jit
def _col_sparse_linear_kernel(
    x_ptr, w_ptr, b_ptr, keep_ptr, count_ptr, group_ptr, out_ptr,
    M, N_COLS, K_IN, M_BUCKET, N_BUCKET, K_BUCKET,  # N_COLS = out features, K_IN = Kmax
    stride_xs, stride_xm, stride_wn, stride_keep, stride_os, stride_om,  # features: unit stride
    HAS_BIAS: tl.constexpr, COMPACT_INPUT: tl.constexpr, KEEP_RUN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N_COLS, BLOCK_M, BLOCK_N, GROUP_M)
    s = tl.program_id(1).to(tl.int64)
    g = tl.load(group_ptr + s)
    count = tl.load(count_ptr + g)
    if KEEP_RUN > 1:
        count = tl.multiple_of(count, KEEP_RUN)  # lets the k masks below stay vectorised

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N_COLS
    x_rows = x_ptr + s * stride_xs + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # the reduction runs over this group's kept features only: pruned ones are never loaded
    for k0 in range(0, count, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_kept = offs_k < count
        idx = _load_keep(keep_ptr + g * stride_keep, offs_k, k_kept, KEEP_RUN)
        if COMPACT_INPUT:
            x_cols = offs_k
        else:
            x_cols = idx
        a = tl.load(x_rows + x_cols[None, :], mask=m_mask[:, None] & k_kept[None, :], other=0.0)
        # kept columns of W through the index, tile [BLOCK_N, BLOCK_K] of W[:, idx]. Past
        # `count`, idx reads column 0..KEEP_RUN-1 (in bounds) against a zeroed x: no k mask.
        w = tl.load(w_rows + idx[None, :], mask=n_mask[:, None], other=0.0)
        acc = dot_acc(a, tl.trans(w), acc, DOT_PRECISION, DOT_UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _launch(kernel, x3, weight, bias, keep, counts, group_ids, out, n_cols, k_in, flag_name, flag):
    """Shared launcher: grid (tiles of one sample, samples); features must have unit stride."""
    S, M, _ = x3.shape
    if S == 0 or M == 0 or n_cols == 0:
        return out
    keep = keep.contiguous()  # the kernels step along a keep row with unit stride
    bias = None if bias is None else bias.contiguous()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_cols, meta["BLOCK_N"]), S)

    keep_run = aligned_run_length(keep, counts)
    with interpretable_triton_library():
        kernel[grid](
            x3, weight, weight if bias is None else bias, keep, counts, group_ids, out,
            M, n_cols, k_in, *(triton.next_power_of_2(n) for n in (M, n_cols, k_in)),
            x3.stride(0), x3.stride(1), weight.stride(0), keep.stride(0), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, KEEP_RUN=keep_run, GROUP_M=8,
            **{flag_name: flag},
            **dot_options(x3.dtype),
        )
    return out


def launch_row_sparse_linear(
    x3: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    counts: torch.Tensor,
    group_ids: torch.Tensor,
    full_width: bool,
) -> torch.Tensor:
    """y [S, M, Kmax] (or [S, M, N_out] if full_width) of x3 [S, M, K_in] with kept W rows."""
    S, M, K_in = x3.shape
    if full_width:
        out = x3.new_zeros(S, M, weight.shape[0])
    else:
        out = x3.new_empty(S, M, keep.shape[1])
    return _launch(_row_sparse_linear_kernel, x3, weight, bias, keep, counts, group_ids, out,
                   keep.shape[1], K_in, "FULL_WIDTH", full_width)


def launch_col_sparse_linear(
    x3: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    counts: torch.Tensor,
    group_ids: torch.Tensor,
    compact_input: bool,
) -> torch.Tensor:
    """y [S, M, N_out] of x3 [S, M, K_in or Kmax] through the kept columns of W."""
    S, M, _ = x3.shape
    out = x3.new_empty(S, M, weight.shape[0])
    return _launch(_col_sparse_linear_kernel, x3, weight, bias, keep, counts, group_ids, out,
                   weight.shape[0], keep.shape[1], "COMPACT_INPUT", compact_input)
