"""Native-precision decode: the FFN's weights at 4 bits, the precision the shipped models are stored at.

The shipped SmolLM2 is a Q4_1 model that HeadLab dequantises to float32; a user runs it at 4 bits (llama.cpp
reads the file as it is), so a decode speed-up over float32 says little about what sparsity buys there. Here
every FFN matrix of every layer is quantised to 16 levels per group of 32 inputs (headlab.engine.dynamic.sketch's
format: the SmolLM2 gate/up/down weights already lie on such a grid, so this is their own precision, up to the
bf16 rounding of each group's scale and offset) and multiplied by PyTorch's CPU weight-only int4 kernel
(`torch.ops.aten._weight_int4pack_mm_for_cpu`, bf16 activations) when it runs on this machine, else expanded to
float32 on every call (`path` says which: "int4 kernel" or "int4 dequantise-per-call", a fallback that reads
4-bit storage but runs slower than float32). Attention, embeddings and the LM head stay float32.

    out = int4_generate(handle, ids, 128)       # dense decode, FFN at 4 bits (prefill too)
    int4_decode_weight_bytes(handle)            # weight bytes a token reads that way
    int4_decode_weight_bytes(handle, kept, chooser=IPNChooser(handle, ipn))   # a sparse decode's ideal at 4 bits

A sparse decode whose kept rows are read at 4 bits is headlab.engine.dynamic.int4_gathered: the same levels in a
channel-major layout and its own compiled kernel (PyTorch's packed layout is blocked over rows, and a kept
channel's down column crosses every group of 32 of the down projection's rows). `int4_decode_weight_bytes`
gives what it reads, i.e. its ideal speed-up.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.dynamic.choosers import Chooser, tensor_bytes
from headlab.engine.dynamic.decode import Generation, check_prompt, decode_weight_bytes
from headlab.engine.dynamic.sketch import Int4Sketch, int4_kernel_available

__all__ = ["INT4_DEQUANTISE", "INT4_KERNEL", "Int4FFNLayer", "int4_decode_weight_bytes", "int4_ffn",
           "int4_generate", "int4_path"]

INT4_KERNEL, INT4_DEQUANTISE = "int4 kernel", "int4 dequantise-per-call"


def int4_path() -> str:
    """How the int4 FFN runs here: through PyTorch's CPU int4 kernel, or expanded to float32 on every call."""
    return INT4_KERNEL if int4_kernel_available() else INT4_DEQUANTISE


@dataclass(frozen=True)
class Int4FFNLayer:
    """One layer's gated FFN with gate, up and down at 4 bits (16 levels per group of 32 inputs), biases float."""

    gate: Int4Sketch
    up: Int4Sketch
    down: Int4Sketch
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the float weights it was quantised from

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) for x [..., d], every product at 4 bits; float32 out."""
        g, u = self.gate.matmul(x), self.up.matmul(x)
        if self.gate_bias is not None:
            g = g + self.gate_bias
        if self.up_bias is not None:
            u = u + self.up_bias
        out = self.down.matmul(self.act(g) * u)
        return out if self.down_bias is None else out + self.down_bias

    @property
    def nbytes(self) -> int:
        """Bytes one token reads: the three matrices at 4 bits with their bf16 scales and offsets, and the biases."""
        return (self.gate.nbytes + self.up.nbytes + self.down.nbytes + tensor_bytes(self.gate_bias)
                + tensor_bytes(self.up_bias) + tensor_bytes(self.down_bias))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float gate, up and down weights the layer stands for."""
        return self.gate.dequantized(), self.up.dequantized(), self.down.dequantized()


_PREPARED: weakref.WeakKeyDictionary[nn.Module, list[Int4FFNLayer]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def int4_ffn(handle: ModelHandle) -> list[Int4FFNLayer]:
    """Every layer's FFN at 4 bits: quantised once per model (and again if a weight is replaced), then reused."""
    adapter, model = handle.adapter, handle.model
    with _LOCK:
        prepared = _PREPARED.get(model)
        if prepared is not None and len(prepared) == handle.geometry.n_layers and all(
                a is b.weight for layer, p in enumerate(prepared)
                for a, b in zip(p.sources, (adapter.projections(layer)[r] for r in ("gate", "up", "down")))):
            return prepared
        prepared = []
        with torch.no_grad():
            for layer in range(handle.geometry.n_layers):
                p = adapter.projections(layer)
                gate, up, down = p["gate"], p["up"], p["down"]
                prepared.append(Int4FFNLayer(
                    Int4Sketch.of(gate.weight), Int4Sketch.of(up.weight), Int4Sketch.of(down.weight),
                    _detached(gate.bias), _detached(up.bias), _detached(down.bias), adapter.ffn_activation(layer),
                    (gate.weight, up.weight, down.weight)))
        _PREPARED[model] = prepared
        return prepared


@torch.no_grad()
def int4_generate(handle: ModelHandle, ids: torch.Tensor, max_new_tokens: int) -> Generation:
    """Greedy continuation of ids [1, T] by `max_new_tokens` tokens with every FFN at 4 bits (the prefill too);
    the dense float32 decode loop otherwise. Generation.ffn_path says how the int4 products ran (int4_path)."""
    check_prompt(handle, ids, max_new_tokens)
    layers = int4_ffn(handle)
    adapter = handle.adapter
    ids = ids.to(handle.device)
    cache = adapter.decode_cache()
    t0 = time.perf_counter()
    with temporary_hooks() as hooks:  # the prefill: each FFN's output replaced by its 4-bit twin's
        inputs: dict[int, torch.Tensor] = {}
        for layer in range(handle.geometry.n_layers):
            p = adapter.projections(layer)
            hooks.pre(p["gate"], lambda m, a, layer=layer: inputs.__setitem__(layer, a[0]))
            hooks.post(p["down"], lambda m, a, out, layer=layer: layers[layer](inputs.pop(layer)).to(out.dtype))
        logits = handle.model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
    t1 = time.perf_counter()

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        return layers[layer](h).to(h.dtype)

    all_logits, tokens = [logits], [logits.argmax(-1)]
    for position in range(ids.shape[1], ids.shape[1] + max_new_tokens - 1):
        logits = adapter.decode_token(tokens[-1][:, None], position, cache, ffn)
        all_logits.append(logits)
        tokens.append(logits.argmax(-1))
    t2 = time.perf_counter()
    out = torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)
    return Generation(out, torch.cat(all_logits).float().cpu(), None, t1 - t0, t2 - t1, ffn_path=int4_path())


def int4_decode_weight_bytes(handle: ModelHandle, kept: torch.Tensor | None = None, *,
                             chooser: Chooser | None = None) -> float:
    """Weight bytes a decoded token reads with every FFN at 4 bits (decode_weight_bytes otherwise).

    kept [n, n_layers]: a sparse decode's FFN channels per token and layer; each layer then reads its mean kept
    count of channels at 4 bits (gate row, up row and down column, each with its groups' scale and offset; the
    gate row not when the chooser computed the gate) plus what the chooser reads itself: an importance network
    its predictor_bytes (its sketches are 4-bit already), a chooser that computes the gate (CATS; chooser None
    too) the whole gate at 4 bits.
    """
    adapter, g = handle.adapter, handle.geometry
    layers = int4_ffn(handle)
    total = decode_weight_bytes(handle)
    computes_gate = True if chooser is None else chooser.computes_gate
    for layer, q in enumerate(layers):
        p = adapter.projections(layer)
        total -= sum(tensor_bytes(p[r].weight) + tensor_bytes(p[r].bias) for r in ("gate", "up", "down"))
        if kept is None:
            total += q.nbytes
            continue
        gate = q.gate.nbytes + tensor_bytes(q.gate_bias)
        up_down = q.up.nbytes + tensor_bytes(q.up_bias) + q.down.nbytes  # a down column: d/32 groups, as a row
        per_channel = (up_down + (0 if computes_gate else gate)) / g.ffn_dim
        total += float(kept[:, layer].float().mean()) * per_channel + tensor_bytes(q.down_bias)
        if computes_gate:  # CATS decides from the whole gate: at 4 bits here, not its float32 predictor_bytes
            total += gate
    if kept is not None and not computes_gate:
        total += chooser.predictor_bytes(handle)
    return total
