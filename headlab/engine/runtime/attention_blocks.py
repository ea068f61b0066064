"""One layer's attention probabilities, a block of query rows at a time, reduced as they go.

`probability_blocks(q, k, rows, causal=...)` yields the softmax probabilities of `block`
query rows at a time, [H, block, K], from the layer's queries and keys (GQA: each group of
query heads multiplies its shared KV head; K is never repeated). Each block is reduced
straight away and dropped, so one pass holds O(block x T) floats, never H x T x T:

- `pooled_map`: the rows and keys of a span (window) pooled into contiguous bins, exactly
  as `headlab.engine.runtime.attention_maps.pool_attention` pools a full map ("mass": rows averaged,
  keys summed; "max": the largest probability of each cell);
- `head_statistics`: per-head sink / self / previous-token / local mass, mean distance and
  entropy (plain and normalized), defined as `headlab.engine.importance.capture` defines them for
  one unpadded sequence (the caller passes capture's LOCAL_WINDOW: runtime does not import
  importance).

Memory: a block's scores take at most `block_bytes` (float32 [H, rows, K]); softmax and a
reduction each need one more block-sized temporary, so one pass peaks at about
`pass_bytes_bound(...)` on top of the layer's queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "HeadStatistics",
    "block_rows",
    "pass_bytes_bound",
    "probability_blocks",
    "pooled_map",
    "head_statistics",
]

DEFAULT_BLOCK_BYTES = 32 * 2**20  # 227 query rows of SmolLM2 (9 heads) at 4,096 keys


def block_rows(n_heads: int, n_keys: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Query rows per block so that one block's float32 scores [H, rows, K] fit in `block_bytes` (at least 1)."""
    return max(1, block_bytes // (4 * n_heads * max(1, n_keys)))


def pass_bytes_bound(n_heads: int, n_keys: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Peak bytes one blockwise pass allocates besides q and k: three blocks of [H, rows, T] float32.

    Two are alive at a time (scores and their softmax; or probabilities and one reduction's
    temporary); the third is headroom for a reduction that copies a non-contiguous slice.
    """
    rows = block_rows(n_heads, n_keys, block_bytes)
    return 3 * 4 * n_heads * rows * n_keys


def _check(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"expected q [1, H, T, hd] and k [1, H_kv, T, hd], got {tuple(q.shape)} and {tuple(k.shape)}")
    _, H, T, d = q.shape
    H_kv = k.shape[1]
    if H % H_kv or k.shape[2] != T or k.shape[3] != d:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} do not pair up")
    return H, H_kv, T, d


@torch.no_grad()
def probability_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: tuple[int, int] | None = None,
    *,
    causal: bool,
    attn_mask: torch.Tensor | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, probabilities [H, b, K]) for query rows rows[0]..rows[1]-1, `b` rows at a time.

    q [1, H, T, hd] is scaled (q @ k^T are the logits), k [1, H_kv, T, hd]. Causal without
    `attn_mask`: a block of rows < r1 sees keys 0..r1-1 only, so K = r1 (later keys have
    probability 0). `attn_mask` [1, 1 or H, T, T] (bool: True = visible, or additive float)
    replaces the causal rule, e.g. a sliding window; then K = T.
    """
    H, H_kv, T, d = _check(q, k)
    G = H // H_kv
    r0, r1 = rows if rows is not None else (0, T)
    if not 0 <= r0 <= r1 <= T:
        raise ValueError(f"rows {rows} outside 0..{T}")
    q = q.float()
    k_t = k[0].float().transpose(1, 2).contiguous()  # (H_kv, hd, T)
    step = block_rows(H, T, block_bytes)
    for q0 in range(r0, r1, step):
        q1 = min(r1, q0 + step)
        b = q1 - q0
        n_keys = q1 if causal and attn_mask is None else T
        qb = q[0, :, q0:q1].reshape(H_kv, G * b, d)  # (H_kv, G*b, hd): query heads grouped by their KV head
        s = torch.bmm(qb, k_t[:, :, :n_keys])  # (H_kv, G*b, K)
        s = s.view(H, b, n_keys)  # (H, b, K): head h = kv * G + g, as repeat_kv orders them
        if attn_mask is not None:
            m = attn_mask[0, :, q0:q1, :n_keys]  # (1 or H, b, K)
            if m.dtype == torch.bool:
                s.masked_fill_(~m, float("-inf"))
            else:
                s.add_(m.to(s.dtype))
        elif causal:  # keys 0..q0-1 are visible to every row of the block: mask the diagonal square only
            later = torch.ones(b, b, dtype=torch.bool, device=s.device).triu_(1)  # (b, b): keys after the query
            s[:, :, q0:q1].masked_fill_(later, float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s  # one block alive while the caller reduces this one
        yield q0, p
        del p  # the caller has dropped it too: freed before the next block is formed


@torch.no_grad()
def pooled_map(
    q: torch.Tensor,
    k: torch.Tensor,
    span: tuple[int, int],
    edges: list[int],
    reduce: str = "mass",
    *,
    causal: bool,
    attn_mask: torch.Tensor | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    """Probabilities of query and key positions span[0]..span[1]-1 pooled into bins `edges` (relative to the span): [H, n, n].

    With one bin per position the map is returned as is. Probabilities are normalised over
    every key a row sees, also those outside the span (a window slices the full map).
    """
    start, stop = span
    n, n_bins = stop - start, len(edges) - 1
    if edges[0] != 0 or edges[-1] != n:
        raise ValueError(f"bin edges {edges[0]}..{edges[-1]} do not cover the span of {n} positions")
    if reduce not in ("mass", "max"):
        raise ValueError(f"unknown reduction {reduce!r}; choose mass or max")
    H, dev = q.shape[1], q.device
    out = torch.zeros(H, n_bins, n_bins, device=dev)
    pooled = n_bins < n
    sizes = torch.tensor([b - a for a, b in zip(edges[:-1], edges[1:])], device=dev)  # (n_bins,)
    bin_of = torch.repeat_interleave(torch.arange(n_bins, device=dev), sizes)  # (n,): the bin of each span position
    # Summing keys into bins as a product with a one-hot matrix: faster on a CPU than index_add_ or a gather.
    one_hot = torch.zeros(n, n_bins, device=dev).index_put_((torch.arange(n, device=dev), bin_of),
                                                            torch.tensor(1.0, device=dev))  # (n, n_bins)
    for q0, p in probability_blocks(q, k, (start, stop), causal=causal, attn_mask=attn_mask,
                                    block_bytes=block_bytes):
        b = p.shape[1]
        n_k = min(stop, p.shape[2]) - start  # span keys this block can see
        keys = p[:, :, start : start + n_k]  # (H, b, n_k)
        rows = slice(q0 - start, q0 - start + b)
        if not pooled:
            out[:, rows, :n_k] = keys
            del p, keys
            continue
        if reduce == "mass":
            by_bin = (keys.reshape(H * b, n_k) @ one_hot[:n_k]).view(H, b, n_bins)  # (H, b, n_bins): keys summed
            out.index_add_(1, bin_of[rows], by_bin)
        else:  # bin by bin: a scatter would materialise an int64 index as large as the block
            by_bin = torch.zeros(H, b, n_bins, device=dev)  # (H, b, n_bins): the largest key of each bin
            for j, (a, e) in enumerate(zip(edges[:-1], edges[1:])):
                if a >= n_k:
                    break
                by_bin[:, :, j] = keys[:, :, a : min(e, n_k)].amax(dim=-1)
            out.scatter_reduce_(1, bin_of[rows][None, :, None].expand(H, b, n_bins), by_bin, "amax",
                                include_self=True)
        del p, keys  # before the next block is formed
    if pooled and reduce == "mass":
        out /= sizes.to(out.dtype)[None, :, None]  # rows averaged within a bin
    return out.cpu()


@dataclass(frozen=True)
class HeadStatistics:
    """Per-head attention statistics of one layer over one sequence, each [H] (see headlab.engine.importance.capture)."""

    entropy: torch.Tensor
    entropy_normalized: torch.Tensor
    sink: torch.Tensor
    self_mass: torch.Tensor
    prev_mass: torch.Tensor
    local_mass: torch.Tensor
    mean_distance: torch.Tensor


def _diagonals(p: torch.Tensor, q0: int, offsets: range) -> torch.Tensor:
    """Sum over rows of p [H, b, K] of the keys at query position + each offset (those that exist): [H]."""
    total = torch.zeros(p.shape[0], dtype=torch.float64)
    for off in offsets:
        diag = torch.diagonal(p, offset=q0 + off, dim1=1, dim2=2)  # (H, n): row i, key q0 + i + off
        if diag.shape[1]:
            total += diag.sum(dim=1).double()
    return total


@torch.no_grad()
def head_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    local_window: int,
    attn_mask: torch.Tensor | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> HeadStatistics:
    """Sink, self, previous-token and local mass, mean distance and entropy of every head, averaged over query rows.

    Local: the `local_window` nearest keys up to the query (itself included) when causal,
    else keys within local_window // 2 on either side.
    """
    H, _, T, _ = _check(q, k)
    sums = {name: torch.zeros(H, dtype=torch.float64) for name in
            ("entropy", "entropy_normalized", "sink", "self_mass", "prev_mass", "local_mass", "mean_distance")}
    rows_norm = 0
    local = range(-(local_window - 1), 1) if causal else range(-(local_window // 2), local_window // 2 + 1)
    for q0, p in probability_blocks(q, k, causal=causal, attn_mask=attn_mask, block_bytes=block_bytes):
        b, n_keys = p.shape[1], p.shape[2]
        pos = torch.arange(q0, q0 + b, dtype=torch.float64)  # (b,)
        ent = -torch.special.xlogy(p, p).sum(dim=-1).double()  # (H, b)
        visible = pos + 1 if causal else torch.full((b,), float(T), dtype=torch.float64)  # (b,) keys a row sees
        counted = visible >= 2
        sums["entropy"] += ent.sum(dim=1)
        sums["entropy_normalized"] += (ent[:, counted] / visible[counted].log()).sum(dim=1)
        rows_norm += int(counted.sum())
        sums["sink"] += p[:, :, 0].sum(dim=1).double()
        sums["self_mass"] += _diagonals(p, q0, range(1))
        sums["prev_mass"] += _diagonals(p, q0, range(-1, 0))
        sums["local_mass"] += _diagonals(p, q0, local)
        key_pos = torch.arange(n_keys, dtype=p.dtype)  # (K,)
        if causal:  # keys never follow the query: sum_j p_ij (i - j) = i - E[j]
            sums["mean_distance"] += (pos[None, :] * p.sum(dim=-1).double() - (p @ key_pos).double()).sum(dim=1)
        else:
            dist = (key_pos[None, :] - pos.to(p.dtype)[:, None]).abs()  # (b, K)
            sums["mean_distance"] += (p * dist).sum(dim=-1).double().sum(dim=1)
        del p  # before the next block is formed
    per_row = {name: (s / T).float() for name, s in sums.items()}
    per_row["entropy_normalized"] = (sums["entropy_normalized"] / max(1, rows_norm)).float()
    per_row["prev_mass"] = (sums["prev_mass"] / max(1, T - 1)).float()
    return HeadStatistics(**per_row)
