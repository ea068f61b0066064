"""Text a model writes itself: its greedy answers to the shipped training prompts, cached, and calibration
text that mixes them with WikiText.

    train, heldout = prompt_split()                         # prompt texts, never a reserved one
    texts = teacher_continuations(handle, train[:160])      # each prompt (chat template) + the model's answer
    texts = mixed_texts(handle, 256)                        # WikiText paragraphs and answers, alternating

An instruct model pruned on WikiText alone loses most of its loss on chat text (out-of-domain NLL in
bench/results/quality.csv); calibrating on "mixed" text keeps part of it. The answers are generated once
and cached as JSON under headlab.engine.models.load.cache_dir()/distill, keyed by a content hash of the
model, the prompts and the answer length; the prompts never include a reserved text
(headlab.engine.runtime.regions.reserved_texts: the scored out-of-domain items and the out-of-domain
validation ones).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.tokens import context_length
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.models.load import cache_dir
from headlab.engine.runtime.regions import training_prompts

__all__ = ["MIXED", "mixed_texts", "prompt_split", "teacher_continuations"]

MIXED = "mixed"  # the calibration set's name
_CONTINUATIONS_FORMAT = "headlab.continuations"
ANSWER_TOKENS = 64


def prompt_split(sets: Sequence[str] = ("mt_bench", "vicuna_bench", "gsm8k", "humaneval"),
                 heldout_every: int = 5) -> tuple[list[str], list[str]]:
    """(train, held-out) prompt texts: the sets interleaved round-robin, every `heldout_every`-th held out.

    Never a reserved text (headlab.engine.runtime.regions.reserved_texts: the items scored out of domain, the
    last of each set, and the out-of-domain validation items in front of them).
    """
    pools = [training_prompts(s) for s in sets]
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
        raise ValueError(f"{teacher.name} cannot generate: continuations need a causal language model")
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


def mixed_texts(handle: ModelHandle, n: int, max_new_tokens: int = ANSWER_TOKENS,
                progress: Callable[[int, int], None] | None = None) -> list[str]:
    """`n` calibration texts: WikiText-2 paragraphs from the end of the file and the model's answers to the
    first training prompts (`prompt_split`), alternating (WikiText first where `n` is odd).

    An encoder, which cannot answer, gets the prompts themselves.
    """
    if n < 1:
        raise ValueError(f"a mixed calibration needs at least one text, got {n}")
    n_prompts = n // 2
    wiki = calibration_texts("wikitext", n - n_prompts)
    prompts = prompt_split()[0][:n_prompts]
    if len(prompts) < n_prompts:
        raise ValueError(f"only {len(prompts)} training prompts available, asked for {n_prompts}")
    answers = (teacher_continuations(handle, prompts, max_new_tokens=max_new_tokens, progress=progress)
               if handle.is_causal_lm else prompts)
    out = [t for pair in zip(wiki, answers) for t in pair]
    return out + wiki[len(answers):]
