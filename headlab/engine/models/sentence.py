"""Sentence-transformers folders: opening one, its pooling modules, embedding through them, writing one.

A sentence-transformers (ST) folder lists its pipeline in `modules.json`: module 0 is the
Transformer (the Hugging Face model at the folder root; its truncation length in
`sentence_bert_config.json`), the modules after it turn token states into one vector per text
(`1_Pooling/config.json`; `2_Normalize` for unit length; some models add `Dense`). HeadLab
embeds only through a folder's own modules, never through a pooling of its own:

- `open_sentence_transformer(name)`: a `SentenceTransformer` from an alias ("minilm"), a folder or
  a hub id. A folder without the ST files is refused with what is missing. Only
  `sentence_transformers.*` module types are opened (trust_remote_code stays off). A per-layer
  pruned export (`headlab_layers` in config.json: BERT heads pruned unevenly, which no standard
  config can state) gets its Transformer's model built by headlab.engine.models.pruned.
- `sentence_head(source)`: the modules after the Transformer as one torch module, and
  `pool(head, h, attention_mask)`: the sentence embeddings of token states h (differentiable).
- `embed_handle(handle, texts, mask=...)`: the engine's (masked) transformer, then the head.
- `write_sentence_files(source, folder)`: an export's ST files, copied from its source folder.
- `encoder_identity(source)`: what the embeddings cache keys on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from sentence_transformers.util import import_from_string
from torch import nn

from headlab.engine.core import gates
from headlab.engine.core.errors import ModelLoadError
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.tokens import EmptyTextError, context_length, encode_batch
from headlab.engine.models.load import resolve_source
from headlab.engine.models.pruned import LAYERS_KEY, open_layered, verify_files

__all__ = [
    "MODULES_FILE",
    "SENTENCE_FILES",
    "is_sentence_folder",
    "read_modules",
    "open_sentence_transformer",
    "sentence_head",
    "pool",
    "sentence_max_length",
    "embed_handle",
    "write_sentence_files",
    "encoder_identity",
]

MODULES_FILE = "modules.json"
# The folder-level ST files next to modules.json (the module folders it lists travel too).
SENTENCE_FILES = (MODULES_FILE, "sentence_bert_config.json", "config_sentence_transformers.json")
_ST_PREFIX = "sentence_transformers."
# Modules whose folder may be absent: they have no settings (the shipped MiniLM lists 2_Normalize without one).
_STATELESS = ("Normalize",)


def is_sentence_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with a modules.json (the mark of a sentence-transformers folder)."""
    return (Path(path) / MODULES_FILE).is_file()


def _check_modules(modules: Any, where: str) -> list[dict[str, Any]]:
    """The modules.json entries, refused when the pipeline is not Transformer-first or imports foreign code."""
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{where} is not a list of modules (each with idx, name, path, type)")
    for m in modules:
        if not {"path", "type"} <= set(m):
            raise ModelLoadError(f"{where}: the module {m} lacks its 'path' or 'type'")
        if not str(m["type"]).startswith(_ST_PREFIX):
            raise ModelLoadError(f"{where} names the module type {m['type']!r} from outside sentence-transformers; "
                                 "opening it would run that code (trust_remote_code), which HeadLab keeps off")
    modules = sorted(modules, key=lambda m: m.get("idx", 0))
    first = modules[0]
    if not first["type"].endswith(".Transformer") or first["path"] not in ("", "."):
        raise ModelLoadError(f"{where}: HeadLab reads pipelines whose first module is the Transformer at the folder "
                             f"root; this one starts with {first['type']} at {first['path']!r}")
    if len(modules) < 2:
        raise ModelLoadError(f"{where} lists only the Transformer: no Pooling module turns its token states "
                             "into one vector per text")
    return modules


def read_modules(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The checked modules.json of a sentence-transformers folder; ModelLoadError naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder")
    path = folder / MODULES_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{folder} is not a sentence-transformers folder: it has no {MODULES_FILE} (the list of its modules: "
            "Transformer, Pooling, Normalize). Use a folder saved by SentenceTransformer.save(), a hub id of a "
            "sentence-transformers model, or a HeadLab export of one"
        )
    try:
        modules = _check_modules(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e.msg})") from None
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has a {MODULES_FILE} but no config.json for its Transformer module")
    for m in modules[1:]:
        sub = folder / m["path"]
        if not sub.is_dir() and not m["type"].endswith(_STATELESS):
            raise ModelLoadError(f"{sub} is missing: {MODULES_FILE} lists it as the folder of {m['type']}")
    return modules


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _hub_modules(repo: str) -> None:
    """Refuse a hub id whose repository has no modules.json (ST would silently invent a mean pooling)."""
    try:
        path = hf_hub_download(repo, MODULES_FILE)
    except EntryNotFoundError:
        raise ModelLoadError(f"{repo!r} is not a sentence-transformers model: its repository has no "
                             f"{MODULES_FILE}") from None
    except Exception as e:  # offline, unknown repository, gated: one clear line
        raise ModelLoadError(f"cannot open {repo!r}: not a known alias, a folder, or a reachable hub id "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        _check_modules(json.loads(Path(path).read_text()), f"{repo}/{MODULES_FILE}")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{repo}/{MODULES_FILE} is not valid JSON ({e.msg})") from None


class _LayeredTransformer(Transformer):
    """ST's Transformer module over a per-layer pruned export, whose model headlab.engine.models.pruned builds."""

    def _load_model(self, model_name_or_path: str, transformer_task: Any, config: Any, backend: str,
                    is_peft_model: bool, **model_kwargs: Any) -> nn.Module:
        folder = Path(model_name_or_path)
        verify_files(folder)
        dtype = getattr(config, "dtype", None)
        handle = open_layered(folder, config, getattr(config, LAYERS_KEY), device="cpu",
                              dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
                              attn_implementation="sdpa", name=str(folder))
        return handle.model


def _head_modules(folder: Path, modules: list[dict[str, Any]]) -> list[nn.Module]:
    """The modules after the Transformer, each opened by its own class from its folder."""
    out = []
    for m in modules[1:]:
        cls = import_from_string(m["type"])
        sub = folder / m["path"]
        out.append(cls() if not sub.is_dir() and m["type"].endswith(_STATELESS)
                   else cls.load(str(folder), subfolder=m["path"]))
    return out


def _wrap_load_error(name: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot open the sentence-transformers model {name!r}: {type(e).__name__}: {e}")


def open_sentence_transformer(name: str, *, device: str | torch.device = "cpu") -> SentenceTransformer:
    """A SentenceTransformer from an alias ("minilm"), a sentence-transformers folder or a hub id."""
    source = resolve_source(name)
    if os.path.isdir(source):
        folder = Path(source)
        modules = read_modules(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
            if config.get(LAYERS_KEY) is not None:
                head = _head_modules(folder, modules)
                return SentenceTransformer(modules=[_LayeredTransformer.load(str(folder)), *head], device=str(device))
            return SentenceTransformer(str(folder), device=str(device), trust_remote_code=False,
                                       local_files_only=True)
        except ModelLoadError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise _wrap_load_error(name, e) from None
    if os.path.exists(source):
        raise ModelLoadError(f"{source} is a file; point to a sentence-transformers folder (with {MODULES_FILE})")
    if _looks_like_path(source):
        raise ModelLoadError(f"{source} does not exist: no such sentence-transformers folder")
    _hub_modules(source)
    try:
        return SentenceTransformer(source, device=str(device), trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise _wrap_load_error(name, e) from None


def _source_folder(handle: ModelHandle) -> Path | None:
    src = getattr(handle, "source", None)
    return Path(src) if src and is_sentence_folder(src) else None


def sentence_head(source: ModelHandle | SentenceTransformer | str | os.PathLike) -> nn.Sequential:
    """The modules after the Transformer (Pooling, Normalize, ...) of an ST model, folder or handle's source.

    A handle whose source is not a sentence-transformers folder (a bare BERT) gets ST's mean
    Pooling + Normalize, the all-MiniLM-L6-v2 pipeline.
    """
    if isinstance(source, SentenceTransformer):
        return nn.Sequential(*[source[i] for i in range(1, len(source))])
    if isinstance(source, ModelHandle):
        folder = _source_folder(source)
        if folder is None:
            return nn.Sequential(Pooling(source.geometry.hidden, "mean"), Normalize())
        source = folder
    folder = Path(source)
    return nn.Sequential(*_head_modules(folder, read_modules(folder)))


def pool(head: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings [B, d'] of token states `hidden` [B, T, d] through `head` (differentiable)."""
    return head({"token_embeddings": hidden, "attention_mask": attention_mask})["sentence_embedding"]


def sentence_max_length(handle: ModelHandle) -> int:
    """The truncation length ST uses for the handle's source (sentence_bert_config), else its context length."""
    folder = _source_folder(handle)
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        n = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
        if isinstance(n, int) and n > 0:
            return n
    return context_length(handle.model, default=512)


def _last_hidden(out: Any) -> torch.Tensor:
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out.hidden_states[-1]


@torch.no_grad()
def embed_handle(handle: ModelHandle, texts: Sequence[str], *, head: nn.Module | None = None,
                 mask: PruneMask | None = None, max_length: int | None = None, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [N, d'] (float32, CPU): the handle's transformer under `mask`, then the ST head."""
    if isinstance(texts, str) or not texts:
        raise EmptyTextError("pass a non-empty list of texts to embed")
    head = head if head is not None else sentence_head(handle)
    max_length = max_length or sentence_max_length(handle)
    out = []
    with gates.apply(handle, mask):
        for i in range(0, len(texts), batch_size):
            ids, am = encode_batch(handle.tokenizer, texts[i : i + batch_size], max_length, handle.device)
            res = handle.model(input_ids=ids, attention_mask=am, output_hidden_states=True)
            out.append(pool(head, _last_hidden(res), am).float().cpu())
    return torch.cat(out)


def write_sentence_files(source: str | os.PathLike | None, folder: str | os.PathLike) -> list[str]:
    """Copy the ST files of `source` (modules.json, its module folders, configs) into `folder`; [] when not ST.

    The Transformer module stays at the folder root, where the export writes the model itself.
    """
    if not source or not is_sentence_folder(source):
        return []
    src, dst = Path(source), Path(folder)
    modules = read_modules(src)
    written = []
    for name in SENTENCE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            written.append(name)
    for m in modules[1:]:
        if (src / m["path"]).is_dir():
            shutil.copytree(src / m["path"], dst / m["path"], dirs_exist_ok=True)
            written.append(m["path"])
    return written


def encoder_identity(source: str) -> str:
    """A folder: its resolved path and every file's name, size and mtime (a rewrite changes it); a hub id as is."""
    path = Path(source)
    if not path.is_dir():
        return source
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        s = f.stat()
        h.update(f"\0{f.relative_to(path)}\0{s.st_size}\0{s.st_mtime_ns}".encode())
    return f"{path.resolve()}@{h.hexdigest()[:16]}"
