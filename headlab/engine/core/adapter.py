"""The common view of a transformer that every model family maps onto.

An adapter answers, for one loaded Hugging Face model: how many layers, heads, KV heads
and FFN channels it has; which module's *input* carries the concatenated head outputs
(the O-projection) and the FFN channels (the down-projection), so gates can be applied
there; and which modules are the ATTN and FFN sub-blocks of each layer and whether their
output already includes the residual stream (post-LN BERT) or is a delta added to it
(pre-LN GPT-2 / Llama). Nothing outside `headlab/engine/models/adapters/` knows module names.

A family may also run a layer through the masked kernels (`sparse_layer_forward`, driven by
headlab.engine.runtime.sparse_forward), computing only what a `SparseLayer` keeps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from headlab.engine.core.errors import UnsupportedModelError
from headlab.engine.core.reshape import add_bias_, is_removed
from headlab.kernels import Backend, HeadKeep, KeepIndex, head_features

__all__ = [
    "Geometry",
    "SubBlock",
    "HeadWeights",
    "SparseAttention",
    "SparseFFN",
    "SparseLayer",
    "FFNOverride",
    "HeadChooser",
    "Adapter",
    "UnsupportedModelError",
]


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
    `output_normed`: the output goes through a norm of its own before it joins the stream
    (Gemma's post-attention / post-feedforward norms), so the delta is not linear in the
    projection's output: a constant cannot stand in for another sub-block there.
    """

    module: nn.Module
    residual_inclusive: bool
    residual_input: Callable[[tuple, dict], torch.Tensor] | None = None
    output_normed: bool = False


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


@dataclass(frozen=True)
class _SparseSubBlock:
    """What every sparse sub-block shares: which batch rows run it, and its compensation bias."""

    rows: torch.Tensor | None  # [B] bool: rows whose mask keeps the sub-block; None: every row
    bias: torch.Tensor | None  # [d] or [B, 1, d], added to the output projection's output

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """The sub-block's output [B, T, d] with its bias added and rows that removed it zeroed."""
        if self.bias is not None:
            out = out + self.bias
        if self.rows is not None:  # where, not a product: a removed row's output may be anything
            out = torch.where(self.rows[:, None, None], out, out.new_zeros(()))
        return out


@dataclass(frozen=True)
class SparseAttention(_SparseSubBlock):
    """The kept part of one attention sub-block, as compact indices.

    q: features of the kept query heads (head-major, head_dim each) in the Q projection's output
    and the O projection's input; kv: features of the kept KV heads in K/V; heads: the compact
    query slots (which hold a head, which compact KV head each reads).
    """

    q: KeepIndex | None = None
    kv: KeepIndex | None = None
    heads: HeadKeep | None = None


@dataclass(frozen=True)
class SparseFFN(_SparseSubBlock):
    """The kept FFN channels of one FFN sub-block (the up/gate outputs, the down projection's input)."""

    channels: KeepIndex | None = None


@dataclass(frozen=True)
class SparseLayer:
    """What one layer keeps for a batch (built by headlab.engine.runtime.sparse_forward); None: removed for every row."""

    attn: SparseAttention | None
    ffn: SparseFFN | None


#: A replacement FFN sub-block for batch-1 decoding: (layer, its normed input [1, 1, d]) -> its output [1, 1, d].
FFNOverride = Callable[[int, torch.Tensor], torch.Tensor]
#: A token's kept query heads in batch-1 decoding: (layer, attention input [1, 1, d]) -> sorted int64 [k], None: all.
HeadChooser = Callable[[int, torch.Tensor], torch.Tensor | None]


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

    def projections(self, layer: int) -> dict[str, nn.Linear]:
        """The layer's linear maps by role: "q", "k", "v", "o" (attention) and "gate", "up", "down" (gated FFN).

        For per-token dynamic sparsity (headlab.engine.dynamic), which zeroes entries of their inputs;
        a gated FFN computes down(ffn_activation(gate(x)) * up(x)).
        """
        raise UnsupportedModelError(f"{self.family}: dynamic sparsity needs separate q/k/v/o projections and a "
                                    f"gated FFN (gate/up/down); only the llama family has them mapped")

    def projections_of(self, layer: int, kind: str) -> dict[str, nn.Linear]:
        """One sub-block's linear maps by role (`projections`, restricted to "attn" or "ffn"); it must be kept."""
        roles = ("q", "k", "v", "o") if kind == "attn" else ("gate", "up", "down") if kind == "ffn" else None
        if roles is None:
            raise ValueError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")
        if self.is_subblock_removed(layer, kind):
            raise ValueError(f"layer {layer}: its {kind} sub-block was removed")
        maps = self.projections(layer)
        return {role: maps[role] for role in roles}

    def sublayer_norm(self, layer: int, kind: str) -> nn.Module:
        """The norm in front of `layer`'s ATTN or FFN sub-block (pre-LN families), for export to other runtimes."""
        raise UnsupportedModelError(f"{self.family}: no pre-sub-block norm is mapped")

    def ffn_activation(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The activation of the gated FFN's gate projection (FFN channel j = act(gate(x))_j * up(x)_j)."""
        raise UnsupportedModelError(f"{self.family}: no gated FFN activation is mapped for dynamic sparsity")

    @abstractmethod
    def final_norm(self) -> nn.Module | None:
        """The norm applied after the last layer (None when there is none)."""

    @abstractmethod
    def lm_head(self) -> nn.Module | None:
        """The output projection to the vocabulary (None for bare encoders)."""

    @abstractmethod
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table."""

    def attention_qk(
        self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, H, T, hd] and keys [B, H_kv, T, hd] of `layer` from its input `hidden` [B, T, d].

        `hidden` is the layer's input (the residual stream, before any norm the layer applies);
        `position_ids` [B, T] place rotary embeddings where the family has them. The queries
        carry the attention scale, so `q @ k^T` are the attention logits. Nothing is masked
        here: causality, padding and sliding windows are the caller's.
        """
        raise NotImplementedError(f"{self.family}: attention queries and keys are not implemented")

    # --- the kernel path (headlab.engine.runtime.sparse_forward) ----------------------------------
    def sparse_refusal(self) -> str | None:
        """Why this model cannot run through the masked kernels (None when it can)."""
        return f"the kernel path has no layer forward for the {self.family} family yet"

    def sparse_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(first layer's input [B, T, d], what every layer needs to know about positions 0..T-1)."""
        raise UnsupportedModelError(self._no_sparse_path())

    def sparse_layer_forward(
        self, layer: int, x: torch.Tensor, keep: SparseLayer, pos: Any, backend: Backend
    ) -> torch.Tensor:
        """Layer `layer` on x [B, T, d] computing only what `keep` keeps, through the masked kernels."""
        raise UnsupportedModelError(self._no_sparse_path())

    # --- batch-1 decoding with the KV cache (headlab.engine.dynamic.decode) -------------------------
    def decode_refusal(self) -> str | None:
        """Why this model cannot decode token by token through `decode_token` (None when it can)."""
        return f"batch-1 decoding with a per-token FFN is implemented for the llama family only, not {self.family}"

    def decode_cache(self) -> Any:
        """A fresh, empty KV cache that the HF model's forward (prefill) and `decode_token` both fill."""
        raise UnsupportedModelError(self.decode_refusal() or "no decode path")

    def decode_token(self, token: torch.Tensor, position: int, cache: Any, ffn: FFNOverride | None,
                     heads: HeadChooser | None = None) -> torch.Tensor:
        """Logits [1, V] after one token [1, 1] at `position`: attention over `cache` (which it extends with this
        token's keys and values for every KV head), each layer's FFN sub-block given by `ffn` (None: the model's
        own); `heads` (None: every head) picks per layer the query heads whose Q rows and O columns are read,
        and a layer keeping none adds no attention output."""
        raise UnsupportedModelError(self.decode_refusal() or "no decode path")

    def _no_sparse_path(self) -> str:
        reason = self.sparse_refusal() or "no sparse layer forward"
        return f"{reason}; run it through headlab.engine.core.gates.apply instead"

    # --- derived helpers ---------------------------------------------------------------
    @property
    def has_lm_head(self) -> bool:
        return self.lm_head() is not None

    def is_subblock_removed(self, layer: int, kind: str) -> bool:
        """The `kind` sub-block of `layer` was physically removed (headlab.engine.export.surgery)."""
        return is_removed(self.subblock(layer, kind).module)

    # --- physical reshaping (headlab.engine.export.surgery, headlab.engine.models.pruned) ----------------------------
    # These mutate the model: call them only on a private copy, never on a shared model.

    #: The family's config can say heads * head_dim != hidden (Llama's `head_dim`), so fewer
    #: heads per layer still load with the family's standard config.
    config_decouples_heads: bool = False

    def resize_attention_(
        self, layer: int, q_heads: Sequence[int], kv_heads: Sequence[int], kv_index: Sequence[int] | None = None
    ) -> None:
        """Keep query heads `q_heads` and KV heads `kv_heads` of `layer`, in that order.

        `kv_index` (uneven GQA groups only) gives, per kept query head, the position in
        `kv_heads` of the KV head it reads; without it heads pair up as repeat_kv does.
        """
        raise NotImplementedError(f"{self.family}: physical head pruning is not implemented")

    def resize_ffn_(self, layer: int, channels: Sequence[int]) -> None:
        """Keep FFN channels `channels` of `layer`, in that order."""
        raise NotImplementedError(f"{self.family}: physical channel pruning is not implemented")

    def remove_subblock_(self, layer: int, kind: str) -> None:
        """Replace the `kind` sub-block of `layer` by a RemovedSubBlock (and free its parameters)."""
        raise NotImplementedError(f"{self.family}: sub-block removal is not implemented")

    def set_sizes_(self, n_heads: int, n_kv_heads: int, ffn_dim: int) -> None:
        """Write one per-layer size into the config (every layer has it); refuses what the config cannot say."""
        raise NotImplementedError(f"{self.family}: config sizes cannot be set")

    def _set_layers(self, layers: nn.ModuleList) -> None:
        raise NotImplementedError(f"{self.family}: layers cannot be dropped")

    def add_output_bias_(self, layer: int, kind: str, bias: torch.Tensor) -> bool:
        """Fold `bias` [hidden] into the O- (`"attn"`) or down-projection (`"ffn"`) bias; True if one was created."""
        proj = self.head_output_proj(layer) if kind == "attn" else self.ffn_output_proj(layer)
        return add_bias_(proj, bias)

    def can_switch_output_bias(self, kind: str) -> bool:
        """The family's config has a switch that gives the `kind` sub-block's output projection a bias."""
        return False

    def switch_on_output_bias_(self, kind: str) -> int:
        """Turn that switch on: zero biases for every projection it governs that has none; the values added."""
        raise NotImplementedError(f"{self.family}: no config switch adds an output bias")

    def keep_layers_(self, keep: Sequence[int]) -> None:
        """Keep only the layers `keep` (in order); updates num_hidden_layers and layer_types."""
        layers = self.layers()
        if not keep:
            raise ValueError("at least one layer must be kept")
        self._set_layers(nn.ModuleList([layers[i] for i in keep]))
        cfg = self.model.config
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == len(layers):
            cfg.layer_types = [types[i] for i in keep]
        cfg.num_hidden_layers = len(keep)
        self.geometry = self._geometry(cfg)

    def renumber_cache_layers_(self) -> None:
        """Number the attention modules that remain 0, 1, ... so KV caches stay dense.

        Caches measure the sequence length on their first layer; an attention removed from
        layer 0 would otherwise leave that layer empty and break generation.
        """
        k = 0
        for layer in range(len(self.layers())):
            if self.is_subblock_removed(layer, "attn"):
                continue
            attn = self.attention(layer)
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = k
            k += 1

    def _head_rows(self, heads: Sequence[int]) -> torch.Tensor:
        """Feature indices [len(heads) * head_dim] of `heads` in a concatenated-heads axis."""
        return head_features(list(heads), self.geometry.head_dim)

    def drop_unsaved_optional_(self, saved_keys: set[str]) -> None:  # noqa: B027  (most families have none)
        """Remove optional modules (e.g. BERT's pooler) that a saved state dict has no weights for."""

    def layer_sizes(self, layer: int) -> dict[str, Any]:
        """Physical sizes of `layer`: heads, kv_heads, ffn, sub-blocks kept, output biases present."""
        raise NotImplementedError(f"{self.family}: layer sizes are not implemented")

    def module_name(self, module: nn.Module) -> str:
        """Dotted path of `module` inside the model (for messages and manifests)."""
        for name, m in self.model.named_modules():
            if m is module:
                return name
        raise KeyError("module is not part of this model")
