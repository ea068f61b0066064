"""The common view of a transformer that every model family maps onto.

An adapter answers, for one loaded Hugging Face model: how many layers, heads, KV heads
and FFN channels it has; which module's *input* carries the concatenated head outputs
(the O-projection) and the FFN channels (the down-projection), so gates can be applied
there; and which modules are the ATTN and FFN sub-blocks of each layer and whether their
output already includes the residual stream (post-LN BERT) or is a delta added to it
(pre-LN GPT-2 / Llama). Nothing outside `engine/adapters/` knows module names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Geometry", "SubBlock", "HeadWeights", "Adapter", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Geometry:
    """Sizes that masks and scores are shaped by."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn_dim: int
    causal: bool
    vocab_size: int

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The KV head that query head `head` reads."""
        return head // self.group_size

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SubBlock:
    """One ATTN or FFN sub-block of a layer.

    `residual_inclusive`: the module's output is the new residual stream (post-LN BERT),
    so removing it means passing its residual input through; otherwise the output is a
    delta that the layer adds to the stream, and removing it means a zero delta.
    `residual_input` pulls that residual input out of the module's (args, kwargs).
    """

    module: nn.Module
    residual_inclusive: bool
    residual_input: Callable[[tuple, dict], torch.Tensor] | None = None


@dataclass(frozen=True)
class HeadWeights:
    """Per-head weight views of one layer (views into the model: never write to them).

    q: [H, head_dim, hidden], k/v: [H_kv, head_dim, hidden], o: [H, hidden, head_dim],
    and biases shaped like their rows ([H, head_dim], [H_kv, head_dim]) or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None


class Adapter(ABC):
    """Maps one family's HF modules onto the common view."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.geometry = self._geometry(model.config)

    # --- structure -------------------------------------------------------------------
    @abstractmethod
    def _geometry(self, config: Any) -> Geometry: ...

    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The transformer blocks in order."""

    @abstractmethod
    def attention(self, layer: int) -> nn.Module:
        """The module that computes attention probabilities (its output[1] when eager)."""

    @abstractmethod
    def head_output_proj(self, layer: int) -> nn.Module:
        """The module whose input is the concatenated head outputs [.., H * head_dim]."""

    @abstractmethod
    def ffn_output_proj(self, layer: int) -> nn.Module:
        """The module whose input is the FFN channels [.., F]."""

    @abstractmethod
    def subblock(self, layer: int, kind: str) -> SubBlock:
        """The ATTN (`kind="attn"`) or FFN (`kind="ffn"`) sub-block of `layer`."""

    @abstractmethod
    def subblock_modules(self, layer: int, kind: str) -> list[nn.Module]:
        """Every module whose parameters exist only for that sub-block (removed with it)."""

    @abstractmethod
    def head_weights(self, layer: int) -> HeadWeights:
        """Q/K/V/O weights of `layer` split per head (views, [out, in] orientation)."""

    @abstractmethod
    def ffn_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """FFN weights in [out, in] orientation: "in" projections [F, hidden] (up, gate) and "down" [hidden, F]."""

    @abstractmethod
    def final_norm(self) -> nn.Module | None:
        """The norm applied after the last layer (None when there is none)."""

    @abstractmethod
    def lm_head(self) -> nn.Module | None:
        """The output projection to the vocabulary (None for bare encoders)."""

    @abstractmethod
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table."""

    # --- derived helpers ---------------------------------------------------------------
    @property
    def has_lm_head(self) -> bool:
        return self.lm_head() is not None

    def module_name(self, module: nn.Module) -> str:
        """Dotted path of `module` inside the model (for messages and manifests)."""
        for name, m in self.model.named_modules():
            if m is module:
                return name
        raise KeyError("module is not part of this model")
