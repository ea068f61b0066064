"""What the student learns from: WikiText-2 paragraphs and the teacher's own answers, with a held-out split.

WikiText-2 paragraphs come from the *end* of the shipped file (perplexity is measured on its
start); the teacher's greedy answers to the shipped prompts (headlab.engine.runtime.continuations) are
generated once and cached. A fixed held-out split drives early stopping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.data.datasets import calibration_texts, wikitext_stream
from headlab.engine.recovery.distill.config import DistillError
from headlab.engine.runtime.continuations import prompt_split, teacher_continuations

__all__ = ["DistillData", "distill_data", "prompt_split", "teacher_continuations"]


@dataclass(frozen=True)
class DistillData:
    """Training texts and the held-out texts that decide early stopping."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    sources: dict[str, int] = field(default_factory=dict)  # how many texts came from where

    def check(self) -> DistillData:
        if not self.train or not self.heldout:
            raise DistillError(f"distillation needs training and held-out texts (got {len(self.train)} and "
                               f"{len(self.heldout)})")
        for i, t in enumerate((*self.train, *self.heldout)):
            if not isinstance(t, str) or not t.strip():
                raise DistillError(f"text #{i} of the distillation data is empty")
        return self

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.train, self.heldout]).encode())
        return h.hexdigest()[:16]


def distill_data(teacher: ModelHandle, *, n_wikitext: int = 64, n_prompts: int = 48, max_new_tokens: int = 64,
                 heldout_fraction: float = 0.1, seed: int = 0, pack: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> DistillData:
    """WikiText-2 paragraphs (end of file) + the teacher's answers to training prompts, split train / held-out.

    `pack` > 0: the WikiText part is the file's running text over the same paragraphs' span, cut into
    windows of `pack` tokens (datasets.wikitext_stream), not one text per paragraph: contexts then
    cross paragraph boundaries and reach `pack` tokens, as the perplexity windows do.
    For an encoder the prompts are used as they are (there is nothing to generate). Prompts of the
    held-out half of `prompt_split` are never used, so they stay unseen for agreement metrics.
    """
    if not 0 < heldout_fraction < 1:
        raise DistillError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    if pack < 0 or pack == 1:
        raise DistillError(f"pack must be 0 (one text per paragraph) or a window of at least 2 tokens, got {pack!r}")
    if not n_wikitext:
        wiki = []
    elif pack:
        try:
            wiki = wikitext_stream(teacher.tokenizer, n_wikitext, pack)
        except ValueError as e:
            raise DistillError(str(e)) from None
    else:
        wiki = calibration_texts("wikitext", n_wikitext)
    prompts = prompt_split()[0][:n_prompts] if n_prompts else []
    if teacher.is_causal_lm and prompts:
        prompted = teacher_continuations(teacher, prompts, max_new_tokens=max_new_tokens, progress=progress)
    else:
        prompted = prompts
    texts = [*wiki, *prompted]
    if len(texts) < 2:
        raise DistillError("distillation needs at least two texts (one to train on, one held out)")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(len(texts) - 1, max(1, round(heldout_fraction * len(texts))))
    heldout = tuple(texts[i] for i in order[:n_held])
    train = tuple(texts[i] for i in order[n_held:])
    kind = "teacher_continuations" if teacher.is_causal_lm else "prompts"
    wiki_kind = f"wikitext_end_windows_{pack}" if pack else "wikitext_end"
    return DistillData(train, heldout, {wiki_kind: len(wiki), kind: len(prompted)})
