"""One-shot strategies: score once with a criterion, cut once (optionally compensate).

The four baselines users know (random, magnitude, entropy, gradient), plus:
- `fluctuation` / `flap`: FLAP's fluctuation metric (An et al., AAAI 2024); `flap` is the
  paper's recipe: scores standardised within each layer (its "adaptive structure search":
  one global cut over per-layer z-scores) and mean compensation of everything pruned;
- `ablation`: the measured KL to the dense model when each head alone is removed
  (headlab.engine.importance.ablation), computed once per calibration set and cached.

"+comp" adds FLAP mean compensation, and where a criterion can, it then scores the removal
compensation actually performs: `gradient+comp` takes |dL/dg| of gates that interpolate
between a head's output and its mean, `ablation+comp` measures mean-ablation, not zeroing.

Scopes (how one score table becomes a per-layer allocation):
- "global": one threshold over raw scores (layers lose different amounts);
- "uniform": every layer loses the same count;
- "standardized": one threshold over scores z-scored within each layer, so a criterion whose
  scale drifts with depth (fluctuation, gradients) still allocates across layers sensibly.
FFN channels use the criterion's own channel scores, or fluctuation for head-only criteria.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.importance.criteria import Scores
from headlab.engine.pruning.compensation import compensate as add_compensation
from headlab.engine.pruning.select import select
from headlab.engine.pruning.strategies.base import Budget, Calibration, Strategy
from headlab.engine.pruning.strategies.scores import ablation_scores, criterion_scores, gradient_scores

__all__ = ["CriterionStrategy", "SCOPES", "standardize", "select_scores", "finish", "method_scores",
           "RandomStrategy", "MagnitudeStrategy", "EntropyStrategy", "GradientStrategy", "FluctuationStrategy",
           "FlapStrategy", "AblationStrategy"]

SCOPES = ("global", "uniform", "standardized")


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Scores z-scored within each layer (row): [L, N] -> [L, N]."""
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True).clamp(min=1e-12)
    return (scores - mean) / std


def select_scores(g: Any, scores: Scores, budget: Budget, scope: str, base: PruneMask | None = None) -> PruneMask:
    """Cut the budget's heads and FFN channels by `scores` under `scope`, on top of `base`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    h, f = budget.counts(g)
    mask = base or PruneMask.dense(g)
    for unit, count, t in (("heads", h, scores.heads), ("ffn", f, scores.ffn)):
        if not count:
            continue
        if t is None:
            raise ValueError(f"criterion {scores.criterion!r} gives no {unit} scores")
        s = standardize(t) if scope == "standardized" else t
        sel_scope = "uniform" if scope == "uniform" else "global"
        mask = select(g, Scores(scores.criterion, heads=s if unit == "heads" else None,
                                ffn=s if unit == "ffn" else None), count, unit=unit, scope=sel_scope, base=mask)
    return mask


def finish(handle: ModelHandle, mask: PruneMask, calib: Calibration, compensate: bool, meta: dict[str, Any],
           progress: Progress | None = None) -> PruneMask:
    """Add compensation biases when asked, and record how the mask was made."""
    if compensate:
        mask = add_compensation(handle, mask, calib.stats(handle, progress))
    mask.meta.update(meta)
    mask.meta["calibration"] = calib.describe()
    return mask


def method_scores(handle: ModelHandle, criterion: str, calib: Calibration, compensate: bool,
                  progress: Progress | None = None) -> Scores:
    """The scores a one-shot method cuts by; with `compensate`, gradient and ablation measure mean-ablation."""
    if criterion == "ablation":
        delta, texts = ablation_scores(handle, calib, mean=compensate, progress=progress)
        kind = "mean" if compensate else "zero"
        return Scores("ablation", heads=delta, note=f"KL(dense || {kind}-ablated head) on {len(texts)} texts")
    if criterion == "gradient" and compensate:
        heads, ffn = gradient_scores(handle, calib, compensate=True, progress=progress)
        return Scores("gradient", heads=heads, ffn=ffn, note="|dL/dg| of mean-ablation gates")
    return criterion_scores(handle, criterion, calib, progress)


class CriterionStrategy(Strategy):
    """Score once with `criterion`, cut the budget under `scope`, optionally compensate."""

    criterion: ClassVar[str] = ""
    default_scope: ClassVar[str] = "global"
    always_compensates: ClassVar[bool] = False
    ffn_fallback: ClassVar[str] = "fluctuation"

    def __init__(self, compensate: bool = False, scope: str | None = None):
        self.compensate = compensate or self.always_compensates
        self.scope = scope or self.default_scope
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")

    def __call__(self, handle: ModelHandle, budget, calib, *, progress=None):
        self.check_budget(handle, budget)
        scores = method_scores(handle, self.criterion, calib, self.compensate, progress)
        if budget.counts(handle.geometry)[1] and scores.ffn is None:
            fb = criterion_scores(handle, self.ffn_fallback, calib, progress)
            scores = Scores(scores.criterion, heads=scores.heads, ffn=fb.ffn, note=scores.note)
        mask = select_scores(handle.geometry, scores, budget, self.scope)
        return finish(handle, mask, calib, self.compensate,
                      {"method": self.name + ("+comp" if self.compensate and not self.always_compensates else ""),
                       "criterion": self.criterion, "scope": self.scope, "reference": self.reference}, progress)


def _one_shot(name: str, criterion: str, description: str, reference: str, *, scope: str = "global",
              comp: bool = False, ffn_fallback: str = "fluctuation") -> type[CriterionStrategy]:
    """A CriterionStrategy subclass named `name` (listed by headlab.engine.pruning.strategies.registry)."""
    return type(f"{name.title().replace('-', '')}Strategy", (CriterionStrategy,), {
        "name": name, "criterion": criterion, "description": description, "reference": reference,
        "default_scope": scope, "always_compensates": comp, "ffn_fallback": ffn_fallback,
    })


RandomStrategy = _one_shot("random", "random", "uniformly random heads (the baseline every method must beat)", "baseline")
MagnitudeStrategy = _one_shot("magnitude", "magnitude", "smallest Q/K/V/O weight norms first", "weight magnitude")
EntropyStrategy = _one_shot("entropy", "entropy", "broadest attention (highest mean entropy) first",
                            "common heuristic", ffn_fallback="magnitude")
GradientStrategy = _one_shot("gradient", "gradient", "smallest |dL/dgate| first, one shot",
                             "Michel, Levy & Neubig, 'Are Sixteen Heads Really Better than One?', NeurIPS 2019")
FluctuationStrategy = _one_shot("fluctuation", "fluctuation",
                                "steadiest output (Var(x) x ||W_O col||^2) first, one global cut",
                                "An et al., 'Fluctuation-based Adaptive Structured Pruning for LLMs' (FLAP), AAAI 2024")
FlapStrategy = _one_shot("flap", "fluctuation", "FLAP: fluctuation standardised per layer, one cut, mean compensation",
                         "An et al., 'Fluctuation-based Adaptive Structured Pruning for LLMs' (FLAP), AAAI 2024",
                         scope="standardized", comp=True)
AblationStrategy = _one_shot("ablation", "ablation", "smallest measured KL when the head alone is removed, one shot",
                             "loss-drop ablation (Michel et al. 2019, sec. 3; measured instead of first-order)")
