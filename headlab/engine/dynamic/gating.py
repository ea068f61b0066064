"""The gated model of a chooser: the shared model with each position's chosen heads and channels zeroed, per call.

    with chooser_gates(handle, chooser):
        logits = handle.model(input_ids=ids).logits   # every position masked as decoding would mask it

This is what batch-1 decoding (headlab.engine.dynamic.decode) must equal token by token, written the slow
and obvious way, through thread-scoped hooks on the projections the adapter names
(headlab.engine.core.hooks): per layer,

- a pre-hook on "q" reads the attention input and asks the chooser which query heads each position
  keeps; a pre-hook on "o" zeroes the other heads' slices of its input, and a hook on its output
  zeroes the positions that keep no head at all (the sub-block rule: no head, no attention output,
  not even the O bias);
- a pre-hook on "gate" reads the FFN input and asks which channels each position keeps; a pre-hook
  on "down" zeroes the others (act(gate) * up is then zero exactly where a channel is not read).

Keys and values are untouched, so every position's cache entry is the dense one, as in decoding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import HookSet, temporary_hooks

__all__ = ["PositionMasks", "chooser_gates"]


class PositionMasks(Protocol):
    """What the gates ask of a chooser (headlab.engine.dynamic.choosers.Chooser): masks for a batch of positions."""

    chooses_heads: bool

    def head_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Bool [..., H] for attention inputs x [..., d] (None: every head)."""

    def channel_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Bool [..., F] for FFN inputs x [..., d]."""


def _head_hooks(hooks: HookSet, chooser: PositionMasks, layer: int, q: nn.Linear, o: nn.Linear, head_dim: int) -> None:
    decided: list[torch.Tensor | None] = []  # the heads "q" chose, consumed by "o" in the same forward

    def on_q(module: nn.Module, args: tuple) -> None:
        decided.append(chooser.head_keep(layer, args[0]))  # (B, T, H) or None

    def on_o_input(module: nn.Module, args: tuple) -> tuple | None:
        keep = decided[-1]
        if keep is None:
            return None
        z = args[0]  # (B, T, H * head_dim)
        kept = keep.to(z.dtype).repeat_interleave(head_dim, dim=-1)
        if kept.shape != z.shape:
            raise RuntimeError(f"layer {layer}: heads chosen {tuple(keep.shape)} for an O input {tuple(z.shape)}")
        return (z * kept, *args[1:])

    def on_o_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        keep = decided.pop()
        if keep is None:
            return None
        return torch.where(keep.any(-1, keepdim=True), output, output.new_zeros(()))

    hooks.pre(q, on_q)
    hooks.pre(o, on_o_input)
    hooks.post(o, on_o_output)


def _channel_hooks(hooks: HookSet, chooser: PositionMasks, layer: int, gate: nn.Linear, down: nn.Linear) -> None:
    decided: list[torch.Tensor] = []

    def on_gate(module: nn.Module, args: tuple) -> None:
        decided.append(chooser.channel_keep(layer, args[0]))  # (B, T, F)

    def on_down(module: nn.Module, args: tuple) -> tuple:
        keep = decided.pop()
        if keep.shape != args[0].shape:
            raise RuntimeError(f"layer {layer}: channels chosen {tuple(keep.shape)} for a down input "
                               f"{tuple(args[0].shape)}")
        return (args[0].masked_fill(~keep, 0), *args[1:])

    hooks.pre(gate, on_gate)
    hooks.pre(down, on_down)


@contextlib.contextmanager
def chooser_gates(handle: ModelHandle, chooser: PositionMasks) -> Iterator[None]:
    """Run `handle`'s shared model with `chooser`'s per-position heads and channels for the `with` body only."""
    g = handle.geometry
    with temporary_hooks() as hooks:
        for layer in range(g.n_layers):
            projs = handle.adapter.projections(layer)
            if chooser.chooses_heads:
                _head_hooks(hooks, chooser, layer, projs["q"], projs["o"], g.head_dim)
            _channel_hooks(hooks, chooser, layer, projs["gate"], projs["down"])
        yield
