"""A handle on a model already in memory: the family's adapter looked up, the model frozen for analysis."""

from __future__ import annotations

from typing import Any

from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.models.adapters import adapter_for

__all__ = ["wrap_model"]


def wrap_model(model: nn.Module, tokenizer: Any, name: str = "in-memory") -> ModelHandle:
    """A handle on a model already in memory (put in eval mode, gradients off for its weights)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ModelHandle(model=model, tokenizer=tokenizer, adapter=adapter_for(model), name=name, source=name)
