"""`suggest_mask`: the best known mask for a budget, with its predicted and measured perplexity.

Modes (which strategy runs; chosen from bench/bench_quality.py's measurements, docs/quality.md):
- "fast":     ablation+comp — one-shot cut by the measured mean-ablation KL of each head, then
              FLAP compensation. The ablation costs a few CPU-minutes once per calibration set
              (kept in the Calibration); every later budget is instant.
- "measured": ablation-iterative+comp — the same, removed in steps with the heads near the
              cut re-measured under the pruned model (better at large budgets, minutes per budget).
- "optimise": hardconcrete+comp — a static hard-concrete mask trained on KL to the dense model,
              started from the ablation ranking, exact budget (slowest).
- "reconstruct": obs — per-layer counts from one global OBS cost across layers (chosen on validation
              text), structured OBS choosing the heads (and channels) of each layer, every kept weight
              re-solved by least squares
              (headlab.engine.pruning.strategies.reconstruct; minutes, on 128 calibration paragraphs).

The prediction needs no forward pass: removals are assumed to add up, so
    predicted perplexity = dense perplexity x exp(sum of the removed heads' single-head KL)
(the KL of a mean-ablated head approximates the rise in next-token loss it causes); it is
given when the method measured those KLs (the ablation-based ones). The
measured perplexity runs the masked model on the given protocol (default: the app's live one,
2 windows of 256 tokens). Interactions make the
measurement higher than the prediction as the budget grows; the gap is reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.pruning.strategies.base import Budget, Calibration
from headlab.engine.pruning.strategies.reconstruct import depth_refit_prune, width_by_reconstruction
from headlab.engine.pruning.strategies.registry import get_strategy
from headlab.engine.pruning.strategies.scores import cached_ablation
from headlab.engine.runtime.evaluate import PerplexityProtocol, perplexity
from headlab.engine.runtime.prefix_cache import live_protocol

__all__ = ["MODES", "MODE_METHODS", "ROUTES", "SIZE_METHODS", "Suggestion", "suggest_mask", "suggest_size",
           "predicted_perplexity"]

MODE_METHODS = {"fast": "ablation+comp", "measured": "ablation-iterative+comp", "optimise": "hardconcrete+comp",
                "reconstruct": "obs"}
MODES = tuple(MODE_METHODS)
# A parameter budget: the measured best of each route without training (bench/bench_quality.py: width20, depth20).
SIZE_METHODS = {"width": "obs", "depth": "ablation-iterative-refit"}
ROUTES = tuple(SIZE_METHODS)


@dataclass(frozen=True)
class Suggestion:
    """What suggest_mask did and what the mask is expected to cost."""

    method: str
    mode: str
    budget: str
    heads_removed: int
    ffn_removed: int
    predicted_perplexity: float | None
    measured_perplexity: float | None
    dense_perplexity: float | None
    protocol: str | None
    calibration: str
    seconds: float

    @property
    def measured_ratio(self) -> float | None:
        """Measured / dense perplexity (None when not measured)."""
        if self.measured_perplexity is None or not self.dense_perplexity:
            return None
        return self.measured_perplexity / self.dense_perplexity

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "measured_ratio": self.measured_ratio}


def predicted_perplexity(dense: float, kl: Any, mask: PruneMask) -> float:
    """dense x exp(sum over the mask's pruned heads of their single-head KL)."""
    pruned = mask.heads_effective() == 0
    return dense * math.exp(float(kl[pruned].sum()))


def _measure(handle: ModelHandle, mask: PruneMask, protocol: PerplexityProtocol | None,
             measure: bool) -> tuple[float | None, float | None, str | None]:
    """(dense, masked perplexity, protocol text) on `protocol` (the live one by default); Nones when not measured."""
    if not (handle.is_causal_lm and measure):
        return None, None, None
    protocol = protocol or live_protocol(handle)
    dense = perplexity(handle, None, protocol).perplexity
    result = perplexity(handle, mask, protocol)
    return dense, result.perplexity, result.protocol.describe(result.tokenizer, result.n_tokens)


def suggest_mask(
    handle: ModelHandle,
    budget: Budget | float | int,
    *,
    mode: str = "fast",
    method: str | None = None,
    calib: Calibration | None = None,
    protocol: PerplexityProtocol | None = None,
    measure: bool = True,
    progress: Progress | None = None,
) -> tuple[PruneMask, Suggestion]:
    """(mask, Suggestion) for `budget` (a Budget, or a head fraction/count) by `mode`'s method, or `method`."""
    if mode not in MODE_METHODS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(budget, Budget):
        budget = Budget(heads=budget)
    g = handle.geometry
    budget.counts(g)  # fail fast on a bad budget, before any slow pass
    method = method or MODE_METHODS[mode]
    strategy = get_strategy(method)
    calib = calib or Calibration.shipped()
    t0 = time.perf_counter()
    mask = strategy(handle, budget, calib, progress=progress)
    dense, measured, proto_text = _measure(handle, mask, protocol, measure)
    predicted = None
    if dense is not None:
        kl = cached_ablation(calib, mean=mask.attn_bias is not None)
        predicted = predicted_perplexity(dense, kl, mask) if kl is not None else None
    s = mask.summary()
    info = Suggestion(
        method=method, mode=mode, budget=budget.describe(g), heads_removed=s["heads_pruned"],
        ffn_removed=s["ffn_channels_pruned"], predicted_perplexity=predicted, measured_perplexity=measured,
        dense_perplexity=dense, protocol=proto_text, calibration=calib.describe(),
        seconds=time.perf_counter() - t0,
    )
    mask.meta["suggestion"] = info.to_dict()
    return mask, info


def suggest_size(
    handle: ModelHandle,
    keep: float,
    route: str = "width",
    *,
    calib: Calibration | None = None,
    protocol: PerplexityProtocol | None = None,
    measure: bool = True,
    progress: Progress | None = None,
) -> tuple[PruneMask, Suggestion]:
    """(mask, Suggestion) keeping about `keep` of the parameters by `route`, with the route's best method.

    width: structured OBS with the per-layer counts chosen on validation text (AUTO_ALLOCATION["width"]: OBS costs
    in measured KL, heads and channels competing per parameter) and the kept weights re-solved
    (headlab.engine.pruning.strategies.reconstruct.width_by_reconstruction; a per-layer export);
    depth: whole layers dropped by measured KL, re-measured under the pruned model, and the
    sub-blocks around each gap re-fitted to stand in for them (ablation-iterative-refit).
    """
    if route not in SIZE_METHODS:
        raise ValueError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep must be a fraction of the parameters in (0, 1), got {keep!r}")
    calib = calib or Calibration.shipped()
    t0 = time.perf_counter()
    method = SIZE_METHODS[route]
    if route == "width":
        mask = width_by_reconstruction(handle, keep, calib, progress=progress).mask
    else:
        mask = depth_refit_prune(handle, keep, method, calib, progress=progress)
    dense, measured, proto_text = _measure(handle, mask, protocol, measure)
    s = mask.summary()
    info = Suggestion(
        method=method, mode=f"size:{route}", budget=f"keep {keep:.0%} of the parameters by {route}",
        heads_removed=s["heads_pruned"], ffn_removed=s["ffn_channels_pruned"], predicted_perplexity=None,
        measured_perplexity=measured, dense_perplexity=dense, protocol=proto_text, calibration=calib.describe(),
        seconds=time.perf_counter() - t0,
    )
    mask.meta["suggestion"] = info.to_dict()
    return mask, info
