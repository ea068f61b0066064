"""llama.cpp's perplexity protocol computed by HeadLab, to compare a GGUF export like with like.

`llama-perplexity -c N` cuts the token stream into chunks of N tokens (the first replaced by BOS
when the vocabulary adds one), runs each chunk from an empty cache and scores only its second half:
the logits at positions N/2 .. N-2 predict the tokens at N/2+1 .. N-1 (tools/perplexity/perplexity.cpp,
`first = n_ctx/2`, `n_ctx - 1 - first` tokens per chunk). Given the token ids llama.cpp used
(`llama-tokenize --ids`), this computes the same number on HeadLab's (masked) model.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits

__all__ = ["HalfWindowResult", "half_window_perplexity"]


@dataclass(frozen=True)
class HalfWindowResult:
    perplexity: float
    chunks: int
    scored_tokens: int
    n_ctx: int

    def describe(self) -> str:
        return (f"llama.cpp's protocol: {self.chunks} chunks of {self.n_ctx} tokens, second half scored "
                f"({self.scored_tokens:,} tokens)")


@torch.no_grad()
def half_window_perplexity(handle: ModelHandle, ids: Sequence[int], n_ctx: int, *, mask: PruneMask | None = None,
                           n_chunks: int | None = None, bos_id: int | None = None) -> HalfWindowResult:
    """Perplexity over the second half of each n_ctx-token chunk of `ids`, as llama-perplexity computes it."""
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be at least 4, got {n_ctx}")
    available = len(ids) // n_ctx
    chunks = available if n_chunks is None else min(n_chunks, available)
    if chunks < 1:
        raise ValueError(f"{len(ids)} tokens make no chunk of {n_ctx}")
    first = n_ctx // 2
    nll, count = 0.0, 0
    with gates.apply(handle, mask.normalized()) if mask is not None else nullcontext():
        for c in range(chunks):
            chunk = torch.tensor([list(ids[c * n_ctx:(c + 1) * n_ctx])], device=handle.device)
            targets = chunk[0, first + 1:].clone()
            if bos_id is not None:
                chunk[0, 0] = bos_id
            logits = token_logits(handle, chunk, torch.ones_like(chunk))[0, first:n_ctx - 1].double()
            nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            count += n_ctx - 1 - first
    return HalfWindowResult(math.exp(nll / count), chunks, count, n_ctx)
