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

The means come from `CaptureStats` (head_in_mean, ffn_mean: the projections' inputs, taken
before any gate). `sequential=True` re-captures them under the compensated mask, so each
layer's means reflect the pruned layers before it (the shift FLAP's one-pass means ignore).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from engine.capture import CaptureStats, capture
from engine.importance import Criterion, Scores, register
from engine.masks import PruneMask

__all__ = [
    "attention_bias",
    "ffn_bias",
    "compensate",
    "strip_compensation",
    "head_fluctuation",
    "ffn_fluctuation",
    "Fluctuation",
]


def attention_bias(adapter: Any, heads: torch.Tensor, head_in_mean: torch.Tensor) -> torch.Tensor:
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


def ffn_bias(adapter: Any, ffn: torch.Tensor, ffn_mean: torch.Tensor) -> torch.Tensor:
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


def _with_biases(handle: Any, mask: PruneMask, stats: CaptureStats, units: str) -> PruneMask:
    m = mask.clone()
    a = handle.adapter
    if units in ("heads", "both"):
        m.attn_bias = attention_bias(a, m.heads, stats.head_in_mean)
    if units in ("ffn", "both"):
        m.ffn_bias = ffn_bias(a, m.ffn, stats.ffn_mean)
    return m


def compensate(
    handle: Any,
    mask: PruneMask,
    stats: CaptureStats | None = None,
    *,
    texts: Sequence[str] | None = None,
    units: str = "both",
    sequential: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **capture_kwargs: Any,
) -> PruneMask:
    """A copy of `mask` with FLAP biases for its pruned heads/channels (`units`: heads, ffn, both).

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
    m = _with_biases(handle, strip_compensation(mask), stats, units)
    if sequential:
        if texts is None:
            raise ValueError("sequential compensation re-captures statistics: pass the calibration texts")
        # Means under the pruned model: what each layer really receives once the earlier ones changed.
        shifted = capture(handle, texts, gradients=False, mask=m, progress=progress, **capture_kwargs)
        m = _with_biases(handle, m, shifted, units)
    m.meta["compensation"] = {"method": "FLAP mean bias (An et al. 2024)", "units": units,
                              "sequential": sequential, "calibration_tokens": stats.n_tokens}
    return m.check(g)


def head_fluctuation(adapter: Any, stats: CaptureStats) -> torch.Tensor:
    """[L, H]: sum over a head's O-input channels of Var(x_c) * ||W_O[:, c]||^2 (FLAP)."""
    g = adapter.geometry
    var = (stats.head_in_sq - stats.head_in_mean.square()).clamp(min=0)  # (L, H * hd)
    out = torch.zeros(g.n_layers, g.n_heads)
    for layer in range(g.n_layers):
        o = adapter.head_weights(layer).o.detach().float().cpu()  # (H, d, hd)
        col_sq = o.square().sum(dim=1)  # (H, hd): squared norm of each input column
        out[layer] = (var[layer].view(g.n_heads, g.head_dim) * col_sq).sum(dim=1)
    return out


def ffn_fluctuation(adapter: Any, stats: CaptureStats) -> torch.Tensor:
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

    def __call__(self, handle, stats):
        s = self._require(stats)
        a = handle.adapter
        return Scores(self.name, heads=head_fluctuation(a, s), ffn=ffn_fluctuation(a, s),
                      note="sum of Var(input channel) x ||output column||^2")
