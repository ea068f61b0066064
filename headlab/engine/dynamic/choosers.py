"""Choosers: per decoded token and layer, which FFN channels and query heads it keeps.

Batch-1 decoding (headlab.engine.dynamic.decode) asks a chooser, for each token and layer,

- `heads(layer, x)`: the kept query heads [k] (sorted int64), or None for every head, from the
  attention input x (after the input norm); Q rows and O columns of the others are not read;
- `channels(layer, x)`: a ChannelChoice from the FFN input x: the kept channels idx [k] (sorted
  int64) and, when the chooser had to compute the whole gate to decide (CATS), act(gate(x)) for
  every channel, so decoding reads only the kept channels' up rows and down columns and never
  recomputes the gate;

and, for the ideal speed-up, `predictor_bytes(handle)`: the weight bytes the chooser itself reads
per token (CATS: the whole gate; an importance network: its sketches and parameters). The same
decisions for a batch of positions (`channel_keep`, `head_keep`: bool masks) drive the gated
model (`gates`), which runs the prompt's prefill and is what decoding must equal token by token.

    CatsChooser(handle, thresholds)   CATS (Lee et al. 2024): channel j when |act(gate(x))_j| >= t_l
    IPNChooser(handle, ipn)           an importance network (headlab.engine.dynamic.ipn): reads 4-bit sketches, not the gate
    FixedChooser(channels, heads)     the same kept sets for every token (tests, exact-sparsity timing)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.apply import apply_rule
from headlab.engine.dynamic.gating import chooser_gates
from headlab.engine.dynamic.ipn import IPN, IPNError, apply_ipn
from headlab.engine.dynamic.rules import CATS, Thresholds, ThresholdsError, get_rule, magnitude_score

__all__ = ["CatsChooser", "ChannelChoice", "Chooser", "FixedChooser", "IPNChooser", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor's elements (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


@dataclass(frozen=True)
class ChannelChoice:
    """One token's kept FFN channels in one layer.

    idx: [k] int64, sorted; gate_act: act(gate(x)) [F] for every channel when the chooser computed
    the whole gate (its bias included), else None (decoding then computes the kept channels' gate).
    """

    idx: torch.Tensor
    gate_act: torch.Tensor | None = None


class Chooser(ABC):
    """Decides, per token and layer, the FFN channels and query heads a decoded token keeps."""

    name: str = ""
    #: channels() returns act(gate(x)) for every channel: the gate is read by the chooser, not per kept channel.
    computes_gate: bool = False
    #: head_keep() may return a mask; False: every head is always kept (attention runs dense).
    chooses_heads: bool = False

    def check(self, handle: ModelHandle) -> None:
        """Raise a clear error when this chooser does not fit `handle`'s model (nothing by default)."""

    @abstractmethod
    def channel_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Bool [..., F]: the channels kept by positions with FFN inputs x [..., d]."""

    def head_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Bool [..., H]: the query heads kept by positions with attention inputs x [..., d] (None: all)."""
        return None

    def channels(self, layer: int, x: torch.Tensor) -> ChannelChoice:
        """One token's kept channels from its FFN input x [1, 1, d]."""
        return ChannelChoice(self.channel_keep(layer, x).reshape(-1).nonzero()[:, 0])

    def heads(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """One token's kept query heads [k] (sorted int64) from its attention input x [1, 1, d]; None: all."""
        keep = self.head_keep(layer, x) if self.chooses_heads else None
        return None if keep is None else keep.reshape(-1).nonzero()[:, 0]

    @abstractmethod
    def predictor_bytes(self, handle: ModelHandle) -> int:
        """Weight bytes the chooser itself reads per token, over every layer."""

    def gates(self, handle: ModelHandle) -> AbstractContextManager:
        """The gated model: `handle`'s shared model under this chooser's masks for every position, for one call."""
        return chooser_gates(handle, self)


class CatsChooser(Chooser):
    """CATS: keep channel j when |act(gate(x))_j| >= the layer's calibrated threshold; every head."""

    name = "cats"
    computes_gate = True

    def __init__(self, handle: ModelHandle, thresholds: Thresholds):
        rule = get_rule(thresholds.rule)
        if rule is not CATS:
            raise ThresholdsError(f"sparse decoding runs the CATS rule (channels chosen from act(gate(x)) before up "
                                  f"and down are read); got {rule.name!r} thresholds")
        g = handle.geometry
        thresholds.check(g.n_layers, g.ffn_dim)
        self.thresholds = thresholds
        self._values = [float(v) for v in thresholds.values["down"]]
        self._gate: list[nn.Linear] = [handle.adapter.projections(i)["gate"] for i in range(g.n_layers)]
        self._act: list[Callable] = [handle.adapter.ffn_activation(i) for i in range(g.n_layers)]
        self._model = handle.model

    def check(self, handle: ModelHandle) -> None:
        if handle.model is not self._model:
            raise ThresholdsError(f"this CATS chooser was made for another model than {handle.name}")

    def channel_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return magnitude_score(self._act[layer](self._gate[layer](x))) >= self._values[layer]

    def channels(self, layer: int, x: torch.Tensor) -> ChannelChoice:
        a = self._act[layer](self._gate[layer](x.reshape(1, -1)))[0]  # (F,): every channel, CATS scores them all
        return ChannelChoice((magnitude_score(a) >= self._values[layer]).nonzero()[:, 0], a)

    def predictor_bytes(self, handle: ModelHandle) -> int:
        return sum(tensor_bytes(g.weight) + tensor_bytes(g.bias) for g in self._gate)

    def gates(self, handle: ModelHandle) -> AbstractContextManager:
        return apply_rule(handle, self.thresholds)


class IPNChooser(Chooser):
    """An importance network's channels (and heads, when it predicts them), decided from its weight sketches."""

    name = "ipn"

    def __init__(self, handle: ModelHandle, ipn: IPN):
        self.ipn = ipn
        self.chooses_heads = bool(ipn.heads)
        self.check(handle)

    def check(self, handle: ModelHandle) -> None:
        if getattr(self.ipn, "lora_rank", 0):
            raise IPNError("this importance network adds LoRA terms to the down projections, which the decode path "
                           "does not compute; decode with a network trained without LoRA")
        self.ipn.attach(handle)  # checks the shapes; the sketches are made once per model

    def channel_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.ipn.channel_keep(layer, x)

    def head_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        return self.ipn.head_keep(layer, x)

    def predictor_bytes(self, handle: ModelHandle) -> int:
        return int(self.ipn.predictor_bytes)

    def gates(self, handle: ModelHandle) -> AbstractContextManager:
        return apply_ipn(handle, self.ipn)


class FixedChooser(Chooser):
    """The same kept channels (and heads) for every token: channels[l] [k_l], heads[l] [h_l] or None (all)."""

    name = "fixed"

    def __init__(self, handle: ModelHandle, channels: Sequence[torch.Tensor],
                 heads: Sequence[torch.Tensor | None] | None = None):
        g = handle.geometry
        if len(channels) != g.n_layers or (heads is not None and len(heads) != g.n_layers):
            raise ValueError(f"a fixed chooser needs one kept set per layer ({g.n_layers})")
        self._channels = [_keep_mask(c, g.ffn_dim, "channel", layer) for layer, c in enumerate(channels)]
        self._heads = [None if h is None else _keep_mask(h, g.n_heads, "head", layer)
                       for layer, h in enumerate(heads or [None] * g.n_layers)]
        self.chooses_heads = any(h is not None for h in self._heads)

    def channel_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._channels[layer].to(x.device).expand(*x.shape[:-1], -1)

    def head_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        keep = self._heads[layer]
        return None if keep is None else keep.to(x.device).expand(*x.shape[:-1], -1)

    def predictor_bytes(self, handle: ModelHandle) -> int:
        return 0


def _keep_mask(kept: torch.Tensor, n: int, what: str, layer: int) -> torch.Tensor:
    idx = torch.as_tensor(kept, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"layer {layer}: kept {what}s must lie in [0, {n}), got {idx.tolist()}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask
