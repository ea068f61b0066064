"""How the kernels call `tl.dot`: fp32 accumulation, and the precision torch would use.

Imported only by the Triton kernel modules, so importing `kernels` never imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headlab.kernels.backend import interpreter_enabled

__all__ = ["SUPPORTED_DTYPES", "dot_acc", "dot_options"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Constexpr kwargs (DOT_PRECISION, DOT_UPCAST) for a kernel whose operands have `dtype`."""
    # fp32 follows torch: TF32 only where the user allowed it for matmuls, else exact IEEE,
    # so a kernel and the dense model it replaces agree to fp32 tolerance by default.
    exact_fp32 = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if exact_fp32 else "tf32"  # 16-bit operands ignore it
    # The CPU interpreter (triton 3.9) multiplies bf16 tiles as their raw uint16 bits;
    # upcasting to fp32 gives the products a GPU's bf16 tensor cores accumulate in fp32.
    upcast = interpreter_enabled() and dtype == torch.bfloat16
    return {"DOT_PRECISION": precision, "DOT_UPCAST": upcast}


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
