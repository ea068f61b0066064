"""A 4-bit sketch of a weight matrix: the cheap copy a predictor reads to estimate a layer's outputs.

A per-token predictor must decide which FFN channels a token keeps *before* the channels' weights
are read, so it cannot read them itself. What it can read cheaply is a coarse copy: every weight
rounded to one of 16 levels per group of 32 inputs (asymmetric min/max quantisation, as in
GPTQ/AWQ-style weight-only int4 formats), 1/8 of the fp32 bytes. The importance network
(headlab.engine.dynamic.ipn) multiplies the token's hidden state by the sketches of the gate and up
projections to estimate |act(gate(x)) * up(x)| for every channel, the quantity the oracle ranks
by, and reads the exact weights only for the channels it keeps.

On the CPU the product runs through PyTorch's weight-only int4 kernel
(`torch.ops.aten._weight_int4pack_mm_for_cpu`, bf16 activations), which reads the packed nibbles
directly: about 5.7x less time than an fp32 mat-vec of the same matrix on one thread (measured on
this project's 2-core Xeon). Elsewhere, or when the kernel is missing, the same levels are expanded
once into a float matrix (`dequantized`) and multiplied as usual. Both paths use the same levels
(scale and offset rounded to bf16, as the kernel stores them), so they differ only by the bf16
rounding of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GROUP", "Int4Sketch", "int4_kernel_available"]

#: Inputs that share one scale and offset.
GROUP = 32
_LEVELS = 15  # 4 bits: levels 0..15


def _kernel_ops() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


_KERNEL_OK: bool | None = None


def int4_kernel_available() -> bool:
    """Whether this PyTorch build runs the CPU int4 weight-only kernel (checked once on a tiny matrix)."""
    global _KERNEL_OK
    if _KERNEL_OK is None:
        _KERNEL_OK = False
        if _kernel_ops():
            try:
                s = Int4Sketch._build(torch.randn(16, 64), pack=True)
                x = torch.randn(2, 64)
                _KERNEL_OK = bool(torch.allclose(s.matmul(x), s.matmul(x, kernel=False), rtol=0.05, atol=0.05))
            except (RuntimeError, NotImplementedError):
                _KERNEL_OK = False
    return _KERNEL_OK


@dataclass(frozen=True)
class Int4Sketch:
    """weight [N, K] rounded to 16 levels per group of GROUP inputs; `matmul(x)` ~ x @ weight.T.

    levels [N, K] uint8 (0..15); scale, low [N, K // GROUP] float32 (bf16-rounded): the weight is
    approximated by levels * scale + low. `packed` / `scale_zeros` are the CPU kernel's layout (None
    when the kernel is not used).
    """

    levels: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    packed: torch.Tensor | None
    scale_zeros: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per product: half a byte per weight, a bf16 scale and offset per group."""
        n, k = self.shape
        return n * k // 2 + 2 * 2 * n * (k // GROUP)

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int4Sketch:
        """The sketch of a Linear weight [out, in] (in a multiple of GROUP), packed for the CPU kernel when it runs."""
        return cls._build(weight, pack=weight.device.type == "cpu" and int4_kernel_available())

    @classmethod
    def _build(cls, weight: torch.Tensor, pack: bool) -> Int4Sketch:
        w = weight.detach().float()
        if w.dim() != 2:
            raise ValueError(f"a sketch needs a 2-D weight [out, in], got shape {tuple(w.shape)}")
        n, k = w.shape
        if k % GROUP:
            raise ValueError(f"a 4-bit sketch groups {GROUP} inputs; this weight has {k} inputs, not a multiple")
        g = w.view(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / _LEVELS).clamp(min=1e-8).bfloat16().float()
        low = lo.bfloat16().float()
        levels = ((g - low[..., None]) / scale[..., None]).round().clamp(0, _LEVELS).to(torch.uint8).view(n, k)
        packed = scale_zeros = None
        if pack:
            # The kernel computes (q - 8) * scale + zero, so its "zero" is low + 8 * scale; layout [K/GROUP, N, 2].
            zero = low + 8 * scale
            scale_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32).contiguous(), 1)
        return cls(levels, scale, low, packed, scale_zeros)

    def dequantized(self) -> torch.Tensor:
        """The float weight [N, K] the sketch stands for."""
        n, k = self.shape
        g = self.levels.view(n, k // GROUP, GROUP).float()
        return (g * self.scale[..., None] + self.low[..., None]).view(n, k)

    def matmul(self, x: torch.Tensor, *, kernel: bool = True) -> torch.Tensor:
        """x [..., K] @ sketch.T -> [..., N] float32 (through the int4 kernel when packed and `kernel`)."""
        n, k = self.shape
        if x.shape[-1] != k:
            raise ValueError(f"the sketch takes {k} inputs, got x of shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if kernel and self.packed is not None and x.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.bfloat16().contiguous(), self.packed, GROUP,
                                                             self.scale_zeros)
            return out.float().view(*lead, n)
        return (x2.float() @ self.dequantized().to(x.device).T).view(*lead, n)
