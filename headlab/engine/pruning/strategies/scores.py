"""Score tables the strategies share, computed once per calibration set and kept in it.

Each is keyed in `Calibration.cache`, so several strategies and budgets run on one capture
pass and one round of ablations.
"""

from __future__ import annotations

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.progress import Progress
from headlab.engine.importance.ablation import ablation_kl
from headlab.engine.importance.ablation_store import ABLATION_STORE, AblationStore
from headlab.engine.importance.criteria import Scores
from headlab.engine.importance.gate_gradients import gate_gradients
from headlab.engine.importance.registry import get_criterion
from headlab.engine.pruning.strategies.base import Calibration
from headlab.engine.runtime.replay import LayerReplay

__all__ = ["ABLATION_TEXTS", "ABLATION_MAX_LENGTH", "criterion_scores", "gradient_scores", "ablation_scores",
           "cached_ablation"]

# The ablation replays 4 calibration texts of up to 128 tokens: ~270 partial forwards over ~500
# tokens for SmolLM2-135M, a few CPU-minutes; KL to the dense model keeps the ranking stable at that size.
ABLATION_TEXTS = 4
ABLATION_MAX_LENGTH = 128


def criterion_scores(handle: ModelHandle, name: str, calib: Calibration, progress: Progress | None = None) -> Scores:
    """Scores of the registered criterion `name` from the calibration's dense capture."""
    key = f"criterion:{name}"
    if key not in calib.cache:
        calib.cache[key] = get_criterion(name)(handle, calib.stats(handle, progress))
    return calib.cache[key]


def gradient_scores(handle: ModelHandle, calib: Calibration, *, compensate: bool,
                    progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads [L, H], channels [L, F]) |dL/dgate| of the dense model; of mean-ablation gates with `compensate`."""
    stats = calib.stats(handle, progress)
    if not compensate:
        return stats.head_grad, stats.ffn_grad
    key = "gradient:mean"
    if key not in calib.cache:
        calib.cache[key] = gate_gradients(handle, calib.texts, None, head_means=stats.head_in_mean,
                                          ffn_means=stats.ffn_mean, batch_size=calib.batch_size,
                                          max_length=calib.max_length, progress=progress)
    return calib.cache[key]


def ablation_scores(handle: ModelHandle, calib: Calibration, *, mean: bool,
                    progress: Progress | None = None) -> tuple[torch.Tensor, list[str]]:
    """(KL [L, H] of removing each head alone from the dense model, the texts measured on).

    `mean=True` replaces the head by its calibration mean (what compensation does), else zeroes it.
    """
    texts = calib.texts[:ABLATION_TEXTS]
    key = _ablation_key(mean)
    with calib.lock:  # threads sharing a calibration (the app's sessions) measure once; the others wait
        if key not in calib.cache:
            _measure_ablation(handle, calib, texts, mean, key, progress)
    return calib.cache[key], texts


def _measure_ablation(handle: ModelHandle, calib: Calibration, texts: list[str], mean: bool, key: str,
                      progress: Progress | None) -> None:
    """Measure every head into calib.cache[key], resuming from (and saving to) calib.persist_dir when set."""
    means = calib.stats(handle, progress).head_in_mean if mean else None
    max_length = min(calib.max_length, ABLATION_MAX_LENGTH)
    replay = LayerReplay(handle, texts, max_length=max_length)
    folder = calib.persist_dir / ABLATION_STORE if calib.persist_dir is not None else None
    store = AblationStore.for_run(folder, handle, texts, max_length=max_length, mean=mean) if folder else None
    known = store.load() if store is not None else None
    try:
        delta, _ = ablation_kl(handle, texts, means=means, replay=replay, progress=progress, known=known,
                               on_measured=store.add if store is not None else None)
    finally:  # also when stopped part-way: what was measured is kept for the next run
        if store is not None:
            store.flush()
    calib.cache[key] = delta


def _ablation_key(mean: bool) -> str:
    return f"ablation:{'mean' if mean else 'zero'}"


def cached_ablation(calib: Calibration, *, mean: bool) -> torch.Tensor | None:
    """The ablation KL [L, H] if this calibration already measured it, else None (never computes)."""
    return calib.cache.get(_ablation_key(mean))
