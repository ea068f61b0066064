"""Recover a physically pruned student by knowledge distillation from the dense teacher.

    student = headlab.engine.export.surgery.prune(teacher, mask)   # a smaller private copy
    data = distill_data(teacher)                           # shipped text + the teacher's own answers
    result = distill(teacher, student, data, DistillConfig(steps=150), out_dir="runs/kd")

One module per idea; each imports only modules listed above it:
- config:     DistillConfig, DistillError, MODES, with_bits;
- data:       the training / held-out texts and the cache of the teacher's answers;
- student:    LoRA adapters, quantisers, which weights train, the teacher layer of each layer;
- losses:     the KD objective and the held-out metric;
- checkpoint: the run state (StepRecord history) and its on-disk form, for exact resume;
- loop:       distill(), which ties them together.
"""

from headlab.engine.recovery.distill.checkpoint import StepRecord, has_checkpoint
from headlab.engine.recovery.distill.config import MODES, DistillConfig, DistillError, with_bits
from headlab.engine.recovery.distill.data import DistillData, distill_data, prompt_split, teacher_continuations
from headlab.engine.recovery.distill.loop import DistillResult, distill
from headlab.engine.recovery.distill.losses import _hidden_pairs as _hidden_pairs  # the tests check the layer pairing
from headlab.engine.recovery.distill.losses import heldout_metric, hidden_mse, kd_kl, sentence_cosine
from headlab.engine.recovery.distill.student import (
    LowRankDelta,
    add_lora_,
    layer_map,
    prepare_student_,
    trainable_parameters,
)

__all__ = [
    "DistillError",
    "DistillConfig",
    "DistillData",
    "StepRecord",
    "DistillResult",
    "MODES",
    "LowRankDelta",
    "add_lora_",
    "prepare_student_",
    "trainable_parameters",
    "layer_map",
    "kd_kl",
    "hidden_mse",
    "sentence_cosine",
    "prompt_split",
    "teacher_continuations",
    "distill_data",
    "heldout_metric",
    "has_checkpoint",
    "distill",
    "with_bits",
]
