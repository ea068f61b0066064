"""Batch-1 decode FFN in Triton: one token, a list of kept channels, their interleaved weights only.

    launch_gathered_ffn(x, w3, idx, gate_act, gate_bias, up_bias) -> out [d] (fp32 accumulation)

w3 [F, 3d] holds, per channel j, gate row j | up row j | down column j contiguously (the layout
headlab.engine.dynamic.gathered makes once per model). Program p takes kept channels
idx[p * BLOCK_K : (p + 1) * BLOCK_K]: it reduces their gate and up rows against x over d in
BLOCK_D chunks, forms h = act(g) * u (SiLU, or the given act(gate) values when the caller computed
the gate already), then adds h @ down rows into `out` with atomic adds, chunk by chunk. Pruned
channels' weights are never loaded. Inputs must be checked by the caller (headlab.kernels.decode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headlab.kernels.interpreter import interpretable_triton_library

__all__ = ["launch_gathered_ffn"]

BLOCK_K = 16  # kept channels per program
BLOCK_D = 128  # hidden features per chunk


@triton.jit
def _gathered_ffn_kernel(
    x_ptr, w_ptr, idx_ptr, act_ptr, gate_bias_ptr, up_bias_ptr, out_ptr,
    K, D, stride_w,
    GIVEN: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    j = tl.load(idx_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
    rows = w_ptr + j[:, None] * stride_w  # [BLOCK_K, 1]: the kept channels' runs of 3D weights

    g = tl.zeros((BLOCK_K,), tl.float32)
    u = tl.zeros((BLOCK_K,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        xv = tl.load(x_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        mask = k_mask[:, None] & d_mask[None, :]
        if not GIVEN:
            wg = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            g += tl.sum(wg * xv[None, :], axis=1)
        wu = tl.load(rows + D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        u += tl.sum(wu * xv[None, :], axis=1)
    if HAS_UP_BIAS:
        u += tl.load(up_bias_ptr + j, mask=k_mask, other=0.0).to(tl.float32)
    if GIVEN:
        a = tl.load(act_ptr + j, mask=k_mask, other=0.0).to(tl.float32)
    else:
        if HAS_GATE_BIAS:
            g += tl.load(gate_bias_ptr + j, mask=k_mask, other=0.0).to(tl.float32)
        a = g / (1.0 + tl.exp(-g))  # SiLU
    h = tl.where(k_mask, a * u, 0.0)  # [BLOCK_K]: this program's down inputs

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        wd = tl.load(rows + 2 * D + offs_d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        part = tl.sum(wd.to(tl.float32) * h[:, None], axis=0)  # [BLOCK_D]
        tl.atomic_add(out_ptr + offs_d, part, mask=d_mask)


def launch_gathered_ffn(
    x: torch.Tensor,
    w3: torch.Tensor,
    idx: torch.Tensor,
    gate_act: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
) -> torch.Tensor:
    """out [d] float32 = sum over kept j of act_j * <up_j, x> * down_j (see the module docstring)."""
    d, k = x.shape[0], idx.shape[0]
    out = torch.zeros(d, dtype=torch.float32, device=x.device)
    if k == 0:
        return out
    with interpretable_triton_library():
        _gathered_ffn_kernel[(triton.cdiv(k, BLOCK_K),)](
            x, w3, idx, w3 if gate_act is None else gate_act, w3 if gate_bias is None else gate_bias,
            w3 if up_bias is None else up_bias, out,
            k, d, w3.stride(0),
            GIVEN=gate_act is not None, HAS_GATE_BIAS=gate_bias is not None, HAS_UP_BIAS=up_bias is not None,
            BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
        )
    return out
