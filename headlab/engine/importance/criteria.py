"""Importance criteria: the `Scores` they return, the `Criterion` base, and the criteria read off one capture.

Convention: every score is an *importance* — higher means "keep". A criterion returns a
`Scores` with per-head scores [L, H], per-FFN-channel [L, F] and/or per-sub-block [L, 2]
(ATTN, FFN) scores: exactly the units it names in `units`. The registry of every criterion
by name (these, the depth criteria, fluctuation, ablation) is headlab.engine.importance.registry.

| name             | heads                                   | reference                         |
|------------------|-----------------------------------------|-----------------------------------|
| entropy          | -mean attention entropy (prune broad)   | common heuristic                  |
| magnitude        | ||Q_h|| + ||K_g||/r + ||V_g||/r + ||O_h|| | weight norm (r = heads per KV head) |
| gradient         | mean |dL/dgate|                         | Michel, Levy & Neubig, NeurIPS 2019 |
| activation       | mean ||head output||                    | activation norm                   |
| random           | seeded uniform                          | baseline                          |
| block_influence  | (sub-blocks only) 1 - cos(h_in, h_out)  | ShortGPT, Men et al. 2024         |

Under GQA a K/V head is shared by r query heads; its norm is split evenly among them so
that the heads' magnitudes add up to the layer's total (nothing counted r times).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from headlab.engine.core.adapter import Adapter
from headlab.engine.core.handle import ModelHandle
from headlab.engine.importance.capture import CaptureStats
from headlab.engine.models.placement import resident

__all__ = [
    "Scores",
    "Criterion",
    "Entropy",
    "Magnitude",
    "Gradient",
    "Activation",
    "Random",
    "BlockInfluence",
    "head_magnitude",
    "ffn_magnitude",
]


@dataclass
class Scores:
    """Importance scores of one criterion (higher = keep)."""

    criterion: str
    heads: torch.Tensor | None = None  # [L, H]
    ffn: torch.Tensor | None = None  # [L, F]
    blocks: torch.Tensor | None = None  # [L, 2]: ATTN, FFN
    note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def head_magnitude(adapter: Adapter) -> torch.Tensor:
    """||Q_h||_F + (||K_g||_F + ||V_g||_F) / r + ||O_h||_F per head, [L, H]."""
    g = adapter.geometry
    out = torch.zeros(g.n_layers, g.n_heads)
    kv_of = torch.arange(g.n_heads) // g.group_size
    for layer in range(g.n_layers):
        with resident(adapter.layers()[layer]):  # a layer offloaded by a device map is loaded for the read
            w = adapter.head_weights(layer)
            q = w.q.detach().float().flatten(1).norm(dim=1).cpu()  # (H,)
            k = w.k.detach().float().flatten(1).norm(dim=1).cpu()  # (H_kv,)
            v = w.v.detach().float().flatten(1).norm(dim=1).cpu()
            o = w.o.detach().float().flatten(1).norm(dim=1).cpu()  # (H,)
        out[layer] = q + o + (k[kv_of] + v[kv_of]) / g.group_size
    return out


def ffn_magnitude(adapter: Adapter) -> torch.Tensor:
    """Sum of the L2 norms of each channel's input rows and output column, [L, F]."""
    g = adapter.geometry
    out = torch.zeros(g.n_layers, g.ffn_dim)
    for layer in range(g.n_layers):
        with resident(adapter.layers()[layer]):
            w = adapter.ffn_weights(layer)
            total = w["down"].detach().float().norm(dim=0)  # (F,) column norms
            for name in ("up", "gate"):
                if name in w:
                    total = total + w[name].detach().float().norm(dim=1)
        out[layer] = total.cpu()
    return out


class Criterion:
    """Base: `criterion(handle, stats) -> Scores`. `needs` names the capture it requires, `units` what it scores."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "none"  # "none" | "forward" | "gradients"
    units: ClassVar[tuple[str, ...]] = ()  # the headlab.engine.core.mask.UNIT_KINDS its Scores fill
    description: ClassVar[str] = ""
    splits_work: ClassVar[bool] = False  # its constructor takes world= and deals its work to the ranks

    def __call__(self, handle: ModelHandle, stats: CaptureStats | None) -> Scores:
        raise NotImplementedError

    def _require(self, stats: CaptureStats | None) -> CaptureStats:
        if stats is None:
            raise ValueError(f"criterion {self.name!r} needs calibration statistics (capture(...))")
        if self.needs == "gradients" and stats.head_grad is None:
            raise ValueError(f"criterion {self.name!r} needs a capture with gradients=True")
        return stats


class Entropy(Criterion):
    name = "entropy"
    needs = "forward"
    units = ("heads",)
    description = "prune heads whose attention is broadest (highest mean entropy) first"

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        return Scores(self.name, heads=-s.entropy, note="importance = -mean row entropy (nats)")


class Magnitude(Criterion):
    name = "magnitude"
    units = ("heads", "ffn")
    description = "prune heads / channels with the smallest weight norms first"

    def __call__(self, handle: ModelHandle, stats):
        a = handle.adapter
        return Scores(self.name, heads=head_magnitude(a), ffn=ffn_magnitude(a), note="Frobenius norms")


class Gradient(Criterion):
    name = "gradient"
    needs = "gradients"
    units = ("heads", "ffn", "blocks")
    description = "Michel et al. 2019: |dL/dgate| of each head / channel / sub-block gate"

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        return Scores(self.name, heads=s.head_grad, ffn=s.ffn_grad, blocks=s.block_grad,
                      note="mean over batches of |dL/dgate| at gate = 1")


class Activation(Criterion):
    name = "activation"
    needs = "forward"
    units = ("heads", "ffn")
    description = "prune heads / channels with the smallest mean output norm first"

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        return Scores(self.name, heads=s.head_act_norm, ffn=s.ffn_act, note="mean L2 norm of head output")


class Random(Criterion):
    name = "random"
    units = ("heads", "ffn", "blocks")
    description = "uniform random scores (a baseline every criterion should beat)"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, handle: ModelHandle, stats):
        g = handle.geometry
        gen = torch.Generator().manual_seed(self.seed)
        return Scores(
            self.name,
            heads=torch.rand(g.n_layers, g.n_heads, generator=gen),
            ffn=torch.rand(g.n_layers, g.ffn_dim, generator=gen),
            blocks=torch.rand(g.n_layers, 2, generator=gen),
            note=f"seed {self.seed}",
        )


class BlockInfluence(Criterion):
    name = "block_influence"
    needs = "forward"
    units = ("blocks",)
    description = "ShortGPT (Men et al. 2024): 1 - cos(h_in, h_out) of each sub-block; prune the smallest"

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        return Scores(self.name, blocks=s.block_influence, note="mean over tokens of 1 - cos(h_in, h_out)")
