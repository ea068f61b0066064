"""Reconstruction layer by layer: each pruned layer re-fits what it keeps to reproduce its dense output.

    mask = refit(handle, mask, texts)                        # keep the mask's units, re-solve their weights
    mask = obs_prune(handle, heads, channels, texts)          # OBS chooses the units per layer, then re-solves

Walking the layers in order over calibration batches (engine.runtime.replay: one dense record and
one record under the mask being built, advanced one layer at a time), for each layer l:

1. the dense layer runs on its dense input; the inputs of its O and down projections give the
   targets Y = X_dense W^T (what the dense projections output, without their own bias);
2. the pruned layer runs on the input the already-reconstructed layers 0..l-1 produce; the O
   projection's input X over every head's columns is accumulated against Y (engine.pruning.reconstruct.
   least_squares.Moments). Structured OBS may choose the heads that go (`obs_prune`); the kept
   columns are re-solved by ridge least squares with an intercept, which becomes the mask's
   attention compensation bias (FLAP's bias is the special case of keeping nothing);
3. the same for the FFN down projection, on inputs that already see the refitted attention.

This is the closed-form, training-free reconstruction of SlimGPT (Ling et al., NeurIPS 2024) and
ZipLM (Kurtic et al., NeurIPS 2023) restricted to the output projections, so the result is still an
ordinary checkpoint after surgery (engine.core.refit: compact refits carried by the mask). The
targets are the dense model's outputs, so a layer also absorbs part of the error that earlier
layers left in its input. Cost: about four forwards of one layer per layer over the calibration
tokens, plus the solves (an [F, F] system per FFN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.core.handle import ModelHandle
from engine.core.hooks import temporary_hooks
from engine.core.mask import MaskError, PruneMask
from engine.core.progress import Progress
from engine.core.refit import LayerRefit, unit_features
from engine.core.tokens import batches, context_length, encode_batch
from engine.pruning.reconstruct.least_squares import DEFAULT_DAMP, Moments, obs_select, ridge_fit
from engine.runtime.replay import LayerInputs, record_layers

__all__ = ["RefitConfig", "obs_prune", "output_weight", "refit", "relative_error"]

@dataclass(frozen=True)
class RefitConfig:
    """How reconstruction fits: ridge damping, intercept, which sub-blocks, calibration batching."""

    damp: float = DEFAULT_DAMP
    intercept: bool = True
    units: str = "both"  # "heads", "ffn" or "both": which output projections are refitted
    refit_unpruned: bool = False  # also re-solve layers that lost nothing (they still see shifted inputs)
    max_length: int = 256
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.units not in ("heads", "ffn", "both"):
            raise ValueError(f"units must be 'heads', 'ffn' or 'both', got {self.units!r}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")

    def refits(self, kind: str) -> bool:
        return self.units == "both" or self.units == ("heads" if kind == "attn" else "ffn")


def output_weight(handle: ModelHandle, layer: int, kind: str) -> torch.Tensor:
    """The O ("attn") or down ("ffn") projection's weight of `layer` as [hidden, inputs] (a view of the model)."""
    if kind == "attn":
        o = handle.adapter.head_weights(layer).o  # (H, d, hd)
        return o.permute(1, 0, 2).reshape(o.shape[1], -1)  # (d, H * hd)
    return handle.adapter.ffn_weights(layer)["down"]  # (d, F)


def relative_error(m: Moments, keep: torch.Tensor, w: torch.Tensor, intercept: bool) -> float:
    """||X_keep W^T + c - Y||^2 / ||Y - mean(Y)||^2 at the fitted intercept (0: the dense output exactly)."""
    h, cxy, _, my = m.centered(intercept)
    yc = float(m.yy) - m.count * float(my @ my) if intercept else float(m.yy)
    if keep.numel() == 0:
        return 1.0
    hk, ck = h[keep][:, keep], cxy[keep]
    err = yc - 2.0 * float((w.T * ck).sum()) + float(((w @ hk) * w).sum())
    return max(err, 0.0) / max(yc, 1e-30)


def _capture(module: torch.nn.Module, into: list[torch.Tensor]):
    def hook(mod, args):
        into.append(args[0].detach())

    return module, hook


def _run_layer(record: LayerInputs, layer: int, mask: PruneMask | None,
               watch: Sequence[torch.nn.Module]) -> tuple[LayerInputs, list[list[torch.Tensor]]]:
    """Run `layer` alone under `mask`; (the record at layer + 1, the inputs each watched module saw per batch)."""
    seen: list[list[torch.Tensor]] = [[] for _ in watch]
    with temporary_hooks() as hooks:
        for module, into in zip(watch, seen):
            hooks.pre(*_capture(module, into))
        out = record.run_from(layer, mask, stop=layer + 1)
    return out.starting_at(layer + 1), seen


def _with_refit(mask: PruneMask, g, layer: int, kind: str, keep_units: tuple[int, ...], w: torch.Tensor,
                c: torch.Tensor) -> PruneMask:
    """`mask` with `layer`'s `kind` gates set to keep exactly `keep_units`, its refit and its intercept bias."""
    m = mask.clone()
    gates_ = m.heads if kind == "attn" else m.ffn
    row = torch.zeros(gates_.shape[1])
    row[list(keep_units)] = 1.0
    gates_[layer] = row
    name = "attn_bias" if kind == "attn" else "ffn_bias"
    bias = getattr(m, name)
    bias = torch.zeros(g.n_layers, g.hidden) if bias is None else bias.clone()
    bias[layer] = c.float()
    setattr(m, name, bias)
    m.refits(kind)[layer] = LayerRefit(keep_units, w.float())
    return m


def _obs_keep(g, kind: str, m: Moments, kept: tuple[int, ...], count: int, config: RefitConfig,
              even_groups: bool, layer: int) -> tuple[int, ...]:
    """The units of `kept` that stay after structured OBS removes `count` of them."""
    n_units, width = (g.n_heads, g.head_dim) if kind == "attn" else (g.ffn_dim, 1)
    if count >= len(kept):
        raise ValueError(f"layer {layer} keeps {len(kept)} {'heads' if kind == 'attn' else 'channels'}; "
                         f"cannot remove {count} of them (at least one must stay)")
    allowed = torch.zeros(n_units, dtype=torch.bool)
    allowed[list(kept)] = True
    limit = {}
    if kind == "attn" and even_groups:
        limit = {"group_of": torch.arange(g.n_heads) // g.group_size, "max_per_bucket": count // g.n_kv_heads}
    res = obs_select(m, n_units, width, count, damp=config.damp, intercept=config.intercept, allowed=allowed,
                     **limit)
    gone = set(res.removed)
    return tuple(u for u in kept if u not in gone)


@torch.no_grad()
def _walk(handle: ModelHandle, mask: PruneMask, texts: Sequence[str], config: RefitConfig,
          counts: dict[str, list[int]] | None, even_groups: bool, progress: Progress | None) -> PruneMask:
    g, adapter = handle.geometry, handle.adapter
    mask.check(g)
    if not mask.is_hard:
        raise MaskError("reconstruction needs a hard mask (every gate 0 or 1)")
    max_length = min(config.max_length, context_length(handle.model))
    encoded = [encode_batch(handle.tokenizer, list(chunk), max_length, handle.device)
               for chunk in batches(list(texts), config.batch_size)]
    valid = [am.bool() for _, am in encoded]  # (B, T): padding never enters a fit
    inputs = [{"input_ids": ids, "attention_mask": am} for ids, am in encoded]
    # Refits and intercepts are re-solved; FLAP biases of the input mask are replaced, never stacked.
    mask = mask.without_refit()
    mask.attn_bias = mask.ffn_bias = None
    dense = record_layers(handle, None, inputs).starting_at(0)
    pruned = dense
    errors: dict[str, list[float | None]] = {"attn": [None] * g.n_layers, "ffn": [None] * g.n_layers}
    for layer in range(g.n_layers):
        projs = {"attn": adapter.head_output_proj(layer), "ffn": adapter.ffn_output_proj(layer)}
        dense_next, (x_o, x_d) = _run_layer(dense, layer, None, [projs["attn"], projs["ffn"]])
        targets = {kind: [x @ output_weight(handle, layer, kind).T.to(x.dtype) for x in xs]
                   for kind, xs in (("attn", x_o), ("ffn", x_d))}
        del x_o, x_d
        current: LayerInputs | None = None  # the pruned record at layer + 1 under the current mask, if run
        for kind in ("attn", "ffn"):
            alive = mask.attn[layer] > 0 if kind == "attn" else mask.ffn_block[layer] > 0
            kept = mask.kept_units(layer, kind)
            n_units = g.n_heads if kind == "attn" else g.ffn_dim
            count = counts[kind][layer] if counts is not None else 0
            changed = len(kept) < n_units or count > 0 or config.refit_unpruned
            if not alive or not kept or not changed or not (config.refits(kind) or count):
                continue
            current, (x_p,) = _run_layer(pruned, layer, mask, [projs[kind]])
            m = Moments(x_p[0].shape[-1], g.hidden)
            for x, y, v in zip(x_p, targets[kind], valid):
                m.add(x[v], y[v])
            del x_p
            keep_units = _obs_keep(g, kind, m, kept, count, config, even_groups, layer) if count else kept
            width = g.head_dim if kind == "attn" else 1
            feats = unit_features(keep_units, width)
            w, c = ridge_fit(m, feats, damp=config.damp, intercept=config.intercept)
            errors[kind][layer] = relative_error(m, feats, w, config.intercept)
            mask = _with_refit(mask, g, layer, kind, keep_units, w, c)
            current = None  # the record ran before this refit
        if current is None:
            current, _ = _run_layer(pruned, layer, mask, [])
        pruned, dense = current, dense_next
        if progress:
            progress(layer + 1, g.n_layers)
    n_tokens = sum(int(v.sum()) for v in valid)
    mask.meta["reconstruction"] = {
        "method": "layer-wise ridge least squares on the dense outputs (SlimGPT / ZipLM style)",
        "damp": config.damp, "intercept": config.intercept, "units": config.units,
        "calibration_texts": len(texts), "calibration_tokens": n_tokens,
        "relative_error": {k: [None if e is None else round(e, 5) for e in v] for k, v in errors.items()},
    }
    return mask.check(g)


def refit(handle: ModelHandle, mask: PruneMask, texts: Sequence[str], *, config: RefitConfig | None = None,
          progress: Progress | None = None) -> PruneMask:
    """`mask` with every layer that lost heads or channels re-solved on `texts` (the units stay as they are)."""
    return _walk(handle, mask, texts, config or RefitConfig(), None, False, progress)


def obs_prune(handle: ModelHandle, heads: Sequence[int], channels: Sequence[int], texts: Sequence[str], *,
              base: PruneMask | None = None, even_groups: bool = False, config: RefitConfig | None = None,
              progress: Progress | None = None) -> PruneMask:
    """Remove `heads[l]` query heads and `channels[l]` FFN channels from each layer l, chosen by structured OBS
    on the inputs the already-pruned layers produce, then re-solve what remains (see module doc).

    `base`: units already removed (OBS removes more among the rest). `even_groups`: every KV group of a layer
    loses the same number of query heads, so an export keeps the family's standard GQA layout.
    """
    g = handle.geometry
    base = base if base is not None else PruneMask.dense(g)
    heads, channels = list(heads), list(channels)
    if len(heads) != g.n_layers or len(channels) != g.n_layers:
        raise ValueError(f"need one head count and one channel count per layer ({g.n_layers}), "
                         f"got {len(heads)} and {len(channels)}")
    if even_groups and any(h % g.n_kv_heads for h in heads):
        raise ValueError(f"even GQA groups need head counts that are multiples of {g.n_kv_heads} KV heads")
    counts = {"attn": heads, "ffn": channels}
    mask = _walk(handle, base, texts, config or RefitConfig(), counts, even_groups, progress)
    mask.meta["reconstruction"]["selection"] = "structured OBS, greedy per layer (SlimGPT / ZipLM)"
    mask.meta["reconstruction"]["removed_per_layer"] = {k: list(v) for k, v in counts.items()}
    return mask
