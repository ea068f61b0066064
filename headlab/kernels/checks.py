"""Input checks shared by both backends, with messages that say what to fix.

A Triton kernel given an out-of-range index reads foreign memory silently, so every
index is range-checked here before any backend runs (one small host sync each).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from headlab.kernels.indices import PAD_INDEX, keep_indices, pad_keep_indices

__all__ = ["check_attention", "check_group_keep", "check_keep_idx", "check_linear"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_float(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the input has {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")


def check_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_keep: torch.Tensor, kv_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate attention inputs; return head_keep [B, H] bool and kv_index [B, H] int64 (or None) on q's device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, T, head_dim], got shape {tuple(t.shape)}")
        _check_float(name, t, q.dtype, q.device)
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    Bk, Hkv, Tk, Dk = k.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(
            f"k/v [B, Hkv, T, D] = {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D"
        )
    if Hkv == 0 or (kv_index is None and H % Hkv):
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv} (GQA), "
                         f"or kv_index must say which KV head each query head reads")
    if head_keep.dtype != torch.bool:
        raise TypeError(f"head_keep must be a bool mask, got {head_keep.dtype}")
    if tuple(head_keep.shape) == (H,):
        head_keep = head_keep.expand(B, H)  # one mask for every sample
    elif tuple(head_keep.shape) != (B, H):
        raise ValueError(f"head_keep must have shape [H]=({H},) or [B, H]=({B}, {H}), got {tuple(head_keep.shape)}")
    return head_keep.to(q.device), None if kv_index is None else _check_kv_index(kv_index, B, H, Hkv, q.device)


def _check_kv_index(kv_index: torch.Tensor, B: int, H: int, Hkv: int, device: torch.device) -> torch.Tensor:
    """kv_index [H] or [B, H] of KV heads in [0, Hkv) as [B, H] int64 on device."""
    if kv_index.is_floating_point() or kv_index.is_complex() or kv_index.dtype == torch.bool:
        raise TypeError(f"kv_index must hold integer KV head indices, got {kv_index.dtype}")
    if tuple(kv_index.shape) == (H,):
        kv_index = kv_index.expand(B, H)
    elif tuple(kv_index.shape) != (B, H):
        raise ValueError(f"kv_index must have shape [H]=({H},) or [B, H]=({B}, {H}), got {tuple(kv_index.shape)}")
    kv_index = kv_index.to(device=device, dtype=torch.int64)
    if kv_index.numel() and bool(((kv_index < 0) | (kv_index >= Hkv)).any()):
        raise ValueError(f"kv_index out of range: KV heads lie in [0, {Hkv}), "
                         f"got min {int(kv_index.min())}, max {int(kv_index.max())}")
    return kv_index


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Validate a projection: weight [N_out, K_in], bias [N_out], matching dtype/device."""
    if x.dim() < 1:
        raise ValueError("x must have a feature dimension")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    _check_float("x", x, x.dtype, x.device)
    _check_float("weight", weight, x.dtype, x.device)
    if bias is not None:
        _check_float("bias", bias, x.dtype, x.device)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def check_keep_idx(keep_idx: torch.Tensor, n_features: int, device: torch.device) -> torch.Tensor:
    """Validate a keep index (int indices or bool mask) over n_features; return int64 on device."""
    if keep_idx.dim() != 1:
        raise ValueError(f"keep_idx must be 1-D, got shape {tuple(keep_idx.shape)}")
    if keep_idx.dtype == torch.bool and keep_idx.numel() != n_features:
        raise ValueError(f"bool keep mask has {keep_idx.numel()} entries for {n_features} features")
    if keep_idx.is_floating_point() or keep_idx.is_complex():
        raise TypeError(f"keep_idx must hold integer indices or bools, got {keep_idx.dtype}")
    idx = keep_indices(keep_idx).to(device)
    if idx.numel() and bool(((idx < 0) | (idx >= n_features)).any()):
        raise ValueError(
            f"keep_idx out of range: values must lie in [0, {n_features}), "
            f"got min {int(idx.min())}, max {int(idx.max())}"
        )
    return idx


def check_group_keep(
    group_keep_idx: torch.Tensor | Sequence[torch.Tensor],
    group_ids: torch.Tensor,
    n_features: int,
    n_samples: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate grouped keep indices and group ids.

    Returns (keep [G, Kmax] int64, counts [G], group_ids [B] int64), all on device.
    """
    if not isinstance(group_keep_idx, torch.Tensor) or group_keep_idx.dtype == torch.bool:
        group_keep_idx = pad_keep_indices(group_keep_idx)
    if group_keep_idx.dim() != 2 or group_keep_idx.is_floating_point():
        raise ValueError(
            f"group_keep_idx must be a [G, Kmax] integer index padded with {PAD_INDEX} "
            f"(see pad_keep_indices), got shape {tuple(group_keep_idx.shape)} and dtype {group_keep_idx.dtype}"
        )
    keep = group_keep_idx.to(device=device, dtype=torch.int64)
    valid = keep != PAD_INDEX
    if keep.numel() and bool(((keep < PAD_INDEX) | (keep >= n_features)).any()):
        raise ValueError(f"group_keep_idx out of range: values must lie in [0, {n_features}) or be {PAD_INDEX}")
    if keep.shape[1] > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError(f"group_keep_idx padding ({PAD_INDEX}) must only trail each row")
    if group_ids.dim() != 1 or group_ids.numel() != n_samples:
        raise ValueError(
            f"group_ids must have shape ({n_samples},) (one group per sample), got {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be integer, got {group_ids.dtype}")
    group_ids = group_ids.to(device=device, dtype=torch.int64)
    n_groups = keep.shape[0]
    if group_ids.numel() and bool(((group_ids < 0) | (group_ids >= n_groups)).any()):
        raise ValueError(f"group_ids out of range: values must lie in [0, {n_groups})")
    return keep, valid.sum(1), group_ids
