"""FLAP's fluctuation metric: how much each head's and FFN channel's output varies over calibration data.

An, Zhao, Yu, Tang & Wang, "Fluctuation-based Adaptive Structured Pruning for Large
Language Models", AAAI 2024. A unit whose output barely varies is replaced almost exactly by
its mean (headlab.engine.pruning.compensation), so the steadiest units are pruned first: the score
is the variance of each input channel of the output projection, weighted by the squared
norm of the column it multiplies.
"""

from __future__ import annotations

import torch

from headlab.engine.core.adapter import Adapter
from headlab.engine.core.handle import ModelHandle
from headlab.engine.importance.capture import CaptureStats
from headlab.engine.importance.criteria import Criterion, Scores
from headlab.engine.models.placement import resident

__all__ = ["head_fluctuation", "ffn_fluctuation", "Fluctuation"]


def head_fluctuation(adapter: Adapter, stats: CaptureStats) -> torch.Tensor:
    """[L, H]: sum over a head's O-input channels of Var(x_c) * ||W_O[:, c]||^2 (FLAP)."""
    g = adapter.geometry
    var = (stats.head_in_sq - stats.head_in_mean.square()).clamp(min=0)  # (L, H * hd)
    out = torch.zeros(g.n_layers, g.n_heads)
    for layer in range(g.n_layers):
        with resident(adapter.layers()[layer]):  # a layer offloaded by a device map is loaded for the read
            o = adapter.head_weights(layer).o.detach().float().cpu()  # (H, d, hd)
        col_sq = o.square().sum(dim=1)  # (H, hd): squared norm of each input column
        out[layer] = (var[layer].view(g.n_heads, g.head_dim) * col_sq).sum(dim=1)
    return out


def ffn_fluctuation(adapter: Adapter, stats: CaptureStats) -> torch.Tensor:
    """[L, F]: Var(x_c) * ||W_down[:, c]||^2 per FFN channel (FLAP)."""
    g = adapter.geometry
    var = (stats.ffn_sq - stats.ffn_mean.square()).clamp(min=0)  # (L, F)
    out = torch.zeros(g.n_layers, g.ffn_dim)
    for layer in range(g.n_layers):
        with resident(adapter.layers()[layer]):
            down = adapter.ffn_weights(layer)["down"].detach().float().cpu()  # (d, F)
        out[layer] = var[layer] * down.square().sum(dim=0)
    return out


class Fluctuation(Criterion):
    name = "fluctuation"
    needs = "forward"
    units = ("heads", "ffn")
    description = ("FLAP (An et al. 2024): variance of each unit's output through its projection; "
                   "prune the steadiest (pair with compensation)")

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        a = handle.adapter
        return Scores(self.name, heads=head_fluctuation(a, s), ffn=ffn_fluctuation(a, s),
                      note="sum of Var(input channel) x ||output column||^2")
