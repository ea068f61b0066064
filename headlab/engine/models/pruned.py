"""Read an exported folder back: its manifest check and the per-layer (non-uniform) layout.

An export whose layers keep different sizes records them in config.json under
`headlab_layers` (written by headlab.engine.export.surgery.layer_record); the family's standard class
is built from the config, each layer is resized to its record, then the safetensors weights are
loaded with every key and shape checked. `headlab_manifest.json` lists every file's size and
sha256, checked before anything is read. headlab.engine.models.load.load_pruned is the entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.initialization import no_init_weights

from headlab.engine.core.adapter import Adapter
from headlab.engine.core.errors import ModelLoadError
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.reshape import add_bias_
from headlab.engine.models.adapters import adapter_class, adapter_for
from headlab.engine.models.wrap import wrap_model

__all__ = ["LAYERS_KEY", "LAYERS_FORMAT", "MANIFEST", "file_sha256", "verify_files", "open_layered"]

LAYERS_KEY = "headlab_layers"  # config.json key recording per-layer sizes of a non-uniform model
LAYERS_FORMAT = "headlab.layers"
MANIFEST = "headlab_manifest.json"


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Check every file the manifest lists (size, then sha256); ModelLoadError naming the first bad one."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e.msg}); the export is damaged") from None
    for name, info in manifest.get("files", {}).items():
        f = folder / name
        if not f.exists():
            raise ModelLoadError(f"{f} is missing (listed in {MANIFEST}); the export is incomplete")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise ModelLoadError(f"{f} is truncated or altered: {size:,} bytes, {MANIFEST} says {info['bytes']:,}")
        if file_sha256(f) != info["sha256"]:
            raise ModelLoadError(f"{f} does not match its sha256 in {MANIFEST}: the file is corrupt or altered")
    return manifest


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise ModelLoadError(f"{path} is missing: an exported model needs its safetensors weights")
        try:
            state.update(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path} is corrupt or truncated and cannot be read as safetensors ({e})") from None
    return state


def _reshape_to_record(adapter: Adapter, record: dict[str, Any], hidden: int) -> None:
    """Give each layer of a freshly built model the sizes `record` lists (weights come later)."""
    layers = record["layers"]
    if len(layers) != len(adapter.layers()):
        raise ValueError(f"{LAYERS_KEY} lists {len(layers)} layers but the config builds {len(adapter.layers())}")
    g = adapter.geometry
    for i, rec in enumerate(layers):
        if rec["attn"]:
            # Any in-range indices will do: the loaded weights overwrite the values.
            q = [h % g.n_heads for h in range(rec["heads"])]
            kv = [h % g.n_kv_heads for h in range(rec["kv_heads"])]
            adapter.resize_attention_(i, q, kv, rec.get("kv_index"))
            if rec.get("attn_out_bias") and adapter.head_output_proj(i).bias is None:
                add_bias_(adapter.head_output_proj(i), torch.zeros(hidden))
        else:
            adapter.remove_subblock_(i, "attn")
        if rec["ffn_block"]:
            adapter.resize_ffn_(i, [c % g.ffn_dim for c in range(rec["ffn"])])
            if rec.get("ffn_out_bias") and adapter.ffn_output_proj(i).bias is None:
                add_bias_(adapter.ffn_output_proj(i), torch.zeros(hidden))
        else:
            adapter.remove_subblock_(i, "ffn")
    adapter.renumber_cache_layers_()


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy `state` into `model`, refusing missing, extra or mis-shaped tensors (tied copies aside)."""
    expected = model.state_dict()
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = sorted(set(expected) - set(state) - tied)
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelLoadError(
            f"the weights in {folder} do not fit {LAYERS_KEY} in its config.json: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
        )
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ModelLoadError(f"{key} is {tuple(t.shape)} in the safetensors of {folder} but "
                                 f"{LAYERS_KEY} gives {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()


def open_layered(folder: Path, config: Any, record: dict[str, Any], *, device: str | torch.device,
                 dtype: torch.dtype, attn_implementation: str, name: str) -> ModelHandle:
    """Build the family's standard model from `config`, reshape each layer to `record`, load the weights."""
    if record.get("format") != LAYERS_FORMAT:
        raise ModelLoadError(f"{folder}/config.json has a {LAYERS_KEY} entry of unknown format "
                             f"{record.get('format')!r}")
    adapter_class(config.model_type, str(folder))
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ModelLoadError(f"{folder}/config.json names no architecture transformers knows ({archs})")
    torch_dtype = dtype
    with no_init_weights():
        model = cls._from_config(config, dtype=torch_dtype, attn_implementation=attn_implementation)
    try:
        _reshape_to_record(adapter_for(model), record, config.hidden_size)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{folder}/config.json: {LAYERS_KEY} cannot be applied ({e})") from None
    state = _read_state_dict(folder)
    adapter_for(model).drop_unsaved_optional_(set(state))
    _load_weights(model, state, folder)
    model.to(device=device, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    handle = wrap_model(model, tokenizer, name=name)
    handle.source = str(folder)
    handle.meta[LAYERS_KEY] = record
    return handle
