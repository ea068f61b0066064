"""The student's side of a run: LoRA adapters, quantisers, which weights train, and the teacher layer of each layer.

Trainable: every weight but the token embeddings / tied LM head ("full"), or only low-rank
adapters on the Q/K/V/O and FFN projections ("lora", W + alpha/r * B A, B = 0 at start). With
`bits` set the same projections are fake-quantised (headlab.engine.recovery.quantize) and trained through
the straight-through estimator.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from headlab.engine.core.handle import ModelHandle
from headlab.engine.models.adapters import adapter_for
from headlab.engine.recovery.distill.config import DistillConfig, DistillError
from headlab.engine.recovery.quantize import FakeQuantize, quantizable_modules, set_quantization_

__all__ = ["LowRankDelta", "add_lora_", "prepare_student_", "trainable_parameters", "layer_map"]


class LowRankDelta(nn.Module):
    """Parametrization W -> W + (alpha / r) B A (LoRA, Hu et al. 2022); B = 0, so the student starts unchanged."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, transposed: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default range: a seeded generator makes it reproducible
        self.A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank
        self.transposed = transposed

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta = (self.B @ self.A) * self.scale  # (out, in)
        return w + (delta.t() if self.transposed else delta)


def _has(module: nn.Module, kind: type) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, kind) for p in module.parametrizations.weight)


def add_lora_(model: nn.Module, rank: int = 8, alpha: float = 16.0) -> int:
    """Put a LowRankDelta on every Q/K/V/O and FFN projection (once); returns how many carry one."""
    modules = quantizable_modules(model)
    if any(_has(m, FakeQuantize) for m in modules.values()):
        raise DistillError("add LoRA adapters before quantising: the quantiser must see the adapted weight")
    gen = torch.Generator().manual_seed(0)
    for m in modules.values():
        if _has(m, LowRankDelta):
            continue
        conv = isinstance(m, Conv1D)
        w = m.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if conv else tuple(w.shape)
        # Seeded, so a resumed run rebuilds the same adapters.
        delta = LowRankDelta(out_f, in_f, rank, alpha, transposed=conv, generator=gen).to(device=w.device,
                                                                                          dtype=w.dtype)
        parametrize.register_parametrization(m, "weight", delta)
    return len(modules)


def _frozen_embeddings(model: nn.Module) -> set[int]:
    adapter = adapter_for(model)
    ids = {id(adapter.input_embeddings().weight)}
    head = adapter.lm_head()
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        ids.add(id(head.weight))
    return ids


def prepare_student_(student: ModelHandle, config: DistillConfig) -> dict[str, nn.Parameter]:
    """Add LoRA adapters / quantisers as `config` asks, set requires_grad, and return the trainable parameters."""
    model = student.model
    if config.mode == "lora":
        add_lora_(model, config.lora_rank, config.lora_alpha)
    set_quantization_(model, config.bits, config.scheme)
    frozen = _frozen_embeddings(model)
    for name, p in model.named_parameters():
        if config.mode == "lora":
            p.requires_grad_(".parametrizations.weight." in name and not name.endswith(".original"))
        else:
            p.requires_grad_(config.train_embeddings or id(p) not in frozen)
    model.eval()  # no dropout: the run is deterministic, so it can be resumed exactly
    return trainable_parameters(model)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with requires_grad, by name (tied parameters once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def layer_map(student: ModelHandle, teacher: ModelHandle) -> list[int]:
    """For each student layer, the teacher layer it was cut from (the surgery plan, else identity)."""
    plan = (getattr(student, "meta", None) or {}).get("surgery")
    n_s, n_t = len(student.adapter.layers()), len(teacher.adapter.layers())
    if plan is not None:
        sources = [lp.source for lp in plan.layers]
        if len(sources) == n_s:
            return sources
    if n_s == n_t:
        return list(range(n_s))
    raise DistillError(f"the student has {n_s} layers and the teacher {n_t}, and no surgery plan says which "
                       "teacher layer each student layer came from; set hidden_weight=0")
