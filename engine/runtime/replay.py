"""Re-run only layers l..L-1 of fixed calibration batches, scoring the change as KL to the dense model.

Removing a unit of layer l cannot change the inputs of layers 0..l, so a `LayerReplay`
runs the model once under a base mask, keeps every layer's input hidden states and the
arguments each layer was called with (captured by a pre-hook: no family-specific code),
plus the dense model's next-token log-probabilities. `kl(mask, start)` then replays
layers start..L-1 under `mask` and returns the token-averaged KL(dense || masked).

KL to the dense model rather than the LM loss: it is zero for the dense model, never
negative, and has no label noise, so single-head effects of 1e-3 nats are still ranked
reliably on a few hundred calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from engine.core import gates
from engine.core.handle import ModelHandle
from engine.core.hooks import temporary_hooks
from engine.core.mask import PruneMask
from engine.core.objective import token_logits
from engine.core.tokens import batches, context_length, encode_batch

__all__ = ["LayerReplay"]


@dataclass
class _Batch:
    ids: torch.Tensor  # (B, T)
    valid: torch.Tensor  # (B, T) bool: tokens that count
    dense_logp: torch.Tensor  # (n_valid, V) dense log-probs at the counted positions
    inputs: list[torch.Tensor]  # [L + 1]: input of each layer under the base mask; [L] = last output
    calls: list[tuple[tuple, dict]]  # [L]: each layer's other args and kwargs


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class LayerReplay:
    """Dense log-probs and per-layer inputs (under `base`) of fixed calibration batches."""

    def __init__(self, handle: ModelHandle, texts: Sequence[str], *, base: PruneMask | None = None,
                 max_length: int = 128, batch_size: int = 4) -> None:
        self.handle = handle
        self.base = base if base is not None else PruneMask.dense(handle.geometry)
        self.base.check(handle.geometry)
        max_length = min(max_length, context_length(handle.model))
        self.batches = [self._record(*encode_batch(handle.tokenizer, chunk, max_length, handle.device))
                        for chunk in batches(list(texts), batch_size)]
        self.n_tokens = sum(int(b.valid.sum()) for b in self.batches)
        self.base_kl = self._kl_of_outputs([b.inputs[-1] for b in self.batches])

    def _positions(self, valid: torch.Tensor) -> torch.Tensor:
        # Causal LMs predict token t+1 at t (the last position predicts nothing); encoders reconstruct t.
        if self.handle.geometry.causal:
            pos = valid.clone()
            pos[:, -1] = False
            return pos & valid.roll(-1, dims=1)
        return valid

    @torch.no_grad()
    def _record(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> _Batch:
        h = self.handle
        adapter, L = h.adapter, h.geometry.n_layers
        inputs: list[torch.Tensor] = []
        calls: list[tuple[tuple, dict]] = []

        def record(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            inputs.append(hidden.detach())
            calls.append((tuple(args[1:]), kwargs))

        valid = self._positions(attention_mask.bool())
        dense = token_logits(h, ids, attention_mask)
        dense_logp = F.log_softmax(dense[valid].float(), dim=-1)
        with temporary_hooks() as hooks, gates.apply(h, self.base):
            for layer in adapter.layers():
                hooks.pre(layer, record, with_kwargs=True)
            hooks.post(adapter.layers()[L - 1], lambda m, a, k, out: inputs.append(_hidden(out).detach()),
                       with_kwargs=True)
            # use_cache=False: a KV cache captured in the kwargs would grow on every replay.
            kwargs = {"use_cache": False} if h.geometry.causal else {}
            h.model(input_ids=ids, attention_mask=attention_mask, **kwargs)
        return _Batch(ids, valid, dense_logp, inputs, calls)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        adapter = self.handle.adapter
        norm = adapter.final_norm()
        if norm is not None:
            hidden = norm(hidden)
        head = adapter.lm_head()
        if head is not None:
            return head(hidden)
        return hidden @ adapter.input_embeddings().weight.t()  # bare encoder: tied read-out (engine.core.objective)

    def _kl_of_outputs(self, outputs: list[torch.Tensor]) -> float:
        total = 0.0
        for b, out in zip(self.batches, outputs):
            logp = F.log_softmax(self._logits(out)[b.valid].float(), dim=-1)  # (n_valid, V)
            total += float(F.kl_div(logp, b.dense_logp, log_target=True, reduction="sum"))
        return total / self.n_tokens

    @torch.no_grad()
    def kl(self, mask: PruneMask, start: int) -> float:
        """Mean KL(dense || model under `mask`), replaying layers `start`..L-1 (mask must equal base below)."""
        layers = self.handle.adapter.layers()
        outs = []
        with gates.apply(self.handle, mask):
            for b in self.batches:
                hidden = b.inputs[start]
                for layer in range(start, len(layers)):
                    args, kwargs = b.calls[layer]
                    hidden = _hidden(layers[layer](hidden, *args, **kwargs))
                outs.append(hidden)
        return self._kl_of_outputs(outs)
