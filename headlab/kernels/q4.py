"""The 4-bit channel-major FFN layout a sparse decode reads, and its torch twin.

A gated FFN whose weights are 16 levels per group of 32 inputs (level * scale + offset, the shipped
SmolLM2's own Q4_1 format) is stored per layer as three tensors (see csrc/gathered_ffn.cpp):

    q3  uint8 [F, 3d/2]       channel j's gate row | up row | down column, two levels a byte
    sm  bf16  [F, 4 * d/32]   per group of the channel's rows: gate scales | gate offsets | up scales | up offsets
    dsm bf16  [F/32, 2, d]    the down projection's scales and offsets (its groups run along the channels)

In each group of 32 levels, byte i holds level i in its low nibble and level i + 16 in its high one,
so a group's bytes meet 32 consecutive inputs in order. A token that keeps channels idx reads their
runs of q3 and sm only, plus the dsm rows of the blocks of 32 channels it touches: the 4-bit twin of
the float32 interleaved copy (headlab.kernels.reference.gathered_ffn).

    q3, sm, dsm = pack_q4_ffn(gate_levels, gate_scale, gate_offset, up_..., down_levels, down_scale, down_offset)
    out = gathered_ffn_q4(x, q3, sm, dsm, idx)            # the torch twin
    run_gathered_ffn_q4("compiled", x, q3, sm, dsm, idx, scratch=..., out=...)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from headlab.kernels.compiled import CompiledKernelError, load_built, unavailable_reason

__all__ = ["GROUP", "Q4Path", "gathered_ffn_q4", "pack_levels", "pack_q4_ffn", "q4_backend", "run_gathered_ffn_q4",
           "unpack_levels"]

#: Inputs sharing one scale and offset.
GROUP = 32
Q4Path = str  # "compiled" or "torch"


def pack_levels(levels: torch.Tensor) -> torch.Tensor:
    """levels [N, K] (0..15, K a multiple of 32) -> uint8 [N, K/2]: per group, byte i = level i | level i+16 << 4."""
    n, k = levels.shape
    if k % GROUP:
        raise ValueError(f"4-bit rows group {GROUP} values; got rows of {k}")
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > 15):
        raise ValueError("levels must lie in 0..15")
    g = levels.to(torch.uint8).view(n, k // GROUP, 2, GROUP // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_levels(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_levels: uint8 [N, K/2] -> levels [N, K] uint8."""
    n, half = packed.shape
    g = packed.view(n, half // (GROUP // 2), GROUP // 2)
    return torch.stack([g & 15, g >> 4], dim=2).reshape(n, 2 * half)


def pack_q4_ffn(gate_levels: torch.Tensor, gate_scale: torch.Tensor, gate_offset: torch.Tensor,
                up_levels: torch.Tensor, up_scale: torch.Tensor, up_offset: torch.Tensor,
                down_levels: torch.Tensor, down_scale: torch.Tensor, down_offset: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q3, sm, dsm) of one layer from its projections' levels [out, in] and per-group scales/offsets [out, in/32].

    gate/up: [F, d] levels, [F, d/32] scales; down: [d, F] levels, [d, F/32] scales (groups along F).
    Scales and offsets are stored as bf16 (exact when they are bf16-rounded already, as Int4Sketch's are).
    """
    f, d = gate_levels.shape
    if up_levels.shape != (f, d) or down_levels.shape != (d, f):
        raise ValueError(f"gate/up levels must be [F, d] and down [d, F]; got {tuple(gate_levels.shape)}, "
                         f"{tuple(up_levels.shape)}, {tuple(down_levels.shape)}")
    if d % GROUP or f % GROUP:
        raise ValueError(f"the 4-bit layout needs d and F multiples of {GROUP}; got d={d}, F={f}")
    q3 = torch.cat([pack_levels(gate_levels), pack_levels(up_levels), pack_levels(down_levels.t())], dim=1)
    sm = torch.cat([gate_scale, gate_offset, up_scale, up_offset], dim=1).to(torch.bfloat16).contiguous()
    dsm = torch.stack([down_scale.t(), down_offset.t()], dim=1).to(torch.bfloat16).contiguous()  # [F/32, 2, d]
    return q3.contiguous(), sm, dsm


def _rows(levels: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Float rows [k, K] from levels [k, K] and per-group scale/offset [k, K/32]."""
    k, width = levels.shape
    g = levels.view(k, width // GROUP, GROUP).float()
    return (g * scale.float()[..., None] + offset.float()[..., None]).view(k, width)


def gathered_ffn_q4(x: torch.Tensor, q3: torch.Tensor, sm: torch.Tensor, dsm: torch.Tensor, idx: torch.Tensor,
                    gate_act: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                    up_bias: torch.Tensor | None = None,
                    activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One token's gated FFN over kept channels idx [k] of the 4-bit layout, in float32 (the kernel's twin).

    h_j = act_j * (<up_j, x> + up_bias_j), act_j = gate_act[j] or activation(<gate_j, x> + gate_bias_j) (SiLU
    when None); returns sum_j h_j * down_j [d]. Only the kept channels' levels are expanded.
    """
    d = x.shape[0]
    groups = d // GROUP
    levels = unpack_levels(q3.index_select(0, idx))  # [k, 3d]
    s = sm.index_select(0, idx).float()
    up = _rows(levels[:, d: 2 * d], s[:, 2 * groups: 3 * groups], s[:, 3 * groups:]) @ x.float()
    if up_bias is not None:
        up = up + up_bias.index_select(0, idx)
    if gate_act is not None:
        act = gate_act.index_select(0, idx)
    else:
        g = _rows(levels[:, :d], s[:, :groups], s[:, groups: 2 * groups]) @ x.float()
        if gate_bias is not None:
            g = g + gate_bias.index_select(0, idx)
        act = (F.silu if activation is None else activation)(g)
    block = dsm.index_select(0, idx // GROUP).float()  # [k, 2, d]
    down = levels[:, 2 * d:].float() * block[:, 0] + block[:, 1]  # channel j's down column [k, d]
    return (act * up) @ down


def q4_backend(backend: str = "auto") -> tuple[Q4Path, str]:
    """(the path the 4-bit decode FFN runs on, why): the compiled CPU kernel when built, else the torch twin."""
    if backend not in ("auto", "compiled", "torch"):
        raise ValueError(f"the 4-bit FFN runs on 'auto', 'compiled' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch", "the torch backend was asked for"
    module = load_built()
    if module is not None and hasattr(module, "gathered_ffn_q4"):
        return "compiled", "compiled CPU kernel"
    why = unavailable_reason() or "the built kernel predates its 4-bit entry point (run `make setup` again)"
    if backend == "compiled":
        raise CompiledKernelError(f"the compiled 4-bit decode kernel cannot run: {why}")
    return "torch", f"the compiled CPU kernel is unavailable: {why}"


def run_gathered_ffn_q4(path: Q4Path, x: torch.Tensor, q3: torch.Tensor, sm: torch.Tensor, dsm: torch.Tensor,
                        idx: torch.Tensor, gate_act: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
                        up_bias: torch.Tensor | None = None,
                        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        scratch: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """gathered_ffn_q4 on a resolved path; idx sorted and in range (the compiled kernel checks, the twin indexes)."""
    if path == "compiled" and activation is None:
        d = x.shape[0]
        out = x.new_empty(d) if out is None else out
        scratch = x.new_empty(d + d // GROUP) if scratch is None else scratch
        load_built().gathered_ffn_q4(q3, sm, dsm, x, idx, out, scratch, gate_act, gate_bias, up_bias)
        return out
    return gathered_ffn_q4(x, q3, sm, dsm, idx, gate_act, gate_bias, up_bias, activation)
