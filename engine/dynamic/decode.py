"""Batch-1 greedy decoding with the KV cache where each token's CATS mask means pruned FFN weights are not read.

    out = sparse_generate(handle, ids, calibrate(handle, "cats", 0.5), max_new_tokens=128)
    ref = dense_generate(handle, ids, max_new_tokens=128)  # the same loop, every FFN dense

The prompt is prefilled by the HF model itself (under `apply_rule` for the sparse path, so its
KV cache is the sparse model's); every later token runs through `adapter.decode_token`: dense
attention over the cache (keys and values of every token are computed, so the cache stays exact)
and, per layer, a gated FFN that reads only the channels CATS keeps for that token:

- gate in full: CATS decides channel j by |act(gate(x))_j| >= threshold, which needs every channel;
- up: only the kept rows of the [F, d] weight (rows are channels already), gathered a few hundred
  at a time into a cache-sized scratch block and multiplied there: one index_select of all kept
  rows writes a copy as large as what it read to memory and costs as much as the dense matvec;
- down: only the kept columns, as rows of a channel-major copy [F, d] of its [d, F] weight,
  summed with F.embedding_bag(per_sample_weights=h): one pass over the kept rows, no copy.

The channel-major copies are made once per model (on first use) and kept beside it; the shared
model is never changed and no hook outlives a call. Only the gated-FFN rules' CATS runs here:
the oracle needs up(x) for every channel, TEAL/WINA sparsify inputs, not channels.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.errors import UnsupportedModelError
from engine.core.handle import ModelHandle
from engine.dynamic.apply import apply_rule
from engine.dynamic.rules import CATS, Thresholds, ThresholdsError, get_rule, magnitude_score

__all__ = ["Generation", "sparse_generate", "dense_generate", "decode_weight_bytes"]


@dataclass(frozen=True)
class Generation:
    """A greedy continuation and what it cost.

    ids: [1, T + n] prompt and new tokens; logits: [n, V], the logits each new token was picked
    from (the first from the prefill); kept: [n - 1, n_layers] FFN channels read per decoded
    token and layer (None for dense decoding); prefill_s / decode_s: wall time of the prefill
    and of the n - 1 cached decode steps.
    """

    ids: torch.Tensor
    logits: torch.Tensor
    kept: torch.Tensor | None
    prefill_s: float
    decode_s: float

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.ids[0, self.ids.shape[1] - self.logits.shape[0]:]

    @property
    def decode_tokens_per_s(self) -> float:
        """Decoded tokens per second over the cached steps (the prefill excluded)."""
        return (self.logits.shape[0] - 1) / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass(frozen=True)
class _ChannelMajorFFN:
    """One layer's gated FFN, laid out so a token's kept channels are contiguous rows of every matrix read."""

    gate: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    up_weight: torch.Tensor  # [F, d]: the model's own (an nn.Linear weight is [out, in])
    up_bias: torch.Tensor | None  # [F]
    down_t: torch.Tensor  # [F, d]: a contiguous copy of down.weight.T
    down_bias: torch.Tensor | None  # [d]
    source: torch.Tensor  # the down weight it was copied from (a replaced weight invalidates the copy)


_PREPARED: "weakref.WeakKeyDictionary[nn.Module, list[_ChannelMajorFFN]]" = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def _channel_major(handle: ModelHandle) -> list[_ChannelMajorFFN]:
    """The per-layer channel-major FFN weights of `handle`'s model: made once per model, then reused."""
    adapter, model = handle.adapter, handle.model
    with _PREPARED_LOCK:
        prepared = _PREPARED.get(model)
        if prepared is not None and all(p.source is adapter.projections(i)["down"].weight
                                        for i, p in enumerate(prepared)):
            return prepared
        prepared = []
        with torch.no_grad():
            for layer in range(handle.geometry.n_layers):
                proj = adapter.projections(layer)
                down = proj["down"]
                prepared.append(_ChannelMajorFFN(
                    gate=proj["gate"], act=adapter.ffn_activation(layer),
                    up_weight=proj["up"].weight.detach(), up_bias=_detached(proj["up"].bias),
                    down_t=down.weight.detach().t().contiguous(), down_bias=_detached(down.bias),
                    source=down.weight))
        _PREPARED[model] = prepared
        return prepared


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


#: Bytes of up rows gathered at once: small enough for the scratch block to stay in a core's L2 cache.
_GATHER_BYTES = 512 * 1024


def _gathered_rows_mv(weight: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, scratch: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """weight[idx] @ x for weight [F, d], idx [k], x [d], into out[:k], gathering len(scratch) rows at a time."""
    k, step = idx.numel(), scratch.shape[0]
    for s in range(0, k, step):
        j = idx[s : s + step]
        block = scratch[: j.numel()]
        torch.index_select(weight, 0, j, out=block)  # (rows, d), cache-resident
        torch.mv(block, x, out=out[s : s + j.numel()])
    return out[:k]


def _cats_ffn(prepared: list[_ChannelMajorFFN], thresholds: list[float], kept: list[list[int]]):
    """The FFN override for one decode: CATS channels per token, reading only their up rows and down columns."""
    up = prepared[0].up_weight
    ffn_dim, d = up.shape
    scratch = up.new_empty(max(1, _GATHER_BYTES // (d * up.element_size())), d)  # this call's own buffers
    u_out = up.new_empty(ffn_dim)

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        w = prepared[layer]
        x = h.reshape(1, -1)  # (1, d)
        a = w.act(w.gate(x))  # (1, F): every channel, CATS scores them all
        idx = (magnitude_score(a)[0] >= thresholds[layer]).nonzero()[:, 0]  # (k,) kept channels
        kept[-1].append(idx.numel())
        if idx.numel() == 0:
            out = x.new_zeros(1, w.down_t.shape[1])
        else:
            u = _gathered_rows_mv(w.up_weight, idx, x[0], scratch, u_out)  # (k,)
            if w.up_bias is not None:
                u = u + w.up_bias.index_select(0, idx)
            hk = a.index_select(1, idx) * u  # (1, k): the kept down inputs
            out = F.embedding_bag(idx[None], w.down_t, per_sample_weights=hk, mode="sum")  # (1, d)
        if w.down_bias is not None:
            out = out + w.down_bias
        return out.view_as(h)

    return ffn


def _check_prompt(handle: ModelHandle, ids: torch.Tensor, max_new_tokens: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"decoding runs one non-empty prompt: ids must be [1, T], got {tuple(ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    reason = handle.adapter.decode_refusal()
    if reason is not None:
        raise UnsupportedModelError(f"cannot decode {handle.name} token by token: {reason}")


@torch.no_grad()
def _generate(handle: ModelHandle, ids: torch.Tensor, max_new_tokens: int, thresholds: Thresholds | None,
              ffn_for: Callable[[list[list[int]]], Callable] | None) -> Generation:
    adapter = handle.adapter
    ids = ids.to(handle.device)
    cache = adapter.decode_cache()
    t0 = time.perf_counter()
    if thresholds is None:
        logits = handle.model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
    else:
        with apply_rule(handle, thresholds):
            logits = handle.model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
    t1 = time.perf_counter()
    kept: list[list[int]] = []
    ffn = ffn_for(kept) if ffn_for is not None else None
    steps, tokens = [logits], [logits.argmax(-1)]
    for position in range(ids.shape[1], ids.shape[1] + max_new_tokens - 1):
        kept.append([])
        logits = adapter.decode_token(tokens[-1][:, None], position, cache, ffn)  # (1, V)
        steps.append(logits)
        tokens.append(logits.argmax(-1))
    t2 = time.perf_counter()
    out = torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)
    counts = torch.tensor(kept, dtype=torch.long).view(len(kept), handle.geometry.n_layers) if ffn else None
    return Generation(out, torch.cat(steps).float().cpu(), counts, t1 - t0, t2 - t1)


def sparse_generate(handle: ModelHandle, ids: torch.Tensor, thresholds: Thresholds,
                    max_new_tokens: int) -> Generation:
    """Greedy continuation of ids [1, T] by exactly `max_new_tokens` tokens with CATS `thresholds` per token.

    Token for token the same model as `apply_rule(handle, thresholds)`, but each decoded token reads
    only the up rows and down columns of the FFN channels it keeps (gate and attention in full).
    """
    rule = get_rule(thresholds.rule)
    if rule is not CATS:
        raise ThresholdsError(f"sparse decoding runs the CATS rule (channels chosen from act(gate(x)) before up and "
                              f"down are read); got {rule.name!r} thresholds")
    g = handle.geometry
    _check_prompt(handle, ids, max_new_tokens)
    thresholds.check(g.n_layers, g.ffn_dim)
    prepared = _channel_major(handle)
    values = [float(v) for v in thresholds.values["down"]]
    return _generate(handle, ids, max_new_tokens, thresholds, lambda kept: _cats_ffn(prepared, values, kept))


def dense_generate(handle: ModelHandle, ids: torch.Tensor, max_new_tokens: int) -> Generation:
    """The dense twin of `sparse_generate`: the same prefill and decode loop, every FFN the model's own."""
    _check_prompt(handle, ids, max_new_tokens)
    return _generate(handle, ids, max_new_tokens, None, None)


def _numel_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def decode_weight_bytes(handle: ModelHandle, kept: torch.Tensor | None = None) -> float:
    """Weight bytes read per decoded token: one embedding row, every layer (attention and gate in full),
    the final norm and the LM head; with `kept` [n, n_layers], up rows and down columns only for the
    mean number of channels kept per layer (None: dense)."""
    adapter, g = handle.adapter, handle.geometry
    emb = adapter.input_embeddings().weight
    total = float(g.hidden * emb.element_size())
    for layer in range(g.n_layers):
        total += sum(_numel_bytes(p) for p in adapter.layers()[layer].parameters())
        if kept is not None:
            proj = adapter.projections(layer)
            per_channel = (_numel_bytes(proj["up"].weight) + _numel_bytes(proj["up"].bias)
                           + _numel_bytes(proj["down"].weight)) / g.ffn_dim
            total -= (g.ffn_dim - float(kept[:, layer].float().mean())) * per_channel
    norm = adapter.final_norm()
    total += 0 if norm is None else sum(_numel_bytes(p) for p in norm.parameters())
    head = adapter.lm_head()
    total += 0 if head is None else sum(_numel_bytes(p) for p in head.parameters())
    return total
