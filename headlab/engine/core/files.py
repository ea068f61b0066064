"""The engine's own files (masks, routers, clusters, thresholds, tensor caches): read with checks, write atomically.

Every such file carries `"format"` (what it is) and `"version"` (its layout); a reader refuses a
file that is not valid JSON, not that kind of file, or of another version, naming the file and
what it found, so bad input gives one clear line and nothing is half-read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_format_json", "write_atomic_safetensors", "write_atomic_text"]


def read_format_json(path: str | os.PathLike, fmt: str, *, version: int | None = None, what: str = "file",
                     error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in `path`, checked to be a `fmt` file (of `version` when given); `error` otherwise."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise error(f"{path} is not a {what} (its 'format' is not {fmt!r})")
    if version is not None and d.get("version") != version:
        raise error(f"{path} has format version {d.get('version')}; this build reads {version}")
    return d


def write_atomic_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling renamed into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_atomic_safetensors(path: str | os.PathLike, tensors: dict[str, Any],
                             metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (made contiguous) as safetensors through a temporary sibling renamed into place: readers
    never see half a file, and processes writing the same path never share a temporary one."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
