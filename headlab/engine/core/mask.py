"""PruneMask: which heads, FFN channels and sub-blocks of a model are kept.

Values are gates in [0, 1]: 1 keeps a unit, 0 prunes it, values between are soft gates
(used while training masks). Shapes, for a model of geometry g:
  heads [L, H]   one gate per query head (applied to the O-projection's input)
  ffn   [L, F]   one gate per FFN channel (applied to the down-projection's input)
  attn  [L]      the whole ATTN sub-block of each layer
  ffn_block [L]  the whole FFN sub-block of each layer
Optional compensation biases (FLAP, An et al. AAAI 2024), None unless a strategy set them:
  attn_bias [L, hidden]  added to the O-projection's output (the pruned heads' mean contribution)
  ffn_bias  [L, hidden]  added to the down-projection's output (the pruned channels' mean contribution)
They live inside their sub-block: a removed sub-block removes its bias too. Editing gates by
hand keeps the biases as they are; headlab.engine.pruning.compensation recomputes them for the new gates.
Optional refitted output projections (headlab.engine.core.refit; empty unless reconstruction made them):
  attn_refit {layer: LayerRefit}  new weights for the O projection's kept columns
  ffn_refit  {layer: LayerRefit}  new weights for the down projection's kept columns
A refit belongs to the units it was fitted for: editing a layer's gates drops that layer's
refit, and `check` refuses one that no longer matches. `save` writes them next to the JSON
file as safetensors (`<name>.refit.safetensors`), which `load` reads back and verifies.
A mask is immutable in spirit: editing methods return a new mask.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file

from headlab.engine.core.adapter import Geometry
from headlab.engine.core.errors import MaskError
from headlab.engine.core.files import write_atomic_safetensors, write_atomic_text
from headlab.engine.core.refit import (
    REFIT_KINDS,
    LayerRefit,
    refit_path,
    input_maps_from_tensors,
    refit_tensors,
    refits_from_tensors,
)

__all__ = ["PruneMask", "MaskError", "first_difference", "MASK_FORMAT_VERSION", "UNIT_KINDS", "UNIT_WORDS"]

MASK_FORMAT_VERSION = 1
# The kinds of unit a mask gates, and how the app names them.
UNIT_KINDS = ("heads", "ffn", "blocks")
UNIT_WORDS = {"heads": "heads", "ffn": "FFN channels", "blocks": "sub-blocks"}


def first_difference(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> int:
    """The first index where two `PruneMask.layer_keys()` differ (their common length when none does)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _as_float(t: Any) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32).detach().clone()


@dataclass
class PruneMask:
    heads: torch.Tensor
    ffn: torch.Tensor
    attn: torch.Tensor
    ffn_block: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    attn_bias: torch.Tensor | None = None
    ffn_bias: torch.Tensor | None = None
    attn_refit: dict[int, LayerRefit] = field(default_factory=dict)
    ffn_refit: dict[int, LayerRefit] = field(default_factory=dict)
    # input maps [hidden, hidden] by layer (headlab.engine.core.refit): the row-wise re-fit of Q/K/V and gate/up
    attn_in: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn_in: dict[int, torch.Tensor] = field(default_factory=dict)

    # --- construction ------------------------------------------------------------------
    @classmethod
    def dense(cls, g: Geometry) -> "PruneMask":
        """A mask that keeps everything."""
        return cls(
            heads=torch.ones(g.n_layers, g.n_heads),
            ffn=torch.ones(g.n_layers, g.ffn_dim),
            attn=torch.ones(g.n_layers),
            ffn_block=torch.ones(g.n_layers),
        )

    @classmethod
    def from_heads(cls, g: Geometry, heads: torch.Tensor, **meta: Any) -> "PruneMask":
        """A mask that gates heads only."""
        m = cls.dense(g)
        m.heads = _as_float(heads)
        m.meta.update(meta)
        m.check(g)
        return m

    def clone(self) -> "PruneMask":
        bias = lambda b: None if b is None else b.clone()  # noqa: E731
        return PruneMask(
            self.heads.clone(), self.ffn.clone(), self.attn.clone(), self.ffn_block.clone(), dict(self.meta),
            attn_bias=bias(self.attn_bias), ffn_bias=bias(self.ffn_bias),
            attn_refit=dict(self.attn_refit), ffn_refit=dict(self.ffn_refit),  # refits are shared, never written
            attn_in=dict(self.attn_in), ffn_in=dict(self.ffn_in),
        )

    @property
    def has_bias(self) -> bool:
        """The mask carries compensation biases."""
        return self.attn_bias is not None or self.ffn_bias is not None

    @property
    def has_refit(self) -> bool:
        """The mask carries refitted weights (output projections or input maps) for some layer."""
        return bool(self.attn_refit) or bool(self.ffn_refit) or bool(self.attn_in) or bool(self.ffn_in)

    def input_maps(self, kind: str) -> dict[int, torch.Tensor]:
        """The input maps of the "attn" (Q/K/V) or "ffn" (gate/up) sub-blocks, by layer."""
        if kind not in REFIT_KINDS:
            raise MaskError(f"input map kind must be one of {', '.join(REFIT_KINDS)}, got {kind!r}")
        return self.attn_in if kind == "attn" else self.ffn_in

    def refits(self, kind: str) -> dict[int, LayerRefit]:
        """The refits of the "attn" (O projection) or "ffn" (down projection) sub-blocks, by layer."""
        if kind not in REFIT_KINDS:
            raise MaskError(f"refit kind must be one of {', '.join(REFIT_KINDS)}, got {kind!r}")
        return self.attn_refit if kind == "attn" else self.ffn_refit

    def kept_units(self, layer: int, kind: str) -> tuple[int, ...]:
        """The heads ("attn") or FFN channels ("ffn") of `layer` that run (sub-block removal folded in)."""
        gates_ = self.heads_effective() if kind == "attn" else self.ffn_effective()
        return tuple(torch.nonzero(gates_[layer] > 0).flatten().tolist())

    def without_refit(self) -> "PruneMask":
        """A copy without refitted weights (the gates and biases as they are)."""
        m = self.clone()
        m.attn_refit, m.ffn_refit, m.attn_in, m.ffn_in = {}, {}, {}, {}
        return m

    def _drop_stale_refits(self) -> "PruneMask":
        """Drop, in place, every refit whose layer no longer keeps exactly the units it was fitted for."""
        for kind in REFIT_KINDS:
            refits = self.refits(kind)
            for layer in [l for l, r in refits.items() if not 0 <= l < self.attn.numel()
                          or r.units != self.kept_units(l, kind)]:
                del refits[layer]
        return self

    # --- checks ------------------------------------------------------------------------
    def check(self, g: Geometry) -> "PruneMask":
        """Raise MaskError naming the first part whose shape or values do not fit `g`."""
        expected = {
            "heads": (g.n_layers, g.n_heads),
            "ffn": (g.n_layers, g.ffn_dim),
            "attn": (g.n_layers,),
            "ffn_block": (g.n_layers,),
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise MaskError(
                    f"mask.{name} has shape {tuple(t.shape)} but this model needs {shape} "
                    f"({g.n_layers} layers, {g.n_heads} heads, {g.ffn_dim} FFN channels)"
                )
            if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
                raise MaskError(f"mask.{name} must hold gates in [0, 1] (found values outside, or NaN)")
        for name in ("attn_bias", "ffn_bias"):
            t = getattr(self, name)
            if t is None:
                continue
            if tuple(t.shape) != (g.n_layers, g.hidden):
                raise MaskError(
                    f"mask.{name} has shape {tuple(t.shape)} but this model needs {(g.n_layers, g.hidden)} "
                    f"({g.n_layers} layers, hidden size {g.hidden})"
                )
            if not torch.isfinite(t).all():
                raise MaskError(f"mask.{name} holds NaN or inf")
        self._check_refits(g)
        if self.attn.max() == 0 and self.ffn_block.max() == 0:
            raise MaskError("this mask prunes every sub-block of every layer: nothing would be left to run")
        if self.heads_effective().sum() == 0 and self.ffn_effective().sum() == 0:
            raise MaskError("this mask prunes every head and every FFN channel: nothing would be left to run")
        return self

    def _check_refits(self, g: Geometry) -> None:
        for kind in REFIT_KINDS:
            width = g.head_dim if kind == "attn" else 1
            for layer, r in self.refits(kind).items():
                where = f"mask.{kind}_refit[{layer}]"
                if not 0 <= layer < g.n_layers:
                    raise MaskError(f"{where}: this model has layers 0..{g.n_layers - 1}")
                kept = self.kept_units(layer, kind)
                if r.units != kept:
                    raise MaskError(f"{where} was fitted for units {list(r.units)[:8]}... but the mask keeps "
                                    f"{list(kept)[:8]}...: refit the mask or drop it (mask.without_refit())")
                shape = (g.hidden, len(kept) * width)
                if tuple(r.weight.shape) != shape:
                    raise MaskError(f"{where} has shape {tuple(r.weight.shape)}, this model needs {shape}")
                if not torch.isfinite(r.weight).all():
                    raise MaskError(f"{where} holds NaN or inf")
            for layer, m in self.input_maps(kind).items():
                where = f"mask.{kind}_in[{layer}]"
                if not 0 <= layer < g.n_layers:
                    raise MaskError(f"{where}: this model has layers 0..{g.n_layers - 1}")
                if tuple(m.shape) != (g.hidden, g.hidden):
                    raise MaskError(f"{where} has shape {tuple(m.shape)}, this model needs {(g.hidden, g.hidden)}")
                if not torch.isfinite(m).all():
                    raise MaskError(f"{where} holds NaN or inf")

    # --- views -------------------------------------------------------------------------
    @property
    def is_hard(self) -> bool:
        """Every gate is exactly 0 or 1."""
        return all(bool(((t == 0) | (t == 1)).all()) for t in (self.heads, self.ffn, self.attn, self.ffn_block))

    def heads_effective(self) -> torch.Tensor:
        """Head gates with sub-block removal folded in: [L, H]."""
        return self.heads * self.attn[:, None]

    def ffn_effective(self) -> torch.Tensor:
        """FFN channel gates with sub-block removal folded in: [L, F]."""
        return self.ffn * self.ffn_block[:, None]

    def normalized(self) -> "PruneMask":
        """The documented rule for a layer with every head pruned: its ATTN sub-block is removed.

        The same for a layer with every FFN channel pruned. This keeps the masked model and
        the physically pruned model identical (an attention with zero heads has no shape).
        """
        m = self.clone()
        dead_attn = (m.heads == 0).all(dim=1)
        dead_ffn = (m.ffn == 0).all(dim=1)
        m.attn[dead_attn] = 0.0
        m.ffn_block[dead_ffn] = 0.0
        return m._drop_stale_refits()

    def summary(self) -> dict[str, int]:
        """Counts of pruned units (a unit inside a removed sub-block counts as pruned)."""
        h, f = self.heads_effective(), self.ffn_effective()
        return {
            "heads_pruned": int((h == 0).sum()),
            "heads_total": h.numel(),
            "ffn_channels_pruned": int((f == 0).sum()),
            "ffn_channels_total": f.numel(),
            "attn_blocks_pruned": int((self.attn == 0).sum()),
            "ffn_blocks_pruned": int((self.ffn_block == 0).sum()),
            "layers": int(self.attn.numel()),
        }

    # --- editing -----------------------------------------------------------------------
    def with_head(self, layer: int, head: int, value: float) -> "PruneMask":
        """A copy with one head's gate set to `value`."""
        m = self.clone()
        m.heads[layer, head] = float(value)
        return m._drop_stale_refits()

    def toggle_head(self, layer: int, head: int) -> "PruneMask":
        """A copy with one head flipped between kept (1) and pruned (0), the ATTN sub-block rule kept.

        Turning a head on in a layer whose ATTN sub-block is removed brings the sub-block back
        (otherwise the toggle would have no effect); turning off the last head of a layer removes
        the sub-block (the rule of `normalized`), so no layer runs an empty attention.
        """
        return self.toggle_heads([(layer, head)])

    def toggle_heads(self, cells: Iterable[tuple[int, int]]) -> "PruneMask":
        """`toggle_head` for each (layer, head) in order, as one new mask."""
        m = self.clone()
        for layer, head in cells:
            turning_on = bool(m.heads_effective()[layer, head] == 0)
            m.heads[layer, head] = 1.0 if turning_on else 0.0
            if turning_on:
                m.attn[layer] = 1.0
            elif bool((m.heads[layer] == 0).all()):
                m.attn[layer] = 0.0
        return m._drop_stale_refits()

    def reset_unit(self, unit: str) -> "PruneMask":
        """A copy with one unit kind back to dense, the others untouched (the base for re-selecting it).

        "heads" clears head gates and the ATTN sub-blocks removed only because all their heads
        were; "ffn" does the same for channels; "blocks" restores sub-blocks that still have units.
        """
        if unit not in UNIT_KINDS:
            raise MaskError(f"unit must be one of {', '.join(UNIT_KINDS)}, got {unit!r}")
        m = self.clone()
        if unit == "heads":
            m.attn[(m.heads == 0).all(dim=1)] = 1.0
            m.heads.fill_(1.0)
        elif unit == "ffn":
            m.ffn_block[(m.ffn == 0).all(dim=1)] = 1.0
            m.ffn.fill_(1.0)
        else:
            m.attn[(m.heads > 0).any(dim=1)] = 1.0
            m.ffn_block[(m.ffn > 0).any(dim=1)] = 1.0
        return m._drop_stale_refits()

    def with_block(self, layer: int, kind: str, value: float) -> "PruneMask":
        """A copy with the `kind` ("attn" or "ffn") sub-block gate of `layer` set to `value`."""
        if kind not in ("attn", "ffn"):
            raise MaskError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")
        m = self.clone()
        (m.attn if kind == "attn" else m.ffn_block)[layer] = float(value)
        return m._drop_stale_refits()

    # --- identity ------------------------------------------------------------------------
    def layer_keys(self) -> tuple[bytes, ...]:
        """One bytes key per layer: every gate, compensation bias and refit that acts inside that layer.

        The one definition of "what this mask computes": equality, digests, the first changed
        layer and every cache key derive from it. A zero bias and no bias compute the same
        thing (gates skip a missing one), so they give the same key.
        """
        gates_ = torch.cat([self.heads, self.ffn, self.attn[:, None], self.ffn_block[:, None]], dim=1)
        gates_ = gates_.detach().float().cpu()  # (L, H + F + 2)
        keys = []
        for layer, row in enumerate(gates_):
            key = row.numpy().tobytes()
            for tag, bias in ((b"a", self.attn_bias), (b"f", self.ffn_bias)):
                if bias is not None and bool(bias[layer].any()):
                    key += tag + bias[layer].detach().float().cpu().numpy().tobytes()
            for tag, refits in ((b"A", self.attn_refit), (b"F", self.ffn_refit)):
                if layer in refits:
                    key += tag + refits[layer].digest()
            for tag, maps in ((b"I", self.attn_in), (b"J", self.ffn_in)):
                if layer in maps:
                    key += tag + hashlib.sha1(maps[layer].detach().float().cpu().numpy().tobytes()).digest()
            keys.append(key)
        return tuple(keys)

    def digest(self) -> str:
        """A short hex digest of every gate, bias and refit: equal masks (`==`) give equal digests."""
        h = hashlib.sha1()
        for key in self.layer_keys():
            h.update(len(key).to_bytes(8, "little") + key)
        return h.hexdigest()[:16]

    def first_changed_layer(self, other: "PruneMask") -> int:
        """The first layer whose gates, biases or refits differ from `other`'s (the layer count when none does)."""
        return first_difference(self.layer_keys(), other.layer_keys())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PruneMask):
            return NotImplemented
        return self.layer_keys() == other.layer_keys()

    __hash__ = None  # mutable tensors inside: use digest() as a key

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": "headlab.prune_mask",
            "version": MASK_FORMAT_VERSION,
            "heads": self.heads.tolist(),
            "ffn": self.ffn.tolist(),
            "attn": self.attn.tolist(),
            "ffn_block": self.ffn_block.tolist(),
            "meta": self.meta,
        }
        # Written only when present, so masks without compensation keep the original format.
        for name in ("attn_bias", "ffn_bias"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name).tolist()
        if self.has_refit:  # the weights themselves are too large for JSON: `save` writes them beside it
            d["refit"] = {"attn_layers": sorted(self.attn_refit), "ffn_layers": sorted(self.ffn_refit),
                          "attn_in_layers": sorted(self.attn_in), "ffn_in_layers": sorted(self.ffn_in),
                          "digest": self.digest()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], refit: dict[str, torch.Tensor] | None = None) -> "PruneMask":
        """The mask of `to_dict`; one that carries refits needs their tensors (`refit`, as `save` wrote them)."""
        if d.get("format") != "headlab.prune_mask":
            raise MaskError("not a mask file: its 'format' field is not 'headlab.prune_mask'")
        if d.get("refit") and refit is None:
            raise MaskError("this mask carries refitted weights, which live in a .refit.safetensors file next to "
                            "its JSON: load it with PruneMask.load(path) (or the CLI's --mask) from that folder")
        try:
            m = cls(
                heads=_as_float(d["heads"]),
                ffn=_as_float(d["ffn"]),
                attn=_as_float(d["attn"]),
                ffn_block=_as_float(d["ffn_block"]),
                meta=dict(d.get("meta", {})),
                attn_bias=_as_float(d["attn_bias"]) if d.get("attn_bias") is not None else None,
                ffn_bias=_as_float(d["ffn_bias"]) if d.get("ffn_bias") is not None else None,
            )
        except KeyError as e:
            raise MaskError(f"mask file is missing the field {e.args[0]!r}") from None
        if d.get("refit"):
            m.attn_refit, m.ffn_refit = refits_from_tensors(refit)
            maps = input_maps_from_tensors(refit)
            m.attn_in, m.ffn_in = maps["attn"], maps["ffn"]
            if m.digest() != d["refit"].get("digest"):
                raise MaskError("the refitted weights do not belong to this mask file (digest mismatch): "
                                "the .refit.safetensors file beside it was replaced or is stale")
        return m

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask as JSON (atomically: a temporary file renamed into place); refits go beside it."""
        path = Path(path)
        d = self.to_dict()
        if self.has_refit:
            side = refit_path(path)
            write_atomic_safetensors(side, refit_tensors(self.attn_refit, self.ffn_refit,
                                                          {"attn": self.attn_in, "ffn": self.ffn_in}))
            d["refit"]["file"] = side.name
        return write_atomic_text(path, json.dumps(d))

    @classmethod
    def load(cls, path: str | os.PathLike, g: Geometry | None = None) -> "PruneMask":
        """Read a mask written by `save` (and its refits); with `g`, also check it fits that model."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MaskError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        refit = None
        if isinstance(d, dict) and d.get("refit"):
            side = path.with_name(d["refit"].get("file") or refit_path(path).name)
            if not side.is_file():
                raise MaskError(f"{path} carries refitted weights, but {side.name} is not beside it")
            refit = load_file(str(side))
        m = cls.from_dict(d, refit)
        return m.check(g) if g is not None else m
