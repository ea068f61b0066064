"""How far a perplexity change between two masks is from noise: a paired bootstrap over the scored tokens.

    ci = change_interval(dense.token_nll, masked.token_nll)      # both on the same tokens, in the same order
    ci.delta, ci.low, ci.high                                      # perplexity change and its 95% interval

Both perplexities are computed on the same tokens, so what varies between resamples is which tokens are
drawn, the same for both (paired): the interval is that of exp(mean NLL_b) - exp(mean NLL_a). Neighbouring
tokens' losses are correlated (a hard passage is hard for several tokens), so the tokens are drawn in
contiguous blocks (a moving-block bootstrap, Kuensch 1989) of `block` tokens, which keeps that correlation
inside each draw; single-token draws would give too narrow an interval. A change whose interval holds 0
is within the noise of this evaluation's tokens: more tokens (the full protocol) are needed to tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ChangeInterval", "change_interval"]


@dataclass(frozen=True)
class ChangeInterval:
    delta: float  # perplexity b - perplexity a on all tokens
    low: float
    high: float
    level: float
    n_tokens: int
    block: int

    @property
    def significant(self) -> bool:
        """Whether the interval leaves out 0 (the change is more than this evaluation's noise)."""
        return self.low > 0 or self.high < 0

    def describe(self) -> str:
        verdict = "beyond the noise" if self.significant else "within the noise"
        return (f"{self.delta:+.3f} ({100 * self.level:.0f}% interval {self.low:+.3f} to {self.high:+.3f}, paired "
                f"bootstrap over {self.n_tokens:,} tokens in blocks of {self.block}: {verdict})")


def change_interval(nll_a: torch.Tensor, nll_b: torch.Tensor, *, level: float = 0.95, n_boot: int = 2000,
                    block: int = 32, seed: int = 0) -> ChangeInterval:
    """The perplexity change from `nll_a` to `nll_b` (per-token NLLs of the same tokens) with its interval."""
    a, b = nll_a.reshape(-1).double(), nll_b.reshape(-1).double()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"the two evaluations must score the same tokens: {a.numel()} vs {b.numel()}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = a.numel()
    block = max(1, min(block, n))
    delta = math.exp(b.mean().item()) - math.exp(a.mean().item())
    gen = torch.Generator().manual_seed(seed)
    n_blocks = math.ceil(n / block)
    starts = torch.randint(0, n - block + 1, (n_boot, n_blocks), generator=gen)
    idx = (starts[:, :, None] + torch.arange(block)[None, None, :]).reshape(n_boot, -1)[:, :n]  # [n_boot, n]
    samples = torch.exp(b[idx].mean(1)) - torch.exp(a[idx].mean(1))
    tail = (1 - level) / 2
    low, high = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=samples.dtype)).tolist()
    return ChangeInterval(delta, low, high, level, n, block)
