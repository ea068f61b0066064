"""Per-prompt masks: one set of FFN channels (and heads) per prompt, predicted once and kept for the whole generation.

Between a static mask (one for every input) and per-token masks (one per token) lie masks chosen per
input: the router's k masks (one per cluster of prompts) and one mask per prompt. Here the
importance network (headlab.engine.dynamic.ipn) reads the prompt once: for every layer and channel, the
fraction of the prompt's tokens that would keep it; each layer keeps its most-kept channels, as many
as the network keeps per token on average in that layer (so the learned per-layer budget carries
over and the average sparsity matches the per-token network's). On request (`compensate=True`), what a
dropped channel would have added on this prompt is put back as a bias (its mean down input over the
prompt times its down column: FLAP's compensation, An et al. 2024, measured on the prompt itself). It is
off by default: on SmolLM2 it makes per-prompt masks far worse (perplexity 12,015 instead of 134 at 25%
sparsity, bench_dynamic), because a prompt's first token carries activations hundreds of times larger
than the rest in a few channels that the other tokens never keep, and their mean is then added to every
token. The result is an ordinary
`PruneMask`: it runs through the gates, the sparse kernels and surgery like any static mask, so
decoding under it reads only its channels with no per-token work at all.

- `predict_prompt_mask(handle, ipn, ids)`: the mask of one prompt, and the prompt's embedding (the
  mean of its tokens' input embeddings, unit length: no forward pass, so a cache lookup is cheap).
- `MaskCache` (headlab.engine.dynamic.mask_cache) keeps masks of frequently seen prompts.
- `RoutedMasks`: the k-mask router on the same footing: prompts clustered by that embedding
  (k-means), one mask per cluster from its prompts' pooled keep fractions and means, each input routed
  to the nearest centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import PruneMask
from headlab.engine.dynamic.ipn.network import IPN

__all__ = [
    "PromptMask",
    "RoutedMasks",
    "keep_fractions",
    "mask_from_fractions",
    "predict_prompt_mask",
    "prompt_embedding",
]


@dataclass(frozen=True)
class PromptMask:
    """A prompt's mask: channels [L, F] (and heads [L, H] or None) kept for its whole generation."""

    channels: torch.Tensor
    heads: torch.Tensor | None
    embedding: torch.Tensor  # [d], unit length
    ffn_bias: torch.Tensor | None = None  # [L, d]: the dropped channels' mean contribution, added back

    @property
    def ffn_sparsity(self) -> float:
        return 1.0 - float(self.channels.float().mean())

    def to_prune_mask(self, handle: ModelHandle) -> PruneMask:
        """The same mask as a PruneMask (what the gates, the sparse kernels and surgery run)."""
        m = PruneMask.dense(handle.geometry)
        m.ffn = self.channels.float().clone()
        if self.heads is not None:
            m.heads = self.heads.float().clone()
        if self.ffn_bias is not None:
            m.ffn_bias = self.ffn_bias.float().clone()
        m.meta = {"source": "per-prompt importance network"}
        return m


@torch.no_grad()
def prompt_embedding(handle: ModelHandle, ids: torch.Tensor) -> torch.Tensor:
    """[d]: the mean input embedding of the prompt ids [1, T] (or [T]), unit length."""
    ids = ids.reshape(-1).to(handle.device)
    if ids.numel() == 0:
        raise ValueError("an empty prompt has no embedding")
    e = handle.adapter.input_embeddings()(ids).float().mean(0)
    return F.normalize(e, dim=0).cpu()


@torch.no_grad()
def keep_fractions(handle: ModelHandle, ipn: IPN, ids: torch.Tensor, means: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per layer and unit, the fraction of the prompt's tokens whose per-token mask keeps it ([L, F], [L, H] or None).

    The prompt runs once through the dense model; the network reads each layer's inputs there. `means`
    ([L, F], optional) receives each channel's mean down-projection input over the prompt.
    """
    ipn.attach(handle)
    g = handle.geometry
    ids = ids.reshape(1, -1).to(handle.device)
    channels = torch.zeros(g.n_layers, g.ffn_dim)
    heads = torch.zeros(g.n_layers, g.n_heads) if ipn.heads else None
    with temporary_hooks() as hooks:
        for layer in range(g.n_layers):
            p = handle.adapter.projections(layer)

            def on_gate(module: nn.Module, args: tuple, layer: int = layer) -> None:
                channels[layer] = ipn.channel_keep(layer, args[0]).float().reshape(-1, g.ffn_dim).mean(0).cpu()

            hooks.pre(p["gate"], on_gate)
            if means is not None:
                def on_down(module: nn.Module, args: tuple, layer: int = layer) -> None:
                    means[layer] = args[0].float().reshape(-1, g.ffn_dim).mean(0).cpu()

                hooks.pre(p["down"], on_down)
            if heads is not None:
                def on_q(module: nn.Module, args: tuple, layer: int = layer) -> None:
                    heads[layer] = ipn.head_keep(layer, args[0]).float().reshape(-1, g.n_heads).mean(0).cpu()

                hooks.pre(p["q"], on_q)
        handle.model(input_ids=ids)
    return channels, heads


def mask_from_fractions(channels: torch.Tensor, heads: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bool masks keeping, per layer, the round(sum of fractions) most-kept units (at least one head per layer)."""
    def top(frac: torch.Tensor, at_least: int) -> torch.Tensor:
        keep = torch.zeros_like(frac, dtype=torch.bool)
        for layer, row in enumerate(frac):
            k = max(at_least, min(row.numel(), round(float(row.sum()))))
            keep[layer, row.topk(k).indices] = True  # ties go to the lower index (topk's order)
        return keep

    return top(channels, 0), None if heads is None else top(heads, 1)


@torch.no_grad()
def compensation(handle: ModelHandle, channels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[L, d]: per layer, down[:, dropped] @ means[dropped] (what the dropped channels add on average)."""
    out = torch.zeros(handle.geometry.n_layers, handle.geometry.hidden)
    for layer in range(handle.geometry.n_layers):
        w = handle.adapter.projections(layer)["down"].weight.detach().float().cpu()
        out[layer] = w @ (means[layer] * (~channels[layer]).float())
    return out


def predict_prompt_mask(handle: ModelHandle, ipn: IPN, ids: torch.Tensor, *, compensate: bool = False) -> PromptMask:
    """The mask `ipn` predicts for the prompt ids [1, T] for its whole generation; see the module docstring."""
    g = handle.geometry
    means = torch.zeros(g.n_layers, g.ffn_dim)
    channels, heads = mask_from_fractions(*keep_fractions(handle, ipn, ids, means))
    bias = compensation(handle, channels, means) if compensate else None
    return PromptMask(channels, heads, prompt_embedding(handle, ids), bias)


def _kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means of unit rows x [n, d]: (centroids [k, d], assignment [n]); k-means++ seeding."""
    gen = torch.Generator().manual_seed(seed)
    centroids = [x[int(torch.randint(len(x), (1,), generator=gen))]]
    for _ in range(1, k):
        d = 1 - (x @ torch.stack(centroids).T).amax(1)
        centroids.append(x[int(torch.multinomial(d.clamp(min=1e-12), 1, generator=gen))])
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        new = torch.stack([F.normalize(x[assign == j].mean(0), dim=0) if (assign == j).any() else c[j]
                           for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return c, (x @ c.T).argmax(1)


@dataclass(frozen=True)
class RoutedMasks:
    """k masks, one per cluster of calibration prompts, and their centroids; `route` picks one per input."""

    centroids: torch.Tensor  # [k, d]
    masks: list[PromptMask]

    @classmethod
    def fit(cls, handle: ModelHandle, ipn: IPN, prompts: list[torch.Tensor], k: int, seed: int = 0, *,
            compensate: bool = False) -> RoutedMasks:
        """Cluster `prompts` (ids each) by embedding into k groups; each group's mask pools its prompts' fractions."""
        if not 1 <= k <= len(prompts):
            raise ValueError(f"k must be between 1 and the number of prompts ({len(prompts)}), got {k}")
        g = handle.geometry
        emb = torch.stack([prompt_embedding(handle, p) for p in prompts])
        means = [torch.zeros(g.n_layers, g.ffn_dim) for _ in prompts]
        fracs = [keep_fractions(handle, ipn, p, m) for p, m in zip(prompts, means)]
        centroids, assign = _kmeans(emb, k, seed)
        masks = []
        for j in range(k):
            idx = [i for i, a in enumerate(assign.tolist()) if a == j] or list(range(len(prompts)))
            ch = torch.stack([fracs[i][0] for i in idx]).mean(0)
            hd = torch.stack([fracs[i][1] for i in idx]).mean(0) if fracs[0][1] is not None else None
            channels, heads = mask_from_fractions(ch, hd)
            bias = compensation(handle, channels, torch.stack([means[i] for i in idx]).mean(0)) if compensate else None
            masks.append(PromptMask(channels, heads, centroids[j], bias))
        return cls(centroids, masks)

    def route(self, handle: ModelHandle, ids: torch.Tensor) -> PromptMask:
        """The mask of the cluster whose centroid is nearest the prompt's embedding."""
        return self.masks[int((self.centroids @ prompt_embedding(handle, ids)).argmax())]
