"""The settings of one distillation run, and the error raised when a run cannot go as asked."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from headlab.engine.recovery.quantize import FakeQuantize, default_scheme

__all__ = ["MODES", "DistillError", "DistillConfig", "with_bits"]

MODES = ("full", "lora")


class DistillError(ValueError):
    """A distillation that cannot run as asked (bad settings, mismatched models, stale checkpoint)."""


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 150
    batch_size: int = 4
    max_length: int = 128
    lr: float = 1e-4
    warmup: int = 10  # linear warm-up steps, then cosine decay to min_lr_ratio * lr at `steps`
    min_lr_ratio: float = 0.1
    temperature: float = 2.0
    hidden_weight: float = 0.0  # 0 = logits (or sentence embeddings) only
    mode: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    bits: int | None = None  # 1 or 2: fake-quantise Q/K/V/O and FFN weights; None = full precision
    scheme: str | None = None  # 2-bit: "ternary" (default) or "uniform"
    train_embeddings: bool = False  # full mode: also train the token embeddings / tied LM head
    grad_clip: float = 1.0
    eval_every: int = 25
    patience: int = 3  # held-out evaluations without improvement before stopping (0 = never stop early)
    min_improvement: float = 1e-3  # relative improvement of the held-out metric that counts
    restore_best: bool = True
    checkpoint_every: int = 50
    seed: int = 0
    data_offset: int = 0  # the position in the data order of step 0 (later stages of a recipe continue it)

    def check(self) -> "DistillConfig":
        """Raise DistillError naming the first setting that cannot work."""
        positive = {"steps": self.steps, "batch_size": self.batch_size, "max_length": self.max_length,
                    "eval_every": self.eval_every, "checkpoint_every": self.checkpoint_every,
                    "lora_rank": self.lora_rank}
        for name, v in positive.items():
            if not isinstance(v, int) or v < 1:
                raise DistillError(f"{name} must be a positive integer, got {v!r}")
        if self.max_length < 2:
            raise DistillError("max_length must be at least 2 tokens")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise DistillError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if self.temperature <= 0:
            raise DistillError(f"temperature must be > 0, got {self.temperature!r}")
        if self.hidden_weight < 0:
            raise DistillError(f"hidden_weight must be >= 0, got {self.hidden_weight!r}")
        if self.mode not in MODES:
            raise DistillError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.bits is not None:
            try:
                FakeQuantize(self.bits, self.scheme)
            except ValueError as e:
                raise DistillError(str(e)) from None
        if self.patience < 0 or self.warmup < 0:
            raise DistillError("patience and warmup must be >= 0")
        return self

    @property
    def quantization(self) -> str:
        return "fp32" if self.bits is None else f"{self.bits}-bit {self.scheme or default_scheme(self.bits)}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_bits(config: DistillConfig, bits: int | None, steps: int, scheme: str | None = None,
              data_offset: int = 0) -> DistillConfig:
    """`config` for one stage: its bit width, step budget and where in the data order it starts."""
    return replace(config, bits=bits, steps=steps, scheme=scheme if bits == 2 else None, data_offset=data_offset)
