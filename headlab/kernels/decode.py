"""Batch-1 decode kernels' entry points: check inputs, pick a backend, run.

    gathered_ffn(x, w3, idx, *, gate_act=None, gate_bias=None, up_bias=None, activation=None,
                 backend="auto") -> [d]
        One token's gated FFN over its kept channels only. x [d]; w3 [F, 3d], per channel j its gate
        row | up row | down column (an interleaved copy of one layer); idx [k] int64, the kept
        channels, sorted; gate_act [F]: act(gate(x)) when the caller computed the gate already (then
        gate rows are not read); biases [F]; activation: None = SiLU (what the fast backends
        compute), or any callable (torch backend only).
        Returns sum over kept j of act_j * (<up_j, x> + up_bias_j) * down_j.

Backends: "triton" (headlab/kernels/gathered_ffn.py: CUDA, or the CPU under TRITON_INTERPRET=1),
"compiled" (headlab/kernels/csrc/gathered_ffn.cpp, fp32 on the CPU, when `python -m headlab.kernels.compiled`
built it), "torch" (headlab.kernels.reference.gathered_ffn, anything). "auto" picks Triton on CUDA, the
compiled kernel on the CPU when it is built, else torch; `gathered_ffn_backend` says which, and
why not the faster one, so a caller can resolve once and run many tokens through
`run_gathered_ffn` without re-checking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from headlab.kernels import reference
from headlab.kernels.backend import interpreter_enabled, triton_available
from headlab.kernels.compiled import CompiledKernelError, load_built, unavailable_reason

__all__ = ["FFNBackend", "FFNPath", "gathered_ffn", "gathered_ffn_backend", "run_gathered_ffn"]

FFNBackend = Literal["auto", "triton", "compiled", "torch"]
FFNPath = Literal["triton", "compiled", "torch"]
_BACKENDS = ("auto", "triton", "compiled", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gathered_ffn_backend(device: torch.device, dtype: torch.dtype, *, fused_activation: bool = True,
                         backend: FFNBackend = "auto") -> tuple[FFNPath, str]:
    """(the backend that will run, why) for tensors on `device` of `dtype`.

    fused_activation: whether the fast backends can compute what is asked (the gate is given, or
    the activation is SiLU); when False only torch runs it.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch", "the torch backend was asked for"
    device = torch.device(device)
    if not fused_activation:
        if backend != "auto":
            raise ValueError(f"backend={backend!r} computes SiLU only; this FFN's activation needs backend='torch'")
        return "torch", "the FFN activation is not SiLU, which the fused kernels compute"
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        if not triton_available():
            if backend == "triton":
                raise RuntimeError("backend='triton' but the triton package is not installed")
            return "torch", "triton is not installed"
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
        if dtype not in _TRITON_DTYPES:
            raise TypeError(f"the Triton decode kernel takes {_TRITON_DTYPES}, got {dtype}")
        return "triton", "Triton kernel" + (" (interpreted)" if device.type != "cuda" else "")
    # the compiled CPU kernel, asked for or picked by "auto" on the CPU
    problem = None
    if device.type != "cpu":
        problem = f"it runs on the CPU, the tensors are on {device}"
    elif dtype != torch.float32:
        problem = f"it takes float32, the weights are {dtype}"
    elif load_built() is None:
        problem = unavailable_reason() or "not built"
    if problem is None:
        return "compiled", "compiled CPU kernel"
    if backend == "compiled":
        raise CompiledKernelError(f"the compiled decode kernel cannot run: {problem}")
    return "torch", f"the compiled CPU kernel is unavailable: {problem}"


def run_gathered_ffn(
    path: FFNPath,
    x: torch.Tensor,
    w3: torch.Tensor,
    idx: torch.Tensor,
    gate_act: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """gathered_ffn on a resolved backend, inputs not checked (see `gathered_ffn`); out/scratch: reusable buffers."""
    if path == "compiled":
        out = x.new_empty(x.shape[0]) if out is None else out
        load_built().gathered_ffn(w3, x, idx, out, gate_act, gate_bias, up_bias)
        return out
    if path == "triton":
        from headlab.kernels.gathered_ffn import launch_gathered_ffn  # imports triton

        return launch_gathered_ffn(x, w3, idx.to(torch.int32), gate_act, gate_bias, up_bias).to(x.dtype)
    return reference.gathered_ffn(x, w3, idx, gate_act, gate_bias, up_bias, activation, scratch)


def _check(x: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor, vectors: dict[str, torch.Tensor | None]) -> None:
    if x.dim() != 1:
        raise ValueError(f"x must be one token's vector [d], got shape {tuple(x.shape)}")
    d = x.shape[0]
    if w3.dim() != 2 or w3.shape[1] != 3 * d:
        raise ValueError(f"w3 must be [F, 3 * d] = [F, {3 * d}] (gate | up | down per channel), got {tuple(w3.shape)}")
    if w3.dtype != x.dtype or w3.device != x.device:
        raise TypeError(f"w3 is {w3.dtype} on {w3.device}, x is {x.dtype} on {x.device}")
    if w3.stride(1) != 1 or w3.stride(0) < 3 * d:
        raise ValueError("w3 must have contiguous rows")
    if idx.dim() != 1 or idx.dtype != torch.int64 or idx.device != x.device:
        raise ValueError(f"idx must be a 1-D int64 index on {x.device}, got {tuple(idx.shape)} {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w3.shape[0]):
        raise IndexError(f"idx must lie in [0, {w3.shape[0]}), got [{int(idx.min())}, {int(idx.max())}]")
    for name, v in vectors.items():
        if v is not None and (v.shape != (w3.shape[0],) or v.device != x.device or v.dtype != x.dtype):
            raise ValueError(f"{name} must be [{w3.shape[0]}] {x.dtype} on {x.device}, got {tuple(v.shape)} "
                             f"{v.dtype} on {v.device}")


def gathered_ffn(
    x: torch.Tensor,
    w3: torch.Tensor,
    idx: torch.Tensor,
    *,
    gate_act: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backend: FFNBackend = "auto",
) -> torch.Tensor:
    """One token's gated FFN reading only the kept channels' weights (see the module docstring)."""
    _check(x, w3, idx, {"gate_act": gate_act, "gate_bias": gate_bias, "up_bias": up_bias})
    x, w3 = x.contiguous(), w3.contiguous()
    vectors = [None if v is None else v.contiguous() for v in (gate_act, gate_bias, up_bias)]
    path, _ = gathered_ffn_backend(x.device, x.dtype, fused_activation=gate_act is not None or activation is None,
                                   backend=backend)
    return run_gathered_ffn(path, x, w3, idx.contiguous(), *vectors, activation)
