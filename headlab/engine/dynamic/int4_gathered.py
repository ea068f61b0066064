"""A sparse decode that reads its kept channels at 4 bits: the like-for-like rival of dense int4 decoding.

The shipped SmolLM2 is stored at 4 bits; its dense int4 decode (headlab.engine.dynamic.int4) multiplies
every FFN matrix at 16 levels per group of 32 inputs. This is the same FFN, the very same levels, scales
and offsets, laid out channel-major (headlab.kernels.q4): channel j's gate row, up row and down column
side by side at half a byte a weight, so a token that keeps channels idx reads exactly their runs, and the
down projection's per-group scales once per block of 32 channels it touches. The compiled CPU kernel
(csrc/gathered_ffn.cpp, `gathered_ffn_q4`, built by `make setup`) runs it; without a build the torch twin
does (correct, not fast), and `Generation.ffn_path` says which.

    gen = int4_sparse_generate(handle, ids, IPNChooser(handle, ipn), 128)

With every channel kept it computes what `int4_generate`'s FFN computes (up to float summation order).
The chooser is unchanged: an importance network reads its own 4-bit sketches; CATS computes the gate
with the model's float weights (so at 4 bits it would read more than it needs: use it at float32).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.choosers import ChannelChoice, Chooser
from headlab.engine.dynamic.decode import Generation, sparse_generate
from headlab.engine.dynamic.gathered import is_silu
from headlab.engine.dynamic.int4 import int4_ffn
from headlab.engine.dynamic.rules import Thresholds
from headlab.kernels.q4 import GROUP, pack_q4_ffn, q4_backend, run_gathered_ffn_q4

__all__ = ["Int4GatheredFFN", "Int4InterleavedFFN", "int4_interleaved_ffn", "int4_sparse_generate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int4InterleavedFFN:
    """One layer's FFN in the 4-bit channel-major layout (q3, sm, dsm: headlab.kernels.q4), plus its float biases."""

    q3: torch.Tensor
    sm: torch.Tensor
    dsm: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    silu: bool
    sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole layer's layout (a token keeping every channel reads all of it)."""
        return sum(t.numel() * t.element_size() for t in (self.q3, self.sm, self.dsm))


_PREPARED: weakref.WeakKeyDictionary[nn.Module, list[Int4InterleavedFFN]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def int4_interleaved_ffn(handle: ModelHandle) -> list[Int4InterleavedFFN]:
    """Every layer's 4-bit channel-major FFN, packed once per model from `int4_ffn`'s levels, then reused."""
    g = handle.geometry
    if g.hidden % GROUP or g.ffn_dim % GROUP:
        raise ValueError(f"the 4-bit decode layout needs hidden and FFN sizes that are multiples of {GROUP}; "
                         f"{handle.name} has {g.hidden} and {g.ffn_dim}")
    layers = int4_ffn(handle)
    with _LOCK:
        prepared = _PREPARED.get(handle.model)
        if prepared is not None and len(prepared) == len(layers) and all(
                a is b for p, q in zip(prepared, layers) for a, b in zip(p.sources, q.sources)):
            return prepared
        prepared = []
        for q in layers:
            q3, sm, dsm = pack_q4_ffn(q.gate.levels, q.gate.scale, q.gate.low, q.up.levels, q.up.scale, q.up.low,
                                      q.down.levels, q.down.scale, q.down.low)
            prepared.append(Int4InterleavedFFN(q3, sm, dsm, q.gate_bias, q.up_bias, q.down_bias, q.act,
                                               is_silu(q.act), q.sources))
        _PREPARED[handle.model] = prepared
        return prepared


_NOTICES: set[str] = set()


class Int4GatheredFFN:
    """One decode's FFN at 4 bits over each token's kept channels (a decode.FFNRunner)."""

    def __init__(self, handle: ModelHandle, gate_given: bool, backend: str = "auto"):
        self.layers = int4_interleaved_ffn(handle)
        fused = gate_given or all(layer.silu for layer in self.layers)
        path, why = q4_backend(backend) if fused else ("torch", "the FFN activation is not SiLU")
        self.path = f"int4 {path}"
        message = f"4-bit sparse decode FFN on {handle.name}: {path} path ({why})"
        if message not in _NOTICES:
            _NOTICES.add(message)
            log.warning(message)
        d = handle.geometry.hidden
        self._out = torch.empty(d)
        self._scratch = torch.empty(d + d // GROUP)

    def __call__(self, layer: int, x: torch.Tensor, choice: ChannelChoice) -> torch.Tensor:
        """The FFN output [d] for one token's FFN input x [d] and its kept channels (down bias included)."""
        w = self.layers[layer]
        out = run_gathered_ffn_q4(
            self.path.removeprefix("int4 "), x.float().contiguous(), w.q3, w.sm, w.dsm, choice.idx,
            gate_act=choice.gate_act, gate_bias=None if choice.gate_act is not None else w.gate_bias,
            up_bias=w.up_bias, activation=None if w.silu else w.act, scratch=self._scratch, out=self._out)
        out = out if w.down_bias is None else out + w.down_bias
        return out.to(x.dtype)


def int4_sparse_generate(handle: ModelHandle, ids: torch.Tensor, chooser: Chooser | Thresholds, max_new_tokens: int,
                         *, backend: str = "auto") -> Generation:
    """`sparse_generate` with each decoded token's kept FFN channels read at 4 bits (the prefill as there).

    `backend`: "auto" (the compiled kernel when built, else the torch twin), "compiled" or "torch".
    """
    if handle.device.type != "cpu":
        raise ValueError(f"the 4-bit sparse decode runs on the CPU; {handle.name} is on {handle.device}")
    gate_given = chooser.computes_gate if isinstance(chooser, Chooser) else True
    runner = Int4GatheredFFN(handle, gate_given, backend)
    return sparse_generate(handle, ids, chooser, max_new_tokens, ffn_runner=runner)
