"""Calibrated thresholds on disk: a folder with thresholds.safetensors (one [n_layers] tensor per
site) and thresholds.json (rule, target, the model's name and weights sha256, the tensors' sha256).

Each file is written to a temporary sibling and renamed into place, the JSON last; the JSON
records the tensors file's sha256, so a torn or altered pair is refused, never half-read.
Loading refuses thresholds calibrated on another model (name or weights) or shaped for another one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from headlab.engine.core.files import read_format_json
from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.rules import Thresholds, ThresholdsError, get_rule

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "TENSORS_FILE",
    "file_sha256",
    "load_thresholds",
    "save_thresholds",
    "weights_sha256",
]

TENSORS_FILE = "thresholds.safetensors"
META_FILE = "thresholds.json"
FORMAT = "headlab.dynamic_thresholds"
FORMAT_VERSION = 1


def weights_sha256(handle: ModelHandle) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes (what thresholds were calibrated on)."""
    h = hashlib.sha256()
    for name, p in handle.model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (recorded beside a tensors file so a torn or altered pair is refused)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_thresholds(handle: ModelHandle, thresholds: Thresholds, folder: str | os.PathLike) -> Path:
    """Write `thresholds` (checked against `handle`) into `folder`, recording the model they belong to."""
    g = handle.geometry
    thresholds.check(g.n_layers, g.ffn_dim)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_tensors, tmp_meta = folder / f".{TENSORS_FILE}.tmp", folder / f".{META_FILE}.tmp"
    save_file({s: t.float().contiguous() for s, t in thresholds.values.items()}, str(tmp_tensors),
              metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "rule": thresholds.rule,
        "target": thresholds.target,
        "sites": sorted(thresholds.values),
        "n_layers": g.n_layers,
        "model": handle.name,
        "weights_sha256": weights_sha256(handle),
        "tensors_sha256": file_sha256(tmp_tensors),
        "meta": thresholds.meta,
    }
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_tensors, folder / TENSORS_FILE)
    os.replace(tmp_meta, folder / META_FILE)
    return folder


def load_thresholds(handle: ModelHandle, folder: str | os.PathLike) -> Thresholds:
    """Read thresholds written by `save_thresholds`, refusing another model's, misshaped or corrupt ones."""
    folder = Path(folder)
    tensors_path, meta_path = folder / TENSORS_FILE, folder / META_FILE
    for p in (tensors_path, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: a thresholds folder holds {TENSORS_FILE} and {META_FILE}")
    meta = read_format_json(meta_path, FORMAT, version=FORMAT_VERSION, what="thresholds file", error=ThresholdsError)
    if meta.get("model") != handle.name:
        raise ThresholdsError(f"these thresholds were calibrated for model {meta.get('model')!r}, not {handle.name!r}")
    if meta.get("weights_sha256") != weights_sha256(handle):
        raise ThresholdsError(f"these thresholds were calibrated on other weights of {handle.name!r} "
                              f"(weights sha256 {str(meta.get('weights_sha256'))[:12]}...): recalibrate for this model")
    if file_sha256(tensors_path) != meta.get("tensors_sha256"):
        raise ThresholdsError(f"{tensors_path} does not match the sha256 in {META_FILE}: the file is corrupt or altered")
    try:
        values = load_file(str(tensors_path))
    except Exception as e:  # torn or foreign safetensors surface as assorted errors
        raise ThresholdsError(f"{tensors_path} is corrupt or not a thresholds file: {e}") from None
    get_rule(meta.get("rule"))
    g = handle.geometry
    return Thresholds(meta["rule"], values, target=meta.get("target"), meta=meta.get("meta") or {}).check(
        g.n_layers, g.ffn_dim)
