"""Per-token detail of a dynamic sparsity method on one prompt: what each token kept, and why.

    tm = inspect_tokens(handle, calibrate(handle, "cats", 0.5), ids)   # or an importance network
    tm.channels_kept          # [T, L]: FFN channels each token keeps in each layer
    cell = tm.cell(token=5, layer=3)
    cell.kept, cell.recall    # the channels it kept; the share of the oracle's top-k among them

Two forwards of the prompt, both through thread-scoped hooks (headlab.engine.core.hooks), so the shared
model is never changed:

1. dense: every layer's down-projection input h = act(gate(x)) * up(x), whose |h| is the oracle's
   score (the true contribution of each channel, Lee et al. 2024 / Deja Vu's label);
2. under the method: its keep mask per token and layer and the score it thresholded —
   oracle |h|, CATS |act(gate(x))|, TEAL |h| (the down projection's input), WINA
   |h| * ||W_down[:, j]||; an importance network's channel score and learned threshold, and its
   kept query heads when it predicts them.

The recording hooks are registered before the method's own, so they see each input before the
method zeroes it (PyTorch runs hooks in registration order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import HookSet, temporary_hooks
from headlab.engine.dynamic.apply import SparsityMeter, apply_rule
from headlab.engine.dynamic.ipn import IPN, apply_ipn
from headlab.engine.dynamic.methods import DynamicMethod, method_name
from headlab.engine.dynamic.rules import CATS, ORACLE, Thresholds, column_norms, get_rule, weighted_score
from headlab.engine.runtime.attention_maps import token_labels

__all__ = ["TokenCell", "TokenMap", "inspect_tokens"]


@dataclass(frozen=True)
class TokenCell:
    """One token in one layer: the channels it kept, the method's scores against the oracle's.

    keep, scores, oracle: [F]; kept / oracle_top: the kept channels and the oracle's top-k at the
    same count k, as index tensors; recall: |kept & oracle_top| / k (1.0 when nothing is kept);
    heads: Bool [H] of kept query heads, or None when the method keeps every head.
    """

    token: int
    layer: int
    label: str
    keep: torch.Tensor
    scores: torch.Tensor
    oracle: torch.Tensor
    threshold: float
    heads: torch.Tensor | None

    @property
    def kept(self) -> torch.Tensor:
        return self.keep.nonzero()[:, 0]

    @property
    def oracle_top(self) -> torch.Tensor:
        """The oracle's choice at the method's count: the k channels with the largest true |act(gate) * up|."""
        k = int(self.keep.sum())
        return self.oracle.topk(k).indices.sort().values if k else self.kept

    @property
    def recall(self) -> float:
        k = int(self.keep.sum())
        if k == 0:
            return 1.0
        top = torch.zeros_like(self.keep)
        top[self.oracle_top] = True
        return float((top & self.keep).sum()) / k


@dataclass(frozen=True)
class TokenMap:
    """A method's per-token choices on one prompt.

    tokens: T readable labels; channels_kept [T, L] (long); heads_kept [T, L] or None; keep [L, T, F]
    (bool); scores [L, T, F]: the method's score; oracle [L, T, F]: the dense model's |act(gate) * up|;
    threshold [L, T]: the score a channel had to reach (NaN for the oracle, which keeps a count);
    head_keep [L, T, H] or None.
    """

    method: str
    tokens: list[str]
    channels_kept: torch.Tensor
    heads_kept: torch.Tensor | None
    keep: torch.Tensor
    scores: torch.Tensor
    oracle: torch.Tensor
    threshold: torch.Tensor
    head_keep: torch.Tensor | None
    ffn_dim: int
    n_heads: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_layers(self) -> int:
        return int(self.keep.shape[0])

    def cell(self, token: int, layer: int) -> TokenCell:
        """The detail of `token` in `layer`."""
        if not (0 <= token < self.n_tokens and 0 <= layer < self.n_layers):
            raise IndexError(f"no cell (token {token}, layer {layer}) in a map of {self.n_tokens} tokens x "
                             f"{self.n_layers} layers")
        return TokenCell(token, layer, self.tokens[token], self.keep[layer, token], self.scores[layer, token],
                         self.oracle[layer, token], float(self.threshold[layer, token]),
                         None if self.head_keep is None else self.head_keep[layer, token])

    def recall(self) -> torch.Tensor:
        """[T, L]: per cell, the share of the oracle's top-k (k = the method's count) the method kept."""
        out = torch.ones(self.n_tokens, self.n_layers)
        for layer in range(self.n_layers):
            for t in range(self.n_tokens):
                out[t, layer] = self.cell(t, layer).recall
        return out


def _row(ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"inspect one non-empty prompt: ids must be [T] or [1, T], got {tuple(ids.shape)}")
    return ids


def _recorder(store: dict[int, torch.Tensor], layer: int, *, output: bool = False,
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable:
    """A hook storing `layer`'s input (pre-hook) or output (`output`) of batch row 0, detached, as float."""
    def pre(module: nn.Module, args: tuple) -> None:
        store[layer] = args[0][0].detach().float()

    def post(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        t = out[0].detach()
        store[layer] = (transform(t) if transform is not None else t).float()

    return post if output else pre


class _KeepMeter(SparsityMeter):
    """A SparsityMeter that also keeps each layer's FFN-channel keep mask (the down projection's input)."""

    def __init__(self, rule: str, n_layers: int):
        super().__init__(rule, n_layers)
        self.keeps: dict[int, torch.Tensor] = {}

    def add(self, site: str, layer: int, keep: torch.Tensor, skips: int) -> None:
        super().add(site, layer, keep, skips)
        if site == "down":
            self.keeps[layer] = keep[0].detach().clone()


@torch.no_grad()
def _dense_oracle(handle: ModelHandle, ids: torch.Tensor) -> torch.Tensor:
    """[L, T, F]: |act(gate(x)) * up(x)| of the dense model, per layer and token."""
    h: dict[int, torch.Tensor] = {}
    with temporary_hooks() as hooks:
        for layer in range(handle.geometry.n_layers):
            hooks.pre(handle.adapter.projections(layer)["down"], _recorder(h, layer))
        handle.model(input_ids=ids)
    return torch.stack([h[l].abs() for l in range(handle.geometry.n_layers)]).cpu()


def _rule_scores(rule_name: str, h: torch.Tensor, act_gate: torch.Tensor | None, down: nn.Linear) -> torch.Tensor:
    rule = get_rule(rule_name)
    if rule is CATS:
        return act_gate.abs()
    if rule.weighted:  # WINA, wina-ffn
        return weighted_score(h, column_norms(down.weight))
    return h.abs()  # the oracle, exact, TEAL and teal-ffn score the down projection's input by magnitude


@torch.no_grad()
def _rule_trace(handle: ModelHandle, thresholds: Thresholds, ids: torch.Tensor):
    g, adapter = handle.geometry, handle.adapter
    rule = get_rule(thresholds.rule)
    h: dict[int, torch.Tensor] = {}
    act_gate: dict[int, torch.Tensor] = {}
    meter = _KeepMeter(rule.name, g.n_layers)
    with temporary_hooks() as hooks:  # before apply_rule's hooks: they see the inputs the rule is about to zero
        for layer in range(g.n_layers):
            proj = adapter.projections(layer)
            hooks.pre(proj["down"], _recorder(h, layer))
            if rule is CATS:
                hooks.post(proj["gate"], _recorder(act_gate, layer, output=True,
                                                   transform=adapter.ffn_activation(layer)))
        with apply_rule(handle, thresholds, meter):
            handle.model(input_ids=ids)
    T = ids.shape[1]
    scores, thresholds_out = [], []
    for layer in range(g.n_layers):
        down = adapter.projections(layer)["down"]
        scores.append(_rule_scores(rule.name, h[layer], act_gate.get(layer), down).cpu())
        t = math.nan if rule is ORACLE else float(thresholds.values["down"][layer])
        thresholds_out.append(torch.full((T,), t))
    keep = torch.stack([meter.keeps[l].cpu() for l in range(g.n_layers)])
    return keep, torch.stack(scores), torch.stack(thresholds_out), None


def _record_inputs(hooks: HookSet, handle: ModelHandle, ffn_in: dict, attn_in: dict) -> None:
    for layer in range(handle.geometry.n_layers):
        proj = handle.adapter.projections(layer)
        hooks.pre(proj["gate"], _recorder(ffn_in, layer))  # the FFN input: after the post-attention norm
        hooks.pre(proj["q"], _recorder(attn_in, layer))  # the attention input: after the input norm


@torch.no_grad()
def _ipn_trace(handle: ModelHandle, ipn: IPN, ids: torch.Tensor):
    n_layers = handle.geometry.n_layers
    ffn_in: dict[int, torch.Tensor] = {}
    attn_in: dict[int, torch.Tensor] = {}
    with temporary_hooks() as hooks:
        _record_inputs(hooks, handle, ffn_in, attn_in)
        with apply_ipn(handle, ipn):
            handle.model(input_ids=ids)
    keep, scores, thresholds, heads = [], [], [], []
    for layer in range(n_layers):
        x = ffn_in[layer]
        keep.append(ipn.channel_keep(layer, x).cpu())
        scores.append(ipn.channel_scores(layer, x).detach().float().cpu())
        thresholds.append(ipn.channel_threshold(layer, x).detach().float()[..., 0].cpu())
        hk = ipn.head_keep(layer, attn_in[layer])
        if hk is not None:
            heads.append(hk.cpu())
    head_keep = torch.stack(heads) if len(heads) == n_layers else None
    return torch.stack(keep), torch.stack(scores), torch.stack(thresholds), head_keep


def inspect_tokens(handle: ModelHandle, method: DynamicMethod, ids: torch.Tensor) -> TokenMap:
    """Per token and layer of the prompt `ids` ([T] or [1, T]): what `method` kept, its scores, the oracle's."""
    ids = _row(ids).to(handle.device)
    g = handle.geometry
    oracle = _dense_oracle(handle, ids)
    trace = _ipn_trace if isinstance(method, IPN) else _rule_trace
    keep, scores, threshold, head_keep = trace(handle, method, ids)
    return TokenMap(
        method=method_name(method),
        tokens=token_labels(handle.tokenizer, ids[0].tolist()),
        channels_kept=keep.sum(-1).T.long(),
        heads_kept=None if head_keep is None else head_keep.sum(-1).T.long(),
        keep=keep, scores=scores, oracle=oracle, threshold=threshold, head_keep=head_keep,
        ffn_dim=g.ffn_dim, n_heads=g.n_heads,
    )
