"""The distillation objective and the held-out metric that decides early stopping.

Per batch of texts (teacher under no_grad; its shared model is never changed):
- causal or masked LM: T^2 * KL(p_teacher^T || p_student^T) over every non-padding position
  (Hinton et al. 2015), T = `temperature`;
- bare encoder (no LM head, e.g. the MiniLM sentence encoder): the cosine distance between the
  mean-pooled sentence embeddings plus the normalised MSE of the last hidden states;
- optional: `hidden_weight` x the normalised MSE ||h_s - h_t||^2 / ||h_t||^2 of matched layers
  (student layer i <-> the teacher layer it was cut from, read off the surgery plan).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from engine.core.handle import ModelHandle
from engine.core.tokens import encode_batch
from engine.recovery.distill.config import DistillConfig
from engine.recovery.distill.student import layer_map

__all__ = ["kd_kl", "hidden_mse", "mean_pool", "heldout_metric"]


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


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` [B, T, d] over non-padding positions, L2-normalised: [B, d]."""
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


def _forward(handle: ModelHandle, ids: torch.Tensor, am: torch.Tensor, hidden: bool) -> tuple[torch.Tensor | None, Any]:
    out = handle.model(input_ids=ids, attention_mask=am, output_hidden_states=hidden)
    logits = getattr(out, "logits", None)
    return logits, out


def _final_hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]


def _batch_loss(teacher: ModelHandle, student: ModelHandle, ids: torch.Tensor, am: torch.Tensor,
                config: DistillConfig, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, float, float]:
    """(total loss, distillation part, hidden-state part) for one batch."""
    want_hidden = config.hidden_weight > 0
    with torch.no_grad():
        t_logits, t_out = _forward(teacher, ids, am, want_hidden)
    s_logits, s_out = _forward(student, ids, am, want_hidden)
    valid = am.bool()
    if s_logits is not None:
        kd = kd_kl(s_logits, t_logits, valid, config.temperature)
    else:
        s_h, t_h = _final_hidden(s_out), _final_hidden(t_out)
        cos = (mean_pool(s_h, am) * mean_pool(t_h, am)).sum(dim=-1)  # (B,)
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
                   max_length: int = 128) -> float:
    """Lower is better. LM: mean per-token KL(teacher || student) at T = 1; encoder: mean (1 - cos) of sentence embeddings."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        ids, am = encode_batch(teacher.tokenizer, texts[i : i + batch_size], max_length, student.device)
        t_logits, t_out = _forward(teacher, ids, am, False)
        s_logits, s_out = _forward(student, ids, am, False)
        valid = am.bool()
        if s_logits is not None:
            n = int(valid.sum())
            total, count = total + float(kd_kl(s_logits, t_logits, valid, 1.0)) * n, count + n
        else:
            cos = (mean_pool(_final_hidden(s_out), am) * mean_pool(_final_hidden(t_out), am)).sum(dim=-1)
            total, count = total + float((1 - cos).sum()), count + ids.shape[0]
    return total / max(count, 1)
