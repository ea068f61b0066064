"""Recover a physically pruned student by knowledge distillation from the dense teacher.

    student = engine.export.surgery.prune(teacher, mask)          # a smaller private copy
    data = distill_data(teacher)                           # shipped text + the teacher's own answers
    result = distill(teacher, student, data, DistillConfig(steps=150), out_dir="runs/kd")

Objective, per batch of texts (teacher under no_grad; its shared model is never changed):
- causal or masked LM: T^2 * KL(p_teacher^T || p_student^T) over every non-padding position
  (Hinton et al. 2015), T = `temperature`;
- bare encoder (no LM head, e.g. the MiniLM sentence encoder): the cosine distance between the
  mean-pooled sentence embeddings plus the normalised MSE of the last hidden states;
- optional: `hidden_weight` x the normalised MSE ||h_s - h_t||^2 / ||h_t||^2 of matched layers
  (student layer i <-> the teacher layer it was cut from, read off the surgery plan).
Trainable: every weight but the token embeddings / tied LM head ("full"), or only low-rank
adapters on the Q/K/V/O and FFN projections ("lora", W + alpha/r * B A, B = 0 at start). With
`bits` set the same projections are fake-quantised (engine.recovery.quantize) and trained through the
straight-through estimator.

Data: WikiText-2 paragraphs from the *end* of the shipped file (perplexity is measured on its
start) and the teacher's greedy answers to the shipped prompts (generated once, cached under
engine.models.load.cache_dir() keyed by a content hash); a fixed held-out split drives early stopping.

Determinism and resume: the student runs in eval mode (no dropout), the data order is a function
of (seed, step) and the learning rate of the step, so the loop draws no random numbers.
A checkpoint (trainable weights and AdamW moments as safetensors, the rest as JSON) is written
every `checkpoint_every` steps, when `should_stop()` says so and on Ctrl-C; `resume=True`
continues the same run: k steps + resume to N equals N steps straight.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from engine.core.handle import ModelHandle
from engine.core.tokens import context_length, encode_batch
from engine.data.datasets import calibration_texts, load_prompts
from engine.models.adapters import adapter_for
from engine.models.load import cache_dir
from engine.recovery.quantize import FakeQuantize, default_scheme, quantizable_modules, set_quantization_

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
    "mean_pool",
    "prompt_split",
    "teacher_continuations",
    "distill_data",
    "heldout_metric",
    "has_checkpoint",
    "distill",
    "with_bits",
]

MODES = ("full", "lora")
CHECKPOINT = "checkpoint"
BEST = "best.safetensors"
_CONTINUATIONS_FORMAT = "headlab.continuations"
StepCallback = Callable[["StepRecord"], None]


class DistillError(ValueError):
    """A distillation that cannot run as asked (bad settings, mismatched models, stale checkpoint)."""


# --- settings and data ----------------------------------------------------------------------
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
    """(train, held-out) prompt texts: the sets interleaved round-robin, every `heldout_every`-th held out."""
    pools = [[p.text for p in load_prompts(s)] for s in sets]
    mixed = [pool[i] for i in range(max(map(len, pools), default=0)) for pool in pools if i < len(pool)]
    train = [t for i, t in enumerate(mixed) if i % heldout_every != heldout_every - 1]
    heldout = [t for i, t in enumerate(mixed) if i % heldout_every == heldout_every - 1]
    return train, heldout


def _teacher_key(teacher: Any, prompts: Sequence[str], max_new_tokens: int) -> str:
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
def _generate(teacher: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
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


def teacher_continuations(teacher: Any, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8,
                          progress: Callable[[int, int], None] | None = None) -> list[str]:
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


def distill_data(teacher: Any, *, n_wikitext: int = 64, n_prompts: int = 48, max_new_tokens: int = 64,
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


# --- the student: adapters, quantisers, what trains ----------------------------------------
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
    from transformers.pytorch_utils import Conv1D

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


def prepare_student_(student: Any, config: DistillConfig) -> dict[str, nn.Parameter]:
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


def layer_map(student: Any, teacher: Any) -> list[int]:
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


# --- losses --------------------------------------------------------------------------------
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


def _batch_loss(teacher: Any, student: Any, ids: torch.Tensor, am: torch.Tensor, config: DistillConfig,
                pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, float, float]:
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


def _hidden_pairs(student: Any, teacher: Any, config: DistillConfig) -> list[tuple[int, int]]:
    """(student, teacher) indices into HF `hidden_states`: matched layer outputs, then final <-> final."""
    if config.hidden_weight == 0:
        return []
    src = layer_map(student, teacher)
    n_t = len(teacher.adapter.layers())
    # hidden_states[i + 1] is layer i's output; the last entry is the final output (after any final norm).
    return [(i + 1, s + 1) for i, s in enumerate(src[:-1])] + [(len(src), n_t)]


@torch.no_grad()
def heldout_metric(teacher: Any, student: Any, texts: Sequence[str], *, batch_size: int = 4,
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


# --- the loop ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRecord:
    """One optimisation step; `heldout` is set on evaluation steps. Step 0 is the student before
    training: held-out gap only, no loss."""

    step: int
    steps: int
    loss: float | None
    kd: float | None
    hidden: float | None
    lr: float
    heldout: float | None
    elapsed_s: float
    stage: str = ""


@dataclass
class DistillResult:
    steps_run: int  # the step counter at the end (a resumed run counts the steps before the stop too)
    steps_planned: int
    history: list[StepRecord]
    initial_heldout: float
    best_heldout: float
    best_step: int
    stopped_early: bool
    interrupted: bool
    wall_s: float  # training time, summed over resumed sessions
    trainable_params: int
    config: DistillConfig

    @property
    def final_heldout(self) -> float:
        evals = [r.heldout for r in self.history if r.heldout is not None]
        return evals[-1] if evals else self.initial_heldout

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("history", "config")}
        return {**d, "config": self.config.to_dict(), "history": [asdict(r) for r in self.history]}


def has_checkpoint(out_dir: str | os.PathLike | None) -> bool:
    """A resumable checkpoint exists in `out_dir`."""
    return out_dir is not None and (Path(out_dir) / CHECKPOINT / "state.json").is_file()


def _lr(config: DistillConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
    progress = step / max(1, config.steps)
    floor = config.min_lr_ratio
    return config.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_texts(data: DistillData, config: DistillConfig, step: int) -> list[str]:
    """The texts of step `step`: a fresh seeded permutation of the training texts per epoch."""
    n, bs = len(data.train), config.batch_size
    texts, perms = [], {}
    start = (config.data_offset + step) * bs
    for pos in range(start, start + bs):
        epoch = pos // n
        if epoch not in perms:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        texts.append(data.train[perms[epoch][pos % n]])
    return texts


@dataclass
class _RunState:
    step: int = 0
    history: list[StepRecord] = field(default_factory=list)
    initial: float = math.inf
    best: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0


def _fingerprint(student: Any, config: DistillConfig, data: DistillData, params: dict[str, nn.Parameter]) -> dict:
    shapes = hashlib.sha256(json.dumps([(n, list(p.shape)) for n, p in params.items()]).encode()).hexdigest()[:16]
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("checkpoint_every",)}
    return {"config": cfg, "data": data.fingerprint(), "trainable": shapes, "student": student.name}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _optimizer_tensors(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in params.items():
        for key, v in opt.state.get(p, {}).items():
            out[f"{name}::{key}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _write_checkpoint(out_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                      state: _RunState, fingerprint: dict) -> None:
    """Write out_dir/checkpoint atomically: a complete temporary folder renamed into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{CHECKPOINT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(dict(params), tmp / "weights.safetensors")
    _save_tensors(_optimizer_tensors(opt, params), tmp / "optimizer.safetensors")
    meta = {"format": "headlab.distill_checkpoint", "version": 1, "fingerprint": fingerprint,
            "state": {**{k: v for k, v in state.__dict__.items() if k != "history"},
                      "history": [asdict(r) for r in state.history]}}
    (tmp / "state.json").write_text(json.dumps(meta))
    final, old = out_dir / CHECKPOINT, out_dir / f".{CHECKPOINT}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                     fingerprint: dict) -> _RunState:
    from safetensors.torch import load_file

    folder = out_dir / CHECKPOINT
    meta = json.loads((folder / "state.json").read_text())
    saved = meta.get("fingerprint", {})
    for key in ("config", "data", "trainable"):
        if saved.get(key) != fingerprint[key]:
            what = {"config": "settings", "data": "training texts", "trainable": "student (mask or mode)"}[key]
            raise DistillError(f"the checkpoint in {folder} was made with other {what}; resume with the same ones "
                               "or choose another output folder")
    weights = load_file(str(folder / "weights.safetensors"))
    moments = load_file(str(folder / "optimizer.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in moments.items():
        name, slot = key.split("::")
        by_param.setdefault(name, {})[slot] = v
    order = list(params)
    opt_state = opt.state_dict()
    opt_state["state"] = {order.index(n): s for n, s in by_param.items()}
    opt.load_state_dict(opt_state)
    raw = meta["state"]
    state = _RunState(**{k: v for k, v in raw.items() if k != "history"})
    state.history = [StepRecord(**r) for r in raw["history"]]
    return state


def _check_pair(teacher: Any, student: Any) -> None:
    if student.model is teacher.model:
        raise DistillError("the student must be a separate copy of the model (engine.export.surgery.prune makes one); "
                           "the shared teacher is never trained")
    gt, gs = teacher.geometry, student.geometry
    if (gt.vocab_size, gt.hidden, gt.causal) != (gs.vocab_size, gs.hidden, gs.causal):
        raise DistillError(f"{student.name} does not fit {teacher.name}: vocabulary, hidden size and causality must "
                           f"match (teacher {gt.vocab_size}/{gt.hidden}/{gt.causal}, student "
                           f"{gs.vocab_size}/{gs.hidden}/{gs.causal})")
    if teacher.adapter.has_lm_head != student.adapter.has_lm_head:
        raise DistillError("teacher and student must both have an LM head, or both be bare encoders")


def distill(
    teacher: Any,
    student: Any,
    data: DistillData,
    config: DistillConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    stage: str = "",
) -> DistillResult:
    """Train `student` (in place) to match `teacher` on `data`; see the module doc for the objective."""
    config = (config or DistillConfig()).check()
    data.check()
    _check_pair(teacher, student)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and has_checkpoint(out) and not resume:
        raise FileExistsError(f"{out} already holds a distillation checkpoint; resume it or choose another folder")
    if resume and not has_checkpoint(out):
        raise DistillError(f"nothing to resume: {out} holds no checkpoint")
    pairs = _hidden_pairs(student, teacher, config)
    params = prepare_student_(student, config)
    if not params:
        raise DistillError("the student has no trainable parameters in this mode")
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    fingerprint = _fingerprint(student, config, data, params)
    best: dict[str, torch.Tensor] | None = None
    eval_kwargs = {"batch_size": config.batch_size, "max_length": config.max_length}
    if resume:
        state = _load_checkpoint(out, params, opt, fingerprint)
        if (out / BEST).exists():
            from safetensors.torch import load_file

            best = load_file(str(out / BEST))
    else:
        state = _RunState()
        state.initial = state.best = heldout_metric(teacher, student, data.heldout, **eval_kwargs)
        # The starting point is a candidate too: a run that only gets worse gives the student back unchanged.
        best = {n: p.detach().clone() for n, p in params.items()} if config.restore_best else None
        if out is not None and best is not None:
            out.mkdir(parents=True, exist_ok=True)
            _save_tensors(best, out / BEST)
        state.history.append(StepRecord(0, config.steps, None, None, None, 0.0, state.initial, 0.0, stage))
        if progress:
            progress(state.history[-1])
    tokenizer = teacher.tokenizer
    interrupted = False
    started = time.perf_counter() - state.wall_s
    try:
        while state.step < config.steps and not state.stopped_early:
            step = state.step
            lr = _lr(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            ids, am = encode_batch(tokenizer, _batch_texts(data, config, step), config.max_length, student.device)
            loss, kd, hid = _batch_loss(teacher, student, ids, am, config, pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
            opt.step()
            state.step = step + 1
            held = None
            if state.step % config.eval_every == 0 or state.step == config.steps:
                held = heldout_metric(teacher, student, data.heldout, **eval_kwargs)
                if held < state.best * (1 - config.min_improvement):
                    state.best, state.best_step, state.bad_evals = held, state.step, 0
                    best = {n: p.detach().clone() for n, p in params.items()} if config.restore_best else None
                    if out is not None and best is not None:
                        out.mkdir(parents=True, exist_ok=True)
                        _save_tensors(best, out / BEST)
                else:
                    state.bad_evals += 1
                    state.stopped_early = bool(config.patience) and state.bad_evals >= config.patience
            state.wall_s = time.perf_counter() - started
            record = StepRecord(state.step, config.steps, loss.item(), kd, hid, lr, held, state.wall_s, stage)
            state.history.append(record)
            if out is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps
                                    or state.stopped_early):
                _write_checkpoint(out, params, opt, state, fingerprint)
            if progress:
                progress(record)
            if should_stop is not None and state.step < config.steps and not state.stopped_early and should_stop():
                interrupted = True
                if out is not None:
                    _write_checkpoint(out, params, opt, state, fingerprint)
                break
    except KeyboardInterrupt:
        if out is not None:
            _write_checkpoint(out, params, opt, state, fingerprint)
        raise
    finally:
        for p in params.values():
            p.requires_grad_(False)
    if not interrupted and config.restore_best and best is not None and state.best_step < state.step:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best[name])
    return DistillResult(state.step, config.steps, state.history, state.initial, state.best, state.best_step,
                         state.stopped_early, interrupted, state.wall_s, sum(p.numel() for p in params.values()),
                         config)


def with_bits(config: DistillConfig, bits: int | None, steps: int, scheme: str | None = None,
              data_offset: int = 0) -> DistillConfig:
    """`config` for one stage: its bit width, step budget and where in the data order it starts."""
    return replace(config, bits=bits, steps=steps, scheme=scheme if bits == 2 else None, data_offset=data_offset)
