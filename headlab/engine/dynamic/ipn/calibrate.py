"""Thresholds of an importance network set from data: per layer to a target, or one shift to an exact average.

- `calibrate_thresholds`: run the calibration windows once; each layer, when it runs, sets its threshold
  tau_l to the quantile of its margins at the target sparsity over the whole batch, and applies it at
  once, so later layers see what earlier thresholds let through (the same scheme as the training-free
  rules' headlab.engine.dynamic.calibrate). `untrained_ipn` is the network with the oracle's score on the
  weight sketch and these thresholds: no training at all.
- `match_sparsity`: after training, the per-layer thresholds differ on purpose (a layer that matters
  keeps more); one common shift of every tau, found by bisection, brings the *average* FFN sparsity
  on the calibration windows to the target, so methods are compared at equal average sparsity.
- `oracle_at_budgets`: the oracle keeping, per layer, the network's own mean kept count (a rival at the same
  per-layer operating point).
"""

from __future__ import annotations

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.apply import SparsityMeter, SparsityReport
from headlab.engine.dynamic.calibrate import calibration_ids
from headlab.engine.dynamic.ipn.apply import RULE_NAME, IPNTrace, apply_ipn
from headlab.engine.dynamic.ipn.network import IPN, IPNError
from headlab.engine.dynamic.rotation import ROTATED
from headlab.engine.dynamic.rules import Thresholds

__all__ = ["calibrate_thresholds", "ffn_sparsity", "layer_keep_counts", "match_sparsity", "oracle_at_budgets",
           "untrained_ipn", "weights_skipped"]


@torch.no_grad()
def calibrate_thresholds(handle: ModelHandle, ipn: IPN, ids: torch.Tensor | None = None,
                         target: float | None = None) -> IPN:
    """Set every layer's tau so it zeroes `target` (default ipn.target) of its channels on `ids` [B, T]."""
    target = ipn.target if target is None else target
    if not 0.0 <= target < 1.0:
        raise IPNError(f"target FFN sparsity must be in [0, 1), got {target}")
    ids = calibration_ids(handle) if ids is None else ids
    with apply_ipn(handle, ipn, trace=IPNTrace(calibrate_to=target, record=False)):
        handle.model(input_ids=ids.to(handle.device))
    return ipn


def untrained_ipn(handle: ModelHandle, target: float, ids: torch.Tensor | None = None, *,
                  sketch: str = ROTATED) -> IPN:
    """The network with the oracle's score computed on the 4-bit sketch (`sketch`: "rotated" or "aligned") and
    per-layer calibrated thresholds."""
    ipn = IPN.for_model(handle, adaptive=False, target=target, sketch=sketch)
    return calibrate_thresholds(handle, ipn, ids)


@torch.no_grad()
def _report(handle: ModelHandle, ipn: IPN, ids: torch.Tensor, batch_size: int) -> SparsityReport:
    meter = SparsityMeter(RULE_NAME, handle.geometry.n_layers)
    with apply_ipn(handle, ipn, meter):
        for i in range(0, ids.shape[0], batch_size):
            handle.model(input_ids=ids[i : i + batch_size].to(handle.device))
    return meter.report()


def ffn_sparsity(handle: ModelHandle, ipn: IPN, ids: torch.Tensor, batch_size: int = 4) -> float:
    """The fraction of FFN channels `ipn` zeroes over every token of `ids` [B, T]."""
    return _report(handle, ipn, ids, batch_size).ffn


def weights_skipped(handle: ModelHandle, ipn: IPN, ids: torch.Tensor, batch_size: int = 4) -> float:
    """The fraction of every layer's seven projection weights `ipn` skips per token over `ids` [B, T]
    (SparsityReport.weights_skipped: the level another method is matched to)."""
    return _report(handle, ipn, ids, batch_size).weights_skipped


def layer_keep_counts(handle: ModelHandle, ipn: IPN, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """[L]: the mean number of FFN channels `ipn` keeps per token in each layer, over every token of `ids` [B, T]."""
    zeroed = torch.tensor(_report(handle, ipn, ids, batch_size).per_layer["down"], dtype=torch.float64)
    return (1.0 - zeroed) * handle.geometry.ffn_dim


def oracle_at_budgets(handle: ModelHandle, ipn: IPN, ids: torch.Tensor) -> Thresholds:
    """The oracle given `ipn`'s own per-layer budgets: in each layer, the true top k_l channels of every token,
    k_l = the mean count `ipn` keeps there on `ids` (calibration windows, so the budgets are not fitted to the
    text they are evaluated on). It separates what the network gains by *where* it spends channels (the budgets)
    from how well it picks them within a layer."""
    return Thresholds.oracle_budgets(layer_keep_counts(handle, ipn, ids).tolist(), handle.geometry.ffn_dim)


@torch.no_grad()
def match_sparsity(handle: ModelHandle, ipn: IPN, ids: torch.Tensor, target: float | None = None, *,
                   tolerance: float = 0.002, max_steps: int = 16) -> float:
    """Shift every layer's tau by one offset so the average FFN sparsity on `ids` is `target` (+- tolerance).

    Returns the measured sparsity after the shift (the thresholds are updated in place).
    """
    target = ipn.target if target is None else target
    base = ipn.tau.detach().clone()

    def at(offset: float) -> float:
        ipn.tau.data.copy_(base + offset)
        return ffn_sparsity(handle, ipn, ids)

    lo, hi = -4.0, 4.0  # margins are in log units: e^4 ~ 55x on the estimated |act(gate) * up|
    s = at(0.0)
    if abs(s - target) <= tolerance:
        return s
    for _ in range(max_steps):
        mid = (lo + hi) / 2
        s = at(mid)
        if abs(s - target) <= tolerance:
            return s
        if s < target:
            lo = mid
        else:
            hi = mid
    return s
