"""The hard-mask inference path: pruned heads and channels are skipped, not zeroed.

    logits = sparse_logits(handle, ids, mask)            # same result as gates.apply(handle, mask)
    logits = sparse_logits(handle, ids, [m0, m1, m0])    # one mask per row (a router's batch)

This driver is family-neutral: it turns masks into compact keep indices per layer
(`headlab.engine.core.adapter.SparseLayer`) and runs the adapter's `sparse_inputs` and
`sparse_layer_forward`, which compute the family's layer through the masked kernels
(headlab/kernels/: Triton on CUDA, their exact torch twins elsewhere, which also save work on a CPU).
Activations stay compact from one projection to the next: Q/K/V and FFN up/gate compute
only kept rows, rotary and attention run on the kept heads only (GQA-aware, also for groups
that kept different numbers of heads), the O and FFN down projections read the compact result.

A batch whose rows carry different masks is grouped by `PruneMask.digest()` and runs once,
through the grouped kernels (one keep index per mask group, each row reading its group's).
Scope: full-sequence forward (perplexity, prefill, scoring), no KV cache, right padding only
(causal attention keeps it from reaching real tokens). `sparse_refusal` says why a model, a
mask or a batch cannot run here; those run through the exact hook path (headlab.engine.core.gates).
"""

from __future__ import annotations

from typing import Sequence

import torch

from headlab import kernels
from headlab.engine.core.adapter import Geometry, SparseAttention, SparseFFN, SparseLayer
from headlab.engine.core.errors import UnsupportedModelError
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.models.placement import is_dispatched
from headlab.kernels import HeadKeep, KeepIndex, head_features

__all__ = ["supports_sparse", "sparse_refusal", "sparse_logits", "default_backend"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def sparse_refusal(
    handle: ModelHandle,
    masks: PruneMask | Sequence[PruneMask] = (),
    attention_mask: torch.Tensor | None = None,
) -> str | None:
    """Why the kernel path cannot run this model (with these masks, on this batch); None when it can."""
    if not handle.is_causal_lm:
        return f"{handle.name} is not a causal language model with an LM head"
    if handle.dtype not in _KERNEL_DTYPES:
        return f"the kernels compute in float16, bfloat16 or float32, and {handle.name} is {handle.dtype}"
    reason = handle.adapter.sparse_refusal()
    if reason:
        return reason
    if is_dispatched(handle.model):
        return "the model is split by a device map (the kernels read every layer's weights in one place)"
    masks = [masks] if isinstance(masks, PruneMask) else masks
    if not all(m.is_hard for m in {id(m): m for m in masks}.values()):
        return "a mask has soft gates (between 0 and 1), and the kernels keep or skip whole units"
    if any(m.has_refit for m in masks):
        return "a mask carries refitted output projections (reconstruction), which the hooks apply"
    if attention_mask is not None and not _right_padded(attention_mask):
        return "the batch is not right-padded (each row's real tokens must come first)"
    return None


def supports_sparse(handle: ModelHandle) -> bool:
    """The kernel path runs this model (see `sparse_refusal` for why not)."""
    return sparse_refusal(handle) is None


def default_backend(handle: ModelHandle) -> str:
    """"triton" on CUDA, else "torch" (the exact reference kernels)."""
    return "triton" if handle.device.type == "cuda" and kernels.triton_available() else "torch"


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros."""
    am = attention_mask.bool()
    return not bool((am[:, 1:] & ~am[:, :-1]).any())


def _group_rows(masks: Sequence[PruneMask], g: Geometry) -> tuple[list[PruneMask], list[int]]:
    """(distinct masks, checked and normalized; the group of each row), by digest: linear in the rows."""
    digests: dict[int, str] = {}  # id(mask) -> digest: a router's rows share mask objects
    groups: dict[str, int] = {}
    distinct: list[PruneMask] = []
    row_groups = []
    for m in masks:
        key = digests.get(id(m))
        if key is None:
            n = m.check(g).normalized()
            if not n.is_hard:
                raise MaskError("the kernel path needs a hard (0/1) mask; "
                                "soft gates run through headlab.engine.core.gates.apply")
            if n.has_refit:
                raise MaskError("the kernel path reads the shared weights; a mask with refitted output "
                                "projections runs through headlab.engine.core.gates.apply")
            key = digests[id(m)] = n.digest()
            if key not in groups:
                groups[key] = len(distinct)
                distinct.append(n)
        row_groups.append(groups[key])
    return distinct, row_groups


def _bias(biases: list[torch.Tensor | None], layer: int, group_ids: torch.Tensor | None,
          like: torch.Tensor) -> torch.Tensor | None:
    """The layer's compensation bias: [d] for one mask, [B, 1, d] per row; None when no mask has one."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    rows = torch.stack([b[layer] if b is not None else torch.zeros_like(present[0][layer]) for b in biases])  # (G, d)
    rows = rows.to(device=like.device, dtype=like.dtype)
    return rows[0] if group_ids is None else rows[group_ids][:, None, :]  # (d,) or (B, 1, d)


def _rows_alive(alive: list[bool], group_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """[B] bool of rows whose mask keeps the sub-block; None when every row's does."""
    return None if all(alive) else torch.tensor(alive, device=device)[group_ids]


def _attention_keep(g: Geometry, masks: list[PruneMask], layer: int, group_ids: torch.Tensor | None,
                    like: torch.Tensor) -> SparseAttention | None:
    alive = [bool(m.attn[layer] > 0) for m in masks]
    if not any(alive):
        return None
    dev = like.device
    q_rows, kv_rows, kv_index = [], [], []
    for m, on in zip(masks, alive):
        heads = (m.heads[layer] > 0) & on  # (H,)
        kv_keep = heads.view(g.n_kv_heads, g.group_size).any(dim=1)  # (H_kv,)
        q_heads = heads.nonzero().flatten()
        q_rows.append(head_features(q_heads, g.head_dim).to(dev))
        kv_rows.append(head_features(kv_keep.nonzero().flatten(), g.head_dim).to(dev))
        kv_slot = kv_keep.long().cumsum(0) - 1  # (H_kv,) compact position of each kept KV head
        kv_index.append(kv_slot[q_heads // g.group_size])  # (n_q,) compact KV head of each kept query head
    bias = _bias([m.attn_bias for m in masks], layer, group_ids, like)
    if group_ids is None:
        n_q, n_kv = kv_index[0].numel(), kv_rows[0].numel() // g.head_dim
        # Groups that kept equal numbers of heads pair up as repeat_kv does: no index needed (SDPA's GQA path).
        pairing = torch.arange(n_q, device=kv_index[0].device) // max(n_q // n_kv, 1)
        even = n_q % n_kv == 0 and torch.equal(kv_index[0], pairing)
        heads = HeadKeep(torch.ones(n_q, dtype=torch.bool, device=dev), None if even else kv_index[0].to(dev))
        return SparseAttention(rows=None, bias=bias, q=KeepIndex(q_rows[0]), kv=KeepIndex(kv_rows[0]), heads=heads)
    width = max(i.numel() for i in kv_index)  # compact query slots: the widest group's kept heads
    valid = torch.zeros(len(masks), width, dtype=torch.bool)
    slots = torch.zeros(len(masks), width, dtype=torch.int64)  # padding slots read KV head 0; they are skipped
    for i, idx in enumerate(kv_index):
        valid[i, : idx.numel()] = True
        slots[i, : idx.numel()] = idx
    heads = HeadKeep(valid.to(dev)[group_ids], slots.to(dev)[group_ids])  # (B, width) each
    return SparseAttention(rows=_rows_alive(alive, group_ids, dev), bias=bias, q=KeepIndex.of(q_rows, group_ids),
                           kv=KeepIndex.of(kv_rows, group_ids), heads=heads)


def _ffn_keep(masks: list[PruneMask], layer: int, group_ids: torch.Tensor | None,
              like: torch.Tensor) -> SparseFFN | None:
    alive = [bool(m.ffn_block[layer] > 0) for m in masks]
    if not any(alive):
        return None
    dev = like.device
    channels = [(m.ffn[layer] > 0).nonzero().flatten().to(dev) if on else torch.zeros(0, dtype=torch.int64, device=dev)
                for m, on in zip(masks, alive)]
    bias = _bias([m.ffn_bias for m in masks], layer, group_ids, like)
    return SparseFFN(rows=_rows_alive(alive, group_ids, dev), bias=bias, channels=KeepIndex.of(channels, group_ids))


def _plan(g: Geometry, masks: list[PruneMask], group_ids: torch.Tensor | None, like: torch.Tensor) -> list[SparseLayer]:
    """Per layer, the compact indices the kernels read: shared by the batch, or one set per mask group."""
    return [SparseLayer(_attention_keep(g, masks, layer, group_ids, like), _ffn_keep(masks, layer, group_ids, like))
            for layer in range(g.n_layers)]


@torch.no_grad()
def sparse_logits(
    handle: ModelHandle,
    input_ids: torch.Tensor,
    mask: PruneMask | Sequence[PruneMask],
    *,
    backend: str | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, T, V] under hard mask(s) (one for the batch or one per row), computing only kept units.

    With a right-padded `attention_mask`, every real token's logits are exact; padding positions' are not meaningful.
    """
    reason = sparse_refusal(handle)
    if reason:
        raise UnsupportedModelError(f"the kernel path cannot run {handle.name}: {reason}; "
                                    f"run it through headlab.engine.core.gates.apply instead")
    if attention_mask is not None and not _right_padded(attention_mask):
        raise ValueError("the kernel path takes right-padded batches only (each row's real tokens first); "
                         "run this batch through headlab.engine.core.gates.apply instead")
    masks = [mask] if isinstance(mask, PruneMask) else list(mask)
    n_rows = input_ids.shape[0]
    if len(masks) not in (1, n_rows):
        raise ValueError(f"{len(masks)} masks for a batch of {n_rows} rows")
    distinct, row_groups = _group_rows(masks, handle.geometry)
    adapter = handle.adapter
    x, pos = adapter.sparse_inputs(input_ids)  # (B, T, d)
    group_ids = None if len(distinct) == 1 else torch.tensor(row_groups, device=x.device)  # (B,)
    plan = _plan(handle.geometry, distinct, group_ids, x)
    backend = backend or default_backend(handle)
    for layer, keep in enumerate(plan):
        x = adapter.sparse_layer_forward(layer, x, keep, pos, backend)
    return adapter.lm_head()(adapter.final_norm()(x))
