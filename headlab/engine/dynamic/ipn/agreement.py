"""How well an importance network's per-token channel choice matches the oracle's, layer by layer.

The oracle keeps, per token, the k channels with the largest true |act(gate(x)) * up(x)| (the down
projection's input). For each layer, over every token of the given windows, with k = the network's
target keep count (1 - target) * F and the network running (each layer sees the inputs its own
earlier choices produce):

- recall: of the oracle's k channels, the fraction the network keeps;
- precision: of the channels the network keeps, the fraction among the oracle's k;
- kept: the mean fraction of channels the network keeps (its count varies per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.dynamic.ipn.apply import apply_ipn
from headlab.engine.dynamic.ipn.network import IPN
from headlab.engine.dynamic.rules import oracle_keep

__all__ = ["LayerAgreement", "oracle_agreement"]


@dataclass(frozen=True)
class LayerAgreement:
    layer: int
    recall: float
    precision: float
    kept: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def oracle_agreement(handle: ModelHandle, ipn: IPN, ids: torch.Tensor, batch_size: int = 4) -> list[LayerAgreement]:
    """Per-layer recall and precision of `ipn`'s kept channels against the oracle's top-k on `ids` [B, T]."""
    g = handle.geometry
    k = round((1.0 - ipn.target) * g.ffn_dim)
    hits = torch.zeros(g.n_layers, dtype=torch.float64)
    kept = torch.zeros(g.n_layers, dtype=torch.float64)
    tokens = torch.zeros(g.n_layers, dtype=torch.float64)
    ipn.attach(handle)
    with temporary_hooks() as hooks:  # registered before apply_ipn's: these see the down input before zeroing
        for layer in range(g.n_layers):
            projs = handle.adapter.projections(layer)
            seen: list[torch.Tensor] = []

            def on_gate(module: nn.Module, args: tuple, layer: int = layer, seen: list = seen) -> None:
                seen.append(ipn.channel_keep(layer, args[0]))

            def on_down(module: nn.Module, args: tuple, layer: int = layer, seen: list = seen) -> None:
                keep, h = seen.pop(), args[0]
                oracle = oracle_keep(h, k)
                hits[layer] += float((keep & oracle).sum())
                kept[layer] += float(keep.sum())
                tokens[layer] += h.numel() // h.shape[-1]

            hooks.pre(projs["gate"], on_gate)
            hooks.pre(projs["down"], on_down)
        with apply_ipn(handle, ipn):
            for i in range(0, ids.shape[0], batch_size):
                handle.model(input_ids=ids[i : i + batch_size].to(handle.device))
    return [LayerAgreement(layer, float(hits[layer] / max(1.0, tokens[layer] * k)),
                           float(hits[layer] / max(1.0, kept[layer])), float(kept[layer] / (tokens[layer] * g.ffn_dim)))
            for layer in range(g.n_layers)]
