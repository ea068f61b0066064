"""A rotation of the FFN input space, so an importance network's 4-bit sketch cannot sit on the weights' own grid.

The shipped SmolLM2 is a 4-bit model dequantised to float32: every group of 32 inputs of a
gate/up row holds at most 16 distinct values, exactly the sketch's format (headlab.engine.dynamic.sketch:
16 levels per group of 32 inputs). Sketched as they are ("aligned"), the weights come back almost
exactly, so the sketch is no coarser than the model and says nothing of how a 4-bit sketch predicts
on a model stored at 16 bits. Rotated, it is an honest 4-bit copy:

    x' = x R,  W' = W R   (R orthogonal [d, d])   =>   x' W'^T = x R R^T W^T = x W^T

so the model's outputs are unchanged (to float rounding), but W' mixes every group of W's inputs
and no longer lies on any 16-level grid; the sketch is taken of W' and the network multiplies it by
x R. R is a randomised Hadamard matrix H diag(s) / sqrt(d) when d is a power of two, else the Q
factor of a seeded Gaussian matrix (a uniformly random rotation); one R per hidden size, from a
fixed seed, so a saved network rebuilds the same sketches. The rotation costs the predictor one
d x d product per layer and token (R shared by every layer), counted in IPN.predictor_bytes.

`sketch_errors(handle)` reports the sketch's relative error both ways, for a benchmark to print.
`weight_grid(handle)` says whether the loaded gate/up weights lie on such a grid (measured, not assumed): the
shipped SmolLM2 (from a Q4_1 GGUF) does in every group; Gemma 3 270M, from a Q4_K_M file, does not: its
640-wide gate/up rows are not a multiple of Q4_K's 256-wide super-blocks, and its groups of 32 hold up to 28
distinct values (a 5-bit type), while half of its down projections are 4-bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.sketch import GROUP, Int4Sketch
from headlab.engine.models.load import shipped_source

__all__ = ["ALIGNED", "ROTATED", "SKETCHES", "WeightGrid", "distinct_per_group", "input_rotation", "sketch_errors",
           "sketch_relative_error", "weight_grid"]

ROTATED, ALIGNED = "rotated", "aligned"
#: How an importance network sketches the gate and up weights: of the rotated input space, or as stored.
SKETCHES = (ROTATED, ALIGNED)
_SEED = 0


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@functools.lru_cache(maxsize=8)
def _rotation(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if d & (d - 1) == 0:
        signs = torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1
        r = _hadamard(d) * signs[None, :] / d ** 0.5
    else:
        q, upper = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        r = q * torch.sign(torch.diagonal(upper))[None, :]  # signs fixed: a uniformly random rotation
    return r.float()


def input_rotation(d: int, seed: int = _SEED) -> torch.Tensor:
    """R [d, d] float32, orthogonal: randomised Hadamard for a power-of-two d, else a seeded random rotation."""
    if d < 1:
        raise ValueError(f"a rotation needs a positive size, got {d}")
    return _rotation(d, seed).clone()


def sketch_relative_error(weight: torch.Tensor, rotation: torch.Tensor | None = None) -> float:
    """||sketch(W R) - W R||_F / ||W||_F for a weight [out, in]: the 4-bit sketch's error, of W R when rotated.

    R is orthogonal, so this is also the error of the sketch mapped back, sketch(W R) R^T against W.
    """
    w = weight.detach().float()
    w = w @ rotation.to(w.device) if rotation is not None else w
    w = w.cpu()
    return float((Int4Sketch.of(w).dequantized() - w).norm() / w.norm().clamp(min=1e-30))


@torch.no_grad()
def sketch_errors(handle: ModelHandle) -> dict[str, float]:
    """{"aligned": e, "rotated": e}: the relative error of every layer's [gate; up] sketch (Frobenius, all layers)."""
    g, adapter = handle.geometry, handle.adapter
    rotation = input_rotation(g.hidden)
    err = {ALIGNED: 0.0, ROTATED: 0.0}
    norm = 0.0
    for layer in range(g.n_layers):
        p = adapter.projections(layer)
        w = torch.cat([p["gate"].weight, p["up"].weight]).detach().float().cpu()
        sq = float(w.norm()) ** 2
        norm += sq
        err[ALIGNED] += sketch_relative_error(w) ** 2 * sq
        err[ROTATED] += sketch_relative_error(w, rotation) ** 2 * sq
    return {k: (v / norm) ** 0.5 for k, v in err.items()}


#: A model whose groups are this often at most 16-valued is natively 4-bit (a float matrix: essentially never).
NATIVE_SHARE = 0.99


def distinct_per_group(weight: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """[out * in / group]: how many distinct values each group of `group` consecutive inputs of a row holds."""
    w = weight.detach().float().cpu()
    g = w.reshape(w.shape[0], -1, group).reshape(-1, group).sort(-1).values
    return 1 + (g.diff(dim=-1) != 0).sum(-1)


@dataclass(frozen=True)
class WeightGrid:
    """Whether a model's gate/up weights lie on a 4-bit grid of the sketch's shape (16 values per group of 32).

    on_grid: the fraction of groups of 32 inputs (every gate and up row of the layers read) holding at most 16
    distinct values; max_distinct: the most any group holds; source: the quantised file a shipped model was
    dequantised from (headlab.engine.models.load.shipped_source), or None.
    """

    on_grid: float
    max_distinct: int
    source: str | None

    @property
    def native_4bit(self) -> bool:
        """The weights are 4-bit as loaded: an aligned 4-bit sketch would sit on their own grid."""
        return self.on_grid >= NATIVE_SHARE

    def note(self) -> str | None:
        """What the Dynamic page says about the weights' grid and the sketch (None for a float model)."""
        origin = f", dequantised from {self.source}" if self.source else ""
        if self.native_4bit:
            return (f"This model's weights are natively 4-bit{origin}: {self.on_grid:.1%} of the groups of 32 inputs "
                    f"of its gate and up projections hold at most 16 distinct values. An aligned 4-bit sketch "
                    f"(16 levels per group of 32 inputs) would sit on the weights' own grid and reproduce them "
                    f"almost exactly, so the IPN's prediction would be no coarser than the model. That is why the "
                    f"IPN sketches the weights in a randomly rotated input space by default (outputs unchanged); "
                    f"the aligned sketch stays an option (`dynamic-train --sketch aligned`).")
        if self.source:
            return (f"This model is dequantised from {self.source}, yet its gate and up weights are not on a 4-bit "
                    f"grid of groups of 32 inputs: only {self.on_grid:.1%} of the groups hold at most 16 distinct "
                    f"values (up to {self.max_distinct}: the file stores them at another precision). An aligned 4-bit "
                    f"sketch would not sit on them exactly; the IPN sketches the rotated weights by default all the "
                    f"same.")
        return None


@torch.no_grad()
def weight_grid(handle: ModelHandle, max_layers: int = 8) -> WeightGrid:
    """How `handle`'s gate and up weights sit on the sketch's grid of 16 values per group of 32 (up to `max_layers`
    evenly spaced layers, first and last included: a second or so on SmolLM2)."""
    g, adapter = handle.geometry, handle.adapter
    step = max(1, -(-(g.n_layers - 1) // max(1, max_layers - 1)))
    layers = sorted({*range(0, g.n_layers, step), g.n_layers - 1})
    on, total, most = 0, 0, 0
    for layer in layers:
        p = adapter.projections(layer)
        for role in ("gate", "up"):
            w = p[role].weight
            if w.shape[1] % GROUP:
                continue
            d = distinct_per_group(w)
            on, total, most = on + int((d <= 16).sum()), total + d.numel(), max(most, int(d.max()))
    return WeightGrid(on / total if total else 0.0, most, shipped_source(handle.name))
