"""What the student learns from: WikiText-2 paragraphs and the teacher's own answers, with a held-out split.

WikiText-2 paragraphs come from the *end* of the shipped file (perplexity is measured on its
start); the teacher's greedy answers to the shipped prompts are generated once and cached under
headlab.engine.models.load.cache_dir() keyed by a content hash. A fixed held-out split drives early stopping.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.tokens import context_length
from headlab.engine.data.datasets import calibration_texts, load_prompts
from headlab.engine.models.load import cache_dir
from headlab.engine.recovery.distill.config import DistillError
from headlab.engine.runtime.regions import ood_items

__all__ = ["DistillData", "prompt_split", "teacher_continuations", "distill_data"]

_CONTINUATIONS_FORMAT = "headlab.continuations"


@dataclass(frozen=True)
class DistillData:
    """Training texts and the held-out texts that decide early stopping."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    sources: dict[str, int] = field(default_factory=dict)  # how many texts came from where

    def check(self) -> "DistillData":
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


def prompt_split(sets: Sequence[str] = ("mt_bench", "vicuna_bench", "gsm8k", "humaneval"),
                 heldout_every: int = 5) -> tuple[list[str], list[str]]:
    """(train, held-out) prompt texts: the sets interleaved round-robin, every `heldout_every`-th held out.

    Never a text scored out of domain (headlab.engine.runtime.regions.ood_items: the last items of each set,
    and vicuna_bench's last prompt, which is also mt_bench's first).
    """
    scored = {item.scored.strip() for item in ood_items()}
    pools = [[p.text for p in load_prompts(s) if p.text.strip() not in scored] for s in sets]
    mixed = [pool[i] for i in range(max(map(len, pools), default=0)) for pool in pools if i < len(pool)]
    train = [t for i, t in enumerate(mixed) if i % heldout_every != heldout_every - 1]
    heldout = [t for i, t in enumerate(mixed) if i % heldout_every == heldout_every - 1]
    return train, heldout


def _teacher_key(teacher: ModelHandle, prompts: Sequence[str], max_new_tokens: int) -> str:
    emb = teacher.adapter.input_embeddings().weight
    probe = [round(float(v), 6) for v in emb[: min(4, emb.shape[0])].double().sum(dim=1)]
    payload = {"format": _CONTINUATIONS_FORMAT, "version": 1, "name": teacher.name, "source": str(teacher.source),
               "geometry": teacher.geometry.to_dict(), "weights_probe": probe,
               "chat_template": getattr(teacher.tokenizer, "chat_template", None) or "",
               "prompts": list(prompts), "max_new_tokens": max_new_tokens}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


@torch.no_grad()
def _generate(teacher: ModelHandle, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
              progress: Callable[[int, int], None] | None) -> list[str]:
    tok, model = teacher.tokenizer, teacher.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    texts: list[str] = []
    keep = max(1, context_length(model) - max_new_tokens)  # a prompt longer than the context keeps its end
    for start in range(0, len(prompts), batch_size):
        chunk = [_prompt_ids(tok, p)[-keep:] for p in prompts[start : start + batch_size]]
        width = max(map(len, chunk))
        # Left padding, so every row's continuation starts at the same column.
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=teacher.device)
        am = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=teacher.device)
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        for row, c in zip(out, chunk):
            new = row[width:].tolist()
            if eos is not None and eos in new:
                new = new[: new.index(eos) + 1]
            texts.append(tok.decode(c + new, skip_special_tokens=False))
        if progress:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    return texts


def teacher_continuations(teacher: ModelHandle, prompts: Sequence[str], *, max_new_tokens: int = 64,
                          batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Each prompt (through the chat template when there is one) followed by the teacher's greedy answer.

    Generated once and cached as JSON under cache_dir()/distill, keyed by a hash of the teacher
    (name, source, geometry, a probe of its weights), the prompts and `max_new_tokens`.
    """
    if not teacher.is_causal_lm:
        raise DistillError(f"{teacher.name} cannot generate: continuations need a causal language model")
    if not prompts:
        return []
    key = _teacher_key(teacher, prompts, max_new_tokens)
    path = cache_dir() / "distill" / f"continuations-{key[:20]}.json"
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key and len(cached["texts"]) == len(prompts):
                return list(cached["texts"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a damaged cache file is regenerated
    texts = _generate(teacher, list(prompts), max_new_tokens, batch_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": _CONTINUATIONS_FORMAT, "key": key, "teacher": teacher.name,
                               "max_new_tokens": max_new_tokens, "texts": texts}))
    os.replace(tmp, path)
    return texts


def distill_data(teacher: ModelHandle, *, n_wikitext: int = 64, n_prompts: int = 48, max_new_tokens: int = 64,
                 heldout_fraction: float = 0.1, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> DistillData:
    """WikiText-2 paragraphs (end of file) + the teacher's answers to training prompts, split train / held-out.

    For an encoder the prompts are used as they are (there is nothing to generate). Prompts of the
    held-out half of `prompt_split` are never used, so they stay unseen for agreement metrics.
    """
    if not 0 < heldout_fraction < 1:
        raise DistillError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    wiki = calibration_texts("wikitext", n_wikitext) if n_wikitext else []
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
    return DistillData(train, heldout, {"wikitext_end": len(wiki), kind: len(prompted)})
