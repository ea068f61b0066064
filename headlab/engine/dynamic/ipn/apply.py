"""Run the shared model with an importance network's per-token masks, for one call only.

    with apply_ipn(handle, ipn) as meter:
        logits = handle.model(ids).logits
    print(meter.report().describe())

Per layer: a pre-hook on the gate projection reads the FFN input x, the network decides the kept
channels of every token from x and the layer's weight sketch, and a pre-hook on the down projection
zeroes the others (act(gate) * up is then zero exactly where a channel is dropped, the same model a
decode path gets by never reading those channels' weights). With head prediction, a pre-hook on the
Q projection reads the attention input and one on the O projection zeroes the dropped heads' slices.
A network with LoRA adapters adds B A h to each down projection's output (h: the masked input), a forward
hook too. Hooks are thread-scoped and removed when the body ends (headlab.engine.core.hooks); nothing is stored
on the model.

With a `trace` (training), masks are straight-through: hard in the forward pass, with the gradient of
sigmoid(margin / temperature) in the backward pass, and the trace keeps them for the losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import HookSet, temporary_hooks
from headlab.engine.dynamic.apply import SparsityMeter
from headlab.engine.dynamic.ipn.network import IPN

__all__ = ["RULE_NAME", "IPNTrace", "apply_ipn", "straight_through"]

#: How an IPN's runs are named in sparsity reports and perplexity tables.
RULE_NAME = "ipn"


@dataclass
class IPNTrace:
    """The straight-through masks of one forward pass, per layer, for the training losses.

    ffn[l]: [B, T, F] (values 0/1, gradients of the sigmoid); heads[l]: [B, T, H] when heads are predicted.
    `calibrate_to`: when set, each layer's threshold is first set to the quantile of its scores at this
    sparsity (the batch as a whole), so later layers see what the earlier thresholds let through.
    """

    ffn: list[torch.Tensor] = field(default_factory=list)
    heads: list[torch.Tensor] = field(default_factory=list)
    calibrate_to: float | None = None
    record: bool = True


def straight_through(margin: torch.Tensor, temperature: float) -> torch.Tensor:
    """1[margin > 0] in the forward pass, d sigmoid(margin / temperature) in the backward pass."""
    soft = torch.sigmoid(margin / temperature)
    hard = (margin > 0).to(soft.dtype)
    return hard + soft - soft.detach()


def _ffn_hooks(hooks: HookSet, ipn: IPN, layer: int, projs: dict[str, nn.Linear], meter: SparsityMeter,
               trace: IPNTrace | None) -> None:
    decided: list[torch.Tensor] = []

    def on_gate(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if trace is not None and trace.calibrate_to is not None:
            with torch.no_grad():
                s = ipn.channel_scores(layer, x)
                k = round(trace.calibrate_to * s.numel())
                flat = s.reshape(-1).float()
                t = -1e30 if k <= 0 else float(torch.kthvalue(flat, min(k, flat.numel())).values)
                ipn.tau.data[layer] = t  # zero where score <= t: the k lowest
        margin = ipn.channel_margin(layer, x)
        if trace is not None and torch.is_grad_enabled():
            m = straight_through(margin, ipn.temperature)
            if trace.record:
                trace.ffn.append(m)
        else:
            m = (margin > 0).to(x.dtype)
        decided.append(m)

    def on_down(module: nn.Module, args: tuple) -> tuple:
        m = decided.pop()
        h = args[0]
        if m.shape != h.shape:
            raise RuntimeError(f"layer {layer}: the network decided channels {tuple(m.shape)} for a down input "
                               f"{tuple(h.shape)}")
        # decided from the sketch: a dropped channel's gate and up rows are not read either
        meter.add("down", layer, m.detach() > 0,
                  projs["down"].out_features + projs["gate"].in_features + projs["up"].in_features)
        return (h * m.to(h.dtype), *args[1:])

    hooks.pre(projs["gate"], on_gate)
    hooks.pre(projs["down"], on_down)
    if ipn.lora_rank:
        def lora(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + ipn.lora_delta(layer, args[0]).to(output.dtype)  # args[0]: the masked down input

        hooks.post(projs["down"], lora)


def _head_hooks(hooks: HookSet, ipn: IPN, layer: int, projs: dict[str, nn.Linear], head_dim: int,
                meter: SparsityMeter, trace: IPNTrace | None) -> None:
    decided: list[torch.Tensor] = []

    def on_q(module: nn.Module, args: tuple) -> None:
        margin = ipn.head_margin(layer, args[0])
        if trace is not None and torch.is_grad_enabled():
            m = straight_through(margin, ipn.temperature)
            if trace.record:
                trace.heads.append(m)
        else:
            m = (margin > 0).to(args[0].dtype)
        decided.append(m)

    def on_o(module: nn.Module, args: tuple) -> tuple:
        m = decided.pop()  # (B, T, H)
        z = args[0]
        per_feature = m.repeat_interleave(head_dim, dim=-1)
        if per_feature.shape != z.shape:
            raise RuntimeError(f"layer {layer}: the network decided heads {tuple(m.shape)} for an O input "
                               f"{tuple(z.shape)}")
        meter.add("o", layer, per_feature.detach() > 0, projs["o"].out_features + projs["q"].in_features)  # + Q row
        return (z * per_feature.to(z.dtype), *args[1:])

    hooks.pre(projs["q"], on_q)
    hooks.pre(projs["o"], on_o)


@contextlib.contextmanager
def apply_ipn(handle: ModelHandle, ipn: IPN, meter: SparsityMeter | None = None, *,
              trace: IPNTrace | None = None) -> Iterator[SparsityMeter]:
    """Run `handle`'s shared model with `ipn`'s per-token masks for the body of the `with` only.

    Yields the SparsityMeter counting what was zeroed ("down": FFN channels, "o": head features).
    """
    ipn.attach(handle)
    g = handle.geometry
    meter = meter if meter is not None else SparsityMeter(RULE_NAME, g.n_layers)
    adapter = handle.adapter
    with temporary_hooks() as hooks:
        for layer in range(g.n_layers):
            projs = adapter.projections(layer)
            meter.weigh_layer(layer, projs)
            _ffn_hooks(hooks, ipn, layer, projs, meter, trace)
            if ipn.heads:
                _head_hooks(hooks, ipn, layer, projs, g.head_dim, meter, trace)
        yield meter


Apply = Callable[[SparsityMeter], contextlib.AbstractContextManager]
