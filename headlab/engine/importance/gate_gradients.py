"""Gate gradients under any mask, optionally with compensation: the re-scoring step of iterative pruning.

Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?", NeurIPS 2019: the
importance of head h is |dL/dg_h| at its gate g_h = 1, averaged over batches (absolute value
per batch). headlab.engine.importance.capture computes it for the dense model; here it is computed under the
current (partly pruned) mask, which is what "prune in steps, re-scoring after each" needs.

With compensation (`means`), a gate interpolates between the unit's output and its
calibration mean, x' = mu + g (x - mu), so dL/dg = (x - mu) . dL/dx': the first-order
estimate of the loss change of *mean*-ablation, the removal that FLAP compensation
performs. The bias that carries the (1 - g) mu term is built differentiably
(headlab.engine.importance.mean_ablation.soft_attention_bias / soft_ffn_bias).
"""

from __future__ import annotations

from typing import Sequence

import torch

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import lm_loss
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import batches, context_length, encode_batch
from headlab.engine.importance.mean_ablation import soft_attention_bias, soft_ffn_bias

__all__ = ["gate_gradients"]


def gate_gradients(
    handle: ModelHandle,
    texts: Sequence[str],
    mask: PruneMask | None = None,
    *,
    head_means: torch.Tensor | None = None,
    ffn_means: torch.Tensor | None = None,
    batch_size: int = 4,
    max_length: int = 128,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(|dL/dg| heads [L, H], channels [L, F]) at the gates of `mask` (dense when None), averaged over batches."""
    g = handle.geometry
    base = (mask or PruneMask.dense(g)).check(g)
    max_length = min(max_length, context_length(handle.model))
    chunks = list(batches(list(texts), batch_size))
    head_acc = torch.zeros(g.n_layers, g.n_heads)
    ffn_acc = torch.zeros(g.n_layers, g.ffn_dim)
    for i, chunk in enumerate(chunks):
        ids, valid = encode_batch(handle.tokenizer, chunk, max_length, handle.device)
        heads = base.heads.clone().requires_grad_(True)
        ffn = base.ffn.clone().requires_grad_(True)
        m = PruneMask(heads, ffn, base.attn, base.ffn_block)
        # Units already pruned keep the base's bias; live gates add their own (1 - g) mu term.
        if head_means is not None:
            m.attn_bias = soft_attention_bias(handle.adapter, heads, head_means)
        if ffn_means is not None:
            m.ffn_bias = soft_ffn_bias(handle.adapter, ffn, ffn_means)
        with gates.apply(handle, m):
            loss, _ = lm_loss(handle, ids, valid)
        dh, df = torch.autograd.grad(loss, [heads, ffn])
        head_acc += dh.abs().cpu()
        ffn_acc += df.abs().cpu()
        if progress:
            progress(i + 1, len(chunks))
    return head_acc / len(chunks), ffn_acc / len(chunks)
