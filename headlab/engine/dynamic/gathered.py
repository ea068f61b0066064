"""A decoded token's FFN over its kept channels only, from an interleaved channel-major copy of each layer.

Per layer, one copy w3 [F, 3d] holds channel j's gate row, up row and down column side by side
(one contiguous run of 3d weights, ~7 KB for a 576-wide model), made once per model on first use
and kept beside it (a WeakKeyDictionary: it goes with the model; the model itself is never
changed). A token that keeps channels idx then reads exactly |idx| such runs:

- when the chooser did not compute the gate (an importance network): gate, up and down of each
  kept channel, h_j = act(<gate_j, x>) * <up_j, x>, out = sum_j h_j * down_j;
- when it did (CATS, which needs |act(gate(x))| for every channel to decide): up and down only.

`GatheredFFN` picks the backend once per decode (headlab.kernels.decode.gathered_ffn_backend): Triton on
CUDA; on the CPU the compiled kernel when `make setup` built it (four channels in lockstep, about
the dense mat-vec's bandwidth on the rows it reads), else the torch twin (kept rows gathered a
block at a time into a cache-sized scratch and multiplied there, which runs at about half that
bandwidth: the gather writes what it reads). The fused kernels compute SiLU; an FFN with another
activation runs the torch twin whenever the gate is not given, and says so.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.choosers import ChannelChoice
from headlab.kernels.decode import FFNBackend, FFNPath, gathered_ffn_backend, run_gathered_ffn
from headlab.kernels.reference import GATHER_ROWS

__all__ = ["GatheredFFN", "InterleavedFFN", "interleaved_ffn", "is_silu"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterleavedFFN:
    """One layer's gated FFN as w3 [F, 3d] (gate row | up row | down column per channel), plus its biases."""

    w3: torch.Tensor
    gate_bias: torch.Tensor | None  # [F]
    up_bias: torch.Tensor | None  # [F]
    down_bias: torch.Tensor | None  # [d]
    act: Callable[[torch.Tensor], torch.Tensor]
    silu: bool
    sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the gate/up/down weights it was copied from


_PROBE = torch.linspace(-12.0, 12.0, 97)


def is_silu(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether `act` is SiLU (x * sigmoid(x)), the activation the fused kernels compute: by type and by value."""
    known = act is F.silu or isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")
    if not known:
        return False
    with torch.no_grad():
        return bool(torch.allclose(act(_PROBE), F.silu(_PROBE), rtol=1e-6, atol=1e-7))


_PREPARED: weakref.WeakKeyDictionary[nn.Module, list[InterleavedFFN]] = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _current(prepared: list[InterleavedFFN], handle: ModelHandle) -> bool:
    """Whether each copy still stands for the model's own weights (a replaced weight invalidates it)."""
    for layer, p in enumerate(prepared):
        proj = handle.adapter.projections(layer)
        if any(a is not b.weight for a, b in zip(p.sources, (proj["gate"], proj["up"], proj["down"]))):
            return False
    return True


def interleaved_ffn(handle: ModelHandle) -> list[InterleavedFFN]:
    """The per-layer interleaved FFN copies of `handle`'s model: made once per model, then reused."""
    adapter, model = handle.adapter, handle.model
    with _PREPARED_LOCK:
        prepared = _PREPARED.get(model)
        if prepared is not None and len(prepared) == handle.geometry.n_layers and _current(prepared, handle):
            return prepared
        prepared = []
        with torch.no_grad():
            for layer in range(handle.geometry.n_layers):
                proj = adapter.projections(layer)
                gate, up, down = proj["gate"], proj["up"], proj["down"]
                w3 = torch.cat([gate.weight, up.weight, down.weight.t()], dim=1).contiguous()  # (F, 3d)
                act = adapter.ffn_activation(layer)
                prepared.append(InterleavedFFN(
                    w3=w3, gate_bias=_detached(gate.bias), up_bias=_detached(up.bias), down_bias=_detached(down.bias),
                    act=act, silu=is_silu(act), sources=(gate.weight, up.weight, down.weight)))
        _PREPARED[model] = prepared
        return prepared


_NOTICES: set[str] = set()


def _notice(message: str) -> None:
    """Say once per process which FFN path decoding runs."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        log.warning(message)


class GatheredFFN:
    """One decode's FFN: the interleaved layers, the backend resolved once, and this call's own buffers.

    `gate_given`: the chooser returns act(gate(x)) (CATS), so only up rows and down columns are read.
    """

    def __init__(self, handle: ModelHandle, gate_given: bool, backend: FFNBackend = "auto"):
        self.layers = interleaved_ffn(handle)
        first = self.layers[0].w3
        fused = gate_given or all(layer.silu for layer in self.layers)
        self.path: FFNPath
        self.path, why = gathered_ffn_backend(first.device, first.dtype, fused_activation=fused, backend=backend)
        _notice(f"sparse decode FFN on {handle.name}: {self.path} path ({why})")
        self.gate_given = gate_given
        d = first.shape[1] // 3
        self._out = first.new_empty(d)
        self._scratch = first.new_empty(GATHER_ROWS * 3 * d) if self.path == "torch" else None

    def __call__(self, layer: int, x: torch.Tensor, choice: ChannelChoice) -> torch.Tensor:
        """The FFN output [d] for one token's FFN input x [d] and its kept channels (down bias included)."""
        w = self.layers[layer]
        out = run_gathered_ffn(
            self.path, x, w.w3, choice.idx, gate_act=choice.gate_act,
            gate_bias=None if choice.gate_act is not None else w.gate_bias, up_bias=w.up_bias,
            activation=None if w.silu else w.act, scratch=self._scratch, out=self._out)
        return out if w.down_bias is None else out + w.down_bias
