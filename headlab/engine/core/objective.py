"""The losses the engine scores and trains against, one per model kind.

- causal LM: mean next-token cross-entropy over non-padding positions;
- encoder with an MLM head: cross-entropy of reconstructing each input token;
- bare encoder (e.g. the MiniLM sentence encoder, which has no head): the same token
  reconstruction read out through the tied input embedding table, so gradient scores
  exist for it too. This is a proxy objective; it is named as such wherever it is reported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headlab.engine.core.handle import ModelHandle

__all__ = ["token_logits", "lm_loss", "objective_name"]


def objective_name(handle: ModelHandle) -> str:
    """A short description of the objective used for this model."""
    if handle.geometry.causal and handle.adapter.has_lm_head:
        return "next-token cross-entropy"
    if handle.adapter.has_lm_head:
        return "masked-LM head token reconstruction"
    return "token reconstruction through the tied input embeddings (proxy: the model has no LM head)"


def token_logits(handle: ModelHandle, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] for every position, whatever the model kind."""
    out = handle.model(input_ids=input_ids, attention_mask=attention_mask)
    if getattr(out, "logits", None) is not None:
        return out.logits
    hidden = out.last_hidden_state  # (B, T, d)
    return hidden @ handle.adapter.input_embeddings().weight.t()


def lm_loss(handle: ModelHandle, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean loss over scored tokens, number of scored tokens) under the model's objective."""
    logits = token_logits(handle, input_ids, attention_mask)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> fp32, fp64 stays
    if handle.geometry.causal:
        logits, targets, valid = logits[:, :-1], input_ids[:, 1:], attention_mask[:, 1:].bool()
    else:
        targets, valid = input_ids, attention_mask.bool()
    n = int(valid.sum())
    if n == 0:
        raise ValueError("no token to score: each text needs at least two tokens for a causal model")
    loss = F.cross_entropy(logits[valid], targets[valid])
    return loss, n
