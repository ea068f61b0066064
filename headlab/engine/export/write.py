"""Write a physically pruned model as a Hugging Face folder (headlab.engine.models.load.load_pruned reads it back).

    result = export(handle, mask, "out/smollm2-pruned")   # surgery + save + manifest
    pruned = headlab.engine.models.load.load_pruned("out/smollm2-pruned")   # reading it back

The folder holds `model.safetensors`, the tokenizer, `config.json`, `generation_config.json`
and `headlab_manifest.json` (source, mask, criterion, budget, parameter counts, perplexity
before/after with its protocol, sha256 of every file). A source that is a sentence-transformers
folder (the shipped MiniLM) makes the export one too: its modules.json, module folders
(`1_Pooling/`, ...) and ST configs are copied next to the model, which stays at the folder root
as the Transformer module (headlab.engine.models.sentence).

Layouts:
- uniform: every layer keeps the same heads / KV heads / FFN channels and the family's
  config can state them (Llama-family `head_dim`; GPT-2 and BERT only for FFN channels and
  dropped layers). config.json is the family's standard one, so plain
  `AutoModelForCausalLM.from_pretrained(folder)` loads it.
- per_layer: config.json keeps the source sizes and records each layer's under
  `headlab_layers` (see headlab.engine.export.surgery.layer_record). `load_pruned` (and
  `headlab.engine.models.load.load_model`) build the standard model and reshape each layer before loading
  the weights; docs/export.md shows how to do that without this package.

Writing is atomic: everything goes into a temporary sibling folder that is renamed into
place when complete. A non-empty target is refused unless `overwrite=True`, and even then
the old folder is only deleted after the new one is in place.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from headlab.engine import __version__ as ENGINE_VERSION
from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.export.surgery import SurgeryPlan, layer_record, plan, prune
from headlab.engine.models.pruned import LAYERS_KEY, MANIFEST, file_sha256
from headlab.engine.models.sentence import write_sentence_files
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL, perplexity

__all__ = [
    "ExportError",
    "ExportPreview",
    "ExportResult",
    "LAYOUTS",
    "MANIFEST",
    "preview",
    "export",
    "zip_folder",
    "folder_size",
    "check_target",
    "staged_folder",
    "file_checksums",
    "masked_parity",
    "perplexity_before_after",
]

LAYOUTS = ("auto", "uniform", "per_layer")
MANIFEST_FORMAT = "headlab.export"
Stage = Callable[[str], None]


class ExportError(ValueError):
    """An export that cannot be done as asked (layout, target folder); nothing was written."""


# --- what an export would produce ---------------------------------------------------------
@dataclass(frozen=True)
class ExportPreview:
    """The size and layout an export of `mask` would have, computed without copying the model."""

    layout: str  # "uniform" or "per_layer" (what "auto" resolves to)
    uniform_possible: bool
    why_not_uniform: str
    params_before: int
    params_after: int
    bytes_estimate: int
    plan: SurgeryPlan

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before


def _why_not_uniform(handle: ModelHandle, sp: SurgeryPlan, mask: PruneMask) -> str:
    """Empty when the family's standard config can describe the pruned model, else the reason."""
    g, adapter = handle.geometry, handle.adapter
    removed = [lp.source for lp in sp.layers if not (lp.attn and lp.ffn)]
    if removed:
        return f"layer(s) {removed} keep only one sub-block"
    uneven = [lp.source for lp in sp.layers if lp.kv_index is not None]
    if uneven:
        return f"layer(s) {uneven} keep different numbers of query heads per KV head"
    sizes = sorted({lp.sizes() for lp in sp.layers})
    if len(sizes) > 1:
        return "layers keep different numbers of (heads, KV heads, FFN channels): " + ", ".join(map(str, sizes[:4]))
    if sizes[0][:2] != (g.n_heads, g.n_kv_heads) and not adapter.config_decouples_heads:
        return f"a {adapter.family} config cannot state fewer heads than hidden / head_dim"
    for kind, name, proj in (("attn", "attn_bias", adapter.head_output_proj),
                             ("ffn", "ffn_bias", adapter.ffn_output_proj)):
        bias = getattr(mask, name, None)
        if (bias is not None and not adapter.can_switch_output_bias(kind)
                and any(bias[lp.source].any() and proj(lp.source).bias is None for lp in sp.layers)):
            return f"the mask's compensation {name} adds a bias the {adapter.family} config has no switch for"
    return ""


def _resolve_layout(layout: str, why_not: str) -> str:
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "uniform" and why_not:
        raise ExportError(f"cannot export with a uniform (standard) config: {why_not}; use layout 'per_layer' "
                          "or a mask that prunes every layer alike (headlab.engine.pruning.size_target width route)")
    if layout == "auto":
        return "per_layer" if why_not else "uniform"
    return layout


def preview(handle: ModelHandle, mask: PruneMask | None, layout: str = "auto") -> ExportPreview:
    """Layout, parameter count and approximate file size of exporting `handle` under `mask`."""
    mask = mask if mask is not None else PruneMask.dense(handle.geometry)
    sp = plan(handle.geometry, mask)
    why = _why_not_uniform(handle, sp, mask)
    c = cost(handle, mask)
    item = torch.finfo(handle.dtype).bits // 8
    return ExportPreview(_resolve_layout(layout, why), not why, why, c.params_total, c.params_kept,
                         c.params_kept * item, sp)


# --- the export itself -------------------------------------------------------------------
@dataclass
class ExportResult:
    folder: Path
    layout: str
    params_before: int
    params_after: int
    bytes_on_disk: int
    manifest: dict[str, Any] = field(repr=False)

    @property
    def load_hint(self) -> str:
        return self.manifest["load"]["python"]




def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_target(folder: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless `overwrite`: before any slow work."""
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file; choose a folder to export into")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{folder} already exists and is not empty; choose a new folder or pass overwrite=True "
            "(--overwrite). Nothing was written."
        )


def _publish(tmp: Path, folder: Path, overwrite: bool) -> None:
    """Move the finished `tmp` folder to `folder`; an old non-empty folder is deleted only afterwards."""
    check_target(folder, overwrite)
    if not folder.exists() or not any(folder.iterdir()):
        os.replace(tmp, folder)  # POSIX: renaming onto an empty directory replaces it
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(folder: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `folder` to write into; it becomes `folder` when the block completes, else goes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        _publish(tmp, folder, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (relative path) -> its size and sha256, for a manifest."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def perplexity_before_after(handle: ModelHandle, pruned: ModelHandle, protocol: Any,
                            stage: Stage) -> dict[str, Any] | None:
    """Perplexity of the source and of the pruned copy on `protocol` (None for an encoder)."""
    if not handle.is_causal_lm:
        return None
    stage("measuring perplexity of the source model")
    before = perplexity(handle, None, protocol)
    stage("measuring perplexity of the pruned model")
    after = perplexity(pruned, None, protocol)
    return {"before": before.to_dict(), "after": after.to_dict(),
            "ratio": after.perplexity / before.perplexity,
            "protocol": after.protocol.describe(after.tokenizer, after.n_tokens)}


@torch.no_grad()
def masked_parity(handle: ModelHandle, pruned: ModelHandle, mask: PruneMask, n_tokens: int = 64) -> dict[str, Any]:
    """Max |logit difference| between the masked source and the pruned copy on one short sequence."""
    gen = torch.Generator().manual_seed(0)
    vocab = min(handle.geometry.vocab_size, len(handle.tokenizer))
    ids = torch.randint(0, vocab, (1, n_tokens), generator=gen).to(handle.device)
    am = torch.ones_like(ids)
    with gates.apply(handle, mask.normalized()):
        ref = token_logits(handle, ids, am).float()
    got = token_logits(pruned, ids, am).float()
    return {"max_abs_logit_diff": float((ref - got).abs().max()), "max_abs_logit": float(ref.abs().max()),
            "tokens": n_tokens,
            "note": "masked source vs pruned model on the same random token ids; in float32 the narrower "
                    "matmuls round differently, which deep models grow to ~1e-5 of the logit scale"}


def _clean_config(config: Any) -> None:
    """Drop what must not travel with a plain safetensors export (a GGUF quantisation record)."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def export(
    handle: ModelHandle,
    mask: PruneMask | None,
    folder: str | os.PathLike,
    *,
    layout: str = "auto",
    overwrite: bool = False,
    evaluate: bool = True,
    protocol: Any = None,
    stage: Stage | None = None,
) -> ExportResult:
    """Prune `handle` by `mask` (None = dense copy) and write it to `folder` as a Hugging Face model."""
    stage = stage or (lambda msg: None)
    folder = Path(folder).expanduser().resolve()
    check_target(folder, overwrite)  # fail before any slow work
    mask = mask if mask is not None else PruneMask.dense(handle.geometry)
    pv = preview(handle, mask, layout)
    stage("slicing the model")
    pruned = prune(handle, mask)
    assert pv.layout == "per_layer" or pruned.meta["standard_config"], "preview and surgery disagree on the layout"
    params_after = sum(p.numel() for p in pruned.model.parameters())
    c = cost(handle, mask)
    zeros = pruned.meta.get("bias_switch_params", 0)  # zero biases a config switch needed (surgery's module doc)
    assert params_after == c.params_kept + zeros, \
        f"surgery kept {params_after:,} parameters, cost says {c.params_kept:,} (+{zeros:,} zero biases)"
    stage("checking the pruned model against the masked one")
    parity = masked_parity(handle, pruned, mask)
    ppl = perplexity_before_after(handle, pruned, protocol or DEFAULT_PROTOCOL, stage) if evaluate else None

    stage("writing safetensors")
    config = pruned.model.config
    with staged_folder(folder, overwrite) as tmp:
        _clean_config(config)
        if pv.layout == "per_layer" and getattr(config, LAYERS_KEY, None) is None:
            setattr(config, LAYERS_KEY, layer_record(pruned.adapter, pv.plan))
        pruned.model.save_pretrained(tmp)
        pruned.tokenizer.save_pretrained(tmp)
        sentence = write_sentence_files(handle.source, tmp)
        manifest = _manifest(handle, pruned, mask, pv, c, parity, ppl, sentence)
        manifest["files"] = file_checksums(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        stage("moving the folder into place")
    return ExportResult(folder, pv.layout, c.params_total, params_after, folder_size(folder), manifest)


def _manifest(handle: ModelHandle, pruned, mask, pv: ExportPreview, c, parity, ppl,
              sentence: list[str]) -> dict[str, Any]:
    meta = mask.meta or {}
    causal = handle.is_causal_lm
    loader = "AutoModelForCausalLM" if causal else "AutoModel"
    load: dict[str, Any] = {
        "python": (f"transformers.{loader}.from_pretrained(folder)" if pv.layout == "uniform"
                   else "headlab.engine.models.load.load_pruned(folder)  # or headlab.engine.models.load.load_model(folder)"),
        "note": ("standard config: plain transformers loads it" if pv.layout == "uniform" else
                 "per-layer sizes in config.json['headlab_layers']; see docs/export.md to load without HeadLab"),
    }
    if sentence:
        load["sentence_transformers"] = (
            "sentence_transformers.SentenceTransformer(folder)" if pv.layout == "uniform" else
            "headlab.engine.models.sentence.open_sentence_transformer(folder)  # per-layer sizes: no standard config")
        load["sentence_files"] = sentence
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "engine_version": ENGINE_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"name": handle.name, "path": handle.source, "family": handle.adapter.family,
                   "geometry": handle.geometry.to_dict()},
        "criterion": meta.get("criterion"),
        "budget": meta.get("budget"),
        "unit": meta.get("unit"),
        "scope": meta.get("scope"),
        "mask": mask.to_dict(),
        "mask_summary": mask.normalized().summary(),
        "layout": pv.layout,
        "why_not_uniform": pv.why_not_uniform,
        "params": {"before": c.params_total, "after": c.params_kept, "removed_fraction": c.params_removed_fraction,
                   "zero_biases_for_the_config": pruned.meta.get("bias_switch_params", 0)},
        "flops_per_token_512": {"before": c.flops_dense, "after": c.flops_kept,
                                "ideal_speedup": c.flops_dense / c.flops_kept},
        "dtype": str(handle.dtype).replace("torch.", ""),
        "perplexity": ppl,
        "parity": parity,
        "surgery": pv.plan.to_dict(),
        "load": load,
    }


def zip_folder(folder: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Zip an exported folder (stored, not compressed: safetensors barely compress) next to it."""
    folder = Path(folder)
    target = Path(target) if target else folder.with_suffix(".zip")
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, Path(folder.name) / p.relative_to(folder))
    os.replace(tmp, target)
    return target
