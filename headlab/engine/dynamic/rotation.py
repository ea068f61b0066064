"""A rotation of the FFN input space, so an importance network's 4-bit sketch cannot sit on the weights' own grid.

The shipped causal LMs are 4-bit models dequantised to float32: every group of 32 inputs of a
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
"""

from __future__ import annotations

import functools

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.sketch import Int4Sketch

__all__ = ["ALIGNED", "ROTATED", "SKETCHES", "input_rotation", "sketch_errors", "sketch_relative_error"]

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
