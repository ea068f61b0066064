"""Importance criteria: one small class each, one registry by name.

Convention: every score is an *importance* — higher means "keep". A criterion returns a
`Scores` with per-head scores [L, H] and, where it defines them, per-FFN-channel [L, F] and
per-sub-block [L, 2] (ATTN, FFN) scores.

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
from typing import Any, Callable, ClassVar, Sequence

import torch

from engine.core.adapter import Adapter
from engine.core.errors import UnknownCriterionError
from engine.core.handle import ModelHandle
from engine.core.progress import Progress
from engine.importance.capture import CaptureStats, capture

__all__ = [
    "Scores",
    "Criterion",
    "CRITERIA",
    "UnknownCriterionError",
    "get_criterion",
    "criterion_names",
    "score",
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
        w = adapter.head_weights(layer)
        q = w.q.detach().float().flatten(1).norm(dim=1)  # (H,)
        k = w.k.detach().float().flatten(1).norm(dim=1)  # (H_kv,)
        v = w.v.detach().float().flatten(1).norm(dim=1)
        o = w.o.detach().float().flatten(1).norm(dim=1)  # (H,)
        out[layer] = (q + o + (k[kv_of] + v[kv_of]) / g.group_size).cpu()
    return out


def ffn_magnitude(adapter: Adapter) -> torch.Tensor:
    """Sum of the L2 norms of each channel's input rows and output column, [L, F]."""
    g = adapter.geometry
    out = torch.zeros(g.n_layers, g.ffn_dim)
    for layer in range(g.n_layers):
        w = adapter.ffn_weights(layer)
        total = w["down"].detach().float().norm(dim=0)  # (F,) column norms
        for name in ("up", "gate"):
            if name in w:
                total = total + w[name].detach().float().norm(dim=1)
        out[layer] = total.cpu()
    return out


class Criterion:
    """Base: `criterion(handle, stats) -> Scores`. `needs` names the capture it requires."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "none"  # "none" | "forward" | "gradients"
    description: ClassVar[str] = ""

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
    description = "prune heads whose attention is broadest (highest mean entropy) first"

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        return Scores(self.name, heads=-s.entropy, note="importance = -mean row entropy (nats)")


class Magnitude(Criterion):
    name = "magnitude"
    description = "prune heads / channels with the smallest weight norms first"

    def __call__(self, handle: ModelHandle, stats):
        a = handle.adapter
        return Scores(self.name, heads=head_magnitude(a), ffn=ffn_magnitude(a), note="Frobenius norms")


class Gradient(Criterion):
    name = "gradient"
    needs = "gradients"
    description = "Michel et al. 2019: |dL/dgate| of each head / channel / sub-block gate"

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        return Scores(self.name, heads=s.head_grad, ffn=s.ffn_grad, blocks=s.block_grad,
                      note="mean over batches of |dL/dgate| at gate = 1")


class Activation(Criterion):
    name = "activation"
    needs = "forward"
    description = "prune heads / channels with the smallest mean output norm first"

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        return Scores(self.name, heads=s.head_act_norm, ffn=s.ffn_act, note="mean L2 norm of head output")


class Random(Criterion):
    name = "random"
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
    description = "ShortGPT (Men et al. 2024): 1 - cos(h_in, h_out) of each sub-block; prune the smallest"

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        return Scores(self.name, blocks=s.block_influence, note="mean over tokens of 1 - cos(h_in, h_out)")


CRITERIA: dict[str, Callable[..., Criterion]] = {
    c.name: c for c in (Entropy, Magnitude, Gradient, Activation, Random, BlockInfluence)
}


def register(cls: Callable[..., Criterion]) -> Callable[..., Criterion]:
    """Add a criterion class to the registry (usable as a decorator)."""
    CRITERIA[cls.name] = cls
    return cls


def criterion_names() -> list[str]:
    return sorted(CRITERIA)


def get_criterion(name: str, **kwargs: Any) -> Criterion:
    """The criterion registered as `name`, or UnknownCriterionError listing the known names."""
    try:
        cls = CRITERIA[name]
    except KeyError:
        raise UnknownCriterionError(
            f"unknown criterion {name!r}; choose one of: {', '.join(criterion_names())}"
        ) from None
    return cls(**kwargs)


def score(
    handle: ModelHandle,
    texts: Sequence[str],
    criteria: Sequence[str] = ("entropy", "magnitude", "gradient", "activation"),
    *,
    stats: CaptureStats | None = None,
    progress: Progress | None = None,
    **capture_kwargs: Any,
) -> tuple[dict[str, Scores], CaptureStats | None]:
    """Score with several criteria from one shared capture pass (made here unless given)."""
    chosen = [get_criterion(n) for n in criteria]
    needs = {c.needs for c in chosen}
    if stats is None and needs - {"none"}:
        stats = capture(handle, texts, gradients="gradients" in needs, progress=progress, **capture_kwargs)
    return {c.name: c(handle, stats) for c in chosen}, stats
