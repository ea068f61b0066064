"""Mean-ablation: a removed head or FFN channel replaced by its calibration mean, folded into one bias per layer.

An, Zhao, Yu, Tang & Wang, "Fluctuation-based Adaptive Structured Pruning for Large
Language Models" (FLAP), AAAI 2024. Because the O-projection (down-projection) is linear, the
means of the removed units fold into one bias vector per layer:

    attn_bias[l] = W_O[:, pruned cols] @ mean(O-input[pruned cols])     # [hidden]
    ffn_bias[l]  = W_down[:, pruned ch] @ mean(down-input[pruned ch])   # [hidden]

For soft gates g the same formula weights each unit by (1 - g), so the gated output is
g * x + (1 - g) * mean: exact for g in {0, 1} and continuous in between. `attention_bias` /
`ffn_bias` give the bias of a mask (CPU, no gradient); `soft_attention_bias` / `soft_ffn_bias`
the same sums kept differentiable in the gates, for gate gradients and trained gates.

Removed sub-blocks. `mean_biases` normalizes the mask first (a layer with no head left loses
its ATTN sub-block, as everywhere in the engine), and a removed sub-block has no projection
to carry a bias. In a pre-LN model (a sub-block adds a delta to the residual stream) its
mean output (W mu + the projection's own bias) is folded into the output bias of the
nearest *preceding* kept sub-block instead: nothing in between reads the residual stream,
so the stream every later layer sees is exactly the same. A removed sub-block with no kept
one before it (e.g. layer 0's ATTN), or in a post-LN model (BERT), loses its mean.
Masked model, kernel path and surgery all agree on this, because the biases only ever sit
on kept sub-blocks.

The means are `CaptureStats.head_in_mean` / `ffn_mean` (the projections' inputs, taken
before any gate). The ablation criterion measures with these masks; pruning's compensation
(headlab.engine.pruning.compensation) applies them.
"""

from __future__ import annotations

from typing import Any

import torch

from headlab.engine.core.adapter import Adapter
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.models.placement import resident

__all__ = ["attention_bias", "ffn_bias", "soft_attention_bias", "soft_ffn_bias", "mean_biases"]


def attention_bias(adapter: Adapter, heads: torch.Tensor, head_in_mean: torch.Tensor) -> torch.Tensor:
    """[L, hidden]: sum over heads of (1 - gate) * W_O[h] @ mean(head h's output)."""
    g = adapter.geometry
    out = torch.zeros(g.n_layers, g.hidden)
    for layer in range(g.n_layers):
        drop = (1.0 - heads[layer].detach().float())  # (H,)
        if not drop.any():
            continue
        with resident(adapter.layers()[layer]):  # a layer offloaded by a device map is loaded for the read
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
        with resident(adapter.layers()[layer]):
            down = adapter.ffn_weights(layer)["down"].detach().float().cpu()  # (d, F)
        out[layer] = down @ (drop * ffn_mean[layer])
    return out


def soft_attention_bias(adapter: Adapter, heads: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[L, hidden], differentiable in `heads`: sum_h (1 - g_h) W_O[h] mu_h."""
    g = adapter.geometry
    rows = []
    for layer in range(g.n_layers):
        with resident(adapter.layers()[layer]):
            o = adapter.head_weights(layer).o.detach().float()  # (H, d, hd)
            mu = means[layer].view(g.n_heads, g.head_dim).to(o.device)  # (H, hd)
            per_head = torch.einsum("hdk,hk->hd", o, mu).to(heads.device)  # (H, d), beside the gates
        rows.append(((1.0 - heads[layer])[:, None] * per_head).sum(dim=0))
    return torch.stack(rows)


def soft_ffn_bias(adapter: Adapter, ffn: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[L, hidden], differentiable in `ffn`: W_down ((1 - g) * mu)."""
    g = adapter.geometry
    rows = []
    for layer in range(g.n_layers):
        with resident(adapter.layers()[layer]):
            down = adapter.ffn_weights(layer)["down"].detach().float()  # (d, F)
        keep = (1.0 - ffn[layer]).to(down.device) * means[layer].to(down.device)
        rows.append((down @ keep).to(ffn.device))  # beside the gates: layers may sit on several devices
    return torch.stack(rows)


def _proj_bias(proj: Any, hidden: int) -> torch.Tensor:
    with resident(proj):
        b = getattr(proj, "bias", None)
        return torch.zeros(hidden) if b is None else b.detach().float().cpu().reshape(hidden)


def mean_biases(handle: ModelHandle, mask: PruneMask, head_means: torch.Tensor | None = None,
                ffn_means: torch.Tensor | None = None) -> PruneMask:
    """`mask.normalized()` with mean-ablation biases (see the module doc).

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
            here = a.subblock(layer, kind)
            # Folding is exact only when both sub-blocks add their projection's output to the stream as it is.
            if (last is not None and not here.residual_inclusive and not here.output_normed
                    and not a.subblock(last[1], last[0]).output_normed):
                biases[last[0]][last[1]] += removed
    m.attn_bias = attn if attn.any() else None
    m.ffn_bias = ffn if ffn.any() else None
    return m
