"""Physical pruning: a PruneMask -> a genuinely smaller copy of the model.

    pruned = surgery.prune(handle, mask)   # a new ModelHandle; handle.model is untouched

The copy computes exactly what `gates.apply(handle, mask.normalized())` computes (to float
rounding), because it mirrors the gates' semantics:
- a pruned query head loses its Q rows and O-projection columns (the O bias stays);
- a KV head loses its K/V rows only when every query head reading it is pruned (GQA);
- a pruned FFN channel loses its up/gate rows and down-projection column;
- a removed pre-LN sub-block becomes a zero delta, a removed post-LN (BERT) one passes its
  residual input through; a layer with both sub-blocks removed is dropped whole;
- compensation biases (mask.attn_bias / ffn_bias) are folded into the output projections; where a
  projection had no bias and the family's config can only switch biases on for a whole group of
  projections (Llama's attention_bias / mlp_bias), a uniform result switches them on, the other
  projections of the group getting zero biases (`meta["bias_switch_params"]` counts them), so the
  standard config still describes it;
- refitted output projections (mask.attn_refit / ffn_refit, headlab.engine.core.refit) become the sliced
  O / down projection's weight, columns in the order the slice keeps the units.

Uneven GQA groups. `repeat_kv` gives every KV head the same number of query heads; a layer
whose groups keep different numbers (say 2 and 1) stores each kept KV head once and gathers
one copy per query head (adapters.reshape.GatheredHeads), so no parameter is duplicated and
the count matches headlab.engine.runtime.cost exactly. Such a layer is not expressible by the family's
standard config, so the model is saved with per-layer sizes. `plan(...)` says per layer
what was kept and why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from headlab.engine.core.adapter import Adapter, Geometry
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import private_copy
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.core.refit import LayerRefit, unit_features
from headlab.engine.core.reshape import set_weight_
from headlab.engine.models.adapters import adapter_for
from headlab.engine.models.placement import require_whole
from headlab.engine.models.pruned import LAYERS_FORMAT, LAYERS_KEY
from headlab.engine.models.wrap import wrap_model

__all__ = [
    "SurgeryError",
    "GqaLayout",
    "LayerPlan",
    "SurgeryPlan",
    "gqa_layout",
    "plan",
    "prune",
    "layer_record",
    "LAYERS_KEY",
    "LAYERS_FORMAT",
]



class SurgeryError(MaskError):
    """A mask that cannot be turned into a smaller model (soft gates, wrong model)."""


@dataclass(frozen=True)
class GqaLayout:
    """Which heads of one layer stay, in storage order."""

    q_heads: tuple[int, ...]  # source query heads kept, grouped by KV head
    kv_heads: tuple[int, ...]  # source KV heads kept
    kv_index: tuple[int, ...] | None = None  # per kept query head, its KV head's position; None when even
    note: str = ""


def gqa_layout(kept: Sequence[bool], group_size: int) -> GqaLayout:
    """The head layout of one layer whose query heads `kept` survive (see module doc)."""
    kept = [bool(k) for k in kept]
    n_kv = len(kept) // group_size
    live = [(g, [h for h in range(g * group_size, (g + 1) * group_size) if kept[h]]) for g in range(n_kv)]
    live = [(g, hs) for g, hs in live if hs]
    q_heads = tuple(h for _, hs in live for h in hs)
    kv_heads = tuple(g for g, _ in live)
    counts = [len(hs) for _, hs in live]
    if len(set(counts)) <= 1:
        return GqaLayout(q_heads, kv_heads)
    kv_index = tuple(i for i, (_, hs) in enumerate(live) for _ in hs)
    shared = ", ".join(f"KV head {g} serves {len(hs)}" for g, hs in live)
    return GqaLayout(q_heads, kv_heads, kv_index,
                     f"uneven groups ({shared}): each KV head is computed once and repeated per query head")


@dataclass(frozen=True)
class LayerPlan:
    """What stays of one source layer."""

    source: int
    attn: bool
    ffn: bool
    q_heads: tuple[int, ...] = ()
    kv_heads: tuple[int, ...] = ()
    kv_index: tuple[int, ...] | None = None
    channels: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def n_heads(self) -> int:
        return len(self.q_heads)

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def ffn_dim(self) -> int:
        return len(self.channels)

    def sizes(self) -> tuple[int, int, int]:
        return self.n_heads, self.n_kv_heads, self.ffn_dim

    @property
    def standard(self) -> bool:
        """Both sub-blocks kept and GQA groups even: the family's modules can hold it as-is."""
        return self.attn and self.ffn and self.kv_index is None


@dataclass(frozen=True)
class SurgeryPlan:
    """The per-layer plan of a surgery, for one source geometry."""

    geometry: Geometry
    layers: tuple[LayerPlan, ...]  # kept layers, in order
    dropped: tuple[int, ...]  # source layers removed whole
    notes: tuple[str, ...] = field(default=())

    @property
    def is_uniform(self) -> bool:
        """Every kept layer has both sub-blocks and the same head / KV head / channel counts."""
        return all(lp.standard for lp in self.layers) and len({lp.sizes() for lp in self.layers}) == 1

    def uniform_sizes(self) -> tuple[int, int, int] | None:
        """(heads, KV heads, FFN channels) shared by every layer, or None."""
        return self.layers[0].sizes() if self.is_uniform else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dropped_layers": list(self.dropped),
            "uniform": self.is_uniform,
            "layers": [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(lp).items() if k != "channels"}
                       | {"n_channels": lp.ffn_dim} for lp in self.layers],
            "notes": list(self.notes),
        }


def _hard(mask: PruneMask) -> None:
    if not mask.is_hard:
        raise SurgeryError(
            "physical pruning needs a hard mask (every gate exactly 0 or 1); "
            "binarise the soft gates first (e.g. keep gates >= 0.5)"
        )


def plan(g: Geometry, mask: PruneMask) -> SurgeryPlan:
    """The per-layer plan for pruning a model of geometry `g` with `mask` (normalized first)."""
    mask.check(g)
    _hard(mask)
    m = mask.normalized()
    layers, dropped, notes = [], [], []
    for layer in range(g.n_layers):
        attn, ffn = bool(m.attn[layer] > 0), bool(m.ffn_block[layer] > 0)
        if not attn and not ffn:
            dropped.append(layer)
            notes.append(f"layer {layer}: dropped whole (both sub-blocks removed)")
            continue
        lnotes = []
        if not attn and mask.attn[layer] > 0:
            lnotes.append(f"layer {layer}: every head pruned, so its ATTN sub-block is removed")
        if not ffn and mask.ffn_block[layer] > 0:
            lnotes.append(f"layer {layer}: every FFN channel pruned, so its FFN sub-block is removed")
        layout = gqa_layout((m.heads[layer] > 0).tolist(), g.group_size) if attn else GqaLayout((), ())
        if layout.note:
            lnotes.append(f"layer {layer}: {layout.note}")
        if attn and g.group_size > 1:
            for kv in sorted(set(layout.kv_heads)):
                group = range(kv * g.group_size, (kv + 1) * g.group_size)
                reading = [h for h in group if m.heads[layer, h] > 0]
                if len(reading) < g.group_size:
                    lnotes.append(f"layer {layer}: KV head {kv} kept because query head(s) {reading} still read it")
        channels = tuple(torch.nonzero(m.ffn[layer] > 0).flatten().tolist()) if ffn else ()
        layers.append(LayerPlan(layer, attn, ffn, layout.q_heads, layout.kv_heads, layout.kv_index, channels,
                                tuple(lnotes)))
        notes += lnotes
    return SurgeryPlan(g, tuple(layers), tuple(dropped), tuple(notes))


def _nonzero(bias: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    if bias is None or not bool(bias[layer].any()):
        return None
    return bias[layer]


def prune(handle: ModelHandle, mask: PruneMask, *, progress: Progress | None = None) -> ModelHandle:
    """A new ModelHandle holding a physically pruned deep copy of `handle.model`.

    When every kept layer has the same sizes and the family's config can state them, the
    copy's config is the standard one with those sizes; otherwise the config keeps the
    source sizes and records each layer's under `config.headlab_layers` (headlab.engine.models.pruned reads it back).
    """
    require_whole(handle.model, "surgery (a physically pruned copy)")
    g = handle.geometry
    sp = plan(g, mask)
    norm = mask.normalized()
    model = private_copy(handle.model)
    adapter = adapter_for(model)
    kept = {lp.source: lp for lp in sp.layers}
    created: set[str] = set()  # sub-block kinds whose output projection got a bias it did not have
    with torch.no_grad():
        for layer in range(g.n_layers):
            lp = kept.get(layer)
            if lp is not None:
                created |= _prune_layer(adapter, lp, norm)
            if progress:
                progress(layer + 1, g.n_layers + 1)
    if sp.dropped:
        adapter.keep_layers_([lp.source for lp in sp.layers])
    adapter.renumber_cache_layers_()
    uniform = sp.uniform_sizes()
    switchable = all(adapter.can_switch_output_bias(kind) for kind in created)
    standard = uniform is not None and switchable and (
        uniform[:2] == (g.n_heads, g.n_kv_heads) or adapter.config_decouples_heads)
    switched = 0
    if standard:
        adapter.set_sizes_(*uniform)
        with torch.no_grad():
            switched = sum(adapter.switch_on_output_bias_(kind) for kind in sorted(created))
    else:
        adapter.set_sizes_(g.n_heads, g.n_kv_heads, g.ffn_dim)
        setattr(model.config, LAYERS_KEY, layer_record(adapter, sp))
    for i, lp in enumerate(sp.layers):
        _assert_sizes(adapter, i, lp)
    if progress:
        progress(g.n_layers + 1, g.n_layers + 1)
    pruned = wrap_model(model, handle.tokenizer, name=f"{handle.name} (pruned)")
    pruned.source = handle.source
    pruned.meta = {"surgery": sp, "source_name": handle.name, "mask": mask.clone(), "standard_config": standard,
                   "bias_switch_params": switched}
    return pruned


def _prune_layer(adapter: Adapter, lp: LayerPlan, mask: PruneMask) -> set[str]:
    """Prune one source layer in place (before any layer is dropped); the kinds whose output bias it created."""
    layer, created = lp.source, set()
    for kind, keep in (("attn", lp.attn), ("ffn", lp.ffn)):
        m = mask.input_maps(kind).get(layer)
        if keep and m is not None:  # the row-wise input re-fit folded into every input projection: W' = W M
            for role, proj in adapter.projections_of(layer, kind).items():
                if role not in ("o", "down"):
                    set_weight_(proj, proj.weight.detach().float() @ m.to(proj.weight.device))
    if lp.attn:
        bias = _nonzero(getattr(mask, "attn_bias", None), layer)
        if bias is not None and adapter.add_output_bias_(layer, "attn", bias):
            created.add("attn")
        adapter.resize_attention_(layer, lp.q_heads, lp.kv_heads, lp.kv_index)
        refit = mask.attn_refit.get(layer)
        if refit is not None:
            _write_refit(adapter.head_output_proj(layer), refit, lp.q_heads)
    else:
        adapter.remove_subblock_(layer, "attn")
    if lp.ffn:
        bias = _nonzero(getattr(mask, "ffn_bias", None), layer)
        if bias is not None and adapter.add_output_bias_(layer, "ffn", bias):
            created.add("ffn")
        adapter.resize_ffn_(layer, lp.channels)
        refit = mask.ffn_refit.get(layer)
        if refit is not None:
            _write_refit(adapter.ffn_output_proj(layer), refit, lp.channels)
    else:
        adapter.remove_subblock_(layer, "ffn")
    return created


def _write_refit(proj: torch.nn.Module, refit: LayerRefit, kept: Sequence[int]) -> None:
    """Write a refit's columns into a projection sliced to the units `kept`, in that (storage) order."""
    position = {u: i for i, u in enumerate(refit.units)}
    assert sorted(kept) == list(refit.units), "the refit was fitted for other units than surgery keeps"
    cols = unit_features([position[u] for u in kept], refit.width)
    set_weight_(proj, refit.weight.index_select(1, cols))


def _assert_sizes(adapter: Adapter, layer: int, lp: LayerPlan) -> None:
    s = adapter.layer_sizes(layer)
    got = (s["heads"], s["kv_heads"], s["ffn"], s["attn"], s["ffn_block"])
    want = (lp.n_heads, lp.n_kv_heads, lp.ffn_dim, lp.attn, lp.ffn)
    assert got == want, f"layer {lp.source}: surgery produced {got}, planned {want}"


def layer_record(adapter: Adapter, sp: SurgeryPlan) -> dict[str, Any]:
    """The `headlab_layers` config entry: every kept layer's physical sizes and its source index."""
    return {
        "format": LAYERS_FORMAT,
        "version": 1,
        "family": adapter.family,
        "head_dim": sp.geometry.head_dim,
        "layers": [{"source_layer": lp.source, **adapter.layer_sizes(i)} for i, lp in enumerate(sp.layers)],
    }
