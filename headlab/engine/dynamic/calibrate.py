"""Per-layer thresholds of a dynamic sparsity rule, calibrated on text to a target sparsity.

The calibration text becomes one batch of equal windows (no padding to exclude), run once
through the model under the rule with every threshold unset: each site, when it runs, takes the
quantile of its scores over the whole batch as its threshold and applies it at once. Later
sites therefore see the inputs the earlier sparsification actually produces, so running the
calibrated thresholds on the calibration batch zeroes the target fraction of every site
(exactly, barring tied scores), not only on the dense model's activations.

`calibrate_weights_skipped` sets a rule's level instead by what it saves: the level (found by bisection
on the calibration text) at which the rule's weights_skipped matches another method's, so that TEAL or
WINA over every matrix can be compared with a method that sparsifies only the FFN at equal weights read.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.tokens import EmptyTextError, context_length
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.dynamic.apply import SparsityMeter, apply_rule
from headlab.engine.dynamic.rules import ORACLE, Rule, Thresholds, ThresholdsError, get_rule
from headlab.engine.runtime.evaluate import leading_bos, text_windows

__all__ = ["calibration_ids", "calibrate", "calibrate_weights_skipped"]


def calibration_ids(handle: ModelHandle, texts: Sequence[str] | None = None, *, window: int = 256,
                    n_windows: int = 8) -> torch.Tensor:
    """[n_windows, window] token ids: `texts` (default: the shipped wikitext calibration set) joined and cut."""
    if window > context_length(handle.model):
        raise ValueError(f"window {window} exceeds the model's context of {context_length(handle.model)} tokens")
    texts = list(texts) if texts is not None else calibration_texts("wikitext")
    ids = handle.tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if not ids:
        raise EmptyTextError("the calibration text is empty")
    # BOS first in every window for tokenizers that always start with it (Gemma), as the perplexity protocol does
    return text_windows(torch.tensor(ids), window, window, n_windows, leading_bos(handle.tokenizer))


@torch.no_grad()
def calibrate(handle: ModelHandle, rule: str | Rule, sparsity: float, ids: torch.Tensor | None = None) -> Thresholds:
    """Thresholds of `rule` that zero a fraction `sparsity` of each site's input on `ids` [B, T] (one batch)."""
    rule = get_rule(rule)
    g = handle.geometry
    if rule is ORACLE:  # no threshold to learn: the oracle keeps exactly k per token
        return Thresholds.oracle(g.n_layers, g.ffn_dim, sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ThresholdsError(f"target sparsity must be a fraction in [0, 1], got {sparsity}")
    ids = calibration_ids(handle) if ids is None else ids
    unset = Thresholds(rule.name, {s: torch.full((g.n_layers,), math.nan) for s in rule.sites}, target=sparsity)
    meter = SparsityMeter(rule.name, g.n_layers)
    with apply_rule(handle, unset, meter, calibrate_to=sparsity):
        handle.model(input_ids=ids.to(handle.device))
    report = meter.report()
    unset.meta = {"calibration_tokens": int(ids.numel()), "measured_sparsity": report.overall,
                  "weights_skipped": report.weights_skipped}
    return unset


@torch.no_grad()
def calibrate_weights_skipped(handle: ModelHandle, rule: str | Rule, weights_skipped: float, ids: torch.Tensor, *,
                              tolerance: float = 0.002, max_steps: int = 20) -> Thresholds:
    """Thresholds of `rule` at the level whose weights_skipped on `ids` [B, T] is `weights_skipped` (+- tolerance).

    Bisection on the level (the per-site input sparsity `calibrate` is given), probing the target itself first:
    a rule over all seven projections skips exactly its level on the text it is calibrated on (barring ties),
    a rule over fewer matrices needs a higher level. The result's meta records the level and the
    weights_skipped it reached on `ids`; when the target is out of the rule's reach, the closest end is returned.
    """
    if get_rule(rule) is ORACLE:
        raise ThresholdsError("the oracle has a keep count, not a level: calibrate it by its FFN sparsity")
    if not 0.0 <= weights_skipped <= 1.0:
        raise ThresholdsError(f"weights_skipped must be a fraction in [0, 1], got {weights_skipped}")
    lo, hi = 0.0, 1.0
    level = weights_skipped
    best: Thresholds | None = None
    for _ in range(max_steps):
        th = calibrate(handle, rule, level, ids)
        reached = th.meta["weights_skipped"]
        if best is None or abs(reached - weights_skipped) < abs(best.meta["weights_skipped"] - weights_skipped):
            best = th
        if abs(reached - weights_skipped) <= tolerance:
            break
        lo, hi = (level, hi) if reached < weights_skipped else (lo, level)
        level = (lo + hi) / 2
    best.meta["level"] = best.target
    return best
