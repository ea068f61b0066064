"""Apply a PruneMask to a shared model for the duration of one call, through hooks.

    with gates.apply(handle, mask):
        logits = handle.model(ids).logits

Where the gates act (the same places for every family, found by the adapter):
- head h of layer l: the O-projection's input slice [h*hd:(h+1)*hd] is multiplied by its gate,
  which is exactly "that head's output removed" for a gate of 0;
- FFN channel c: the down-projection's input column c is multiplied by its gate;
- a sub-block: a delta sub-block (pre-LN) has its output multiplied by the gate; a
  residual-inclusive one (post-LN BERT) becomes residual + gate * (output - residual).

Compensation biases (PruneMask.attn_bias / ffn_bias, FLAP) are added to the O-projection's /
down-projection's output, inside the sub-block, so a removed sub-block removes its bias too.
Refitted projections (PruneMask.attn_refit / ffn_refit, headlab.engine.core.refit) replace that output by
x[..., kept columns] @ W_refit.T + the projection's own bias, before the compensation bias is added.
Input maps (PruneMask.attn_in / ffn_in) replace the output x of the norm in front of a sub-block by x @ M.T.

Gates may be soft and require grad (training masks), and may be per sample: pass a list of
masks, one per row of the batch. Hooks fire only in the thread that opened the context, so
concurrent callers (browser sessions) sharing one model never see each other's masks, and
they are removed in `finally`, also when the body raises. Weights are never touched. Each hook
moves its gate to the tensor it acts on, so a model split across devices (a device map) runs too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from headlab.engine.core.adapter import Adapter
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.refit import LayerRefit

__all__ = ["apply", "StackedGates", "stack_masks", "adapter_of"]


@dataclass
class StackedGates:
    """Gates of one or more masks; a leading batch dim B when built from several masks."""

    heads: torch.Tensor  # [L, H] or [B, L, H]
    ffn: torch.Tensor  # [L, F] or [B, L, F]
    attn: torch.Tensor  # [L] or [B, L]
    ffn_block: torch.Tensor  # [L] or [B, L]
    per_sample: bool
    attn_bias: torch.Tensor | None = None  # [L, d] or [B, L, d]
    ffn_bias: torch.Tensor | None = None  # [L, d] or [B, L, d]


def adapter_of(target: Any) -> Adapter:
    """The adapter of a ModelHandle, or `target` itself when it is one."""
    if isinstance(target, Adapter):
        return target
    adapter = getattr(target, "adapter", None)
    if isinstance(adapter, Adapter):
        return adapter
    raise TypeError(f"expected a ModelHandle or an Adapter, got {type(target).__name__}")


def stack_masks(masks: PruneMask | Sequence[PruneMask], adapter: Adapter) -> StackedGates:
    """Check masks against the model and stack them (a list gives one mask per batch row)."""
    g = adapter.geometry
    if isinstance(masks, PruneMask):
        m = masks.check(g)
        return StackedGates(m.heads, m.ffn, m.attn, m.ffn_block, per_sample=False,
                            attn_bias=m.attn_bias, ffn_bias=m.ffn_bias)
    masks = list(masks)
    if not masks:
        raise ValueError("an empty list of masks: pass one mask per batch row")
    for m in masks:
        m.check(g)
    return StackedGates(
        heads=torch.stack([m.heads for m in masks]),
        ffn=torch.stack([m.ffn for m in masks]),
        attn=torch.stack([m.attn for m in masks]),
        ffn_block=torch.stack([m.ffn_block for m in masks]),
        per_sample=True,
        attn_bias=_stack_bias([m.attn_bias for m in masks], g),
        ffn_bias=_stack_bias([m.ffn_bias for m in masks], g),
    )


def _stack_bias(biases: list[torch.Tensor | None], g) -> torch.Tensor | None:
    """[B, L, d] with zeros for masks without a bias; None when no mask has one."""
    if all(b is None for b in biases):
        return None
    return torch.stack([torch.zeros(g.n_layers, g.hidden) if b is None else b for b in biases])


def _is_ones(t: torch.Tensor) -> bool:
    return not t.requires_grad and bool((t == 1).all())


def _layer_slice(t: torch.Tensor, layer: int, per_sample: bool) -> torch.Tensor:
    return t[:, layer] if per_sample else t[layer]


def _check_batch(x: torch.Tensor, gate: torch.Tensor, per_sample: bool) -> None:
    if per_sample and x.shape[0] != gate.shape[0]:
        raise ValueError(f"{gate.shape[0]} per-sample masks for a batch of {x.shape[0]} rows")


def _head_pre_hook(gate: torch.Tensor, n_heads: int, per_sample: bool):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (B, T, H * hd)
        _check_batch(x, gate, per_sample)
        B, T, D = x.shape
        g = gate.to(device=x.device, dtype=x.dtype).view(B if per_sample else 1, 1, n_heads, 1)
        x = (x.view(B, T, n_heads, D // n_heads) * g).view(B, T, D)
        return (x, *args[1:])

    return hook


def _channel_pre_hook(gate: torch.Tensor, per_sample: bool):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (B, T, F)
        _check_batch(x, gate, per_sample)
        g = gate.to(device=x.device, dtype=x.dtype).view(x.shape[0] if per_sample else 1, 1, -1)
        return (x * g, *args[1:])

    return hook


def _bias_post_hook(bias: torch.Tensor, per_sample: bool):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        _check_batch(output, bias, per_sample)  # output: (B, T, d)
        b = bias.to(device=output.device, dtype=output.dtype).view(output.shape[0] if per_sample else 1, 1, -1)
        return output + b

    return hook


def _refit_post_hook(refits: Sequence[LayerRefit | None], per_sample: bool):
    """Replace the projection's output by its refit (per batch row when `per_sample`; None keeps a row's own)."""
    feats = [None if r is None else r.features() for r in refits]
    cache: dict[tuple, torch.Tensor] = {}

    def weight(i: int, like: torch.Tensor) -> torch.Tensor:
        key = (i, like.device, like.dtype)
        if key not in cache:
            cache[key] = refits[i].weight.to(device=like.device, dtype=like.dtype)
        return cache[key]

    def refit(i: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        cols = x.index_select(-1, feats[i].to(x.device))  # (..., kept inputs)
        bias = module.bias.to(x.dtype) if getattr(module, "bias", None) is not None else None
        return F.linear(cols, weight(i, x), bias)  # (..., d)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (B, T, in), gates already applied
        if not per_sample:
            return refit(0, module, x)
        if x.shape[0] != len(refits):
            raise ValueError(f"{len(refits)} per-sample masks for a batch of {x.shape[0]} rows")
        rows = [refit(i, module, x[i]) if refits[i] is not None else output[i] for i in range(len(refits))]
        return torch.stack(rows)

    return hook


def _input_map_post_hook(maps: Sequence[torch.Tensor | None], per_sample: bool):
    """The norm's output x replaced by x @ M^T (per batch row when `per_sample`; None keeps a row's own)."""
    cache: dict = {}

    def mapped(i: int, out: torch.Tensor) -> torch.Tensor:
        key = (i, out.device, out.dtype)
        if key not in cache:
            cache[key] = maps[i].to(device=out.device, dtype=out.dtype)
        return out @ cache[key].T

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not per_sample:
            return mapped(0, output)
        if output.shape[0] != len(maps):
            raise ValueError(f"{len(maps)} per-sample masks for a batch of {output.shape[0]} rows")
        return torch.stack([mapped(i, output[i]) if maps[i] is not None else output[i] for i in range(len(maps))])

    return hook


def _is_zero(t: torch.Tensor) -> bool:
    return not t.requires_grad and not bool(t.any())


def _subblock_hook(gate: torch.Tensor, per_sample: bool, residual_inclusive: bool, residual_input):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        _check_batch(out, gate, per_sample)
        g = gate.to(device=out.device, dtype=out.dtype).view(out.shape[0] if per_sample else 1, 1, 1)
        if residual_inclusive:
            r = residual_input(args, kwargs)
            new = r + g * (out - r)
        else:
            new = g * out
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


@contextlib.contextmanager
def apply(target: Any, mask: PruneMask | Sequence[PruneMask] | None) -> Iterator[StackedGates | None]:
    """Run `target`'s model with `mask` for the body of the `with` only; None means dense."""
    if mask is None:
        yield None
        return
    adapter = adapter_of(target)
    g = adapter.geometry
    gates = stack_masks(mask, adapter)
    per = gates.per_sample
    masks = [mask] if isinstance(mask, PruneMask) else list(mask)
    with temporary_hooks() as hooks:
        for layer in range(g.n_layers):
            heads = _layer_slice(gates.heads, layer, per)
            if not _is_ones(heads):
                hooks.pre(adapter.head_output_proj(layer), _head_pre_hook(heads, g.n_heads, per))
            ffn = _layer_slice(gates.ffn, layer, per)
            if not _is_ones(ffn):
                hooks.pre(adapter.ffn_output_proj(layer), _channel_pre_hook(ffn, per))
            for kind, proj in (("attn", adapter.head_output_proj), ("ffn", adapter.ffn_output_proj)):
                refits = [m.refits(kind).get(layer) for m in masks]
                if any(r is not None for r in refits):  # before the bias hooks: they add onto the refit output
                    hooks.post(proj(layer), _refit_post_hook(refits, per))
            for kind in ("attn", "ffn"):
                maps = [m.input_maps(kind).get(layer) for m in masks]
                if any(x is not None for x in maps):
                    hooks.post(adapter.sublayer_norm(layer, kind), _input_map_post_hook(maps, per))
            for bias, proj in ((gates.attn_bias, adapter.head_output_proj), (gates.ffn_bias, adapter.ffn_output_proj)):
                if bias is None:
                    continue
                b = _layer_slice(bias, layer, per)
                if not _is_zero(b):
                    hooks.post(proj(layer), _bias_post_hook(b, per))
            for kind, t in (("attn", gates.attn), ("ffn", gates.ffn_block)):
                block_gate = _layer_slice(t, layer, per)
                if _is_ones(block_gate):
                    continue
                sb = adapter.subblock(layer, kind)
                hook = _subblock_hook(block_gate, per, sb.residual_inclusive, sb.residual_input)
                hooks.post(sb.module, hook, with_kwargs=True)
        yield gates
