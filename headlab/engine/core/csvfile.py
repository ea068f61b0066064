"""Rows of dicts to a CSV file: the one writer the CLI commands and the benchmarks share."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headlab.engine.core.files import write_atomic_text

__all__ = ["write_rows"]


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write `rows` to `path` atomically (parent folders created), one column per key of the first row."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return write_atomic_text(path, buf.getvalue())
