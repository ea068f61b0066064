"""Pure-torch twins of the masked kernels: the test oracle and the CPU path.

Each function gathers only the kept work and runs one dense op on it, so it also saves
time where Triton does not run. Inputs are assumed already checked (see `checks.py`);
the public, checked entry points are in `dispatch.py`.

    head_sparse_attention(q, k, v, head_keep, causal, scale, merge_heads=False, kv_index=None, window=None)
        q [B,H,T,D], k/v [B,Hkv,T,D], head_keep [B,H] bool, kv_index [B,H] int or None,
        window: causal sliding window (query i sees keys i-window+1..i) or None
        -> [B,H,T,D] or [B,T,H*D]
    row_sparse_linear(x, weight, bias, keep_idx)            x [...,in] -> [...,len(keep)]
    col_sparse_linear(x, weight, bias, keep_idx, compact_input=False)   -> [...,out]
    grouped_row_sparse_linear(x, weight, bias, group_keep_idx, group_ids, full_width=False)
    grouped_col_sparse_linear(x, weight, bias, group_keep_idx, group_ids, compact_input=False)
    gathered_ffn(x, w3, idx, gate_act=None, gate_bias=None, up_bias=None, activation=None, scratch=None)
        one token's FFN over kept channels idx of an interleaved [F, 3d] layout -> [d]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from headlab.kernels.indices import PAD_INDEX, scatter_columns

__all__ = [
    "GATHER_ROWS",
    "col_sparse_linear",
    "gathered_ffn",
    "grouped_col_sparse_linear",
    "grouped_row_sparse_linear",
    "head_sparse_attention",
    "row_sparse_linear",
]


def head_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_keep: torch.Tensor,
    causal: bool,
    scale: float | None,
    merge_heads: bool = False,
    kv_index: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """SDPA over the kept (batch, head) pairs only; pruned heads output exact zeros.

    Query head h of sample b reads KV head kv_index[b, h], or h // (H // Hkv) without kv_index.
    `window` (causal only): query i attends to keys i - window + 1 .. i, as a sliding-window layer does.
    """
    B, H, T, D = q.shape
    windowed = causal and window is not None and window < T
    # A window at least T long is plain causal attention: is_causal keeps SDPA's fused kernels.
    attn_mask = _window_mask(T, window, q.device) if windowed else None
    causal = causal and not windowed
    if kv_index is None and bool(head_keep.all()):  # nothing pruned: skip the gathers (they copy K/V per head)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale,
                                             enable_gqa=True)
        return out.transpose(1, 2).reshape(B, T, H * D) if merge_heads else out
    out = q.new_zeros(B, H, T, D)
    b_idx, h_idx = head_keep.nonzero(as_tuple=True)  # (N,), (N,) kept pairs
    if b_idx.numel():
        # each kept query head reads its own KV head
        kv_idx = kv_index[b_idx, h_idx] if kv_index is not None else h_idx // (H // k.shape[1])
        # (1, N, T, D): SDPA's fused CPU kernels need 4-D inputs; 3-D ones take the slow math path
        q_kept = q[b_idx, h_idx][None]
        k_kept = k[b_idx, kv_idx][None]
        v_kept = v[b_idx, kv_idx][None]
        out[b_idx, h_idx] = F.scaled_dot_product_attention(
            q_kept, k_kept, v_kept, attn_mask=attn_mask, is_causal=causal, scale=scale
        )[0]
    if merge_heads:
        return out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
    return out


def _window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool: query i may read key j when j <= i and i - j < window."""
    if window < 1:
        raise ValueError(f"a sliding window holds at least 1 token, got {window}")
    i = torch.arange(T, device=device)
    distance = i[:, None] - i[None, :]  # (T, T): query minus key position
    return (distance >= 0) & (distance < window)


def row_sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep_idx: torch.Tensor
) -> torch.Tensor:
    """x @ weight[keep].T + bias[keep]: only the kept output features."""
    kept_bias = None if bias is None else bias.index_select(0, keep_idx)
    return F.linear(x, weight.index_select(0, keep_idx), kept_bias)


def col_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep_idx: torch.Tensor,
    compact_input: bool = False,
) -> torch.Tensor:
    """x[..., keep] @ weight[:, keep].T + bias: only the kept input features."""
    x_kept = x if compact_input else x.index_select(-1, keep_idx)
    return F.linear(x_kept, weight.index_select(1, keep_idx), bias)


def _group_rows(group_ids: torch.Tensor, group_keep_idx: torch.Tensor):
    """Yield (rows, keep) per mask group present in the batch."""
    for g in group_ids.unique().tolist():
        rows = (group_ids == g).nonzero().squeeze(1)
        keep = group_keep_idx[g]
        yield rows, keep[keep != PAD_INDEX]


def grouped_row_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_keep_idx: torch.Tensor,
    group_ids: torch.Tensor,
    full_width: bool = False,
) -> torch.Tensor:
    """row_sparse_linear with sample b using mask group_ids[b]; compact output right-padded with zeros."""
    width = weight.shape[0] if full_width else group_keep_idx.shape[1]
    out = x.new_zeros(*x.shape[:-1], width)
    for rows, keep in _group_rows(group_ids, group_keep_idx):
        y = row_sparse_linear(x.index_select(0, rows), weight, bias, keep)  # (R, ..., len(keep))
        if full_width:
            y = scatter_columns(y, keep, width)
        else:
            y = F.pad(y, (0, width - keep.numel()))
        out.index_copy_(0, rows, y)
    return out


def grouped_col_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_keep_idx: torch.Tensor,
    group_ids: torch.Tensor,
    compact_input: bool = False,
) -> torch.Tensor:
    """col_sparse_linear with sample b using mask group_ids[b]."""
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for rows, keep in _group_rows(group_ids, group_keep_idx):
        x_rows = x.index_select(0, rows)
        if compact_input:
            x_rows = x_rows[..., : keep.numel()]  # drop this group's right padding
        out.index_copy_(0, rows, col_sparse_linear(x_rows, weight, bias, keep, compact_input))
    return out


#: Interleaved rows gathered at once by `gathered_ffn`: 128 x 3 x 576 fp32 (~0.9 MB) stays in a core's L2.
GATHER_ROWS = 128


def gathered_ffn(
    x: torch.Tensor,
    w3: torch.Tensor,
    idx: torch.Tensor,
    gate_act: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token's gated FFN over kept channels idx [k] of w3 [F, 3d] (gate row | up row | down column).

    h_j = act_j * (<up_j, x> + up_bias_j), act_j = gate_act[j] (given) or activation(<gate_j, x> + gate_bias_j)
    (SiLU when `activation` is None); returns sum_j h_j * down_j [d] in x's dtype. The kept rows are
    gathered a block at a time into `scratch` (a contiguous buffer, cache-sized: GATHER_ROWS rows of
    3d when None) and multiplied there: one gather of every kept row would write a copy as large as
    what it read.
    """
    d, k = x.shape[0], idx.shape[0]
    out = x.new_zeros(d)
    given = gate_act is not None
    source = w3[:, d:] if given else w3  # only what is read: up | down, or gate | up | down
    width = source.shape[1]
    if scratch is None:
        scratch = x.new_empty(min(max(k, 1), GATHER_ROWS) * 3 * d)
    act = F.silu if activation is None else activation
    step = max(1, scratch.numel() // width)
    for s in range(0, k, step):
        j = idx[s : s + step]
        block = scratch.view(-1)[: j.numel() * width].view(j.numel(), width)
        torch.index_select(source, 0, j, out=block)  # (rows, 2d or 3d), cache-resident
        if given:
            u = torch.mv(block[:, :d], x)
            a = gate_act.index_select(0, j)
        else:
            g = torch.mv(block[:, :d], x)
            u = torch.mv(block[:, d : 2 * d], x)
            a = act(g if gate_bias is None else g + gate_bias.index_select(0, j))
        if up_bias is not None:
            u = u + up_bias.index_select(0, j)
        out.addmv_(block[:, -d:].t(), a * u)  # down columns, as rows of the block
    return out
