"""Perplexity under a pinned protocol, and greedy generation, with or without a mask.

The protocol (every reported perplexity carries it):
- text: data/wikitext-2-raw-test.txt read as one string (sha256 printed with the result);
- tokenised once with the model's tokenizer, no special tokens added;
- windows of `window` tokens starting every `stride` tokens from token 0; `n_windows` of them;
- in each window, the tokens not already scored by the previous window are scored
  (all but the first when stride == window), each predicted from its own window only;
- a tokenizer that starts every text with its BOS token by default (Gemma's) gets it as the first
  token of every window, followed by `window - 1` text tokens, all of them scored (windows then
  advance by `window - 1` text tokens when stride == window): such models are trained never to see
  text without it, and without it Gemma 3 270M's perplexity is 2-4x higher. The scored token count
  is the same either way. Tokenizers that add no BOS (SmolLM2's, GPT-2's) are unaffected;
- perplexity = exp(mean negative log-likelihood over all scored tokens).
The default (window 512, stride 512, 12 windows: 6,132 scored tokens) is fast on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.once import computed_once
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import EmptyTextError, context_length
from headlab.engine.data.datasets import read_wikitext, wikitext_sha256
from headlab.engine.runtime.sparse_forward import sparse_logits, sparse_refusal

__all__ = [
    "PerplexityProtocol",
    "PerplexityResult",
    "DEFAULT_PROTOCOL",
    "eval_windows",
    "leading_bos",
    "text_windows",
    "tokenizer_label",
    "perplexity",
    "window_nll",
    "window_token_nll",
    "generate",
    "prompt_ids",
]


@dataclass(frozen=True)
class PerplexityProtocol:
    dataset: str = "wikitext-2-raw-test"
    window: int = 512
    stride: int = 512
    n_windows: int = 12

    def describe(self, tokenizer_name: str = "", n_scored: int | None = None) -> str:
        scored = f", {n_scored:,} scored tokens" if n_scored is not None else ""
        tok = f", tokenizer {tokenizer_name}" if tokenizer_name else ""
        return (
            f"{self.dataset} (data/wikitext-2-raw-test.txt, sha256 {wikitext_sha256()[:12]}){tok}, "
            f"window {self.window}, stride {self.stride}, {self.n_windows} windows{scored}"
        )


DEFAULT_PROTOCOL = PerplexityProtocol()


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    n_tokens: int
    protocol: PerplexityProtocol
    tokenizer: str
    # each scored token's NLL in protocol order (float32, CPU), where the evaluation kept them: a change between
    # two masks on the same tokens then gets a paired interval (headlab.engine.runtime.paired_bootstrap)
    token_nll: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_token_nll(cls, token_nll: torch.Tensor, protocol: PerplexityProtocol, tokenizer: str) -> "PerplexityResult":
        """The result of every scored token's NLL (1-D, in protocol order), which it keeps (float32, CPU)."""
        token_nll = token_nll.float().cpu()
        nll = float(token_nll.double().sum()) / token_nll.numel()
        return cls(math.exp(nll), nll, token_nll.numel(), protocol, tokenizer, token_nll=token_nll)

    def describe(self) -> str:
        return f"perplexity {self.perplexity:.3f} on {self.protocol.describe(self.tokenizer, self.n_tokens)}"

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "nll": self.nll, "n_tokens": self.n_tokens,
                "tokenizer": self.tokenizer, "protocol": asdict(self.protocol),
                "protocol_text": self.protocol.describe(self.tokenizer, self.n_tokens)}


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS id when `tokenizer` starts every text with it by default (so its model expects it), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def text_windows(ids: torch.Tensor, window: int, stride: int, n: int, bos: int | None, start: int = 0) -> torch.Tensor:
    """[n, window] windows over the token ids `ids` from `start`; with `bos`, each is BOS + window - 1 text tokens.

    Window i's text begins at start + i * stride (i * (stride - 1) with BOS and stride == window, so
    consecutive windows stay contiguous). Raises ValueError when the text is too short.
    """
    text = window - (bos is not None)
    step = stride - 1 if bos is not None and stride == window else stride
    need = start + (n - 1) * step + text
    if ids.numel() < need:
        raise ValueError(f"the text has {ids.numel()} tokens, the protocol needs {need}")
    rows = [ids[start + i * step: start + i * step + text] for i in range(n)]
    if bos is not None:
        rows = [torch.cat([torch.tensor([bos], dtype=ids.dtype), r]) for r in rows]
    return torch.stack(rows)


def tokenizer_label(handle: ModelHandle) -> str:
    """How results name the protocol's tokenizer: the model's name, plus the BOS rule when it applies."""
    bos = leading_bos(handle.tokenizer)
    return handle.name if bos is None else f"{handle.name} (BOS first in every window)"


@computed_once(maxsize=8)
def _wikitext_ids(tokenizer: Any) -> torch.Tensor:
    """The whole evaluation text as token ids, tokenised once per tokenizer, however many sessions ask at once."""
    return torch.tensor(tokenizer(read_wikitext(), add_special_tokens=False)["input_ids"])


def eval_windows(handle: ModelHandle, protocol: PerplexityProtocol = DEFAULT_PROTOCOL) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, window], score_from [n]): the protocol's windows and where scoring starts in each."""
    p = protocol
    if p.window < 2 or p.stride < 1 or p.stride > p.window or p.n_windows < 1:
        raise ValueError(f"invalid protocol {p}: need window >= 2 and 1 <= stride <= window, n_windows >= 1")
    if p.window > context_length(handle.model):
        raise ValueError(f"window {p.window} exceeds the model's context of {context_length(handle.model)} tokens")
    windows = text_windows(_wikitext_ids(handle.tokenizer), p.window, p.stride, p.n_windows,
                           leading_bos(handle.tokenizer))
    # Window 0 scores all its tokens after the first; later ones only what the previous did not reach
    # (the same with a leading BOS: its text is shifted by one position, and so is the overlap).
    score_from = torch.tensor([1] + [p.window - p.stride] * (p.n_windows - 1))
    score_from = score_from.clamp(min=1)
    return windows, score_from


def window_nll(logits: torch.Tensor, ids: torch.Tensor, score_from: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL over each window's scored tokens and their count, from logits [B, T, V]."""
    nll = window_token_nll(logits, ids, score_from)
    return nll.sum(), int(nll.numel())


def window_token_nll(logits: torch.Tensor, ids: torch.Tensor, score_from: torch.Tensor) -> torch.Tensor:
    """The NLL of every scored token, window by window in order (1-D), from logits [B, T, V]."""
    ids = ids.to(logits.device)  # a split model's LM head may compute on another device than the inputs
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1): token t+1 predicted at t
    pos = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
    scored = pos >= score_from.to(ids.device)[:, None]
    return nll[scored]


@torch.no_grad()
def perplexity(
    handle: ModelHandle,
    mask: PruneMask | None = None,
    protocol: PerplexityProtocol = DEFAULT_PROTOCOL,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
    use_kernels: bool | None = None,
) -> PerplexityResult:
    """Perplexity of the model (under `mask` when given) with the pinned protocol.

    `use_kernels`: run a hard mask through the masked kernels (headlab.engine.runtime.sparse_forward: Triton on
    CUDA, the exact torch twins elsewhere), skipping pruned work. None picks it whenever the
    mask is hard and the model has that path (`sparse_refusal`); otherwise the gates' hook path runs.
    """
    if not handle.is_causal_lm:
        raise ValueError(
            f"perplexity needs a causal language model; {handle.name} is an encoder without an LM head"
        )
    windows, score_from = eval_windows(handle, protocol)
    if use_kernels is None:
        use_kernels = mask is not None and sparse_refusal(handle, mask) is None
    nlls: list[torch.Tensor] = []
    n = windows.shape[0]
    with gates.apply(handle, None if use_kernels else mask):
        for i in range(0, n, batch_size):
            ids = windows[i : i + batch_size].to(handle.device)
            if use_kernels:
                logits = sparse_logits(handle, ids, mask if mask is not None else PruneMask.dense(handle.geometry))
            else:
                logits = handle.model(input_ids=ids).logits
            nlls.append(window_token_nll(logits, ids, score_from[i : i + batch_size]).float().cpu())
            if progress:
                progress(min(i + batch_size, n), n)
    return PerplexityResult.from_token_nll(torch.cat(nlls), protocol, tokenizer_label(handle))


def prompt_ids(handle: ModelHandle, prompt: str, chat: bool = True) -> torch.Tensor:
    """[1, T] ids of `prompt`, through the chat template when `chat` and the tokenizer has one."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise EmptyTextError("the prompt is empty: type something for the model to continue")
    tok = handle.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    return ids


@torch.no_grad()
def generate(
    handle: ModelHandle,
    prompt: str,
    mask: PruneMask | None = None,
    *,
    max_new_tokens: int = 40,
    chat: bool = True,
) -> str:
    """Greedy continuation of `prompt` (through the chat template when the model has one)."""
    if not handle.is_causal_lm:
        raise ValueError(f"generation needs a causal language model; {handle.name} is an encoder")
    ids = prompt_ids(handle, prompt, chat)
    limit = context_length(handle.model)
    if ids.shape[1] + max_new_tokens > limit:
        ids = ids[:, -(limit - max_new_tokens):]
    ids = ids.to(handle.device)
    tok = handle.tokenizer
    with gates.apply(handle, mask):
        out = handle.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
