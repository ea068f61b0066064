"""Turning user text into model inputs, with clear errors for empty or oversized input."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from headlab.engine.core.errors import EmptyTextError

__all__ = ["EmptyTextError", "encode_batch", "batches", "context_length"]


def context_length(model: Any, default: int = 2048) -> int:
    """The longest sequence the model accepts (its position table or configured maximum)."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def encode_batch(
    tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask [B, T]; texts longer than max_length are cut."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise EmptyTextError("no text given: pass at least one non-empty string")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise EmptyTextError(f"text #{i} is empty: type something for the model to read")
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if ids.shape[1] == 0 or mask.sum(dim=1).min() == 0:
        raise EmptyTextError("the tokenizer produced no tokens for one of the texts")
    return ids.to(device), mask.to(device)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most `size` items."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i : i + size]
