"""A dynamic sparsity method is a calibrated rule (Thresholds) or an importance network (IPN): one dispatch.

The app's Dynamic page and `python -m headlab dynamic-*` offer the same methods by name:

    method = calibrated(handle, "wina", 0.5)         # oracle / exact / cats / teal / wina: calibrated thresholds
    method = calibrated(handle, "ipn", 0.5)          # the importance network with no training
    method = load_method(handle, "runs/cats-50")     # a thresholds or an IPN folder, checked against the model
    method_perplexity(handle, method, protocol)      # DynamicPerplexity: perplexity + measured sparsity
    side_by_side(handle, method, ids, 48)            # dense and dynamic greedy decoding, with tokens/s
    side_by_side(handle, method, ids, 48, "int4")    # both with the FFN at 4 bits (importance networks)

CATS thresholds and importance networks decode through the path that reads only each token's kept
weights (headlab.engine.dynamic.decode.sparse_generate with their headlab.engine.dynamic.choosers Chooser); the
oracle, the exact-score rule, TEAL and WINA decode through the same loop with their hooks on the dense layers
(`decode_chooser` says why): the same tokens, every weight still read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from headlab.engine.core.errors import UnsupportedModelError
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import context_length
from headlab.engine.dynamic.apply import SparsityMeter, apply_rule
from headlab.engine.dynamic.calibrate import calibrate
from headlab.engine.dynamic.choosers import CatsChooser, Chooser, IPNChooser
from headlab.engine.dynamic.decode import Generation, decode_weight_bytes, dense_generate, sparse_generate
from headlab.engine.dynamic.int4 import int4_decode_weight_bytes, int4_generate
from headlab.engine.dynamic.int4_gathered import int4_sparse_generate
from headlab.engine.dynamic.ipn import IPN, IPNError, apply_ipn, ipn_perplexity, load_ipn, save_ipn, untrained_ipn
from headlab.engine.dynamic.ipn.store import META_FILE as IPN_META_FILE
from headlab.engine.dynamic.measure import DynamicPerplexity, dynamic_perplexity
from headlab.engine.dynamic.rules import CATS, RULES, Thresholds, get_rule
from headlab.engine.dynamic.store import META_FILE, load_thresholds, save_thresholds
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, PerplexityProtocol, prompt_ids

__all__ = [
    "METHOD_NAMES",
    "PRECISIONS",
    "DynamicMethod",
    "SideBySide",
    "applied",
    "calibrated",
    "decode_chooser",
    "dynamic_refusal",
    "load_method",
    "method_label",
    "method_name",
    "method_perplexity",
    "prompt_room",
    "save_method",
    "side_by_side",
]

DynamicMethod = Thresholds | IPN

#: What `calibrated` builds by name: the training-free rules, then the untrained importance network.
METHOD_NAMES = (*RULES, "ipn")


def dynamic_refusal(handle: ModelHandle) -> str | None:
    """Why `handle`'s model cannot run per-token FFN sparsity (None when it can): a causal LM with a gated FFN."""
    if not handle.is_causal_lm:
        return f"{handle.name} is an encoder without an LM head: per-token sparsity is measured by perplexity"
    try:
        handle.adapter.projections(0)
        handle.adapter.ffn_activation(0)
    except UnsupportedModelError as e:
        return str(e)
    return None


def method_name(method: DynamicMethod) -> str:
    """"oracle", "exact", "cats", "teal", "wina", "teal-ffn", "wina-ffn" or "ipn"."""
    return "ipn" if isinstance(method, IPN) else get_rule(method.rule).name


def method_label(method: DynamicMethod) -> str:
    """The name and target sparsity, e.g. "cats 50%"."""
    target = method.target
    return method_name(method) if target is None else f"{method_name(method)} {target:.0%}"


def calibrated(handle: ModelHandle, name: str, target: float, ids: torch.Tensor | None = None) -> DynamicMethod:
    """Method `name` (METHOD_NAMES) set to `target` FFN sparsity without training, calibrated on `ids` [B, T]."""
    if name == "ipn":
        return untrained_ipn(handle, target, ids)
    return calibrate(handle, name, target, ids)


@contextlib.contextmanager
def applied(handle: ModelHandle, method: DynamicMethod, meter: SparsityMeter | None = None) -> Iterator[SparsityMeter]:
    """Run the shared model under `method` for the body of the `with` only (thread-scoped hooks)."""
    context = apply_ipn(handle, method, meter) if isinstance(method, IPN) else apply_rule(handle, method, meter)
    with context as m:
        yield m


def method_perplexity(handle: ModelHandle, method: DynamicMethod, protocol: PerplexityProtocol = DEFAULT_PROTOCOL,
                      *, progress: Progress | None = None) -> DynamicPerplexity:
    """Perplexity under `method` on `protocol`, with the sparsity it reached on those tokens."""
    if isinstance(method, IPN):
        return ipn_perplexity(handle, method, protocol, progress=progress)
    return dynamic_perplexity(handle, method.rule, method, protocol, progress=progress)


_NO_DECODE_PATH = {
    "oracle": "the oracle ranks channels by act(gate(x)) * up(x), so it reads every up row before it can choose",
    "exact": "the exact rule thresholds act(gate(x)) * up(x), so it reads every up row before it can choose",
    "teal": "TEAL zeroes entries of every matrix's input, not FFN channels",
    "wina": "WINA zeroes entries of every matrix's input, not FFN channels",
    "teal-ffn": "TEAL on the FFN zeroes entries of the gate/up input, not only FFN channels",
    "wina-ffn": "WINA on the FFN zeroes entries of the gate/up input, not only FFN channels",
}


def decode_chooser(handle: ModelHandle, method: DynamicMethod) -> tuple[Chooser | None, str | None]:
    """The chooser that decodes `method` reading only the kept weights (CATS, an IPN), or (None, why there is none)."""
    if isinstance(method, IPN):
        try:
            return IPNChooser(handle, method), None
        except IPNError as e:  # e.g. LoRA terms the decode path does not compute
            return None, str(e)
    name = get_rule(method.rule).name
    if get_rule(name) is CATS:
        return CatsChooser(handle, method), None
    return None, _NO_DECODE_PATH.get(name, f"{name} has no decode path")


@dataclass(frozen=True)
class SideBySide:
    """Dense and dynamic greedy continuations of one prompt, decoded by the same batch-1 loop.

    sparse_decode: the dynamic run read only the kept weights (headlab.engine.dynamic.decode.sparse_generate);
    otherwise it ran with the method's hooks on the dense layers (same tokens, every weight read) and
    `note` says why. ideal_speedup: weight bytes per token, dense over dynamic (None without sparse decoding).
    """

    dense: Generation
    dynamic: Generation
    sparse_decode: bool
    note: str | None = None
    ideal_speedup: float | None = None

    @property
    def speedup(self) -> float:
        """Dynamic over dense decoded tokens per second."""
        return self.dynamic.decode_tokens_per_s / self.dense.decode_tokens_per_s

    @property
    def same_tokens(self) -> int:
        """How many leading new tokens the two continuations share."""
        a, b = self.dense.new_tokens, self.dynamic.new_tokens
        diff = (a != b).nonzero()
        return int(diff[0]) if diff.numel() else int(a.numel())


def prompt_room(handle: ModelHandle, prompt: str, max_new_tokens: int, *, chat: bool = True) -> torch.Tensor:
    """[1, T] ids of `prompt` (chat template when `chat`), cut on the left so `max_new_tokens` more fit the context."""
    ids = prompt_ids(handle, prompt, chat)
    limit = context_length(handle.model)
    if max_new_tokens >= limit:
        raise ValueError(f"{max_new_tokens} new tokens do not fit the model's context of {limit} tokens")
    return ids[:, -(limit - max_new_tokens):]


PRECISIONS = ("float32", "int4")


def side_by_side(handle: ModelHandle, method: DynamicMethod, ids: torch.Tensor, max_new_tokens: int,
                 precision: str = "float32") -> SideBySide:
    """Greedy continuations of ids [1, T] by `max_new_tokens` tokens, dense then under `method`, each timed.

    precision "int4": both read the FFN at 4 bits (16 levels per group of 32, the shipped SmolLM2's own format):
    dense through `int4_generate`, the method through `int4_sparse_generate` (importance networks only: the
    other rules decide from the float gate or from hooks on the dense layers).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    int4 = precision == "int4"
    chooser, why = decode_chooser(handle, method)
    if int4 and (chooser is None or chooser.computes_gate):
        raise ValueError(f"decoding at 4 bits runs importance networks only; {method_label(method)} "
                         f"{'decides from the float gate' if chooser is not None else 'has no sparse decode'}: "
                         "use float32")
    if int4 and handle.device.type != "cpu":
        raise ValueError(f"decoding at 4 bits runs on the CPU; the model is on {handle.device}")
    dense_gen, sparse_gen = (int4_generate, int4_sparse_generate) if int4 else (dense_generate, sparse_generate)
    dense = dense_gen(handle, ids, max_new_tokens)
    if chooser is None:
        with applied(handle, method):  # the decode loop calls the layers' modules, so the method's hooks fire
            return SideBySide(dense, dense_generate(handle, ids, max_new_tokens), False, why)
    out = sparse_gen(handle, ids, chooser, max_new_tokens)
    ideal = None
    if out.kept is not None and out.decoded > 0:
        if int4:  # the 4-bit byte count covers the FFN channels only (kept heads are not counted there)
            ideal = int4_decode_weight_bytes(handle) / int4_decode_weight_bytes(handle, out.kept, chooser=chooser)
        else:
            ideal = decode_weight_bytes(handle) / decode_weight_bytes(handle, out.kept, out.heads, chooser=chooser)
    return SideBySide(dense, out, True, None, ideal)


def save_method(handle: ModelHandle, method: DynamicMethod, folder: str | os.PathLike,
                meta: dict | None = None) -> Path:
    """Write `method` to `folder` (safetensors + JSON naming the model and its weights' sha256; `meta` beside)."""
    if isinstance(method, IPN):
        return save_ipn(handle, method, folder, meta)
    if meta:
        method = Thresholds(method.rule, method.values, method.target, {**method.meta, **meta})
    return save_thresholds(handle, method, folder)


def load_method(handle: ModelHandle, folder: str | os.PathLike) -> DynamicMethod:
    """The thresholds or importance network saved in `folder`, refused unless made for `handle`'s model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the folder written by dynamic-calibrate, "
                                f"dynamic-train or the app")
    if (folder / META_FILE).exists():
        return load_thresholds(handle, folder)
    if (folder / IPN_META_FILE).exists():
        return load_ipn(handle, folder)
    raise IPNError(f"{folder} holds neither calibrated thresholds ({META_FILE}) nor an importance network "
                   f"({IPN_META_FILE})")
