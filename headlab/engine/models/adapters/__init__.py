"""Model-family adapters and the lookup from a HF model to its adapter."""

from __future__ import annotations

from torch import nn

from headlab.engine.core.adapter import Adapter, Geometry, HeadWeights, SubBlock, UnsupportedModelError
from headlab.engine.models.adapters.bert import BertAdapter
from headlab.engine.models.adapters.gemma3 import Gemma3Adapter
from headlab.engine.models.adapters.gpt2 import GPT2Adapter
from headlab.engine.models.adapters.llama import LlamaAdapter

__all__ = [
    "Adapter",
    "Geometry",
    "HeadWeights",
    "SubBlock",
    "UnsupportedModelError",
    "ADAPTERS",
    "adapter_for",
    "adapter_class",
    "supported_model_types",
]

ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, Gemma3Adapter, GPT2Adapter, BertAdapter)


def supported_model_types() -> list[str]:
    """Every HF `model_type` that has an adapter."""
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_class(model_type: str | None, what: str = "") -> type[Adapter]:
    """The adapter class for a HF `model_type`, or UnsupportedModelError naming the supported families."""
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    families = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    where = f" ({what})" if what else ""
    raise UnsupportedModelError(f"unsupported architecture {model_type!r}{where}; supported families: {families}")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`, or UnsupportedModelError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return adapter_class(model_type, type(model).__name__)(model)
