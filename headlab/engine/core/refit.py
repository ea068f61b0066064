"""Refitted output projections: new weights for the columns a pruned layer keeps.

Removing heads deletes input columns of the attention's output (O) projection (head_dim per
head); removing FFN channels deletes input columns of the down projection. Reconstruction
(headlab.engine.pruning.reconstruct) then re-solves the columns that remain so that the layer still
reproduces its dense output on calibration data. The result, per layer and sub-block, is one
`LayerRefit`: the kept units (heads or channels, ascending) and a compact matrix
W [hidden, kept inputs] in [out, in] orientation that replaces those columns.

The input side is re-fitted too (families with a norm in front of each sub-block): the kept rows of
Q/K/V (or gate/up) all read that norm's output x, and re-solving each kept row w against its dense
output on the pruned model's inputs, min ||X_p w' - X_d w||^2 + lam ||w' - w||^2, gives w' = M^T w with one
[hidden, hidden] map M per sub-block, shared by every row. So a sub-block carries one *input map*
M (x -> x M^T on the norm's output), exactly the row-wise re-fit of all of its input projections;
surgery folds it into their weights (W' = W M). The projection's
own bias stays; the fit's intercept travels as the mask's compensation bias (attn_bias /
ffn_bias, headlab.engine.core.mask), so a refit output is

    x[..., kept inputs] @ W.T + projection bias + compensation bias

`headlab.engine.core.gates` computes exactly that through a forward hook (the shared weights are never
written), and `headlab.engine.export.surgery` writes W into the sliced projection. A `LayerRefit` is
tied to the units it was fitted for: a mask whose gates no longer keep exactly those units
drops it (PruneMask edits) or is refused (PruneMask.check). Weights are never modified in
place: masks that are copies of one another share them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "INPUT_MAP_KINDS",
    "REFIT_KINDS",
    "LayerRefit",
    "input_maps_from_tensors",
    "refit_path",
    "refit_tensors",
    "refits_from_tensors",
    "unit_features",
]

# The two output projections a refit can replace, by the mask's sub-block names.
REFIT_KINDS = ("attn", "ffn")
# Their input maps, by the same sub-block names (entries "attn_in.{layer}.map" of a refit file).
INPUT_MAP_KINDS = {"attn": "attn_in", "ffn": "ffn_in"}


def unit_features(units: Sequence[int] | torch.Tensor, width: int) -> torch.Tensor:
    """Input-feature indices [len(units) * width] of `units` (each `width` features wide, unit-major)."""
    u = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long)
    return (u[:, None] * width + torch.arange(width)).reshape(-1)


@dataclass(frozen=True, eq=False)
class LayerRefit:
    """Replacement weights [hidden, len(units) * width] for the kept input columns of one output projection."""

    units: tuple[int, ...]
    weight: torch.Tensor
    _key: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        units = tuple(int(u) for u in self.units)
        if list(units) != sorted(set(units)):
            raise ValueError("refit units must be distinct and ascending")
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "weight", self.weight.detach().float().cpu().contiguous())

    @property
    def width(self) -> int:
        """Input features per unit (head_dim for heads, 1 for FFN channels)."""
        return self.weight.shape[1] // max(1, len(self.units))

    def features(self) -> torch.Tensor:
        """The projection's input columns this weight reads, int64 [len(units) * width]."""
        return unit_features(self.units, self.width)

    def digest(self) -> bytes:
        """20 bytes identifying units and weight (cached; recomputed if the tensor was changed in place)."""
        version = self.weight._version
        if self._key.get("version") != version:
            h = hashlib.sha1(torch.tensor(self.units, dtype=torch.int64).numpy().tobytes())
            h.update(self.weight.numpy().tobytes())
            self._key.update(version=version, digest=h.digest())
        return self._key["digest"]


def refit_tensors(attn: dict[int, LayerRefit], ffn: dict[int, LayerRefit],
                  maps: dict[str, dict[int, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Flat safetensors entries "attn.{layer}.units" / ".weight" (and "ffn.") of two refit tables, plus
    "attn_in.{layer}.map" / "ffn_in.{layer}.map" of the input maps (`maps` by sub-block kind)."""
    out = {}
    for kind, table in zip(REFIT_KINDS, (attn, ffn)):
        for layer, r in table.items():
            out[f"{kind}.{layer}.units"] = torch.tensor(r.units, dtype=torch.int64)
            out[f"{kind}.{layer}.weight"] = r.weight
    for kind, table in (maps or {}).items():
        for layer, m in table.items():
            out[f"{INPUT_MAP_KINDS[kind]}.{layer}.map"] = m.detach().float().cpu().contiguous()
    return out


def input_maps_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """The input maps by sub-block kind ({"attn": {layer: M}, "ffn": ...}) from `refit_tensors`' entries."""
    out: dict[str, dict[int, torch.Tensor]] = {k: {} for k in REFIT_KINDS}
    names = {v: k for k, v in INPUT_MAP_KINDS.items()}
    for key, value in tensors.items():
        name, layer, part = key.split(".")
        if name in names and part == "map":
            out[names[name]][int(layer)] = value.float()
    return out


def refits_from_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[int, LayerRefit], dict[int, LayerRefit]]:
    """(attn, ffn) refit tables from the entries `refit_tensors` wrote."""
    tables: dict[str, dict[int, LayerRefit]] = {k: {} for k in REFIT_KINDS}
    for key, value in tensors.items():
        kind, layer, part = key.split(".")
        if kind in INPUT_MAP_KINDS.values() and part == "map":
            continue  # input_maps_from_tensors reads those
        if kind not in tables or part not in ("units", "weight"):
            raise ValueError(f"unexpected entry {key!r} in a refit file")
        if part == "weight":
            units = tensors[f"{kind}.{layer}.units"].tolist()
            tables[kind][int(layer)] = LayerRefit(tuple(units), value)
    return tables["attn"], tables["ffn"]


def refit_path(mask_path: str | os.PathLike) -> Path:
    """Where a mask file's refits live: `<name>.refit.safetensors` beside `<name>.json`."""
    p = Path(mask_path)
    return p.with_name(f"{p.stem}.refit.safetensors")

