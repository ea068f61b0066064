"""Per-head ablation costs kept on disk as they are measured, so a long measurement resumes where it stopped.

    store = AblationStore.for_run(folder, handle, texts, max_length=128, mean=True)
    known = store.load()                      # {(layer, head): KL} measured by an earlier run, maybe partial
    delta, _ = ablation_kl(handle, texts, known=known, on_measured=store.add, ...)
    store.flush()

One JSON file per (model weights, texts, max length, mean or zero ablation, code version): the name is
a hash of all of them, so a changed model, calibration set or measurement never reads another's
values. The model is identified by its name, geometry and a digest of sampled weights (not only the
name: two folders called alike differ). The file is rewritten atomically (temporary file + rename) at
most every `every_s` seconds and at `flush`, so a server stopped mid-way loses at most that much.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from headlab.engine.core.files import write_atomic_text
from headlab.engine.core.handle import ModelHandle

__all__ = ["ABLATION_STORE", "ABLATION_STORE_VERSION", "AblationStore", "model_fingerprint"]

ABLATION_STORE = "ablation"  # the folder under a calibration's persist_dir (strategies.base.Calibration)

#: Bump when ablation_kl's numbers change meaning (a cached file of an older version is not read).
ABLATION_STORE_VERSION = 1


def model_fingerprint(handle: ModelHandle) -> str:
    """A digest of the model's name, geometry and sampled weights (every parameter's first and last values)."""
    h = hashlib.sha256(f"{handle.name}|{handle.geometry}".encode())
    with torch.no_grad():
        for name, p in handle.model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float32)
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:24]


class AblationStore:
    """The measured {(layer, head): KL} of one ablation run, on disk (see the module doc)."""

    def __init__(self, path: Path, meta: dict, every_s: float = 2.0) -> None:
        self.path, self.meta, self.every_s = Path(path), meta, every_s
        self._values: dict[tuple[int, int], float] = {}
        self._written_at = 0.0
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, folder: str | os.PathLike, handle: ModelHandle, texts: Sequence[str], *, max_length: int,
                mean: bool, every_s: float = 2.0) -> "AblationStore":
        meta = {"model": handle.name, "fingerprint": model_fingerprint(handle),
                "texts": hashlib.sha256("\0".join(texts).encode()).hexdigest()[:24], "n_texts": len(texts),
                "max_length": int(max_length), "ablation": "mean" if mean else "zero",
                "version": ABLATION_STORE_VERSION}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        return cls(Path(folder) / f"ablation-{key}.json", meta, every_s)

    def load(self) -> dict[tuple[int, int], float]:
        """What an earlier run measured (empty when there is no file or it is unreadable or another run's)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if data.get("meta") != self.meta:
            return {}
        values = {(int(l), int(h)): float(v) for l, h, v in data.get("values", [])}
        with self._lock:
            self._values.update(values)
        return values

    def add(self, layer: int, head: int, value: float) -> None:
        """Record one measured head; written to disk when `every_s` has passed since the last write."""
        with self._lock:
            self._values[(int(layer), int(head))] = float(value)
            due = time.monotonic() - self._written_at >= self.every_s
        if due:
            self.flush()

    def flush(self) -> None:
        """Write every recorded value now (atomically)."""
        with self._lock:
            values = [[l, h, v] for (l, h), v in sorted(self._values.items())]
            self._written_at = time.monotonic()
        write_atomic_text(self.path, json.dumps({"meta": self.meta, "values": values}))
