"""Head-sparse flash attention forward in Triton: pruned (batch, head) pairs cost nothing.

The grid covers only the kept (b, h) pairs, listed in a compacted index built on device,
so a pruned head launches no program and reads no memory; its output slice is zeroed,
as a gated model would give. GQA: kept query head h reads KV head h // (H // Hkv), or
kv_index[b, h] when given (compact heads whose groups kept different numbers of heads);
the index lists each kept pair with the KV head it reads.

    launch_head_sparse_attention(q, k, v, head_keep, causal, scale, merge_heads, kv_index) -> out
        q [B,H,T,D], k/v [B,Hkv,T,D] (last dim contiguous), head_keep [B,H] bool,
        kv_index [B,H] int or None
        -> [B,H,T,D], or [B,T,H*D] when merge_heads (same kernel, other output strides)

Inputs must already be checked (`checks.check_attention`); use `dispatch` for the API.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from headlab.kernels.backend import interpreter_enabled
from headlab.kernels.dot import dot_acc, dot_options
from headlab.kernels.interpreter import interpretable_triton_library

__all__ = ["launch_head_sparse_attention"]

_LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) == exp2(x * log2(e)), and exp2 is cheaper


def _configs(interpreted: bool) -> list[triton.Config]:
    """Autotuning space; the interpreter gets one small config since it never benchmarks."""
    if interpreted:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that cannot be right or cannot fit, before any is compiled."""
    head_dim = kwargs["BLOCK_D"]
    fp32 = named_args["q_ptr"].element_size() == 4
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm % bn:  # the causal split into unmasked/diagonal KV blocks needs BLOCK_N | BLOCK_M
            continue
        if head_dim >= 128 and bm * bn >= 128 * 128 and c.num_warps < 8:
            continue  # 128x128 tiles of wide heads spill registers on 4 warps
        if fp32 and bm * bn > 64 * 64:
            continue  # fp32 tiles this big overflow shared memory (no tensor-core path either)
        kept.append(c)
    return kept


@triton.jit
def _attend_kv_range(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kt, stride_vt,
    start_n, end_n, offs_m, offs_d, T, qk_scale,
    MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with keys [start_n, end_n)."""
    d_mask = offs_d < HEAD_DIM
    for start in range(start_n, end_n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if MASK_KEYS:
            kv_mask = (offs_n[:, None] < T) & d_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = dot_acc(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_PRECISION, DOT_UPCAST)
        qk = qk * qk_scale
        if MASK_KEYS:
            valid = offs_n[None, :] < T
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        # every row has a finite max: the first block visited always holds key 0 or the diagonal
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, DOT_UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(interpreter_enabled()),
    key=["SEQ_BUCKET", "HEAD_DIM", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _head_sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, pairs_ptr,
    qk_scale, H, T,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    SEQ_BUCKET,  # next power of two of T: the autotune key, so new lengths reuse a tuning
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # 1-D grid: (kept pair slot, query block); a 1-D grid has no 65535 limit on kept pairs
    num_m = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    slot = pid // num_m
    pid_m = pid % num_m
    if CAUSAL:
        # heaviest (last) query blocks first, so the tail of the launch is short work
        pid_m = num_m - 1 - pid_m
    pair = tl.load(pairs_ptr + 2 * slot).to(tl.int64)  # b * H + h, int64: offsets can pass 2**31
    kv_h = tl.load(pairs_ptr + 2 * slot + 1).to(tl.int64)  # the KV head this query head reads
    b = pair // H
    h = pair % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # Stage 1: KV blocks needing no mask. Causal: those strictly below the diagonal block
    # (blocks above it are never visited: fully masked work is skipped, not masked).
    # Non-causal: all whole blocks. BLOCK_M % BLOCK_N == 0 keeps these in bounds.
    if CAUSAL:
        full_end = pid_m * BLOCK_M
        end = tl.minimum(full_end + BLOCK_M, T)
    else:
        full_end = (T // BLOCK_N) * BLOCK_N
        end = T
    acc, l_i, m_i = _attend_kv_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
        0, full_end, offs_m, offs_d, T, qk_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, DOT_UPCAST,
    )
    # Stage 2: the diagonal block(s) (causal) or the ragged tail (T % BLOCK_N), masked.
    acc, l_i, m_i = _attend_kv_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
        full_end, end, offs_m, offs_d, T, qk_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION, DOT_UPCAST,
    )

    acc = acc / l_i[:, None]
    o_base = out_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def launch_head_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_keep: torch.Tensor,
    causal: bool,
    scale: float | None,
    merge_heads: bool = False,
    kv_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the kernel over the kept pairs of head_keep [B,H]; zero the pruned heads' output."""
    B, H, T, D = q.shape
    if merge_heads:
        out = q.new_empty(B, T, H * D)
        out_bhtd = out.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D) view, strided
    else:
        out = q.new_empty(B, H, T, D)
        out_bhtd = out
    flat_keep = head_keep.reshape(-1)  # (B*H,), index b * H + h
    # The one host sync, to size the grid: the price of launching no program for pruned heads.
    n_kept = int(flat_keep.sum())
    order = torch.argsort(~flat_keep, stable=True)  # (B*H,) kept pair ids first, then pruned
    kept, pruned = order[:n_kept], order[n_kept:]
    out_bhtd[pruned // H, pruned % H] = 0  # writes only the pruned heads' slices
    if n_kept == 0 or T == 0:
        return out
    kv = kv_index.reshape(-1)[kept] if kv_index is not None else (kept % H) // (H // k.shape[1])
    pairs = torch.stack([kept, kv], dim=1).to(torch.int32)  # (n_kept, 2): pair b * H + h, its KV head
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    def grid(meta):
        return (n_kept * triton.cdiv(T, meta["BLOCK_M"]),)

    with interpretable_triton_library():
        _head_sparse_attention_kernel[grid](
            q, k, v, out_bhtd, pairs,
            scale * _LOG2E, H, T,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out_bhtd.stride(0), out_bhtd.stride(1), out_bhtd.stride(2),
            triton.next_power_of_2(T),
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
            **dot_options(q.dtype),
        )
    return out
