"""Perplexity of the model under an importance network's per-token masks (pinned protocol), and the sparsity reached."""

from __future__ import annotations

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.progress import Progress
from headlab.engine.dynamic.ipn.apply import RULE_NAME, apply_ipn
from headlab.engine.dynamic.ipn.network import IPN
from headlab.engine.dynamic.measure import DynamicPerplexity, perplexity_under
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, PerplexityProtocol

__all__ = ["ipn_perplexity"]


def ipn_perplexity(handle: ModelHandle, ipn: IPN, protocol: PerplexityProtocol = DEFAULT_PROTOCOL, *,
                   batch_size: int = 4, progress: Progress | None = None) -> DynamicPerplexity:
    """Perplexity with `ipn` choosing every token's FFN channels (and heads), and the sparsity it reached."""
    return perplexity_under(handle, RULE_NAME, lambda meter: apply_ipn(handle, ipn, meter), protocol,
                            batch_size=batch_size, progress=progress)
