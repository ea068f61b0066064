"""The hard-mask inference path: pruned heads and channels are skipped, not zeroed.

    logits = sparse_logits(handle, ids, mask)            # same result as gates.apply(handle, mask)

For Llama-family models (Llama, Mistral, Qwen2, SmolLM) each layer is run functionally with
the model's own weights (read, never copied or changed) through the masked kernels:
Q/K/V and FFN up/gate compute only kept output rows (`row_sparse_linear`), attention runs
only kept (batch, head) pairs (`head_sparse_attention`, GQA-aware), and the O and FFN down
projections read only kept input columns (`col_sparse_linear`). On CUDA these are the Triton
kernels; elsewhere their torch twins (gather + dense matmul), which also save work on a CPU.
A list of masks (one per batch row, as the router produces) runs each group of rows that
share a mask with that mask. Scope: full-sequence forward (perplexity, prefill, scoring of
unpadded windows), no KV cache, no padding mask, no sliding window; other families and
other uses go through the exact hook path (engine.core.gates).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kernels
from engine.core.handle import ModelHandle
from engine.core.mask import MaskError, PruneMask

__all__ = ["supports_sparse", "sparse_logits", "default_backend"]


def supports_sparse(handle: ModelHandle) -> bool:
    """The model's family has the kernel path (Llama family, causal LM)."""
    return handle.adapter.family == "llama" and handle.is_causal_lm


def default_backend(handle: ModelHandle) -> str:
    """"triton" on CUDA, else "torch" (the exact reference kernels)."""
    return "triton" if handle.device.type == "cuda" and kernels.triton_available() else "torch"


def _head_rows(keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices [n_kept * head_dim] of the kept heads in a concatenated-heads axis."""
    heads = keep.nonzero().flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=keep.device)).flatten()


def _attention(handle: ModelHandle, layer: int, x: torch.Tensor, mask: PruneMask, pos: tuple, backend: str) -> torch.Tensor:
    g, a = handle.geometry, handle.adapter
    attn = a.attention(layer)
    B, T, _ = x.shape
    keep = mask.heads[layer] > 0  # (H,)
    kv_keep = keep.view(g.n_kv_heads, g.group_size).any(dim=1)  # (H_kv,)
    dev = x.device
    q_rows, kv_rows = _head_rows(keep.to(dev), g.head_dim), _head_rows(kv_keep.to(dev), g.head_dim)
    width_q, width_kv = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim

    def proj(lin, rows, width):
        y = kernels.row_sparse_linear(x, lin.weight, lin.bias, rows, backend=backend)  # (B, T, kept)
        return kernels.scatter_columns(y, rows, width)  # (B, T, width) with pruned heads zero

    q = proj(attn.q_proj, q_rows, width_q).view(B, T, g.n_heads, g.head_dim).transpose(1, 2)  # (B, H, T, hd)
    k = proj(attn.k_proj, kv_rows, width_kv).view(B, T, g.n_kv_heads, g.head_dim).transpose(1, 2)
    v = proj(attn.v_proj, kv_rows, width_kv).view(B, T, g.n_kv_heads, g.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pos)
    o = kernels.head_sparse_attention(q, k, v, keep.to(dev), causal=True, scale=attn.scaling,
                                      merge_heads=True, backend=backend)  # (B, T, H * hd)
    out = kernels.col_sparse_linear(o, attn.o_proj.weight, attn.o_proj.bias, q_rows, backend=backend)
    if mask.attn_bias is not None:
        out = out + mask.attn_bias[layer].to(out)
    return out


def _ffn(handle: ModelHandle, layer: int, x: torch.Tensor, mask: PruneMask, backend: str) -> torch.Tensor:
    mlp = handle.adapter.layers()[layer].mlp
    idx = (mask.ffn[layer] > 0).nonzero().flatten().to(x.device)
    gate = kernels.row_sparse_linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias, idx, backend=backend)
    up = kernels.row_sparse_linear(x, mlp.up_proj.weight, mlp.up_proj.bias, idx, backend=backend)
    h = mlp.act_fn(gate) * up  # (B, T, kept channels)
    out = kernels.col_sparse_linear(h, mlp.down_proj.weight, mlp.down_proj.bias, idx, compact_input=True,
                                    backend=backend)
    if mask.ffn_bias is not None:
        out = out + mask.ffn_bias[layer].to(out)
    return out


@torch.no_grad()
def _run(handle: ModelHandle, ids: torch.Tensor, mask: PruneMask, backend: str) -> torch.Tensor:
    a = handle.adapter
    base = getattr(handle.model, "model", handle.model)
    x = a.input_embeddings()(ids)  # (B, T, d)
    position_ids = torch.arange(ids.shape[1], device=ids.device)[None, :]
    pos = base.rotary_emb(x, position_ids)
    for layer, block in enumerate(a.layers()):
        if mask.attn[layer] > 0:
            x = x + _attention(handle, layer, block.input_layernorm(x), mask, pos, backend)
        if mask.ffn_block[layer] > 0:
            x = x + _ffn(handle, layer, block.post_attention_layernorm(x), mask, backend)
    return a.lm_head()(a.final_norm()(x))


def sparse_logits(
    handle: ModelHandle, input_ids: torch.Tensor, mask: PruneMask | Sequence[PruneMask], *, backend: str | None = None
) -> torch.Tensor:
    """Logits [B, T, V] under hard mask(s), computing only the kept heads and channels."""
    if not supports_sparse(handle):
        raise NotImplementedError(
            f"the kernel path covers Llama-family causal LMs; {handle.name} ({handle.adapter.family}) "
            f"runs through engine.core.gates.apply instead"
        )
    backend = backend or default_backend(handle)
    masks = [mask] if isinstance(mask, PruneMask) else list(mask)
    if len(masks) not in (1, input_ids.shape[0]):
        raise ValueError(f"{len(masks)} masks for a batch of {input_ids.shape[0]} rows")
    prepared = []
    for m in masks:
        m = m.check(handle.geometry).normalized()
        if not m.is_hard:
            raise MaskError("the kernel path needs a hard (0/1) mask; soft gates run through engine.core.gates.apply")
        prepared.append(m)
    if len(prepared) == 1:
        return _run(handle, input_ids, prepared[0], backend)
    # Rows that share a mask run together with that mask (what the router's batches do).
    out: torch.Tensor | None = None
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(prepared):
        key = next((j for j in groups if prepared[j] == m), i)
        groups.setdefault(key, []).append(i)
    for key, rows in groups.items():
        logits = _run(handle, input_ids[rows], prepared[key], backend)
        if out is None:
            out = logits.new_empty(input_ids.shape[0], *logits.shape[1:])
        out[rows] = logits
    return out
