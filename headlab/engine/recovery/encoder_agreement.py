"""How closely a pruned / quantised sentence encoder agrees with its teacher, on held-out texts.

Embeddings are the last hidden states through the teacher's own sentence-transformers modules
(Pooling, Normalize: headlab.engine.models.sentence; for the MiniLM, mean pooling then unit length), the
same modules for the student.
- spearman: Spearman rank correlation between the two models' pairwise cosine similarities
  (every unordered pair of texts once): 1 means the student orders all pairs as the teacher does;
- nn_agreement: the fraction of texts whose nearest neighbour (by cosine, itself excluded) is
  the same text under both models;
- mean_cosine: the mean cosine between each text's student and teacher embedding (comparable
  only because both live in the same space: the student is distilled to it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.models.sentence import embed_handle, sentence_head

__all__ = ["Agreement", "sentence_embeddings", "agreement", "encoder_agreement", "spearman"]


@dataclass(frozen=True)
class Agreement:
    spearman: float
    nn_agreement: float
    mean_cosine: float
    n_texts: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"Spearman {self.spearman:.4f} of pairwise cosines, nearest neighbour kept for "
                f"{100 * self.nn_agreement:.1f}%, mean cosine to teacher {self.mean_cosine:.4f} "
                f"({self.n_texts} held-out texts)")


def sentence_embeddings(handle: ModelHandle, texts: Sequence[str], *, batch_size: int = 16,
                        max_length: int = 128, head: nn.Module | None = None) -> torch.Tensor:
    """Sentence embeddings [N, d] of `texts`: the handle's last hidden states through `head` (default: its own)."""
    return embed_handle(handle, list(texts), head=head, max_length=max_length, batch_size=batch_size)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank (as Spearman's rho needs)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    if values.numel() < x.numel():  # average the ranks of tied values
        sums = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (Pearson correlation of their average ranks)."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"Spearman needs two vectors of the same length >= 2 (got {a.numel()} and {b.numel()})")
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


def agreement(teacher_emb: torch.Tensor, student_emb: torch.Tensor) -> Agreement:
    """Spearman of pairwise cosines, nearest-neighbour agreement and mean cosine of two [N, d] embedding sets."""
    n = teacher_emb.shape[0]
    if student_emb.shape[0] != n or n < 3:
        raise ValueError(f"agreement needs the same texts under both models, at least 3 (got {n} and "
                         f"{student_emb.shape[0]})")
    t = torch.nn.functional.normalize(teacher_emb.double(), dim=-1)
    s = torch.nn.functional.normalize(student_emb.double(), dim=-1)
    st, ss = t @ t.T, s @ s.T  # (N, N) cosine similarities
    iu = torch.triu_indices(n, n, offset=1)
    rho = spearman(st[iu[0], iu[1]], ss[iu[0], iu[1]])
    eye = torch.eye(n, dtype=torch.bool)
    nn_t = st.masked_fill(eye, -2).argmax(dim=1)
    nn_s = ss.masked_fill(eye, -2).argmax(dim=1)
    same = float((nn_t == nn_s).double().mean())
    cos = float((t * s).sum(dim=-1).mean()) if t.shape[1] == s.shape[1] else float("nan")
    return Agreement(rho, same, cos, n)


def encoder_agreement(teacher: ModelHandle, student: ModelHandle, texts: Sequence[str], *, batch_size: int = 16,
                      max_length: int = 128) -> Agreement:
    """Agreement of `student`'s sentence embeddings with `teacher`'s on `texts` (use held-out ones)."""
    kw = {"batch_size": batch_size, "max_length": max_length, "head": sentence_head(teacher)}
    return agreement(sentence_embeddings(teacher, texts, **kw), sentence_embeddings(student, texts, **kw))
