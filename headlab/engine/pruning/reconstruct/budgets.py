"""Per-layer budgets: one global count of heads or channels to remove, split across layers by sensitivity.

`apportion(total, shares, caps)` turns real-valued shares into integer counts that sum to `total`
exactly (largest remainders, never above a layer's cap, the excess of a capped layer handed on).

`owl_ratios` is OWL's allocation (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing
Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024), applied to structured units: a layer's
outlier ratio is the fraction of its output projection's Wanda scores |W_ij| * ||x_j|| (Sun et al.
2024) above `m` times their mean; layers with more outliers lose less. The ratios are spread
linearly over [r - lam, r + lam] by outlier ratio and shifted to average r, then apportioned. The
O projection scores heads and the down projection scores FFN channels (their input columns are
the units), with input norms from the dense calibration capture.

`counts_of(mask)` reads the allocation another method made (e.g. a global cut by measured KL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.importance.capture import CaptureStats

__all__ = ["OWL_LAMBDA", "OWL_M", "allocate", "apportion", "apportion_aligned", "counts_of", "outlier_ratios", "owl_ratios"]

OWL_M = 5.0  # a score is an outlier above M x the layer's mean score (the paper's default range is 3-10)
OWL_LAMBDA = 0.08  # per-layer ratios stay within +-lambda of the global ratio (the paper's default)


def apportion(total: int, shares: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Integer counts, one per layer, summing to `total` exactly, each within [0, cap], close to `shares`."""
    shares_t = torch.as_tensor(list(shares), dtype=torch.float64).clamp(min=0)
    caps_t = torch.as_tensor(list(caps), dtype=torch.long)
    if shares_t.shape != caps_t.shape:
        raise ValueError(f"{shares_t.numel()} shares for {caps_t.numel()} caps")
    if not 0 <= total <= int(caps_t.sum()):
        raise ValueError(f"cannot place {total} removals in layers holding at most {int(caps_t.sum())}")
    counts = torch.zeros_like(caps_t)
    open_ = caps_t > 0
    left = total
    while left > 0:
        s = torch.where(open_, shares_t, torch.zeros_like(shares_t))
        s = s if float(s.sum()) > 0 else open_.double()  # nothing to go by: spread evenly
        want = s / s.sum() * left  # (L,) real counts for what is left
        room = (caps_t - counts).double()
        base = torch.minimum(want.floor(), room).long()
        counts += base
        left -= int(base.sum())
        frac = torch.where(open_ & (counts < caps_t), want - want.floor(), torch.full_like(want, -1.0))
        for i in torch.argsort(frac, descending=True, stable=True).tolist():
            if left == 0 or frac[i] <= 0:  # whole shares left over are spread again, by share
                break
            counts[i] += 1
            left -= 1
        open_ = counts < caps_t
    return counts.tolist()


def apportion_aligned(total: int, shares: Sequence[float], sizes: Sequence[int], align: int) -> list[int]:
    """Counts to remove per layer, close to `total` and `shares`, that leave every layer a whole number of
    `align`-wide blocks (at least one): a quantised runtime (32 for Q8_0, 256 for K-quants) uses them whole.

    The removals are apportioned in blocks, so the total lands within `align` channels per layer of `total`
    (rounded to the nearest block overall); a layer whose size is not a multiple of `align` first loses its
    remainder.
    """
    if align < 1:
        raise ValueError(f"align must be at least 1, got {align}")
    sizes = list(sizes)
    if any(n < align for n in sizes):
        raise ValueError(f"a layer of {min(sizes)} units holds no whole block of {align}")
    remainders = [n % align for n in sizes]
    blocks = max(0, round((total - sum(remainders)) / align))
    caps = [n // align - 1 for n in sizes]
    per_layer = apportion(min(blocks, sum(caps)), shares, caps)
    return [r + align * b for r, b in zip(remainders, per_layer)]


def allocate(total: int, ratios: Sequence[float], sizes: Sequence[int], keep_min: int = 1) -> list[int]:
    """Counts per layer for `total` removals, shares proportional to `ratios` x layer size, keeping `keep_min`."""
    shares = [max(0.0, r) * n for r, n in zip(ratios, sizes)]
    return apportion(total, shares, [max(0, n - keep_min) for n in sizes])


def outlier_ratios(handle: ModelHandle, stats: CaptureStats, kind: str, m: float = OWL_M) -> torch.Tensor:
    """[L]: fraction of each layer's output-projection Wanda scores above `m` x their mean (OWL's LOD)."""
    g, a = handle.geometry, handle.adapter
    sq = stats.head_in_sq if kind == "attn" else stats.ffn_sq  # (L, inputs): mean square of each input column
    out = torch.zeros(g.n_layers)
    for layer in range(g.n_layers):
        if kind == "attn":
            o = a.head_weights(layer).o.detach().float().cpu()  # (H, d, hd)
            w = o.permute(1, 0, 2).reshape(o.shape[1], -1)  # (d, H * hd)
        else:
            w = a.ffn_weights(layer)["down"].detach().float().cpu()  # (d, F)
        score = w.abs() * sq[layer].float().clamp(min=0).sqrt()[None, :]  # (d, inputs)
        out[layer] = (score > m * score.mean()).float().mean()
    return out


def owl_ratios(lod: torch.Tensor, ratio: float, lam: float = OWL_LAMBDA) -> torch.Tensor:
    """[L] removal ratios in about [ratio - lam, ratio + lam] averaging `ratio`: most outliers, least removed."""
    spread = lod.max() - lod.min()
    z = (lod - lod.min()) / spread if float(spread) > 0 else torch.zeros_like(lod)
    r = ratio + lam * (1.0 - 2.0 * z)
    return (r - r.mean() + ratio).clamp(min=0.0)


def counts_of(mask: PruneMask, kind: str) -> list[int]:
    """Units removed per layer by `mask`: heads ("attn") or FFN channels ("ffn"), sub-block removals included."""
    gates_ = mask.heads_effective() if kind == "attn" else mask.ffn_effective()
    return (gates_ == 0).sum(dim=1).tolist()
