"""Which text is for what: the shipped WikiText-2 test file in named, disjoint regions, and a guard that
proves a method never reads the text it is judged on.

Regions (token offsets in the model's own tokenisation of the whole file):
- main: the pinned protocol's windows from token 0 (headlab.engine.runtime.evaluate.DEFAULT_PROTOCOL);
- validation: `VALIDATION_WINDOWS` windows of 512 tokens from token 75,000. Every choice a method or a
  benchmark makes (an allocation, a method, a damping, a learning rate) is scored here, never on main
  or held-out;
- held-out: 12 windows of 512 tokens from token 150,000, reported only;
- fit: paragraphs taken from the end of the file backwards (calibration, re-fit and distillation texts),
  checked to begin after the held-out windows (`check_fit_texts`);
- out-of-domain: the last items of each shipped prompt set (`ood_items`), scored as mean NLL; the items in
  front of them (`ood_validation_items`) are the out-of-domain part of validation, scored to choose between
  settings; training that reads prompt sets takes them from the front (`training_prompts`) and never reads
  either (`reserved_texts`).

`EvalGuard` holds every run of 16 tokens (at least ~64 characters) of main, validation (with its out-of-domain
items), held-out and the out-of-domain items (as
rolling hashes) and checks every batch a model embeds while it is installed (`guard`): a method that
reads any of them raises `EvaluationLeak`. A test runs every choosing method under the guard with
validation allowed, and runs the evaluations themselves under it to show the guard trips.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.data.datasets import DATA_DIR, PROMPT_SETS, load_prompts, read_wikitext, wikitext_paragraphs
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, _wikitext_ids, leading_bos, text_windows, window_nll

__all__ = [
    "HELDOUT_OFFSET",
    "HELDOUT_WINDOWS",
    "OOD_PER_SET",
    "OOD_VALIDATION_PER_SET",
    "REGIONS",
    "VALIDATION_OFFSET",
    "VALIDATION_WINDOWS",
    "EvalGuard",
    "EvaluationLeak",
    "OodItem",
    "Region",
    "check_fit_texts",
    "check_region_windows",
    "fit_paragraphs",
    "guard",
    "ood_items",
    "ood_nll",
    "ood_validation_items",
    "region_perplexity",
    "region_windows",
    "reserved_texts",
    "training_prompts",
]

WINDOW = 512
VALIDATION_OFFSET, VALIDATION_WINDOWS = 75_000, 8
HELDOUT_OFFSET, HELDOUT_WINDOWS = 150_000, 12
OOD_PER_SET = 16  # the last items of each prompt set are scored, never trained on
OOD_VALIDATION_PER_SET = 8  # the items in front of those: out-of-domain validation, for choosing
NGRAM = 16


@dataclass(frozen=True)
class Region:
    """A run of windows over the file's tokens: `n` windows of `window` tokens from token `start`."""

    name: str
    start: int
    n: int
    window: int = WINDOW

    @property
    def end(self) -> int:
        return self.start + self.n * self.window

    def describe(self) -> str:
        return f"{self.name}: WikiText-2 test tokens {self.start:,}-{self.end:,} ({self.n} windows of {self.window})"


REGIONS = {
    "main": Region("main", 0, DEFAULT_PROTOCOL.n_windows, DEFAULT_PROTOCOL.window),
    "validation": Region("validation", VALIDATION_OFFSET, VALIDATION_WINDOWS),
    "heldout": Region("heldout", HELDOUT_OFFSET, HELDOUT_WINDOWS),
}


class EvaluationLeak(RuntimeError):
    """A model read text reserved for evaluation (or for choosing) while a guard forbade it."""


def region_windows(handle: ModelHandle, region: str | Region, n: int | None = None,
                   window: int | None = None) -> torch.Tensor:
    """[n, window] token windows of a region (BOS first in each where the tokenizer adds one, as the protocol)."""
    r = REGIONS[region] if isinstance(region, str) else region
    return text_windows(_wikitext_ids(handle.tokenizer), window or r.window, window or r.window, n or r.n,
                        leading_bos(handle.tokenizer), start=r.start)


@torch.no_grad()
def region_perplexity(handle: ModelHandle, mask: PruneMask | None, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity over `windows` (each scored from its second token) with `mask` applied per call."""
    total, count = 0.0, 0
    with gates.apply(handle, mask):
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i: i + batch_size].to(handle.device)
            s, c = window_nll(handle.model(input_ids=ids).logits, ids, torch.ones(ids.shape[0], dtype=torch.long))
            total, count = total + float(s), count + c
    return math.exp(total / count)


# --- out-of-domain text ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OodItem:
    """One scored text: `scored` is predicted after `context` (None: a user turn scored on its own)."""

    source: str
    context: str | None
    scored: str


def _items(lo: int, hi: int | None) -> list[OodItem]:
    """Items [lo:hi] of each shipped set: GSM8K answers after their questions, the other sets' prompts themselves."""
    items = [OodItem("gsm8k", q, a) for q, a in _gsm8k_rows()[lo:hi]]
    for name in ("mt_bench", "vicuna_bench", "humaneval"):
        items += [OodItem(name, None, p.text) for p in load_prompts(name)[lo:hi]]
    return items


def ood_items(n_per_set: int = OOD_PER_SET) -> list[OodItem]:
    """The last `n_per_set` items of each shipped prompt set: GSM8K answers after their questions, the other
    sets' prompts themselves."""
    return _items(-n_per_set, None)


def ood_validation_items(n_per_set: int = OOD_VALIDATION_PER_SET) -> list[OodItem]:
    """The out-of-domain part of validation: the `n_per_set` items of each set in front of the scored ones
    (`ood_items`), chosen on, never trained on and never reported as a result."""
    return _items(-(OOD_PER_SET + n_per_set), -OOD_PER_SET)


@functools.lru_cache(maxsize=1)
def reserved_texts() -> frozenset[str]:
    """Every prompt-set text that training may not read (stripped): the scored out-of-domain items and the
    out-of-domain validation items, GSM8K's questions with their answers (vicuna_bench's last prompt is also
    mt_bench's first, so a text is compared, not an index)."""
    items = (*ood_items(), *ood_validation_items())
    return frozenset(t.strip() for item in items for t in (item.scored, item.context) if t is not None)


def training_prompts(name: str, n: int | None = None) -> list[str]:
    """Up to `n` (all: None) prompts of a shipped set from its front, never a reserved text (`reserved_texts`)."""
    reserved = reserved_texts()
    return [p.text for p in load_prompts(name) if p.text.strip() not in reserved][:n]


def _gsm8k_rows() -> list[tuple[str, str]]:
    with (DATA_DIR / "prompts" / PROMPT_SETS["gsm8k"]).open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["question"], r["answer"]) for r in rows]


def _chat_text(tokenizer: Any, item: OodItem) -> tuple[str, int, int]:
    """(formatted text, start, end) with [start, end) the characters of the scored part."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        if item.context is None:
            messages = [{"role": "user", "content": item.scored}]
        else:
            messages = [{"role": "user", "content": item.context}, {"role": "assistant", "content": item.scored}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        start = text.rfind(item.scored)
        if start < 0:
            raise ValueError(f"the chat template changed the {item.source} text; cannot find it to score")
        return text, start, start + len(item.scored)
    text = item.scored if item.context is None else f"{item.context}\n\n{item.scored}"
    return text, len(text) - len(item.scored), len(text)


def _ood_encoded(tokenizer: Any, items: Sequence[OodItem], max_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per item (ids [T], scored [T] bool: tokens wholly inside the scored characters, never the first)."""
    out = []
    for item in items:
        text, start, end = _chat_text(tokenizer, item)
        enc = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None),
                        return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"][:max_length])
        offsets = enc["offset_mapping"][:max_length]
        scored = torch.tensor([a >= start and b <= end and b > a for a, b in offsets])
        scored[0] = False
        out.append((ids, scored))
    return out


@torch.no_grad()
def ood_nll(handle: ModelHandle, mask: PruneMask | None, items: Sequence[OodItem] | None = None,
            max_length: int = 512, batch_size: int = 1) -> dict[str, float]:
    """Mean NLL per scored token on the out-of-domain items, overall ("all") and per source."""
    items = list(items or ood_items())
    encoded = _ood_encoded(handle.tokenizer, items, max_length)
    order = sorted(range(len(items)), key=lambda i: encoded[i][0].numel())  # similar lengths share a batch
    sums: dict[str, list[float]] = {}
    with gates.apply(handle, mask):
        for b in range(0, len(order), batch_size):
            chunk = order[b: b + batch_size]
            width = max(encoded[i][0].numel() for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            am = torch.zeros(len(chunk), width, dtype=torch.long)
            scored = torch.zeros(len(chunk), width, dtype=torch.bool)
            for row, i in enumerate(chunk):
                n = encoded[i][0].numel()
                ids[row, :n], am[row, :n], scored[row, :n] = encoded[i][0], 1, encoded[i][1]
            logits = handle.model(input_ids=ids.to(handle.device), attention_mask=am.to(handle.device)).logits
            nll = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None].to(logits.device))[..., 0]
            for row, i in enumerate(chunk):
                keep = scored[row, 1:].to(nll.device)
                s = sums.setdefault(items[i].source, [0.0, 0])
                s[0] += float(nll[row][keep].sum())
                s[1] += int(keep.sum())
    out = {k: v[0] / max(1, v[1]) for k, v in sums.items()}
    out["all"] = sum(v[0] for v in sums.values()) / max(1, sum(v[1] for v in sums.values()))
    return out


# --- the guard -----------------------------------------------------------------------------------------
_P = 1_000_003


def _hashes(ids: torch.Tensor, n: int = NGRAM) -> torch.Tensor:
    """Rolling hashes (int64, wrapping) of every run of `n` consecutive ids along the last dimension."""
    ids = ids.reshape(-1, ids.shape[-1]).long()
    if ids.shape[-1] < n:
        return torch.empty(0, dtype=torch.long)
    runs = ids.unfold(-1, n, 1)  # (B, T - n + 1, n)
    powers = torch.tensor([pow(_P, k, 2**63) for k in range(n)], dtype=torch.long)
    return (runs * powers).sum(-1).reshape(-1)


class EvalGuard:
    """Every run of `n` tokens of the regions it protects; `check(ids)` raises when a batch contains one."""

    def __init__(self, handle: ModelHandle, protect: Sequence[str] = ("main", "validation", "heldout", "ood")) -> None:
        self.protect = tuple(protect)
        # runs of at least 16 tokens and about 64 characters (a byte-level tokenizer needs longer runs, or common
        # phrases would match by chance)
        per_token = len(read_wikitext()) / max(1, _wikitext_ids(handle.tokenizer).numel())
        self.n = max(NGRAM, math.ceil(64 / per_token))
        found = []
        for name in self.protect:
            if name == "ood":
                found += self._item_hashes(handle, ood_items())
            else:
                found.append(_hashes(region_windows(handle, name), self.n))
                if name == "validation":
                    found += self._item_hashes(handle, ood_validation_items())
        self.hashes = torch.unique(torch.cat(found))
        self.checked = 0

    def _item_hashes(self, handle: ModelHandle, items: Sequence[OodItem]) -> list[torch.Tensor]:
        found = []
        for ids, scored in _ood_encoded(handle.tokenizer, items, 512):
            if ids.numel() >= self.n:  # runs wholly inside the scored text (not the chat template's)
                found.append(_hashes(ids[None], self.n)[scored.unfold(0, self.n, 1).all(-1)])
        for item in items:  # and the scored texts tokenised on their own
            found.append(_hashes(torch.tensor(handle.tokenizer(item.scored, add_special_tokens=False)
                                              ["input_ids"])[None], self.n))
        return found

    def check(self, ids: torch.Tensor) -> None:
        h = _hashes(ids.detach().cpu(), self.n)
        self.checked += int(ids.numel())
        if h.numel() and bool(torch.isin(h, self.hashes).any()):
            raise EvaluationLeak(f"a model input contains text reserved for {', '.join(self.protect)}: "
                                 "a method may not read it")


@contextlib.contextmanager
def guard(handle: ModelHandle, allow: Sequence[str] = ()) -> Iterator[EvalGuard]:
    """Check every batch the model embeds against the protected regions (all but `allow`) while inside."""
    g = EvalGuard(handle, [r for r in ("main", "validation", "heldout", "ood") if r not in allow])
    emb = handle.model.get_input_embeddings()

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            g.check(args[0])

    h = emb.register_forward_pre_hook(hook)
    try:
        yield g
    finally:
        h.remove()


def check_region_windows(handle: ModelHandle, **windows: torch.Tensor) -> None:
    """Raise unless each tensor is exactly its named region's windows (e.g. `main=ids, heldout=ho`).

    A benchmark that builds its evaluation windows itself states with this that they are the regions
    `check_fit_texts` and the guard keep every fitted text away from.
    """
    for name, ids in windows.items():
        if name not in REGIONS:
            raise ValueError(f"unknown region {name!r}: one of {', '.join(REGIONS)}")
        expected = region_windows(handle, name)
        if tuple(ids.shape) != tuple(expected.shape) or not torch.equal(ids.cpu(), expected):
            r = REGIONS[name]
            raise EvaluationLeak(f"the {name} windows evaluated are not the {name} region ({r.n} windows of "
                                 f"{r.window} tokens from token {r.start:,}): got {tuple(ids.shape)}")


def _heldout_end_char(handle: ModelHandle) -> int:
    """The character of the shipped file where the held-out windows end, in `handle`'s tokenisation."""
    ids = _wikitext_ids(handle.tokenizer)
    return len(handle.tokenizer.decode(ids[:min(REGIONS["heldout"].end, ids.numel())]))


def fit_paragraphs(handle: ModelHandle) -> int:
    """How many calibration paragraphs (datasets.wikitext_calibration) start after the held-out windows: the
    most a fit may read (694 for SmolLM2; the count depends on the tokenizer, which places the windows)."""
    text, end = read_wikitext(), _heldout_end_char(handle)
    return sum(1 for p in wikitext_paragraphs() if text.rfind(p) >= end)


def check_fit_texts(handle: ModelHandle, texts: Sequence[str], label: str = "fit") -> str:
    """Raise unless every WikiText text of `texts` lies after the held-out windows and none holds protected text.

    Returns where the earliest one starts, for a benchmark's header.
    """
    text = read_wikitext()
    found = [text.rfind(t) for t in texts]
    inside = [p for p in found if p >= 0]
    ids = _wikitext_ids(handle.tokenizer)
    heldout_end_char = _heldout_end_char(handle)
    if inside and min(inside) < heldout_end_char:
        raise EvaluationLeak(f"a {label} text starts at character {min(inside):,}, before the end of the held-out "
                             f"windows (character ~{heldout_end_char:,}): fit texts come from the file's end")
    g = EvalGuard(handle)
    for i, t in enumerate(texts):
        try:
            g.check(torch.tensor(handle.tokenizer(t, add_special_tokens=False)["input_ids"])[None])
        except EvaluationLeak as e:
            raise EvaluationLeak(f"{label} text #{i} holds protected text: {e}") from None
    if not inside:
        return f"{len(texts)} {label} texts, none from WikiText-2"
    start_tok = len(handle.tokenizer(text[:min(inside)], add_special_tokens=False)["input_ids"])
    return f"{len(texts)} {label} texts; the WikiText ones start at token ~{start_tok:,} of {ids.numel():,}"
