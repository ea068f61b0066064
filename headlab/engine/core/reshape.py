"""Primitives that physically reshape modules: slice a projection, add a bias, stand in for a removed sub-block.

They mutate the module they are given, so they are only ever called on a private deep copy
of a model (headlab.engine.export.surgery) or on a freshly built one (headlab.engine.models.pruned), never on a
shared model. Family adapters combine them; nothing here knows module names.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["slice_out_", "slice_in_", "set_weight_", "add_bias_", "GatheredHeads", "RemovedSubBlock", "is_removed"]


def _index(keep: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.long,
                           device=device)


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D stores its weight as [in, out] and names its output size `nf`.
    return hasattr(module, "nf") and not isinstance(module, nn.Linear)


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=False)


def slice_out_(module: nn.Module, keep: Sequence[int] | torch.Tensor) -> None:
    """Keep only the output features `keep` (in that order, repeats allowed), bias included."""
    idx = _index(keep, module.weight.device)
    conv = _is_conv1d(module)
    _set_weight(module, module.weight.detach().index_select(1 if conv else 0, idx))
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach().index_select(0, idx).contiguous(), requires_grad=False)
    if conv:
        module.nf = len(idx)
    else:
        module.out_features = len(idx)


def slice_in_(module: nn.Module, keep: Sequence[int] | torch.Tensor) -> None:
    """Keep only the input features `keep`; the bias (an output quantity) is unchanged."""
    idx = _index(keep, module.weight.device)
    conv = _is_conv1d(module)
    _set_weight(module, module.weight.detach().index_select(0 if conv else 1, idx))
    if not conv:
        module.in_features = len(idx)


def set_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the module's weight by `weight` given in [out, in] orientation, of the same shape it has."""
    conv = _is_conv1d(module)
    w = weight.detach().to(device=module.weight.device, dtype=module.weight.dtype)
    w = w.t() if conv else w
    if tuple(w.shape) != tuple(module.weight.shape):
        raise ValueError(f"a weight of shape {tuple(weight.shape)} ([out, in]) does not fit this module's "
                         f"{tuple(module.weight.shape)}{' (stored [in, out])' if conv else ''}")
    _set_weight(module, w)


def add_bias_(module: nn.Module, bias: torch.Tensor) -> bool:
    """Add `bias` [out] to the module's output bias, creating one when it has none; True if created."""
    w = module.weight
    b = bias.detach().to(device=w.device, dtype=w.dtype)
    if module.bias is not None:
        module.bias = nn.Parameter((module.bias.detach() + b).contiguous(), requires_grad=False)
        return False
    module.bias = nn.Parameter(b.clone().contiguous(), requires_grad=False)
    return True


class GatheredHeads(nn.Linear):
    """A K or V projection for uneven GQA groups: each KV head is computed once, then repeated.

    `repeat_kv` gives every KV head the same number of query heads; after pruning, groups
    may keep different numbers (say 1 and 2). This projection stores only the distinct KV
    heads (so no parameter is duplicated) and gathers one copy per query head, in query
    order, so the attention runs with num_key_value_groups = 1. The index is a
    non-persistent buffer: the state dict keeps the standard `weight`/`bias` keys.
    """

    def __init__(self, linear: nn.Linear, head_index: Sequence[int], head_dim: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.head_dim = head_dim
        self.register_buffer("head_index", torch.as_tensor(list(head_index), dtype=torch.long,
                                                           device=linear.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., n_kv * hd)
        y = y.view(*y.shape[:-1], -1, self.head_dim)  # (..., n_kv, hd)
        return y.index_select(-2, self.head_index).flatten(-2)  # (..., n_q * hd)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head_index={self.head_index.tolist()}"


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class RemovedSubBlock(nn.Module):
    """Stands in for a removed ATTN or FFN sub-block, mirroring headlab.engine.core.gates at gate 0.

    Pre-LN (delta) sub-blocks return zeros shaped like their input, so the layer adds nothing
    to the residual stream; post-LN (residual-inclusive, BERT) ones return their residual input
    unchanged, skipping their LayerNorm. Attention modules are called for a tuple
    (output, attention weights), so `returns_tuple` answers (output, None).
    """

    def __init__(
        self,
        kind: str,
        residual_inclusive: bool,
        residual_input: Callable[[tuple, dict], torch.Tensor] | None = None,
        returns_tuple: bool = False,
    ):
        super().__init__()
        if residual_inclusive and residual_input is None:
            raise ValueError("a residual-inclusive sub-block needs `residual_input`")
        self.kind = kind
        self.residual_inclusive = residual_inclusive
        self.residual_input = residual_input
        self.returns_tuple = returns_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.residual_inclusive:
            out = self.residual_input(args, kwargs)
        else:
            out = torch.zeros_like(_first(args, kwargs))
        return (out, None) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, {'passes its residual' if self.residual_inclusive else 'zero delta'}"


def is_removed(module: nn.Module) -> bool:
    """The module is a stand-in for a removed sub-block."""
    return isinstance(module, RemovedSubBlock)
