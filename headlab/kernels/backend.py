"""Choosing between the Triton kernels and their pure-torch twins.

`backend="auto"` runs Triton on CUDA tensors and the torch reference elsewhere;
`"triton"` forces the kernels (on CPU only under ``TRITON_INTERPRET=1``, which must be
set before the first Triton-backed call: triton reads it when our kernels are decorated,
on that call's lazy import) and `"torch"` forces the reference. The Triton path is
forward-only, so "auto" also falls back to torch whenever autograd would need a backward.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

__all__ = ["Backend", "interpreter_enabled", "resolve_backend", "triton_available"]

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the triton package can be imported (it is never imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks triton to run kernels on the CPU with numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> Literal["triton", "torch"]:
    """Turn "auto"/"triton"/"torch" into the backend that will run these tensors."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in present)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        use_triton = on_cuda and triton_available() and not needs_grad
        return "triton" if use_triton else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' but the triton package is not installed")
    if needs_grad:
        raise RuntimeError(
            "backend='triton' is forward-only; call it under torch.no_grad() or use "
            "backend='torch' (differentiable) for inputs that require grad"
        )
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before the first "
            "Triton-backed call to run the kernels on the CPU"
        )
    return "triton"
