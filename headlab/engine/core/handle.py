"""ModelHandle: a loaded model with its tokenizer and the adapter that knows its family.

Every engine function that runs a model takes one. The model inside is shared by every
caller (all browser sessions): nothing may change its weights or leave hooks on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from headlab.engine.core.adapter import Adapter, Geometry

__all__ = ["ModelHandle"]


@dataclass
class ModelHandle:
    """A loaded model with its tokenizer and adapter. The model is shared: never mutate it."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    name: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    # Set for a model split by a device map (headlab.engine.models.placement): where inputs go. Its first
    # parameter may sit on another device, or on the meta device when offloaded.
    input_device: torch.device | None = None

    @property
    def geometry(self) -> Geometry:
        return self.adapter.geometry

    @property
    def device(self) -> torch.device:
        """Where input ids go: the model's device (for a split model, the device its embedding computes on)."""
        return self.input_device if self.input_device is not None else next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def is_causal_lm(self) -> bool:
        return self.geometry.causal and self.adapter.has_lm_head
