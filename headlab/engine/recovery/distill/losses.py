"""The distillation objective and the held-out metric that decides early stopping.

Per batch of texts (teacher under no_grad; its shared model is never changed):
- causal or masked LM: T^2 * KL(p_teacher^T || p_student^T) over every non-padding position
  (Hinton et al. 2015), T = `temperature`;
- bare encoder (no LM head, e.g. the MiniLM sentence encoder): the cosine distance between the
  sentence embeddings plus the normalised MSE of the last hidden states. Sentence embeddings go
  through the teacher's own sentence-transformers modules after its Transformer (Pooling,
  Normalize: headlab.engine.models.sentence.sentence_head, plain torch, so the loss is differentiable);
- optional: `hidden_weight` x the normalised MSE ||h_s - h_t||^2 / ||h_t||^2 of matched layers
  (student layer i <-> the teacher layer it was cut from, read off the surgery plan).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.tokens import encode_batch
from headlab.engine.models.sentence import pool, sentence_head
from headlab.engine.recovery.distill.config import DistillConfig
from headlab.engine.recovery.distill.student import layer_map

__all__ = ["kd_kl", "hidden_mse", "sentence_cosine", "heldout_metric"]


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor,
          temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) averaged over positions where `valid` [B, T] is true."""
    s = F.log_softmax(student_logits[valid].float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits[valid].float() / temperature, dim=-1)  # (N, V)
    kl = (t.exp() * (t - s)).sum(dim=-1)  # (N,)
    return kl.mean() * temperature**2


def hidden_mse(student_h: torch.Tensor, teacher_h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """||h_s - h_t||^2 / ||h_t||^2 over valid positions: scale-free, so outlier dimensions do not swamp it."""
    s, t = student_h[valid].float(), teacher_h[valid].float()  # (N, d)
    return ((s - t) ** 2).sum() / (t**2).sum().clamp(min=1e-12)


def sentence_cosine(head: torch.nn.Module, student_h: torch.Tensor, teacher_h: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """[B]: cosine between the student's and the teacher's sentence embeddings, both through `head`."""
    s = pool(head, student_h, attention_mask).float()
    t = pool(head, teacher_h, attention_mask).float()
    return F.cosine_similarity(s, t, dim=-1)


def _forward(handle: ModelHandle, ids: torch.Tensor, am: torch.Tensor, hidden: bool) -> tuple[torch.Tensor | None, Any]:
    out = handle.model(input_ids=ids, attention_mask=am, output_hidden_states=hidden)
    logits = getattr(out, "logits", None)
    return logits, out


def _final_hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]


def _batch_loss(teacher: ModelHandle, student: ModelHandle, ids: torch.Tensor, am: torch.Tensor,
                config: DistillConfig, pairs: list[tuple[int, int]], head: torch.nn.Module | None = None
                ) -> tuple[torch.Tensor, float, float]:
    """(total loss, distillation part, hidden-state part) for one batch; `head`: the encoder's sentence modules."""
    want_hidden = config.hidden_weight > 0
    with torch.no_grad():
        t_logits, t_out = _forward(teacher, ids, am, want_hidden)
    s_logits, s_out = _forward(student, ids, am, want_hidden)
    valid = am.bool()
    if s_logits is not None:
        kd = kd_kl(s_logits, t_logits, valid, config.temperature)
    else:
        s_h, t_h = _final_hidden(s_out), _final_hidden(t_out)
        cos = sentence_cosine(head if head is not None else sentence_head(teacher), s_h, t_h, am)  # (B,)
        kd = (1 - cos).mean() + hidden_mse(s_h, t_h, valid)
    hid = torch.zeros((), device=kd.device)
    if want_hidden:
        hid = torch.stack([hidden_mse(s_out.hidden_states[i], t_out.hidden_states[j], valid) for i, j in pairs]).mean()
    return kd + config.hidden_weight * hid, float(kd.detach()), float(hid.detach())


def _hidden_pairs(student: ModelHandle, teacher: ModelHandle, config: DistillConfig) -> list[tuple[int, int]]:
    """(student, teacher) indices into HF `hidden_states`: matched layer outputs, then final <-> final."""
    if config.hidden_weight == 0:
        return []
    src = layer_map(student, teacher)
    n_t = len(teacher.adapter.layers())
    # hidden_states[i + 1] is layer i's output; the last entry is the final output (after any final norm).
    return [(i + 1, s + 1) for i, s in enumerate(src[:-1])] + [(len(src), n_t)]


@torch.no_grad()
def heldout_metric(teacher: ModelHandle, student: ModelHandle, texts: Sequence[str], *, batch_size: int = 4,
                   max_length: int = 128, head: torch.nn.Module | None = None) -> float:
    """Lower is better. LM: mean per-token KL(teacher || student) at T = 1; encoder: mean (1 - cos) of sentence embeddings."""
    total, count = 0.0, 0
    if not teacher.adapter.has_lm_head and head is None:
        head = sentence_head(teacher)
    for i in range(0, len(texts), batch_size):
        ids, am = encode_batch(teacher.tokenizer, texts[i : i + batch_size], max_length, student.device)
        t_logits, t_out = _forward(teacher, ids, am, False)
        s_logits, s_out = _forward(student, ids, am, False)
        valid = am.bool()
        if s_logits is not None:
            n = int(valid.sum())
            total, count = total + float(kd_kl(s_logits, t_logits, valid, 1.0)) * n, count + n
        else:
            cos = sentence_cosine(head, _final_hidden(s_out), _final_hidden(t_out), am)
            total, count = total + float((1 - cos).sum()), count + ids.shape[0]
    return total / max(count, 1)
