"""What a calibrated rule costs and saves: measured sparsity, and perplexity under the pinned protocol."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.progress import Progress
from headlab.engine.dynamic.apply import SparsityMeter, SparsityReport, apply_rule
from headlab.engine.dynamic.rules import Rule, Thresholds, ThresholdsError, get_rule
from headlab.engine.runtime.evaluate import (
    DEFAULT_PROTOCOL,
    PerplexityProtocol,
    PerplexityResult,
    eval_windows,
    tokenizer_label,
    window_token_nll,
)

__all__ = ["DynamicPerplexity", "dynamic_perplexity", "measure_sparsity", "perplexity_under"]


@dataclass(frozen=True)
class DynamicPerplexity:
    """Perplexity under a rule (with its protocol) and the sparsity the rule reached on those tokens."""

    result: PerplexityResult
    sparsity: SparsityReport

    def describe(self) -> str:
        return f"{self.result.describe()}; {self.sparsity.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "sparsity": self.sparsity.to_dict()}


def _matching(rule: str | Rule, thresholds: Thresholds) -> None:
    if get_rule(rule).name != thresholds.rule:
        raise ThresholdsError(f"these thresholds were calibrated for {thresholds.rule!r}, not {get_rule(rule).name!r}")


@torch.no_grad()
def measure_sparsity(handle: ModelHandle, thresholds: Thresholds, ids: torch.Tensor, *,
                     batch_size: int = 4) -> SparsityReport:
    """The fraction of each site's inputs the rule zeroes on `ids` [B, T], per layer and overall."""
    meter = SparsityMeter(thresholds.rule, handle.geometry.n_layers)
    with apply_rule(handle, thresholds, meter):
        for i in range(0, ids.shape[0], batch_size):
            handle.model(input_ids=ids[i : i + batch_size].to(handle.device))
    return meter.report()


@torch.no_grad()
def dynamic_perplexity(
    handle: ModelHandle,
    rule: str | Rule,
    thresholds: Thresholds,
    protocol: PerplexityProtocol = DEFAULT_PROTOCOL,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> DynamicPerplexity:
    """Perplexity with `rule` applied per token (headlab.engine.runtime.evaluate's windows and NLL), and its sparsity."""
    _matching(rule, thresholds)
    return perplexity_under(handle, thresholds.rule, lambda meter: apply_rule(handle, thresholds, meter), protocol,
                            batch_size=batch_size, progress=progress)


@torch.no_grad()
def perplexity_under(
    handle: ModelHandle,
    name: str,
    apply: Callable[[SparsityMeter], AbstractContextManager],
    protocol: PerplexityProtocol = DEFAULT_PROTOCOL,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> DynamicPerplexity:
    """Perplexity with the per-token masks that `apply(meter)` installs (a context manager), and their sparsity.

    The one evaluation loop of every dynamic method (rules, the importance network): headlab.engine.runtime.evaluate's
    windows and NLL, batches of `batch_size` windows.
    """
    if not handle.is_causal_lm:
        raise ValueError(f"perplexity needs a causal language model; {handle.name} is an encoder without an LM head")
    windows, score_from = eval_windows(handle, protocol)
    meter = SparsityMeter(name, handle.geometry.n_layers)
    nlls, n = [], windows.shape[0]
    with apply(meter):
        for i in range(0, n, batch_size):
            ids = windows[i : i + batch_size].to(handle.device)
            nlls.append(window_token_nll(handle.model(input_ids=ids).logits, ids, score_from[i : i + batch_size])
                        .float().cpu())
            if progress:
                progress(min(i + batch_size, n), n)
    result = PerplexityResult.from_token_nll(torch.cat(nlls), protocol, tokenizer_label(handle))
    return DynamicPerplexity(result, meter.report())
