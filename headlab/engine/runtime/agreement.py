"""Agreement with the dense model, beyond perplexity: next-token top-1 and greedy generation.

Perplexity averages how much probability the pruned model keeps on the text; a user who serves
the pruned model sees its choices. Two measures of those, both against the dense model on the
same token windows (`windows`: [n, T] ids, e.g. the pinned protocol's or held-out windows):

- top-1 agreement: over every position of every window, the fraction where the pruned model's
  most likely next token is the dense model's (teacher-forced on the text, so one error does
  not carry into the next position);
- greedy agreement: the first `prompt_tokens` tokens of each of `n_prompts` windows are
  continued greedily for `n_new` tokens by both models; the score is the mean length of the
  common prefix of the two continuations, as a fraction of `n_new` (1.0: every prompt
  continued identically; after the first different token the rest is not compared, since the
  two generations then read different contexts). `greedy_tokens` also reports the plain
  token-by-token match rate.

The dense side (`DenseReference`) depends only on the model and the windows, so callers that
compare many masks compute it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress

__all__ = ["Agreement", "DenseReference", "agreement", "dense_reference", "greedy_tokens", "top1_tokens"]


@dataclass(frozen=True)
class DenseReference:
    """The dense model's choices on a set of windows: top-1 per position and greedy continuations."""

    top1: torch.Tensor  # [n, T-1] argmax of the logits at positions 0..T-2
    greedy: torch.Tensor  # [n_prompts, n_new]
    prompt_tokens: int


@dataclass(frozen=True)
class Agreement:
    top1: float  # fraction of positions where the masked top-1 equals the dense top-1
    n_positions: int
    greedy_prefix: float  # mean common-prefix length / n_new
    greedy_tokens: float  # token-by-token match rate of the greedy continuations
    n_prompts: int
    n_new: int

    def describe(self) -> str:
        return (f"top-1 agreement {self.top1:.1%} ({self.n_positions:,} positions); greedy agreement "
                f"{self.greedy_prefix:.1%} of {self.n_new} tokens before the first difference "
                f"({self.greedy_tokens:.1%} token by token, {self.n_prompts} prompts)")


def _check(handle: ModelHandle, windows: torch.Tensor) -> None:
    if not handle.is_causal_lm:
        raise ValueError(f"agreement needs a causal language model; {handle.name} is an encoder without an LM head")
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, T] token ids with T >= 2, got shape {tuple(windows.shape)}")


@torch.no_grad()
def top1_tokens(handle: ModelHandle, mask: PruneMask | None, windows: torch.Tensor, *, batch_size: int = 4,
                progress: Progress | None = None) -> torch.Tensor:
    """[n, T-1] most likely next token at every position but the last, under `mask`."""
    _check(handle, windows)
    out = []
    with gates.apply(handle, mask):
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i: i + batch_size].to(handle.device)
            out.append(handle.model(input_ids=ids).logits[:, :-1].argmax(-1).cpu())
            if progress:
                progress(min(i + batch_size, windows.shape[0]), windows.shape[0])
    return torch.cat(out)


@torch.no_grad()
def greedy_tokens(handle: ModelHandle, mask: PruneMask | None, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """[n, n_new] greedy continuations of equal-length prompts [n, P], batched, with the KV cache.

    Every prompt is continued for exactly `n_new` tokens (an end-of-text token is just a token),
    so two models' continuations always have the same length.
    """
    _check(handle, prompts)
    if n_new < 1:
        raise ValueError(f"n_new must be at least 1, got {n_new}")
    model = handle.model
    ids = prompts.to(handle.device)
    new = []
    with gates.apply(handle, mask):
        out = model(input_ids=ids, use_cache=True)
        for step in range(n_new):
            nxt = out.logits[:, -1].argmax(-1)
            new.append(nxt.cpu())
            if step + 1 < n_new:
                out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True)
    return torch.stack(new, dim=1)


def _prompts(windows: torch.Tensor, n_prompts: int, prompt_tokens: int) -> torch.Tensor:
    if not 1 <= prompt_tokens < windows.shape[1]:
        raise ValueError(f"prompt_tokens must be between 1 and {windows.shape[1] - 1}, got {prompt_tokens}")
    return windows[: max(1, n_prompts), :prompt_tokens]


def dense_reference(handle: ModelHandle, windows: torch.Tensor, *, n_prompts: int = 8, prompt_tokens: int = 32,
                    n_new: int = 32, batch_size: int = 4) -> DenseReference:
    """The dense model's top-1 tokens on `windows` and greedy continuations of their first tokens."""
    _check(handle, windows)
    prompts = _prompts(windows, n_prompts, prompt_tokens)
    return DenseReference(top1_tokens(handle, None, windows, batch_size=batch_size),
                          greedy_tokens(handle, None, prompts, n_new), prompt_tokens)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading tokens of a and b are equal."""
    differ = (a != b).to(torch.int64)
    return torch.where(differ.any(dim=1), differ.argmax(dim=1), torch.full_like(differ[:, 0], a.shape[1]))


def agreement(handle: ModelHandle, mask: PruneMask | None, windows: torch.Tensor, *,
              reference: DenseReference | None = None, n_prompts: int = 8, prompt_tokens: int = 32,
              n_new: int = 32, batch_size: int = 4, progress: Progress | None = None) -> Agreement:
    """Top-1 and greedy agreement of the model under `mask` with the dense model on `windows`."""
    _check(handle, windows)
    if reference is None:
        reference = dense_reference(handle, windows, n_prompts=n_prompts, prompt_tokens=prompt_tokens,
                                    n_new=n_new, batch_size=batch_size)
    top1 = top1_tokens(handle, mask, windows, batch_size=batch_size, progress=progress)
    if top1.shape != reference.top1.shape:
        raise ValueError(f"the reference was computed on windows of shape {tuple(reference.top1.shape)}, "
                         f"these give {tuple(top1.shape)}")
    dense_greedy = reference.greedy
    prompts = _prompts(windows, dense_greedy.shape[0], reference.prompt_tokens)
    greedy = greedy_tokens(handle, mask, prompts, dense_greedy.shape[1])
    prefix = _common_prefix(greedy, dense_greedy).float() / dense_greedy.shape[1]
    return Agreement(
        top1=float((top1 == reference.top1).float().mean()),
        n_positions=top1.numel(),
        greedy_prefix=float(prefix.mean()),
        greedy_tokens=float((greedy == dense_greedy).float().mean()),
        n_prompts=dense_greedy.shape[0],
        n_new=dense_greedy.shape[1],
    )
