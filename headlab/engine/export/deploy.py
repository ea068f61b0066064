"""An export for llama.cpp and Ollama: a folder with the GGUF file, an Ollama Modelfile and the manifest.

    result = export_gguf(handle, mask, "out/smollm2-gguf", "q8_0")

Surgery first (a physically smaller copy, checked against the masked model), then
headlab.engine.export.gguf writes it. Atomic like every export: a temporary sibling folder renamed
into place; a non-empty target is refused unless `overwrite=True`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from headlab.engine import __version__ as ENGINE_VERSION
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.export import llama_cpp
from headlab.engine.export.gguf import GGUF_TYPES, GgufError, GgufInfo, write_gguf
from headlab.engine.export.surgery import prune
from headlab.engine.export.write import (
    MANIFEST,
    check_target,
    file_checksums,
    masked_parity,
    perplexity_before_after,
    staged_folder,
)
from headlab.engine.models.load import shipped_gguf
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.evaluate import DEFAULT_PROTOCOL

__all__ = ["EXPORT_TYPES", "GGUF_MANIFEST_FORMAT", "GgufExportResult", "export_gguf", "modelfile", "run_commands"]

GGUF_MANIFEST_FORMAT = "headlab.gguf_export"
EXPORT_TYPES = (*GGUF_TYPES, *llama_cpp.K_QUANTS)  # K-quants: HeadLab writes f16, llama.cpp's llama-quantize converts
Stage = Callable[[str], None]


@dataclass
class GgufExportResult:
    folder: Path
    gguf: GgufInfo
    params_before: int
    params_after: int
    manifest: dict[str, Any] = field(repr=False)


def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for the file beside it (the chat template travels inside the GGUF)."""
    return (f"# ollama create <name> -f Modelfile   (then: ollama run <name>)\n"
            f"FROM ./{gguf_name}\n")


def run_commands(gguf_name: str) -> dict[str, str]:
    """How to run, measure and further quantise the file with llama.cpp and Ollama."""
    stem = gguf_name.removesuffix(".gguf")
    return {
        "llama.cpp": f"llama-cli -m {gguf_name} -p 'Hello'",
        "perplexity": f"llama-perplexity -m {gguf_name} -f wiki.test.raw -c 512",
        "speed": f"llama-bench -m {gguf_name} -p 512 -n 128 -t 1",
        "k-quant": f"llama-quantize {gguf_name} {stem}-Q4_K_M.gguf Q4_K_M   # from an f16 or f32 file",
        "ollama": "ollama create my-model -f Modelfile && ollama run my-model",
    }


def export_gguf(
    handle: ModelHandle,
    mask: PruneMask | None,
    folder: str | os.PathLike,
    out_type: str = "f16",
    *,
    overwrite: bool = False,
    evaluate: bool = True,
    protocol: Any = None,
    stage: Stage | None = None,
) -> GgufExportResult:
    """Prune `handle` by `mask` (None = dense) and write `folder` with `<name>-<type>.gguf`, Modelfile, manifest.

    `out_type` is one of GGUF_TYPES (written directly) or a K-quant (llama_cpp.K_QUANTS: an f16 file is
    written, then llama.cpp's llama-quantize converts it; the tools must be built, `make llama-cpp`).
    """
    stage = stage or (lambda msg: None)
    folder = Path(folder).expanduser().resolve()
    if out_type not in EXPORT_TYPES:
        raise GgufError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(EXPORT_TYPES)}")
    check_target(folder, overwrite)  # fail before any slow work
    if out_type in llama_cpp.K_QUANTS:
        llama_cpp.find_tools()  # a missing llama-quantize is reported before any slow work
    mask = mask if mask is not None else PruneMask.dense(handle.geometry)
    stage("slicing the model")
    pruned = prune(handle, mask)
    stage("checking the pruned model against the masked one")
    parity = masked_parity(handle, pruned, mask)
    ppl = perplexity_before_after(handle, pruned, protocol or DEFAULT_PROTOCOL, stage) if evaluate else None
    c = cost(handle, mask)
    name = f"{folder.name}-{out_type}.gguf"
    with staged_folder(folder, overwrite) as tmp:
        stage(f"writing {name}")
        kquant = out_type in llama_cpp.K_QUANTS
        written = tmp / (f".{folder.name}-f16.gguf" if kquant else name)
        info = write_gguf(pruned, written, "f16" if kquant else out_type, tokenizer_gguf=shipped_gguf(handle.name),
                          name=f"{handle.name} (HeadLab)")
        if kquant:
            stage(f"llama-quantize: f16 -> {out_type}")
            llama_cpp.quantize(written, tmp / name, out_type)
            written.unlink()
            info.out_type, info.bytes = out_type, (tmp / name).stat().st_size
            info.fallbacks = [f"{out_type} made by llama-quantize from f16: it picks the types of rows that are "
                              "not whole blocks of 256"]
        (tmp / "Modelfile").write_text(modelfile(name))
        manifest = {
            "format": GGUF_MANIFEST_FORMAT,
            "version": 1,
            "engine_version": ENGINE_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"name": handle.name, "path": handle.source, "family": handle.adapter.family,
                       "geometry": handle.geometry.to_dict()},
            "mask": mask.to_dict(),
            "mask_summary": mask.normalized().summary(),
            "params": {"before": c.params_total, "after": c.params_kept,
                       "removed_fraction": c.params_removed_fraction,
                       "written_to_gguf": info.params_written, "added_for_llama_cpp": info.extra_params},
            "gguf": {k: v for k, v in info.to_dict().items() if k != "path"} | {"file": name},
            "parity": parity,
            "perplexity": ppl,
            "run": run_commands(name),
        }
        manifest["files"] = file_checksums(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        stage("moving the folder into place")
    info.path = folder / name
    return GgufExportResult(folder, info, c.params_total, c.params_kept, manifest)
