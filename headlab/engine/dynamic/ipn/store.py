"""A trained importance network on disk: a folder with ipn.safetensors (its parameters) and ipn.json (its shape,
the model's name and weights sha256, the tensors file's sha256, how it was trained).

Written like the rules' thresholds (headlab.engine.dynamic.store): each file to a temporary sibling, renamed
into place, the JSON last and naming the tensors' sha256, so a torn or altered pair is refused.
Loading refuses a network trained on another model (name or weights), one of another shape, and
corrupt files. The weight sketches are not saved: they are remade from the model it is loaded for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from headlab.engine.core.files import read_format_json
from headlab.engine.core.handle import ModelHandle
from headlab.engine.dynamic.ipn.network import IPN, IPNError
from headlab.engine.dynamic.store import file_sha256, weights_sha256

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "TENSORS_FILE", "load_ipn", "save_ipn"]

TENSORS_FILE = "ipn.safetensors"
META_FILE = "ipn.json"
FORMAT = "headlab.importance_network"
FORMAT_VERSION = 1


def save_ipn(handle: ModelHandle, ipn: IPN, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write `ipn` (checked against `handle`) into `folder`; `meta` (e.g. training history) goes into the JSON."""
    ipn.attach(handle)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_tensors, tmp_meta = folder / f".{TENSORS_FILE}.tmp", folder / f".{META_FILE}.tmp"
    save_file({k: v.detach().float().cpu().contiguous() for k, v in ipn.state_dict().items()}, str(tmp_tensors),
              metadata={"format": FORMAT})
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": ipn.config(),
        "model": handle.name,
        "weights_sha256": weights_sha256(handle),
        "tensors_sha256": file_sha256(tmp_tensors),
        "meta": meta or {},
    }
    tmp_meta.write_text(json.dumps(record, indent=1))
    os.replace(tmp_tensors, folder / TENSORS_FILE)
    os.replace(tmp_meta, folder / META_FILE)
    return folder


def load_ipn(handle: ModelHandle, folder: str | os.PathLike) -> IPN:
    """Read a network written by `save_ipn` for `handle`, refusing another model's, misshaped or corrupt ones."""
    folder = Path(folder)
    tensors_path, meta_path = folder / TENSORS_FILE, folder / META_FILE
    for p in (tensors_path, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: an importance network folder holds {TENSORS_FILE} and "
                                    f"{META_FILE}")
    record = read_format_json(meta_path, FORMAT, version=FORMAT_VERSION, what="importance network file",
                              error=IPNError)
    if record.get("model") != handle.name:
        raise IPNError(f"this importance network was trained for model {record.get('model')!r}, not {handle.name!r}")
    if record.get("weights_sha256") != weights_sha256(handle):
        raise IPNError(f"this importance network was trained on other weights of {handle.name!r} "
                       f"(weights sha256 {str(record.get('weights_sha256'))[:12]}...): train one for this model")
    if file_sha256(tensors_path) != record.get("tensors_sha256"):
        raise IPNError(f"{tensors_path} does not match the sha256 in {META_FILE}: the file is corrupt or altered")
    try:
        state = load_file(str(tensors_path))
    except Exception as e:  # torn or foreign safetensors surface as assorted errors
        raise IPNError(f"{tensors_path} is corrupt or not an importance network file: {e}") from None
    cfg = record.get("config")
    if not isinstance(cfg, dict):
        raise IPNError(f"{meta_path} has no network shape ('config')")
    try:
        ipn = IPN(cfg["n_layers"], cfg["ffn_dim"], cfg["hidden"], cfg["n_heads"], heads=bool(cfg["heads"]),
                  adaptive=bool(cfg["adaptive"]), target=float(cfg["target"]),
                  head_target=float(cfg["head_target"]), temperature=float(cfg["temperature"]),
                  lora_rank=int(cfg.get("lora_rank", 0)),
                  sketch=str(cfg.get("sketch", "aligned")))  # networks saved before rotated sketches were aligned
    except (KeyError, TypeError, ValueError) as e:
        raise IPNError(f"{meta_path} describes no valid network shape: {e}") from None
    ipn.attach(handle)
    want = {k: tuple(v.shape) for k, v in ipn.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        raise IPNError(f"{tensors_path} holds tensors {have}, a network of this shape needs {want}")
    with torch.no_grad():
        ipn.load_state_dict(state)
    return ipn.to(handle.device)
