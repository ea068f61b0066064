"""Measured allocation: the global OBS costs in one unit, the KL to the dense model that each layer's pruning causes.

The "global" allocation (joint.py) compares OBS costs across layers through a normalisation (each removal's
perturbation of the residual stream relative to its size). That says how much a layer's output changes, not
how much the model's predictions do: a late layer's perturbation goes straight to the logits, an early one's
is partly absorbed. Here each layer's cost curve is calibrated against what the model itself reports:

1. on the dense model's inputs, structured OBS orders each projection's units (heads of O, channels of down)
   as joint.obs_costs does, and keeps the plain moments of the projection;
2. for each fraction f of `KL_FRACTIONS`, the layer alone loses its first f of that order, the kept columns
   re-solved by ridge least squares (the re-fit obs_prune makes), and the mean KL(dense || pruned) is
   measured on `KL_TEXTS` of the fit texts (headlab.engine.runtime.replay: layers l..L-1 replayed);
3. the layer's scale s = sum KL_f C_f / sum C_f^2 (C_f the OBS cost summed over those removals: the least
   squares fit of KL = s C through the origin), and every OBS cost of the layer is multiplied by s.

The scaled costs are taken cheapest-first as "global" takes them (`kl`: the heads' and channels' totals kept)
or by KL per parameter (`kl-joint`: heads and channels compete, the split chosen too). The curves assume the
layers' KLs add up, the usual first-order view (OWL, ShortGPT and FLAP's per-layer scores make it too); the
re-fit that follows, on the pruned model's own inputs, then corrects what they do together.

Cost, on top of "global": one partial forward per (layer, kind, fraction) over the KL texts, each scored over
the whole vocabulary (2 x 2 x 30 for SmolLM2-135M: with the re-fit, 17 minutes on 2 cores against 6 for
FLAP's counts, 128 texts; bench/results/choices.csv's select_s). A measurement is kept for the model's lifetime
and, given a `store` folder (the calibration's `persist_dir`: the app's cache), on disk as safetensors keyed by
the model's weight fingerprint and the measurement's settings, so a restart or another process does not measure
it again (on the whole fit region it is most of a width20 candidate's hour).
"""

from __future__ import annotations

import ast
import hashlib
import json
import weakref
from collections.abc import Sequence
from dataclasses import astuple
from pathlib import Path

import torch

from headlab.engine.core.files import write_atomic_safetensors
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.core.refit import unit_features
from headlab.engine.importance.ablation_store import model_fingerprint
from headlab.engine.pruning.reconstruct.joint import obs_costs
from headlab.engine.pruning.reconstruct.layerwise import RefitConfig, with_refit
from headlab.engine.pruning.reconstruct.least_squares import Moments, ObsResult, ridge_fit
from headlab.engine.runtime.replay import LayerReplay

__all__ = ["KL_FRACTIONS", "KL_LENGTH", "KL_STORE", "KL_TEXTS", "LayerCurve", "kl_costs", "single_layer_mask",
           "store_path"]

KL_FRACTIONS = (0.25, 0.5)  # of a layer's units, removed alone to measure its KL
KL_TEXTS = 16  # fit texts the KL is measured on (the first of the re-fit's)
KL_LENGTH = 128
KL_STORE = "kl_costs"  # the folder under a calibration's persist_dir that keeps measurements on disk
# model -> {settings key: (costs, curves)}: "kl" and "kl-joint" on the same texts measure the curves once
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LayerCurve:
    """One projection's measured points: (units removed, summed OBS cost, KL) and the scale fitted through them."""

    def __init__(self, points: list[tuple[int, float, float]]):
        self.points = points
        num = sum(kl * c for _, c, kl in points)
        den = sum(c * c for _, c, _ in points)
        # A layer whose removals cost nothing in OBS terms (dead units) keeps a zero scale: they go first.
        self.scale = max(num, 0.0) / den if den > 0 else 0.0


def single_layer_mask(handle: ModelHandle, layer: int, kind: str, m: Moments, order: Sequence[int], n: int,
                      config: RefitConfig) -> PruneMask:
    """The dense mask with `layer`'s `kind` losing the first `n` units of `order`, the rest re-solved on `m`."""
    g = handle.geometry
    n_units, width = (g.n_heads, g.head_dim) if kind == "attn" else (g.ffn_dim, 1)
    gone = set(order[:n])
    keep = tuple(u for u in range(n_units) if u not in gone)
    w, c = ridge_fit(m, unit_features(keep, width), damp=config.damp, intercept=config.intercept)
    return with_refit(PruneMask.dense(g), g, layer, kind, keep, w, c)


@torch.no_grad()
def kl_costs(handle: ModelHandle, texts: Sequence[str], config: RefitConfig, *, normalise: str = "stream",
             fractions: Sequence[float] = KL_FRACTIONS, kl_texts: int = KL_TEXTS, kl_length: int = KL_LENGTH,
             kinds: Sequence[str] = ("attn", "ffn"), progress: Progress | None = None,
             store: str | Path | None = None) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[LayerCurve]]]:
    """(costs, curves): joint.obs_costs's costs of every layer multiplied by its measured KL scale, and the curves.

    Only `kinds` are measured (a heads-only budget needs no channel curves); the others get no costs (obs_costs)
    and empty curves. The result is kept for the model's lifetime (the shared
    model is never changed in place), so "kl" and "kl-joint" on the same texts and settings measure once; with
    `store`, also in that folder (store_path), read back instead of measured again by any later process.
    """
    if not fractions or any(not 0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must lie strictly between 0 and 1, got {list(fractions)}")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = (digest, astuple(config), normalise, tuple(fractions), kl_texts, kl_length, tuple(kinds))
    memo = _MEMO.setdefault(handle.model, {})
    if key not in memo:
        path = store_path(store, model_fingerprint(handle), key) if store is not None else None
        entry = _read(path, key) if path is not None else None
        if entry is None:
            entry = _measure(handle, texts, config, normalise, fractions, kl_texts, kl_length, kinds, progress)
            if path is not None:
                _write(path, key, *entry)
        memo[key] = entry
    costs, curves = memo[key]
    return {k: [c.clone() for c in v] for k, v in costs.items()}, {k: list(v) for k, v in curves.items()}


def store_path(folder: str | Path, fingerprint: str, key: tuple) -> Path:
    """The file in `folder` of one measurement (kl_costs's settings `key`) of the model whose weights have
    `fingerprint` (ablation_store.model_fingerprint)."""
    digest = hashlib.sha256(f"{fingerprint}|{key!r}".encode()).hexdigest()[:24]
    return Path(folder) / f"{digest}.safetensors"


def _read(path: Path, key: tuple) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[LayerCurve]]] | None:
    """The measurement stored at `path` for `key`, or None (absent, another key, or unreadable: measured again)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if ast.literal_eval(meta["key"]) != key:
                return None
            layout = json.loads(meta["layout"])
            costs = {kind: [f.get_tensor(f"{kind}.{i}") for i in range(n)] for kind, n in layout.items()}
        curves = {kind: [LayerCurve([tuple(p) for p in points]) for points in layers]
                  for kind, layers in json.loads(meta["curves"]).items()}
    except (OSError, ValueError, KeyError, SyntaxError, SafetensorError):
        return None
    return costs, curves


def _write(path: Path, key: tuple, costs: dict[str, list[torch.Tensor]], curves: dict[str, list[LayerCurve]]) -> None:
    tensors = {f"{kind}.{i}": c for kind, layers in costs.items() for i, c in enumerate(layers)}
    meta = {"key": repr(key), "layout": json.dumps({kind: len(layers) for kind, layers in costs.items()}),
            "curves": json.dumps({kind: [list(map(list, c.points)) for c in layers] for kind, layers in curves.items()})}
    write_atomic_safetensors(path, tensors, metadata=meta)


def _measure(handle: ModelHandle, texts: Sequence[str], config: RefitConfig, normalise: str,
             fractions: Sequence[float], kl_texts: int, kl_length: int, kinds: Sequence[str],
             progress: Progress | None) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[LayerCurve]]]:
    g = handle.geometry
    replay = LayerReplay(handle, list(texts)[:kl_texts], max_length=kl_length, batch_size=config.batch_size)
    curves: dict[str, list[LayerCurve]] = {"attn": [], "ffn": []}

    def measure(layer: int, kind: str, m: Moments, res: ObsResult) -> None:  # called for `kinds` only
        size = g.n_heads if kind == "attn" else g.ffn_dim
        cum = torch.tensor((0.0, *res.costs), dtype=torch.float64).cumsum(0)
        counts = sorted({max(1, min(len(res.removed), round(f * size))) for f in fractions})
        points = []
        for n in counts:
            kl = replay.kl(single_layer_mask(handle, layer, kind, m, res.removed, n, config)) - replay.base_kl
            points.append((n, float(cum[n]), kl))
        curves[kind].append(LayerCurve(points))

    costs = obs_costs(handle, texts, config, normalise, progress=progress, visit=measure, kinds=kinds)
    scaled = {kind: [c * curve.scale for c, curve in zip(costs[kind], curves[kind])] if kind in kinds else costs[kind]
              for kind in costs}
    return scaled, curves
