"""Output-reconstruction compensation for pruned heads and FFN channels (FLAP).

An, Zhao, Yu, Tang & Wang, "Fluctuation-based Adaptive Structured Pruning for Large
Language Models", AAAI 2024. A pruned unit's output is replaced by its *mean* over
calibration data instead of zero. Because the O-projection (down-projection) is linear, that
mean folds into one bias vector per layer:

    attn_bias[l] = W_O[:, pruned cols] @ mean(O-input[pruned cols])     # [hidden]
    ffn_bias[l]  = W_down[:, pruned ch] @ mean(down-input[pruned ch])   # [hidden]

For soft gates g the same formula weights each unit by (1 - g), so the gated output is
g * x + (1 - g) * mean: exact for g in {0, 1} and continuous in between.
A head whose output is constant over the data (an attention-sink head writing the same
vector everywhere) is removed at no cost at all; the criterion that ranks heads by how
much their output *varies* is FLAP's fluctuation metric, registered here as "fluctuation".

Removed sub-blocks. A compensated mask is normalized first (a layer with no head left loses
its ATTN sub-block, as everywhere in the engine), and a removed sub-block has no projection
to carry a bias. In a pre-LN model (a sub-block adds a delta to the residual stream) its
mean output (W mu + the projection's own bias) is folded into the output bias of the
nearest *preceding* kept sub-block instead: nothing in between reads the residual stream,
so the stream every later layer sees is exactly the same. A removed sub-block with no kept
one before it (e.g. layer 0's ATTN), or in a post-LN model (BERT), loses its mean.
Masked model, kernel path and surgery all agree on this, because the biases only ever sit
on kept sub-blocks.

The means come from `CaptureStats` (head_in_mean, ffn_mean: the projections' inputs, taken
before any gate). `sequential=True` re-captures them under the compensated mask, so each
layer's means reflect the pruned layers before it (the shift FLAP's one-pass means ignore).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from engine.core.adapter import Adapter
from engine.core.handle import ModelHandle
from engine.core.mask import PruneMask
from engine.core.progress import Progress
from engine.importance.capture import CaptureStats, capture
from engine.importance.criteria import Criterion, Scores, register

__all__ = [
    "attention_bias",
    "ffn_bias",
    "mean_biases",
    "compensate",
    "strip_compensation",
    "head_fluctuation",
    "ffn_fluctuation",
    "Fluctuation",
]


def attention_bias(adapter: Adapter, heads: torch.Tensor, head_in_mean: torch.Tensor) -> torch.Tensor:
    """[L, hidden]: sum over heads of (1 - gate) * W_O[h] @ mean(head h's output)."""
    g = adapter.geometry
    out = torch.zeros(g.n_layers, g.hidden)
    for layer in range(g.n_layers):
        drop = (1.0 - heads[layer].detach().float())  # (H,)
        if not drop.any():
            continue
        o = adapter.head_weights(layer).o.detach().float().cpu()  # (H, d, hd)
        mean = head_in_mean[layer].view(g.n_heads, g.head_dim)  # (H, hd)
        out[layer] = torch.einsum("h,hdk,hk->d", drop, o, mean)
    return out


def ffn_bias(adapter: Adapter, ffn: torch.Tensor, ffn_mean: torch.Tensor) -> torch.Tensor:
    """[L, hidden]: W_down @ ((1 - gate) * mean(channel activation))."""
    g = adapter.geometry
    out = torch.zeros(g.n_layers, g.hidden)
    for layer in range(g.n_layers):
        drop = 1.0 - ffn[layer].detach().float()  # (F,)
        if not drop.any():
            continue
        down = adapter.ffn_weights(layer)["down"].detach().float().cpu()  # (d, F)
        out[layer] = down @ (drop * ffn_mean[layer])
    return out


def strip_compensation(mask: PruneMask) -> PruneMask:
    """A copy of `mask` without compensation biases."""
    m = mask.clone()
    m.attn_bias = m.ffn_bias = None
    m.meta.pop("compensation", None)
    return m


def _proj_bias(proj: Any, hidden: int) -> torch.Tensor:
    b = getattr(proj, "bias", None)
    return torch.zeros(hidden) if b is None else b.detach().float().cpu().reshape(hidden)


def mean_biases(handle: ModelHandle, mask: PruneMask, head_means: torch.Tensor | None = None,
                ffn_means: torch.Tensor | None = None) -> PruneMask:
    """`mask.normalized()` with compensation biases (see the module doc).

    Pruned heads get their mean when `head_means` is given, pruned channels when `ffn_means`
    is; otherwise that kind's existing bias (or none) is kept. Removed sub-blocks of a kind
    that is compensated are folded into the preceding kept sub-block.
    """
    g, a = handle.geometry, handle.adapter
    m = mask.normalized()
    zeros = lambda: torch.zeros(g.n_layers, g.hidden)  # noqa: E731
    attn = attention_bias(a, m.heads_effective(), head_means) if head_means is not None else (
        m.attn_bias.clone() if m.attn_bias is not None else zeros())
    ffn = ffn_bias(a, m.ffn_effective(), ffn_means) if ffn_means is not None else (
        m.ffn_bias.clone() if m.ffn_bias is not None else zeros())
    biases = {"attn": attn, "ffn": ffn}
    means = {"attn": head_means, "ffn": ffn_means}
    projs = {"attn": a.head_output_proj, "ffn": a.ffn_output_proj}
    last: tuple[str, int] | None = None  # the nearest preceding kept sub-block
    for layer in range(g.n_layers):
        for kind, gate in (("attn", m.attn), ("ffn", m.ffn_block)):
            if gate[layer] > 0:
                last = (kind, layer)
                continue
            removed = biases[kind][layer].clone()
            biases[kind][layer] = 0.0
            if means[kind] is None:
                continue  # this kind is not compensated: the sub-block is simply gone
            removed += _proj_bias(projs[kind](layer), g.hidden)
            if last is not None and not a.subblock(layer, kind).residual_inclusive:
                biases[last[0]][last[1]] += removed
    m.attn_bias = attn if attn.any() else None
    m.ffn_bias = ffn if ffn.any() else None
    return m


def compensate(
    handle: ModelHandle,
    mask: PruneMask,
    stats: CaptureStats | None = None,
    *,
    texts: Sequence[str] | None = None,
    units: str = "both",
    sequential: bool = False,
    progress: Progress | None = None,
    **capture_kwargs: Any,
) -> PruneMask:
    """`mask` normalized, with FLAP biases for its pruned heads/channels (`units`: heads, ffn, both).

    The means come from `stats` (dense calibration statistics) or, when absent, a forward
    capture over `texts`; `sequential=True` re-captures them under the compensated mask once.
    """
    if units not in ("heads", "ffn", "both"):
        raise ValueError(f"units must be 'heads', 'ffn' or 'both', got {units!r}")
    g = handle.geometry
    mask.check(g)
    if stats is None:
        if texts is None:
            raise ValueError("compensate needs calibration statistics or texts to compute them from")
        stats = capture(handle, texts, gradients=False, progress=progress, **capture_kwargs)

    def with_means(m: PruneMask, s: CaptureStats) -> PruneMask:
        return mean_biases(handle, m, s.head_in_mean if units in ("heads", "both") else None,
                           s.ffn_mean if units in ("ffn", "both") else None)

    m = with_means(strip_compensation(mask), stats)
    if sequential:
        if texts is None:
            raise ValueError("sequential compensation re-captures statistics: pass the calibration texts")
        # Means under the pruned model: what each layer really receives once the earlier ones changed.
        shifted = capture(handle, texts, gradients=False, mask=m, progress=progress, **capture_kwargs)
        m = with_means(strip_compensation(m), shifted)
    m.meta["compensation"] = {"method": "FLAP mean bias (An et al. 2024)", "units": units,
                              "sequential": sequential, "calibration_tokens": stats.n_tokens}
    return m.check(g)


def head_fluctuation(adapter: Adapter, stats: CaptureStats) -> torch.Tensor:
    """[L, H]: sum over a head's O-input channels of Var(x_c) * ||W_O[:, c]||^2 (FLAP)."""
    g = adapter.geometry
    var = (stats.head_in_sq - stats.head_in_mean.square()).clamp(min=0)  # (L, H * hd)
    out = torch.zeros(g.n_layers, g.n_heads)
    for layer in range(g.n_layers):
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
        down = adapter.ffn_weights(layer)["down"].detach().float().cpu()  # (d, F)
        out[layer] = var[layer] * down.square().sum(dim=0)
    return out


@register
class Fluctuation(Criterion):
    name = "fluctuation"
    needs = "forward"
    description = ("FLAP (An et al. 2024): variance of each unit's output through its projection; "
                   "prune the steadiest (pair with compensation)")

    def __call__(self, handle: ModelHandle, stats):
        s = self._require(stats)
        a = handle.adapter
        return Scores(self.name, heads=head_fluctuation(a, s), ffn=ffn_fluctuation(a, s),
                      note="sum of Var(input channel) x ||output column||^2")
