"""Record every layer's input once, then re-run layers l..L-1 under another mask.

Changing a unit of layer l cannot change the inputs of layers 0..l. `record_layers` runs the
model once over fixed batches under one mask and keeps, per layer and batch, the hidden
states the layer was given and everything else it was called with (attention mask, position
embeddings, ...: captured by a pre-hook, so no family-specific code). Those call arguments
depend on the token ids only, never on the mask, so every replay reuses them.
`LayerInputs.run_from(layer, mask)` re-runs layers layer..L-1 under `mask` and returns a new
record sharing the first layer + 1 inputs (no copies); `stop` ends the run early, and
`starting_at(layer)` keeps only one layer's inputs (a layer-by-layer walk holds one layer at a time), and
`run_until(layer, mask, module)` runs a layer only as far as a module inside it, for hooks that capture
what that module sees (the rest of the layer is not computed).

Two users, one mechanism:
- `PrefixCache` (headlab.engine.runtime.prefix_cache): perplexity of many masks in the app;
- `LayerReplay` (below): the token-averaged KL(dense || masked) that the measured pruning
  strategies rank units by. KL to the dense model rather than the LM loss: it is zero for
  the dense model, never negative, and has no label noise, so single-head effects of 1e-3
  nats are still ranked reliably on a few hundred calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import batches, context_length, encode_batch

__all__ = ["LayerCall", "LayerInputs", "LayerReplay", "final_logits", "layer_output", "record_layers"]


class _Reached(Exception):
    """Raised by a hook once the module a run waits for has run: the rest of the forward is skipped."""


def _reached(*_: Any) -> None:
    raise _Reached


def layer_output(out: Any) -> torch.Tensor:
    """A layer returns its hidden states alone or first in a tuple, depending on the family."""
    return out[0] if isinstance(out, tuple) else out


def final_logits(handle: ModelHandle, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last layer's output: final norm, then the LM head (tied read-out for a bare encoder)."""
    adapter = handle.adapter
    norm = adapter.final_norm()
    if norm is not None:
        hidden = norm(hidden)
    head = adapter.lm_head()
    if head is not None:
        return head(hidden)
    return hidden @ adapter.input_embeddings().weight.t()  # as headlab.engine.core.objective.token_logits


@dataclass(frozen=True)
class LayerCall:
    """Everything a layer was called with besides its hidden-state input."""

    args: tuple
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class LayerInputs:
    """Every layer's input over fixed batches, as computed under one mask, and the layers' call arguments."""

    handle: ModelHandle
    hidden: list[list[torch.Tensor]]  # [L + 1][n_batches]: input of each layer; [L] = output of the last
    calls: list[list[LayerCall]]  # [L][n_batches]: shared by every record derived from the first

    @property
    def outputs(self) -> list[torch.Tensor]:
        """The last layer's output per batch (before the final norm)."""
        return self.hidden[-1]

    @torch.no_grad()
    def run_from(self, layer: int, mask: PruneMask | None, *, stop: int | None = None,
                 progress: Progress | None = None) -> "LayerInputs":
        """Layers `layer`..stop-1 (default: to the last) under `mask` from this record's input of `layer` (the
        caller vouches that `mask` agrees with the recorded one on layers 0..layer-1); the prefix is shared."""
        L = len(self.calls)
        stop = L if stop is None else stop
        if not 0 <= layer <= stop <= L:
            raise ValueError(f"need 0 <= layer <= stop <= {L}, got layer {layer}, stop {stop}")
        layers = self.handle.adapter.layers()
        n_batches = len(self.hidden[layer])
        hidden = self.hidden[: layer + 1] + [[] for _ in range(L - layer)]
        steps, done = (stop - layer) * n_batches, 0
        with gates.apply(self.handle, mask):
            for b in range(n_batches):
                x = self.hidden[layer][b]
                for i in range(layer, stop):
                    call = self.calls[i][b]
                    x = layer_output(layers[i](x, *call.args, **call.kwargs))
                    hidden[i + 1].append(x)
                    done += 1
                    if progress:
                        progress(done, steps)
        return LayerInputs(self.handle, hidden, self.calls)

    @torch.no_grad()
    def run_until(self, layer: int, mask: PruneMask | None, module: torch.nn.Module, *, pre: bool = False) -> None:
        """Run `layer` under `mask` on every batch only as far as `module`, a module inside it, and stop there.

        For capturing hooks: every forward hook of `module` registered before this call (its forward pre-hooks
        with `pre`) runs, and sees exactly what a full run shows it; the rest of the layer is not computed, so
        nothing is recorded (hooks `mask`'s gates put on `module` itself do not run either).
        """
        if not 0 <= layer < len(self.calls):
            raise ValueError(f"need 0 <= layer < {len(self.calls)}, got {layer}")

        target = self.handle.adapter.layers()[layer]
        with temporary_hooks() as hooks:  # thread-scoped: another session's forward through `module` runs on
            (hooks.pre if pre else hooks.post)(module, _reached)
            with gates.apply(self.handle, mask):
                for x, call in zip(self.hidden[layer], self.calls[layer]):
                    try:
                        target(x, *call.args, **call.kwargs)
                    except _Reached:
                        continue
                    raise ValueError(f"{type(module).__name__} did not run inside layer {layer}")

    def starting_at(self, layer: int) -> "LayerInputs":
        """A record holding only the inputs of `layer` (earlier ones released): enough to `run_from(layer, ...)`."""
        L = len(self.calls)
        return LayerInputs(self.handle, [[] if i != layer else self.hidden[i] for i in range(L + 1)], self.calls)


def _recorder(hidden: list[torch.Tensor] | None, calls: list[LayerCall]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        if hidden is not None:
            hidden.append(x.detach())
        calls.append(LayerCall(tuple(args[1:]), kwargs))

    return hook


@torch.no_grad()
def record_layers(
    handle: ModelHandle,
    mask: PruneMask | None,
    inputs: Sequence[Mapping[str, torch.Tensor]],
    *,
    each: Callable[[int, Any], None] | None = None,
    keep: Sequence[int] | None = None,
) -> LayerInputs:
    """Run `handle.model(**inputs[b])` under `mask` for each batch, recording every layer's input and call.

    `each(b, output)` sees batch b's model output (e.g. to score its logits) before the next batch runs.
    `keep`: record the hidden states of only these layers (L: the last layer's output), e.g. (0,) for a walk
    that advances layer by layer and would otherwise hold every layer's states at once; the calls are all kept.
    """
    adapter, L = handle.adapter, handle.geometry.n_layers
    kept = set(range(L + 1)) if keep is None else set(keep)
    if not kept <= set(range(L + 1)):
        raise ValueError(f"keep names layers outside 0..{L}: {sorted(kept - set(range(L + 1)))}")
    hidden: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
    calls: list[list[LayerCall]] = [[] for _ in range(L)]
    # use_cache=False: a KV cache captured in the kwargs would grow on every replay.
    extra = {"use_cache": False} if handle.geometry.causal else {}
    with temporary_hooks() as hooks, gates.apply(handle, mask):
        for layer, module in enumerate(adapter.layers()):
            hooks.pre(module, _recorder(hidden[layer] if layer in kept else None, calls[layer]), with_kwargs=True)
        if L in kept:
            hooks.post(adapter.layers()[L - 1], lambda m, a, k, out: hidden[L].append(layer_output(out).detach()),
                       with_kwargs=True)
        # nothing reads the model's output: stop once the last layer's call is recorded (its compute and the
        # LM head's, a fifth of a small model's forward, are skipped)
        stop = each is None and L not in kept
        if stop:
            hooks.pre(adapter.layers()[L - 1], _reached, with_kwargs=True)
        for b, batch in enumerate(inputs):
            try:
                out = handle.model(**batch, **extra)
            except _Reached:
                continue
            if stop:
                raise ValueError(f"the model's last layer did not run on batch {b}")
            if each:
                each(b, out)
    return LayerInputs(handle, hidden, calls)


class LayerReplay:
    """Dense log-probs and per-layer inputs (under `base`) of fixed calibration batches."""

    def __init__(self, handle: ModelHandle, texts: Sequence[str], *, base: PruneMask | None = None,
                 max_length: int = 128, batch_size: int = 4) -> None:
        self.handle = handle
        self.base = base if base is not None else PruneMask.dense(handle.geometry)
        self.base.check(handle.geometry)
        max_length = min(max_length, context_length(handle.model))
        encoded = [encode_batch(handle.tokenizer, chunk, max_length, handle.device)
                   for chunk in batches(list(texts), batch_size)]
        self._valid = [self._positions(am.bool()) for _, am in encoded]  # (B, T) bool: tokens that count
        with torch.no_grad():
            # (n_valid, V) per batch: the dense model's log-probs at the counted positions
            self._dense_logp = [F.log_softmax(token_logits(handle, ids, am)[valid].float(), dim=-1)
                                for (ids, am), valid in zip(encoded, self._valid)]
        inputs = [{"input_ids": ids, "attention_mask": am} for ids, am in encoded]
        self.record = record_layers(handle, self.base, inputs)
        self.n_tokens = sum(int(v.sum()) for v in self._valid)
        self.base_kl = self._kl_of_outputs(self.record.outputs)

    def _positions(self, valid: torch.Tensor) -> torch.Tensor:
        # Causal LMs predict token t+1 at t (the last position predicts nothing); encoders reconstruct t.
        if self.handle.geometry.causal:
            pos = valid.clone()
            pos[:, -1] = False
            return pos & valid.roll(-1, dims=1)
        return valid

    @torch.no_grad()
    def _kl_of_outputs(self, outputs: list[torch.Tensor]) -> float:
        total = 0.0
        for out, valid, dense_logp in zip(outputs, self._valid, self._dense_logp):
            logits = final_logits(self.handle, out)  # on the LM head's device (a device map may put it apart)
            logp = F.log_softmax(logits[valid.to(logits.device)].float(), dim=-1)  # (n_valid, V)
            total += float(F.kl_div(logp, dense_logp.to(logp.device), log_target=True, reduction="sum"))
        return total / self.n_tokens

    def kl(self, mask: PruneMask, start: int | None = None) -> float:
        """Mean KL(dense || model under `mask`), replaying layers `start`..L-1.

        `start` defaults to the first layer where `mask` differs from the base; an explicit one
        must not lie after it (those layers' recorded inputs would be wrong).
        """
        first = self.base.first_changed_layer(mask)
        if start is None:
            start = first
        elif start > first:
            raise ValueError(f"the mask differs from the replay's base at layer {first}; "
                             f"replaying from layer {start} would miss that change")
        return self._kl_of_outputs(self.record.run_from(start, mask).outputs)
