"""Output-reconstruction compensation for pruned heads and FFN channels (FLAP).

An, Zhao, Yu, Tang & Wang, "Fluctuation-based Adaptive Structured Pruning for Large
Language Models", AAAI 2024. A pruned unit's output is replaced by its *mean* over
calibration data instead of zero, folded into one bias per layer (the formula, and what
happens to removed sub-blocks: headlab.engine.importance.mean_ablation). A head whose output is
constant over the data (an attention-sink head writing the same vector everywhere) is removed
at no cost at all; the criterion that ranks heads by how much their output *varies* is FLAP's
fluctuation metric (headlab.engine.importance.fluctuation).

The means come from `CaptureStats` (head_in_mean, ffn_mean: the projections' inputs, taken
before any gate). `sequential=True` re-captures them under the compensated mask, so each
layer's means reflect the pruned layers before it (the shift FLAP's one-pass means ignore).
"""

from __future__ import annotations

from typing import Any, Sequence

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.importance.capture import CaptureStats, capture
from headlab.engine.importance.mean_ablation import mean_biases

__all__ = ["compensate", "strip_compensation"]


def strip_compensation(mask: PruneMask) -> PruneMask:
    """A copy of `mask` without compensation biases, nor refits (their intercepts live in those biases)."""
    m = mask.without_refit()
    m.attn_bias = m.ffn_bias = None
    m.meta.pop("compensation", None)
    m.meta.pop("reconstruction", None)
    return m


def compensate(
    handle: ModelHandle,
    mask: PruneMask,
    stats: CaptureStats | None = None,
    *,
    texts: Sequence[str] | None = None,
    units: str = "both",
    sequential: bool = False,
    progress: Progress | None = None,
    **capture_kwargs: Any,
) -> PruneMask:
    """`mask` normalized, with FLAP biases for its pruned heads/channels (`units`: heads, ffn, both).

    The means come from `stats` (dense calibration statistics) or, when absent, a forward
    capture over `texts`; `sequential=True` re-captures them under the compensated mask once.
    """
    if units not in ("heads", "ffn", "both"):
        raise ValueError(f"units must be 'heads', 'ffn' or 'both', got {units!r}")
    g = handle.geometry
    mask.check(g)
    if stats is None:
        if texts is None:
            raise ValueError("compensate needs calibration statistics or texts to compute them from")
        stats = capture(handle, texts, gradients=False, progress=progress, **capture_kwargs)

    def with_means(m: PruneMask, s: CaptureStats) -> PruneMask:
        return mean_biases(handle, m, s.head_in_mean if units in ("heads", "both") else None,
                           s.ffn_mean if units in ("ffn", "both") else None)

    m = with_means(strip_compensation(mask), stats)
    if sequential:
        if texts is None:
            raise ValueError("sequential compensation re-captures statistics: pass the calibration texts")
        # Means under the pruned model: what each layer really receives once the earlier ones changed.
        shifted = capture(handle, texts, gradients=False, mask=m, progress=progress, **capture_kwargs)
        m = with_means(strip_compensation(m), shifted)
    m.meta["compensation"] = {"method": "FLAP mean bias (An et al. 2024)", "units": units,
                              "sequential": sequential, "calibration_tokens": stats.n_tokens}
    return m.check(g)
