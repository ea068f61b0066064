"""Batch-1 greedy decoding with the KV cache where each token's mask means pruned channels' and heads' weights are not read.

    out = sparse_generate(handle, ids, calibrate(handle, "cats", 0.5), max_new_tokens=128)   # CATS thresholds
    out = sparse_generate(handle, ids, IPNChooser(ipn), max_new_tokens=128)                  # any Chooser
    ref = dense_generate(handle, ids, max_new_tokens=128)  # the same loop, every weight read
    ideal = decode_weight_bytes(handle) / decode_weight_bytes(handle, out.kept, out.heads, chooser=chooser)

The prompt is prefilled by the HF model itself under the chooser's gated model (`chooser.gates`:
thread-scoped hooks, so its KV cache is the sparse model's); every later token runs through
`adapter.decode_token`, and per layer a chooser (headlab.engine.dynamic.choosers) decides from the token's
own hidden state what it keeps:

- heads: the Q rows and O columns of the kept query heads only (keys and values of every KV head
  are computed and cached, so the cache stays exact for later tokens; a token keeping no head of a
  layer adds no attention output, the sub-block rule);
- FFN channels: only the kept channels' weights, from an interleaved copy [F, 3d] of each layer
  (gate row | up row | down column per channel, headlab.engine.dynamic.gathered), through the compiled CPU
  kernel (`make setup`), Triton on CUDA, or the torch twin; CATS already computed act(gate(x)) for
  every channel to decide, so it reads only the kept up rows and down columns.

`decode_weight_bytes` counts what a token reads (the chooser's own reads included: CATS the whole
gate, an importance network its sketches), which gives the ideal speed-up over dense. Token for
token the result is the gated model's (`chooser.gates`), to float tolerance; the shared model is
never changed and no hook outlives a call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from headlab.engine.core.errors import UnsupportedModelError
from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.choosers import CatsChooser, ChannelChoice, Chooser, tensor_bytes
from headlab.engine.dynamic.gathered import GatheredFFN
from headlab.engine.dynamic.rules import Thresholds
from headlab.kernels.decode import FFNBackend

__all__ = [
    "FFNRunner", "Generation", "check_prompt", "decode_weight_bytes", "dense_generate", "sparse_generate", "sparse_nll"]


@dataclass(frozen=True)
class Generation:
    """A greedy continuation and what it cost.

    ids: [1, T + n] prompt and new tokens; logits: [n, V], the logits each new token was picked
    from (the first from the prefill); kept: [n - 1, n_layers] FFN channels read per decoded token
    and layer (None for dense decoding); heads: [n - 1, n_layers] query heads read (None: every
    head); prefill_s / decode_s: wall time of the prefill and of the n - 1 cached decode steps;
    chooser_s: the part of decode_s spent in the chooser; chooser / ffn_path: which chooser ran
    and which FFN backend ("compiled", "triton" or "torch"; None for dense decoding).
    """

    ids: torch.Tensor
    logits: torch.Tensor
    kept: torch.Tensor | None
    prefill_s: float
    decode_s: float
    heads: torch.Tensor | None = None
    chooser_s: float = 0.0
    chooser: str | None = None
    ffn_path: str | None = None

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.ids[0, self.ids.shape[1] - self.logits.shape[0]:]

    @property
    def decoded(self) -> int:
        """Tokens that went through the cached decode steps (all but the prefill's)."""
        return self.logits.shape[0] - 1

    @property
    def decode_tokens_per_s(self) -> float:
        """Decoded tokens per second over the cached steps (the prefill excluded)."""
        return self.decoded / self.decode_s if self.decode_s > 0 else float("nan")


def check_prompt(handle: ModelHandle, ids: torch.Tensor, max_new_tokens: int) -> None:
    """Refuse anything but one non-empty prompt [1, T], at least one new token, and a model that decodes stepwise."""
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"decoding runs one non-empty prompt: ids must be [1, T], got {tuple(ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    reason = handle.adapter.decode_refusal()
    if reason is not None:
        raise UnsupportedModelError(f"cannot decode {handle.name} token by token: {reason}")


class FFNRunner(Protocol):
    """Runs one decoded token's FFN over the channels a chooser kept: `path` names the kernel it uses."""

    path: str

    def __call__(self, layer: int, x: torch.Tensor, choice: ChannelChoice) -> torch.Tensor: ...


class _Steps:
    """The per-layer callbacks of one sparse decode: the chooser's decisions, timed and counted, then the FFN."""

    def __init__(self, handle: ModelHandle, chooser: Chooser, backend: FFNBackend, runner: FFNRunner | None = None):
        self.chooser = chooser
        self.ffn_runner = runner if runner is not None else GatheredFFN(handle, chooser.computes_gate, backend)
        self.n_heads = handle.geometry.n_heads
        self.kept: list[list[int]] = []
        self.heads_kept: list[list[int]] = []
        self.chooser_s = 0.0

    def next_token(self) -> None:
        self.kept.append([])
        if self.chooser.chooses_heads:
            self.heads_kept.append([])

    def heads(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        t = time.perf_counter()
        idx = self.chooser.heads(layer, x)
        self.chooser_s += time.perf_counter() - t
        self.heads_kept[-1].append(self.n_heads if idx is None else idx.numel())
        return idx

    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        choice = self.chooser.channels(layer, h)
        self.chooser_s += time.perf_counter() - t
        self.kept[-1].append(choice.idx.numel())
        return self.ffn_runner(layer, h.reshape(-1), choice).view_as(h)


@torch.no_grad()
def _generate(handle: ModelHandle, ids: torch.Tensor, max_new_tokens: int, chooser: Chooser | None,
              backend: FFNBackend, runner: FFNRunner | None = None) -> Generation:
    adapter, n_layers = handle.adapter, handle.geometry.n_layers
    ids = ids.to(handle.device)
    steps = _Steps(handle, chooser, backend, runner) if chooser is not None else None  # the FFN copies are made here
    cache = adapter.decode_cache()
    t0 = time.perf_counter()
    if chooser is None:
        logits = handle.model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
    else:
        with chooser.gates(handle):
            logits = handle.model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
    t1 = time.perf_counter()
    ffn = steps.ffn if steps is not None else None
    heads = steps.heads if steps is not None and chooser.chooses_heads else None
    all_logits, tokens = [logits], [logits.argmax(-1)]
    for position in range(ids.shape[1], ids.shape[1] + max_new_tokens - 1):
        if steps is not None:
            steps.next_token()
        logits = adapter.decode_token(tokens[-1][:, None], position, cache, ffn, heads)  # (1, V)
        all_logits.append(logits)
        tokens.append(logits.argmax(-1))
    t2 = time.perf_counter()
    out = torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)
    logits_cpu = torch.cat(all_logits).float().cpu()
    if steps is None:
        return Generation(out, logits_cpu, None, t1 - t0, t2 - t1)
    kept = torch.tensor(steps.kept, dtype=torch.long).view(len(steps.kept), n_layers)
    head_counts = (torch.tensor(steps.heads_kept, dtype=torch.long).view(len(steps.heads_kept), n_layers)
                   if heads is not None else None)
    return Generation(out, logits_cpu, kept, t1 - t0, t2 - t1, heads=head_counts, chooser_s=steps.chooser_s,
                      chooser=chooser.name, ffn_path=steps.ffn_runner.path)


def sparse_generate(handle: ModelHandle, ids: torch.Tensor, chooser: Chooser | Thresholds, max_new_tokens: int,
                    *, backend: FFNBackend = "auto", ffn_runner: FFNRunner | None = None) -> Generation:
    """Greedy continuation of ids [1, T] by exactly `max_new_tokens` tokens, each reading only what `chooser` keeps.

    `chooser`: a Chooser (headlab.engine.dynamic.choosers), or CATS thresholds (a CatsChooser is made from them).
    Token for token the same model as `chooser.gates(handle)` (CATS: `apply_rule(handle, thresholds)`).
    `backend`: the FFN kernel ("auto": Triton on CUDA, the compiled CPU kernel when built, else torch).
    `ffn_runner`: what runs a decoded token's FFN over its kept channels (default: a GatheredFFN on the model's
    own weights; headlab.engine.dynamic.int4_gathered passes one reading them at 4 bits). The prefill runs
    `chooser.gates(handle)` over the model as it is either way.
    """
    check_prompt(handle, ids, max_new_tokens)
    if isinstance(chooser, Thresholds):
        chooser = CatsChooser(handle, chooser)
    chooser.check(handle)
    return _generate(handle, ids, max_new_tokens, chooser, backend, ffn_runner)


@torch.no_grad()
def sparse_nll(handle: ModelHandle, ids: torch.Tensor, chooser: Chooser, *, backend: FFNBackend = "auto"
               ) -> tuple[float, int]:
    """(summed NLL, count) of ids [1, T] teacher-forced through the sparse decode loop, one token at a time.

    Every token after the first is predicted by the decode step (the KV cache, `chooser`'s kept channels and
    heads only, the gathered FFN kernels): an implementation independent of the hooks that
    `chooser.gates(handle)` installs over a batched forward, for checking a perplexity measured there.
    """
    check_prompt(handle, ids, 1)
    chooser.check(handle)
    adapter = handle.adapter
    ids = ids.to(handle.device)
    steps = _Steps(handle, chooser, backend)
    cache = adapter.decode_cache()
    with chooser.gates(handle):
        logits = handle.model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits[:, -1]
    heads = steps.heads if chooser.chooses_heads else None
    total = 0.0
    for position in range(1, ids.shape[1]):
        total -= float(torch.log_softmax(logits.float(), dim=-1)[0, ids[0, position]])
        steps.next_token()
        logits = adapter.decode_token(ids[:, position : position + 1], position, cache, steps.ffn, heads)
    return total, ids.shape[1] - 1


def dense_generate(handle: ModelHandle, ids: torch.Tensor, max_new_tokens: int) -> Generation:
    """The dense twin of `sparse_generate`: the same prefill and decode loop, every weight the model's own."""
    check_prompt(handle, ids, max_new_tokens)
    return _generate(handle, ids, max_new_tokens, None, "auto")


def _module_bytes(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(tensor_bytes(p) for p in module.parameters())


def decode_weight_bytes(handle: ModelHandle, kept: torch.Tensor | None = None, heads: torch.Tensor | None = None, *,
                        chooser: Chooser | None = None) -> float:
    """Weight bytes read per decoded token.

    Dense (no arguments): one embedding row, every layer's weights, the final norm and the LM head.
    kept [n, n_layers]: FFN channels read per token and layer; each layer then reads, at its mean
    kept count, the kept channels' up rows, down columns (and gate rows unless the chooser computed
    the gate) instead of the whole FFN, plus the chooser's own bytes (`chooser.predictor_bytes`;
    chooser None: CATS's accounting, the whole gate). heads [n, n_layers]: query heads read; the Q
    rows and O columns of the others are not. K and V are always read in full.
    """
    adapter, g = handle.adapter, handle.geometry
    total = float(g.hidden * adapter.input_embeddings().weight.element_size())
    computes_gate = True if chooser is None else chooser.computes_gate
    for layer in range(g.n_layers):
        total += _module_bytes(adapter.layers()[layer])
        proj = adapter.projections(layer)
        if heads is not None:
            q_and_o = tensor_bytes(proj["q"].weight) + tensor_bytes(proj["q"].bias) + tensor_bytes(proj["o"].weight)
            total -= (1.0 - float(heads[:, layer].float().mean()) / g.n_heads) * q_and_o
        if kept is not None:
            gate = tensor_bytes(proj["gate"].weight) + tensor_bytes(proj["gate"].bias)
            up_down = tensor_bytes(proj["up"].weight) + tensor_bytes(proj["up"].bias) + tensor_bytes(proj["down"].weight)
            per_channel = (up_down + (0 if computes_gate else gate)) / g.ffn_dim
            total += float(kept[:, layer].float().mean()) * per_channel - (gate + up_down)
    if kept is not None:
        if chooser is not None:
            total += chooser.predictor_bytes(handle)
        else:  # CATS: the whole gate
            total += sum(tensor_bytes(adapter.projections(i)["gate"].weight)
                         + tensor_bytes(adapter.projections(i)["gate"].bias) for i in range(g.n_layers))
    total += _module_bytes(adapter.final_norm()) + _module_bytes(adapter.lm_head())
    return total
