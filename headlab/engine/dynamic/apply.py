"""Run a dynamic sparsity rule on the shared model for one call, and measure what it zeroed.

    with apply_rule(handle, thresholds) as meter:
        logits = handle.model(ids).logits
    print(meter.report().describe())

Like headlab.engine.core.gates, everything goes through headlab.engine.core.hooks.temporary_hooks: the hooks
fire only in the calling thread and are removed in `finally`; weights are never touched. The
adapter says where each projection lives (`projections`, `ffn_activation`).

Where each rule acts, per layer:
- oracle: a pre-hook on "down" keeps the k largest |input| entries per token;
- CATS: a post-hook on "gate" computes |act(gate(x))| and decides the channels, a pre-hook on
  "down" zeroes them (act(gate) * up is zero exactly where either factor is);
- TEAL / WINA: a pre-hook on every projection zeroes the input entries scored below its threshold
  (teal-ffn / wina-ffn: on gate, up and down only).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import HookSet, temporary_hooks
from headlab.engine.dynamic.rules import (
    CATS,
    ORACLE,
    Thresholds,
    ThresholdsError,
    column_norms,
    get_rule,
    magnitude_score,
    oracle_keep,
    threshold_at,
    weighted_score,
)

__all__ = ["SparsityMeter", "SparsityReport", "apply_rule", "count_quantile"]


@dataclass(frozen=True)
class SparsityReport:
    """What a rule zeroed over the tokens it ran on.

    per_layer[site][l]: fraction of the entries of projection `site`'s input zeroed in layer l;
    overall: the same over every sparsified input entry; ffn: fraction of FFN channels (the down
    projection's input) zeroed; weights_skipped: fraction of the weight elements of every layer's
    projections (q, k, v, o, gate, up, down: the same denominator for every method) that the method's
    sparse kernel need not read per token, averaged over tokens. A zeroed input of W skips its column
    of W; a dropped FFN channel also skips the gate and up rows the method did not need to decide it
    (the importance network decides from a sketch: both; CATS reads the whole gate: the up row; the
    oracle and TEAL compute both before they decide: neither); a dropped head skips its Q rows and O
    columns. What a predictor reads itself (a sketch, CATS's gate) is not subtracted: the decode
    benchmark counts bytes.
    kept_mean[l], kept_p10[l], kept_p90[l]: FFN channels kept per token in layer l, the mean and the 10th and
    90th percentiles over tokens (how much the count varies from token to token; equal for the oracle).
    """

    rule: str
    per_layer: dict[str, list[float]]
    overall: float
    ffn: float
    weights_skipped: float
    n_tokens: int
    kept_mean: list[float] = field(default_factory=list)
    kept_p10: list[float] = field(default_factory=list)
    kept_p90: list[float] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.rule}: {self.overall:.1%} of sparsified inputs zeroed, {self.ffn:.1%} of FFN channels, "
                f"{self.weights_skipped:.1%} of the layers' projection weights skipped, over {self.n_tokens:,} tokens")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SparsityMeter:
    """Counts zeroed and total input entries per (site, layer), and the weight elements they skip, during forwards.

    apply_rule / apply_ipn call `weigh_layer` for every layer they hook: the denominator of weights_skipped.
    """

    def __init__(self, rule: str, n_layers: int):
        self.rule = rule
        self.n_layers = n_layers
        self.zeroed: dict[str, torch.Tensor] = {}
        self.total: dict[str, torch.Tensor] = {}
        self.skipped = torch.zeros(n_layers, dtype=torch.float64)  # weight elements not read, summed over tokens
        self.tokens = torch.zeros(n_layers, dtype=torch.float64)  # tokens through each layer's FFN
        self.layer_weights = torch.zeros(n_layers, dtype=torch.float64)  # elements of each layer's projections
        self.kept_counts: torch.Tensor | None = None  # [L, F + 1]: tokens by the number of FFN channels they kept
        self.n_tokens = 0

    def weigh_layer(self, layer: int, projs: dict[str, nn.Module]) -> None:
        """Record how many weight elements `layer`'s projections hold (every role the adapter names)."""
        self.layer_weights[layer] = float(sum(p.weight.numel() for p in projs.values()))

    def add(self, site: str, layer: int, keep: torch.Tensor, skips: int) -> None:
        """Record one projection's keep mask [..., in] for `layer`; each zeroed entry skips `skips` weight elements.

        `skips`: the column of W the entry meets (W's out_features), plus any rows the zeroing spares
        (SparsityReport says which per method).
        """
        if site not in self.zeroed:
            for d in (self.zeroed, self.total):
                d[site] = torch.zeros(self.n_layers, dtype=torch.float64)
        zeroed = float((~keep).sum())
        self.zeroed[site][layer] += zeroed
        self.total[site][layer] += keep.numel()
        self.skipped[layer] += zeroed * skips
        if site == "down":
            self.tokens[layer] += keep.numel() // keep.shape[-1]
            if layer == 0:
                self.n_tokens += keep.numel() // keep.shape[-1]
            width = keep.shape[-1]
            if self.kept_counts is None:
                self.kept_counts = torch.zeros(self.n_layers, width + 1, dtype=torch.float64)
            per_token = keep.detach().reshape(-1, width).sum(-1).cpu()
            self.kept_counts[layer] += torch.bincount(per_token, minlength=width + 1).to(torch.float64)

    def report(self) -> SparsityReport:
        if not self.total:
            raise ValueError("nothing was measured: run the model inside apply_rule first")
        per_layer = {s: (self.zeroed[s] / self.total[s].clamp(min=1)).tolist() for s in self.zeroed}
        zeroed = sum(float(z.sum()) for z in self.zeroed.values())
        total = sum(float(t.sum()) for t in self.total.values())
        read = float((self.tokens * self.layer_weights).sum())
        if bool(((self.tokens > 0) & (self.layer_weights == 0)).any()):
            raise ValueError("a layer ran without weigh_layer: the meter cannot say what its skipped weights are of")
        ffn = float(self.zeroed["down"].sum() / self.total["down"].sum()) if "down" in self.total else 0.0
        skipped = float(self.skipped.sum()) / read if read else 0.0
        kept: dict[str, list[float]] = {"kept_mean": [], "kept_p10": [], "kept_p90": []}
        if self.kept_counts is not None:
            counts = torch.arange(self.kept_counts.shape[1], dtype=torch.float64)
            tokens = self.kept_counts.sum(-1).clamp(min=1)
            kept = {"kept_mean": ((self.kept_counts * counts).sum(-1) / tokens).tolist(),
                    "kept_p10": [count_quantile(h, 0.1) for h in self.kept_counts],
                    "kept_p90": [count_quantile(h, 0.9) for h in self.kept_counts]}
        return SparsityReport(self.rule, per_layer, zeroed / total, ffn, skipped, self.n_tokens, **kept)


def count_quantile(histogram: torch.Tensor, q: float) -> float:
    """The q-quantile of counts given as a histogram (histogram[c] = how many tokens have count c): the smallest
    count c with at least a fraction q of the tokens at or below it (nan when the histogram is empty)."""
    total = float(histogram.sum())
    if total <= 0:
        return float("nan")
    below = torch.cumsum(histogram.to(torch.float64), 0) / total
    return float(torch.searchsorted(below, torch.tensor([q - 1e-12], dtype=torch.float64)).clamp(
        max=histogram.numel() - 1))


def _threshold(values: dict[str, torch.Tensor], site: str, layer: int, scores: torch.Tensor,
               calibrate_to: float | None) -> float:
    """The threshold of (site, layer); a NaN one is calibrated now from `scores` when calibrating."""
    t = float(values[site][layer])
    if math.isnan(t):
        if calibrate_to is None:
            raise ThresholdsError(f"the threshold of {site!r} in layer {layer} is NaN (not calibrated)")
        t = threshold_at(scores, calibrate_to)
        values[site][layer] = t
    return t


def _zero_input(args: tuple, keep: torch.Tensor) -> tuple:
    return (args[0].masked_fill(~keep, 0), *args[1:])


def _input_hook(site: str, layer: int, proj: nn.Linear, values: dict[str, torch.Tensor], weighted: bool,
                meter: SparsityMeter, calibrate_to: float | None) -> Callable[..., tuple]:
    col_norm = column_norms(proj.weight) if weighted else None

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (B, T, in)
        s = weighted_score(x, col_norm) if col_norm is not None else magnitude_score(x)
        keep = s >= _threshold(values, site, layer, s, calibrate_to)
        meter.add(site, layer, keep, proj.out_features)
        return _zero_input(args, keep)

    return hook


def _install_cats(hooks: HookSet, layer: int, projs: dict[str, nn.Linear], act: Callable, values: dict,
                  meter: SparsityMeter, calibrate_to: float | None) -> None:
    decided: list[torch.Tensor] = []  # the channels gate chose, consumed by down in the same forward

    def on_gate(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        s = magnitude_score(act(output))  # (B, T, F): |act(gate(x))|
        decided.append(s >= _threshold(values, "down", layer, s, calibrate_to))

    def on_down(module: nn.Module, args: tuple) -> tuple:
        keep = decided.pop()
        if keep.shape != args[0].shape:
            raise RuntimeError(f"layer {layer}: CATS decided channels {tuple(keep.shape)} for a down input "
                               f"{tuple(args[0].shape)}")
        meter.add("down", layer, keep, projs["down"].out_features + projs["up"].in_features)  # + the up row
        return _zero_input(args, keep)

    hooks.post(projs["gate"], on_gate)
    hooks.pre(projs["down"], on_down)


def _install_oracle(hooks: HookSet, layer: int, projs: dict[str, nn.Linear], values: dict,
                    meter: SparsityMeter) -> None:
    k = int(values["down"][layer])

    def on_down(module: nn.Module, args: tuple) -> tuple:
        keep = oracle_keep(args[0], k)  # the down input is act(gate(x)) * up(x)
        meter.add("down", layer, keep, projs["down"].out_features)
        return _zero_input(args, keep)

    hooks.pre(projs["down"], on_down)


@contextlib.contextmanager
def apply_rule(handle: ModelHandle, thresholds: Thresholds, meter: SparsityMeter | None = None, *,
               calibrate_to: float | None = None) -> Iterator[SparsityMeter]:
    """Run `handle`'s shared model under `thresholds`' rule for the body of the `with` only.

    Yields the SparsityMeter counting what was zeroed (a new one unless `meter` is given).
    `calibrate_to`: fill every NaN threshold, the first time its site runs, with the quantile of
    that batch's scores at this sparsity (headlab.engine.dynamic.calibrate); the thresholds are updated in place.
    """
    g = handle.geometry
    rule = get_rule(thresholds.rule)
    thresholds.check(g.n_layers, g.ffn_dim)
    adapter = handle.adapter
    meter = meter if meter is not None else SparsityMeter(rule.name, g.n_layers)
    values = thresholds.values
    with temporary_hooks() as hooks:
        for layer in range(g.n_layers):
            projs = adapter.projections(layer)
            meter.weigh_layer(layer, projs)
            if rule is ORACLE:
                _install_oracle(hooks, layer, projs, values, meter)
            elif rule is CATS:
                _install_cats(hooks, layer, projs, adapter.ffn_activation(layer), values, meter, calibrate_to)
            else:
                for site in rule.sites:
                    hooks.pre(projs[site], _input_hook(site, layer, projs[site], values, rule.weighted, meter,
                                                       calibrate_to))
        yield meter
