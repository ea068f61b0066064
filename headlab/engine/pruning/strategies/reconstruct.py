"""Strategies that re-fit what remains (headlab.engine.pruning.reconstruct): closed-form, layer by layer, no training.

- `obs`: structured OBS chooses the heads and FFN channels of each layer on the inputs the
  already-pruned layers produce, every kept weight is re-solved by least squares (the O / down
  columns, and Q/K/V and gate/up through one input map per sub-block; SlimGPT, Ling et al. 2024;
  ZipLM, Kurtic et al. 2023). How many units each layer loses ("auto") was chosen on VALIDATION
  text (bench/bench_choices.py, bench/results/choices.csv): for heads alone, the joint allocation
  from OBS costs comparable across layers ("global"; 30% of heads: 1.15x dense on validation against
  1.19x with those costs in measured KL, "kl", and 1.24x where the measured mean-ablation KL cuts); with
  FFN channels, the OBS costs in units of the KL each layer's pruning alone causes, heads and channels
  competing per parameter ("kl-joint", reconstruct/measured.py; 20% of the parameters: 1.88x, against
  1.91x "kl", 2.00x where FLAP's per-layer standardised fluctuation cuts, An et al. 2024, 2.01x "joint",
  2.06x "global" and 2.47x with OWL's outlier-weighted allocation, Yin et al. 2024). Or name one.
- `flap-refit`, `ablation-refit`, `hardconcrete-refit`: another method's choice of units (FLAP's
  standardised fluctuation, An et al. 2024; the measured mean-ablation KL; a hard-concrete mask
  trained on KL to the dense model), then the same re-solve in place of the mean bias (which is
  the re-solve that keeps no column).
- depth (`DEPTH_REFIT_METHODS`, e.g. `ablation-iterative-refit`): a depth method drops whole
  layers, then residual targets let the sub-block in front of each dropped run stand in for it.

`width_by_reconstruction` reaches a parameter target by width with `obs` (the default of
`python -m headlab export --route width`).

A least-squares re-solve of an [F, F] system wants many more calibration tokens than a score
does (it over-fits a few thousand), so on a shipped calibration set these strategies read
`REFIT_TEXTS` paragraphs (about 20,000 WikiText-2 tokens, from the end of the file like the
others) when the calibration holds fewer; the mask's meta says how many tokens each fit saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.data.datasets import wikitext_stream
from headlab.engine.pruning.reconstruct.budgets import (
    allocate,
    apportion,
    apportion_aligned,
    counts_of,
    outlier_ratios,
    owl_ratios,
)
from headlab.engine.pruning.reconstruct.joint import counts_from_costs, joint_counts
from headlab.engine.pruning.reconstruct.layerwise import INPUT_MODES, RefitConfig, obs_prune, refit, supports_input_maps
from headlab.engine.pruning.reconstruct.measured import KL_FRACTIONS, KL_STORE, kl_costs
from headlab.engine.pruning.size_target import SizeResult, target_params, width_mask
from headlab.engine.pruning.strategies.base import CALIBRATION_CHOICES, Budget, Calibration, Strategy
from headlab.engine.pruning.strategies.depth import DEPTH_METHODS, depth_prune, layers_for_target
from headlab.engine.pruning.strategies.hardconcrete import HardConcreteMask
from headlab.engine.pruning.strategies.oneshot import AblationStrategy, FlapStrategy
from headlab.engine.runtime.continuations import MIXED
from headlab.engine.runtime.cost import cost

__all__ = [
    "ALLOCATIONS",
    "DEPTH_INPUTS",
    "DEPTH_REFIT_METHODS",
    "MEASURED_ALLOCATIONS",
    "REFIT_TEXTS",
    "AblationRefitStrategy",
    "FlapRefitStrategy",
    "HardConcreteRefitStrategy",
    "ObsStrategy",
    "depth_refit_prune",
    "layer_counts",
    "refit_texts",
    "width_by_reconstruction",
    "width_fraction",
]

ALLOCATIONS = ("auto", "global", "joint", "kl", "kl-joint", "flap", "ablation", "owl", "uniform")
MEASURED_ALLOCATIONS = ("global", "joint", "kl", "kl-joint")  # costs measured on the re-fit's texts
REFIT_TEXTS = 128
# Chosen on validation text (bench/bench_choices.py; bench/results/choices.csv, which a test checks against these):
AUTO_ALLOCATION = {"heads": "global", "width": "kl-joint"}  # "auto" for a heads-only budget / heads and channels
GLOBAL_NORMALISATION = "stream"  # how "global" makes OBS costs of different layers comparable (joint.py)
DEFAULT_INPUTS = "all"  # input re-fits (layerwise.RefitConfig.inputs) where the family supports them
# depth's stand-ins: validation (bench_choices depth20) chose no input maps, 2.407x against 2.467x with them
DEPTH_INPUTS = "none"
INPUT_CHOICES = ("auto", *INPUT_MODES)
REFIT_SUFFIX = "-refit"
DEPTH_REFIT_METHODS = tuple(m + REFIT_SUFFIX for m in DEPTH_METHODS if "+comp" not in m and m != "random")
SLIMGPT = "Ling et al., 'SlimGPT: Layer-wise Structured Pruning for Large Language Models', NeurIPS 2024"
ZIPLM = "Kurtic, Frantar & Alistarh, 'ZipLM: Inference-Aware Structured Pruning of Language Models', NeurIPS 2023"
OWL = "Yin et al., 'Outlier Weighed Layerwise Sparsity (OWL)', ICML 2024"


def _config(calib: Calibration, handle: ModelHandle | None = None, inputs: str = "none", *,
            auto: str = DEFAULT_INPUTS, **kw: Any) -> RefitConfig:
    """The refit settings for `calib`; `inputs` "auto": `auto` where `handle`'s family supports input maps."""
    if inputs not in INPUT_CHOICES:
        raise ValueError(f"inputs must be one of {', '.join(INPUT_CHOICES)}, got {inputs!r}")
    if inputs == "auto":
        inputs = auto if handle is not None and supports_input_maps(handle) else "none"
    return RefitConfig(max_length=calib.max_length, batch_size=calib.batch_size, inputs=inputs, **kw)


def _checked_window(window: int) -> int:
    """`window` if it is 0 (one text per paragraph) or at least 2 tokens, else a ValueError."""
    if window and window < 2:
        raise ValueError(f"window must be 0 (paragraphs) or at least 2 tokens, got {window}")
    return window


def refit_texts(calib: Calibration, n: int = REFIT_TEXTS, handle: ModelHandle | None = None,
                window: int = 0) -> list[str]:
    """The texts reconstruction fits on: the calibration's, or `n` of its shipped set when it holds fewer
    ("mixed" needs the model, `handle`, whose answers it holds).

    `window` > 0 (the shipped WikiText set): the file's running text over the span of its last `n` paragraphs,
    cut into pieces of `window` tokens (datasets.wikitext_stream): headings and short paragraphs included and
    contexts crossing paragraph boundaries, as the perplexity windows are, so the same span gives more tokens.
    """
    if _checked_window(window):
        if calib.name != "wikitext" or handle is None:
            raise ValueError(f"fitting on windows of running text needs the shipped WikiText calibration and the "
                             f"model's tokenizer (got the {calib.name!r} set{'' if handle else ' and no model'})")
        return wikitext_stream(handle.tokenizer, n, window)
    if len(calib.texts) >= n or calib.name not in CALIBRATION_CHOICES or (calib.name == MIXED and handle is None):
        return list(calib.texts)
    return Calibration.shipped(calib.name, n, handle=handle).texts


def layer_counts(handle: ModelHandle, budget: Budget, calib: Calibration, allocation: str,
                 progress: Progress | None = None, ffn_align: int = 1,
                 even_groups: bool = False, normalise: str | None = None,
                 texts: Sequence[str] | None = None, curves: dict | None = None,
                 kl_fractions: Sequence[float] = KL_FRACTIONS) -> tuple[list[int], list[int]]:
    """(heads, channels) to remove per layer for `budget`, split by `allocation`; each sums to the budget exactly.

    `ffn_align` > 1: every layer keeps a whole number of `ffn_align`-channel blocks (budgets.apportion_aligned),
    so the channel total lands within a block of the budget; the units are then chosen at these counts.
    `even_groups`: every layer removes a multiple of the KV heads' count (each GQA group then loses as many
    query heads, what llama.cpp runs without extra rows); the head total lands within a group of the budget.

    "owl": OWL outlier ratios; "uniform": the same in every layer; "flap": where FLAP's per-layer standardised
    fluctuation cuts; "ablation": heads where the measured mean-ablation KL cuts (channels as "flap");
    "global": each total taken cheapest-first from OBS costs comparable across layers (reconstruct/joint.py);
    "joint": as "global", but heads and channels compete for the parameters both totals remove (the split
    between them is chosen too, so the totals are not kept); "kl" / "kl-joint": as "global" / "joint", each
    layer's OBS costs scaled by the KL to the dense model its pruning alone causes (reconstruct/measured.py);
    "auto": AUTO_ALLOCATION, chosen on validation text. The measured allocations (MEASURED_ALLOCATIONS)
    measure their costs on `texts`, the ones the re-fit reads (default: refit_texts's). `curves`, a dict, receives
    the KL allocations' measured curves (per kind, per layer: [(units removed, OBS cost, KL)]) and scales;
    `kl_fractions`, the fractions of a layer's units they remove alone to measure its KL.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    g = handle.geometry
    h, f = budget.counts(g)
    even_groups = even_groups and g.group_size > 1  # without GQA any head count is even
    if allocation == "auto":
        allocation = AUTO_ALLOCATION["width" if f else "heads"]
    if allocation in MEASURED_ALLOCATIONS and texts is None:
        texts = refit_texts(calib, handle=handle)
    if allocation in ("kl", "kl-joint"):
        kinds = [k for k, n in (("attn", h), ("ffn", f)) if n or allocation == "kl-joint"]
        store = calib.persist_dir / KL_STORE if calib.persist_dir is not None else None
        costs, measured = kl_costs(handle, texts, _config(calib), normalise=normalise or GLOBAL_NORMALISATION,
                                   kinds=kinds, progress=progress, fractions=tuple(kl_fractions), store=store)
        if curves is not None:
            curves.update({kind: [{"points": c.points, "scale": c.scale} for c in measured[kind]] for kind in kinds})
        return counts_from_costs(handle, costs, h, f, even_groups=even_groups, ffn_align=ffn_align,
                                 mix=allocation == "kl-joint")
    if allocation in ("global", "joint"):
        return joint_counts(handle, h, f, texts, _config(calib), normalise=normalise or GLOBAL_NORMALISATION,
                            even_groups=even_groups, ffn_align=ffn_align, mix=allocation == "joint",
                            progress=progress)
    if allocation in ("flap", "ablation"):
        flap = FlapStrategy()(handle, budget, calib, progress=progress)
        heads = (AblationStrategy(compensate=True)(handle, Budget(heads=h), calib, progress=progress)
                 if allocation == "ablation" and h else flap)
        # Every layer keeps a unit (OBS re-solves what stays): a layer the cut would empty hands its last on.
        channels = (apportion_aligned(f, counts_of(flap, "ffn"), [g.ffn_dim] * g.n_layers, ffn_align)
                    if ffn_align > 1 else apportion(f, counts_of(flap, "ffn"), [g.ffn_dim - 1] * g.n_layers))
        head_counts = (apportion_aligned(h, counts_of(heads, "attn"), [g.n_heads] * g.n_layers, g.n_kv_heads)
                       if even_groups and h else apportion(h, counts_of(heads, "attn"), [g.n_heads - 1] * g.n_layers))
        return head_counts, channels
    out = []
    for kind, total, size in (("attn", h, g.n_heads), ("ffn", f, g.ffn_dim)):
        ratios = [1.0] * g.n_layers
        if allocation == "owl" and total:
            lod = outlier_ratios(handle, calib.stats(handle, progress), kind)
            ratios = owl_ratios(lod, total / (g.n_layers * size)).tolist()
        align = ffn_align if kind == "ffn" else g.n_kv_heads if even_groups else 1
        if align > 1 and total:
            out.append(apportion_aligned(total, [r * size for r in ratios], [size] * g.n_layers, align))
        else:
            out.append(allocate(total, ratios, [size] * g.n_layers))
    return out[0], out[1]


def _fractions(value: str | Sequence[float]) -> tuple[float, ...]:
    """KL fractions from "0.25/0.5" or a sequence, each strictly between 0 and 1, sorted, without repeats."""
    if isinstance(value, (int, float)):
        value = (value,)
    try:
        out = tuple(float(v) for v in (value.split("/") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise ValueError(f"kl_fractions must be fractions such as 0.25/0.5/0.75, got {value!r}") from None
    if not out or any(not 0.0 < f < 1.0 for f in out):
        raise ValueError(f"kl_fractions must lie strictly between 0 and 1, got {value!r}")
    return tuple(sorted(set(out)))


def _reading(calib: Calibration, window: int) -> Calibration:
    """`calib`, read `window` tokens at a time where that is longer: fits and costs then see whole windows."""
    return dataclasses.replace(calib, max_length=window, _stats=None) if window > calib.max_length else calib


class ObsStrategy(Strategy):
    """Structured OBS, layer by layer, every kept weight re-solved (module doc).

    With a budget of heads and channels, the default allocation (AUTO_ALLOCATION["width"], "kl-joint") keeps
    the parameters the two counts remove, not the counts themselves: heads and channels compete for them by
    measured KL per parameter. Name a non-joint allocation (e.g. "kl", "flap") to keep both counts exactly.
    """

    name = "obs"
    description = ("structured OBS chooses heads and FFN channels layer by layer on the pruned model's own "
                   "inputs (per-layer counts: one global OBS cost for heads; with channels, OBS costs in "
                   "measured KL, heads and channels competing per parameter), "
                   "every kept weight re-solved by least squares")
    reference = (f"{SLIMGPT}; {ZIPLM}; per-layer counts: global OBS costs, in measured KL with channels "
                 f"(or An et al., FLAP, AAAI 2024; {OWL})")
    cost_hint = "measured"
    always_compensates = True

    def __init__(self, allocation: str = "auto", target: str = "output", even_groups: bool = False,
                 intercept: bool = True, n_texts: int = REFIT_TEXTS, ffn_align: int = 1, inputs: str = "auto",
                 damp: float | None = None, normalise: str | None = None, window: int = 0,
                 refit_unpruned: bool = False, kl_fractions: str | Sequence[float] = KL_FRACTIONS):
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
        if inputs not in INPUT_CHOICES:
            raise ValueError(f"inputs must be one of {', '.join(INPUT_CHOICES)}, got {inputs!r}")
        _checked_window(window)
        self.allocation, self.target, self.even_groups, self.intercept = allocation, target, even_groups, intercept
        self.n_texts, self.ffn_align, self.inputs, self.damp, self.normalise = n_texts, ffn_align, inputs, damp, normalise
        self.window = window  # > 0: fit on the running text of the n_texts paragraphs' span, in windows (refit_texts)
        # re-solve the output projections of sub-blocks that lose nothing too (after the first loss they read shifted
        # inputs; with target="residual" they also correct the error the stream carries): the FFNs behind a
        # heads-only budget
        if not isinstance(refit_unpruned, bool):
            raise ValueError(f"refit_unpruned must be true or false, got {refit_unpruned!r}")
        self.refit_unpruned = refit_unpruned
        # the measured allocations' points: the fractions of a layer's units removed alone to measure its KL
        # ("0.25/0.5/0.75" in a method's settings); kl-joint takes up to two thirds of a middle FFN's channels at
        # 20% of the parameters, past the default points, where the scale is extrapolated
        self.kl_fractions = _fractions(kl_fractions)

    def __call__(self, handle: ModelHandle, budget: Budget, calib: Calibration, *,
                 progress: Progress | None = None) -> PruneMask:
        self.check_budget(handle, budget)
        texts = refit_texts(calib, self.n_texts, handle, window=self.window)
        calib = _reading(calib, self.window)
        curves: dict = {}
        heads, channels = layer_counts(handle, budget, calib, self.allocation, progress, self.ffn_align,
                                       even_groups=self.even_groups, normalise=self.normalise, texts=texts,
                                       curves=curves, kl_fractions=self.kl_fractions)
        damp = {} if self.damp is None else {"damp": self.damp, "input_damp": self.damp}
        config = _config(calib, handle, self.inputs, target=self.target, intercept=self.intercept,
                         refit_unpruned=self.refit_unpruned, **damp)
        mask = obs_prune(handle, heads, channels, texts, even_groups=self.even_groups, config=config, progress=progress)
        used = self.allocation
        if used == "auto":
            used = AUTO_ALLOCATION["width" if budget.counts(handle.geometry)[1] else "heads"]
        if used in MEASURED_ALLOCATIONS:  # the texts its costs were measured on (the re-fit's)
            mask.meta["allocation_texts"] = len(texts)
        if used in ("kl", "kl-joint"):
            mask.meta["allocation_kl_fractions"] = list(self.kl_fractions)
        if curves:
            mask.meta["allocation_curves"] = curves
        mask.meta.update({"method": self.name, "allocation": used, "allocation_asked": self.allocation,
                          "reference": self.reference,
                          "calibration": calib.describe(), "ffn_align": self.ffn_align, "fit_window": self.window,
                          "even_groups": self.even_groups})
        return mask


class _RefitAfter(Strategy):
    """Another strategy's units, then every pruned layer re-solved (replacing its mean compensation)."""

    base: ClassVar[type[Strategy]]
    cost_hint = "measured"
    always_compensates = True

    def __init__(self, target: str = "output", n_texts: int = REFIT_TEXTS, inputs: str = "auto", **base_options: Any):
        self.target, self.n_texts, self.inputs, self.base_options = target, n_texts, inputs, base_options

    def __call__(self, handle: ModelHandle, budget: Budget, calib: Calibration, *,
                 progress: Progress | None = None) -> PruneMask:
        self.check_budget(handle, budget)
        chosen = self.base(compensate=True, **self.base_options)(handle, budget, calib, progress=progress)
        mask = refit(handle, chosen, refit_texts(calib, self.n_texts, handle),
                     config=_config(calib, handle, self.inputs, target=self.target), progress=progress)
        mask.meta.update({"method": self.name, "selection": chosen.meta.get("method"),
                          "reference": self.reference, "calibration": calib.describe()})
        return mask


class FlapRefitStrategy(_RefitAfter):
    name = "flap-refit"
    base = FlapStrategy
    description = "FLAP's units (fluctuation standardised per layer), then the kept O/down columns re-solved"
    reference = f"An et al., FLAP, AAAI 2024 (selection); {SLIMGPT} (re-solve)"


class AblationRefitStrategy(_RefitAfter):
    name = "ablation-refit"
    base = AblationStrategy
    description = "heads by measured mean-ablation KL (channels by fluctuation), then the kept columns re-solved"
    reference = f"measured ablation (Michel et al. 2019) for the selection; {SLIMGPT} (re-solve)"


class HardConcreteRefitStrategy(_RefitAfter):
    name = "hardconcrete-refit"
    base = HardConcreteMask
    cost_hint = "optimised"
    description = ("heads by a hard-concrete mask trained on KL to the dense model (from the measured ranking), "
                   "then the kept O columns re-solved")
    reference = f"Voita et al., ACL 2019 (hard-concrete head gates) for the selection; {SLIMGPT} (re-solve)"


def depth_refit_prune(handle: ModelHandle, keep: float, method: str, calib: Calibration, *,
                      n_texts: int = REFIT_TEXTS, inputs: str = "auto", window: int = 0, damp: float | None = None,
                      dropped: PruneMask | None = None, progress: Progress | None = None) -> PruneMask:
    """Drop layers by the depth method `method` minus "-refit", then let the sub-blocks around each gap stand in.

    `inputs` "auto": DEPTH_INPUTS (chosen on validation). `window` > 0: the stand-ins are fitted on the running
    text over the span of `n_texts` WikiText paragraphs, in pieces of that many tokens (refit_texts); the layers
    dropped are chosen on the calibration as before. `damp`: the ridge damping of every solve (None: RefitConfig's).
    `dropped`: that depth method's own mask at `keep` on this calibration, made earlier (the layer search does not
    depend on the re-fit's settings, so settings compared side by side can share it); it is checked, not trusted.
    """
    if method not in DEPTH_REFIT_METHODS:
        raise ValueError(f"unknown depth method {method!r}; choose one of {', '.join(DEPTH_REFIT_METHODS)}")
    texts = refit_texts(calib, n_texts, handle, window=window)  # bad input fails before the slow part
    base = method[: -len(REFIT_SUFFIX)]
    if dropped is None:
        dropped = depth_prune(handle, keep, base, calib, progress=progress)
    else:
        _check_dropped(handle, dropped, base, keep, calib)
    kw = {} if damp is None else {"damp": damp, "input_damp": damp}
    mask = refit(handle, dropped, texts, progress=progress,
                 config=_config(_reading(calib, window), handle, inputs, auto=DEPTH_INPUTS, target="residual", **kw))
    mask.meta.update({k: v for k, v in dropped.meta.items() if k != "reconstruction"})
    mask.meta["fit_window"] = window
    # The stand-in is weights the kept projections already have; what it adds is at most an output bias each.
    mask.meta["stand_in"] = {
        "refitted_attn": sorted(mask.attn_refit), "refitted_ffn": sorted(mask.ffn_refit),
        "added_parameters": cost(handle, mask).params_kept - cost(handle, _no_bias(dropped)).params_kept,
    }
    mask.meta["method"] = method
    return mask


def _check_dropped(handle: ModelHandle, dropped: PruneMask, base: str, keep: float, calib: Calibration) -> None:
    """A ValueError unless `dropped` is what depth_prune(handle, keep, base, calib) makes: whole layers only, that
    many, by that method on that calibration."""
    meta, want = dropped.meta, layers_for_target(handle, keep)
    layers = meta.get("layers_dropped")
    whole = (dropped.heads.min() > 0 and dropped.ffn.min() > 0 and not dropped.has_bias and not dropped.has_refit
             and layers is not None
             and all((float(dropped.attn[i]) == 0) == (float(dropped.ffn_block[i]) == 0) == (i in layers)
                     for i in range(handle.geometry.n_layers)))
    if not whole or meta.get("method") != base or meta.get("calibration") != calib.describe() or len(layers) != want:
        raise ValueError(f"the layers given to re-fit around are not {base}'s at keep={keep} on this calibration "
                         f"(expected {want} whole layers dropped by {base} on {calib.describe()!r}; got "
                         f"{meta.get('method')!r}, layers {layers}, calibration {meta.get('calibration')!r})")


def _no_bias(mask: PruneMask) -> PruneMask:
    m = mask.clone()
    m.attn_bias = m.ffn_bias = None
    return m


def width_fraction(handle: ModelHandle, removed: float) -> float:
    """The fraction r of heads and of FFN channels whose removal is `removed` of all parameters."""
    g = handle.geometry
    total = cost(handle).params_total
    per_head = total - cost(handle, PruneMask.dense(g).with_head(0, 0, 0.0)).params_kept
    one_ch = PruneMask.dense(g)
    one_ch.ffn[0, 0] = 0.0
    per_ch = total - cost(handle, one_ch).params_kept
    return removed * total / (g.n_layers * (g.n_heads * per_head + g.ffn_dim * per_ch))


def width_by_reconstruction(handle: ModelHandle, keep: float, calib: Calibration, *, uniform: bool = False,
                            n_texts: int = REFIT_TEXTS, ffn_align: int = 1, even_groups: bool = False,
                            allocation: str = "auto", window: int = 0, progress: Progress | None = None) -> SizeResult:
    """About `keep` of the parameters by width, chosen and re-solved by `obs`.

    Default: the same fraction of heads and channels overall (`kl-joint` lets the split move, the parameter
    count kept), split across layers by `allocation` ("auto": AUTO_ALLOCATION["width"], chosen on validation
    text), with an intercept (a per-layer export, `headlab.engine.models.load.load_pruned`). `uniform`: every layer loses the
    same units, so the export has the family's standard config (plain transformers); the intercept is
    kept where the config can switch output biases on (Llama), else the fit has none. `ffn_align`: every layer
    keeps whole blocks of that many FFN channels (32 for a Q8_0 deployment, 256 for K-quants), chosen by OBS at
    those counts (uniform: the one width rounded to the nearest block). `even_groups` (per layer): every GQA
    group of a layer keeps as many query heads, so llama.cpp runs the layer without extra rows. `window` > 0:
    fit on the running text over the span of `n_texts` WikiText paragraphs, in pieces of that many tokens
    (refit_texts).
    """
    g = handle.geometry
    target, total = target_params(handle, keep), cost(handle).params_total
    prune_heads = handle.adapter.config_decouples_heads or not uniform
    if uniform:
        layout, detail = width_mask(handle, target, PruneMask.dense(g).heads, PruneMask.dense(g).ffn,
                                    prune_heads=prune_heads)
        heads, channels = counts_of(layout, "attn"), counts_of(layout, "ffn")
        if ffn_align > 1:  # one width for all layers, rounded to whole blocks: the nearest, at least one
            kept = min(g.ffn_dim - g.ffn_dim % ffn_align, max(ffn_align, round((g.ffn_dim - channels[0]) / ffn_align)
                                                               * ffn_align))
            channels = [g.ffn_dim - kept] * g.n_layers
        even = all(h % g.n_kv_heads == 0 for h in heads)  # whole KV groups removed: uneven, a per-layer export
        intercept = all(handle.adapter.can_switch_output_bias(k) for k in ("attn", "ffn"))
        mask = obs_prune(handle, heads, channels, refit_texts(calib, n_texts, handle, window=window),
                         even_groups=even, config=_config(_reading(calib, window), handle, "auto", intercept=intercept),
                         progress=progress)
        method = "obs (uniform" + (")" if intercept else ", no bias)")
    else:
        r = width_fraction(handle, 1.0 - target / total)
        budget = Budget(heads=round(r, 4) if prune_heads else 0.0, ffn=round(r, 4))
        mask = ObsStrategy(allocation=allocation, n_texts=n_texts, ffn_align=ffn_align, even_groups=even_groups,
                           window=window)(handle, budget, calib, progress=progress)
        s = mask.summary()
        detail = (f"{s['heads_pruned']} of {s['heads_total']} heads and {s['ffn_channels_pruned']} of "
                  f"{s['ffn_channels_total']} FFN channels, split across layers by the {mask.meta['allocation']} "
                  "allocation")
        method = "obs"
    kept = cost(handle, mask).params_kept
    mask.meta.update({"route": "width", "unit": "heads+ffn", "scope": "uniform" if uniform else "per_layer",
                      "fit_window": window,
                      "budget": 1.0 - kept / total, "target_params": target, "detail": detail})
    return SizeResult("width", method, mask, target, total, kept, detail)
