"""Models larger than one device: where each layer lives (accelerate's device maps), and reading offloaded weights.

    load_model("path/to/llama-8b", device_map="auto", max_memory={0: "20GiB", 1: "20GiB", "cpu": "64GiB"})

A device map names, per module, a GPU index, "cpu" or "disk". Hugging Face's `from_pretrained`
hands it to accelerate, which puts each module's weights there and wraps the module's forward so
its inputs move to the module's device. Modules on "disk" (and on "cpu" when a GPU computes) are
*offloaded*: their parameters are on the meta device, and accelerate loads them onto the
computing device for each forward and drops them after. Strategies: "auto" / "balanced" (fill
the GPUs evenly, then CPU, then disk, within `max_memory`), "balanced_low_0" (keep GPU 0 light
for generation), "sequential" (fill GPU 0 first).

What that means for the engine (docs/scale.md):
- hooks (gates, capture, replay) are torch forward hooks: they fire around accelerate's wrapped
  forward and see tensors on the layer's device, so every hook moves its own tensors there;
- inputs go to `input_device(model)` (the device the embedding computes on); the model's hook
  brings the output back there;
- code that reads weights directly (magnitude scores, mean-ablation biases, FLAP fluctuation)
  wraps the read in `resident(module)`, which loads an offloaded module's weights for the body only;
- the kernel path and surgery need every weight in one place: `require_whole` refuses them with a
  clear message (the hooks path runs instead of the kernels).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import (
    align_module_device,
    compute_module_sizes,
    convert_file_size_to_int,
    get_balanced_memory,
    has_offloaded_params,
)
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "DeviceMap",
    "parse_device_map",
    "parse_max_memory",
    "from_pretrained_kwargs",
    "is_dispatched",
    "is_offloaded",
    "input_device",
    "device_layout",
    "describe_layout",
    "resident",
    "require_whole",
    "meta_model",
    "planned_device_map",
    "bytes_per_device",
]

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, Any]
_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?)$")


def _check_target(module: str, target: Any) -> Any:
    if isinstance(target, bool) or not (isinstance(target, int) and target >= 0 or
                                        isinstance(target, str) and _DEVICE.match(target)):
        raise ValueError(f"device map entry {module!r} -> {target!r}: a device is a GPU index (0, 1, ...), "
                         f"'cuda:N', 'cpu', 'disk' or 'mps'")
    return target


def parse_device_map(spec: DeviceMap | None) -> DeviceMap | None:
    """A strategy name, a {module: device} dict, a JSON object or a JSON file of one; None for "load whole"."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("the device map is empty: name at least one module (\"\" for the whole model)")
        return {str(k): _check_target(str(k), v) for k, v in spec.items()}
    if not isinstance(spec, str):
        raise ValueError(f"a device map is a strategy name, a dict or a JSON file, got {type(spec).__name__}")
    if spec in DEVICE_MAP_STRATEGIES:
        return spec
    text = spec
    if not spec.lstrip().startswith("{"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"device map {spec!r}: not one of {', '.join(DEVICE_MAP_STRATEGIES)}, "
                             f"a JSON object or a JSON file")
        text = path.read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"device map {spec!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"device map {spec!r}: the JSON must be an object {{module: device}}")
    return parse_device_map(d)


def _memory_key(key: Any) -> int | str:
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    if key in ("cpu", "mps", "disk"):
        return key
    raise ValueError(f"max memory key {key!r}: use a GPU index (0, 1, ...), 'cpu' or 'mps'")


def parse_max_memory(spec: str | Mapping[Any, Any] | None) -> dict[int | str, int] | None:
    """Bytes per device from "0=20GiB,1=20GiB,cpu=64GiB" or a {device: size} dict; None without a limit."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        pairs = []
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(f"max memory {spec!r}: write device=size pairs, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
            k, v = part.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    else:
        pairs = list(spec.items())
    out: dict[int | str, int] = {}
    for k, v in pairs:
        key = _memory_key(k)
        try:
            size = v if isinstance(v, int) else convert_file_size_to_int(v)
        except (ValueError, TypeError):
            raise ValueError(f"max memory for {k!r}: {v!r} is not a size (e.g. 20GiB, 512MB, or bytes)") from None
        if size <= 0:
            raise ValueError(f"max memory for {k!r} must be positive, got {v!r}")
        out[key] = int(size)
    if not out:
        raise ValueError("max memory names no device")
    return out


def _gpu_indices(device_map: DeviceMap | None, max_memory: Mapping[Any, Any] | None) -> set[int]:
    used: set[int] = set()
    if isinstance(device_map, dict):
        for v in device_map.values():
            if isinstance(v, int):
                used.add(v)
            elif isinstance(v, str) and v.startswith("cuda"):
                used.add(int(v.split(":")[1]) if ":" in v else 0)
    used |= {k for k in (max_memory or {}) if isinstance(k, int)}
    return used


def from_pretrained_kwargs(device_map: DeviceMap | None, max_memory: str | Mapping[Any, Any] | None,
                           offload_folder: str | Path | None, offload_root: Path) -> dict[str, Any]:
    """The device_map / max_memory / offload_folder arguments of `from_pretrained`, checked against this machine.

    Without `offload_folder`, disk-offloaded weights go to a fresh folder under `offload_root`,
    removed when the process exits.
    """
    device_map = parse_device_map(device_map)
    memory = parse_max_memory(max_memory)
    if device_map is None:
        if memory is not None:
            raise ValueError("max memory applies to a device map: add --device-map auto (or a map)")
        return {}
    n_gpus = torch.cuda.device_count()
    missing = sorted(i for i in _gpu_indices(device_map, memory) if i >= n_gpus)
    if missing:
        raise ValueError(f"the device map or max memory names GPU {', '.join(map(str, missing))}, but this machine "
                         f"has {n_gpus} CUDA device(s)")
    if isinstance(device_map, str) and memory is not None and n_gpus == 0 and "cpu" not in memory:
        raise ValueError("this machine has no GPU: give max memory for 'cpu' (what does not fit goes to disk)")
    if offload_folder is None:
        offload_root.mkdir(parents=True, exist_ok=True)
        offload_folder = tempfile.mkdtemp(prefix="offload-", dir=offload_root)
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    kwargs: dict[str, Any] = {"device_map": device_map, "offload_folder": str(offload_folder)}
    if memory is not None:
        kwargs["max_memory"] = memory
    return kwargs


def is_dispatched(model: nn.Module) -> bool:
    """The model was loaded with a device map (its modules may live on several devices, or be offloaded)."""
    return getattr(model, "hf_device_map", None) is not None


def is_offloaded(model: nn.Module) -> bool:
    """Some of the model's weights are offloaded (on the meta device, loaded per forward from CPU or disk)."""
    return any(has_offloaded_params(m) for m in model.modules())


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the first GPU of the device map (accelerate's main device), else the CPU."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return next(model.parameters()).device
    gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
    if not gpus:
        return torch.device("cpu")
    d = gpus[0]
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def device_layout(model: nn.Module) -> dict[str, list[str]]:
    """{device: [module names]} of a dispatched model (one entry, its own device, for a model loaded whole)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return {str(next(model.parameters()).device): [""]}
    out: dict[str, list[str]] = {}
    for name, d in device_map.items():
        out.setdefault(f"cuda:{d}" if isinstance(d, int) else str(d), []).append(name)
    return out


def _compress(names: list[str]) -> str:
    """'model.embed_tokens', 'model.layers.0', ..., 'model.layers.7', 'lm_head' -> 'embed_tokens, layers 0-7, lm_head'."""
    layers, parts = [], []
    for n in names:
        m = re.search(r"(?:^|\.)(?:layers|h|layer)\.(\d+)$", n)
        if not m:
            parts.append(n.rsplit(".", 1)[-1] or "whole model")
            continue
        if not layers:
            parts.append(None)  # where the layer ranges go
        layers.append(int(m.group(1)))
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    ranges = ", ".join(f"layer {r[0]}" if len(r) == 1 else f"layers {r[0]}-{r[-1]}" for r in runs)
    return ", ".join(ranges if p is None else p for p in parts)


def describe_layout(layout: Mapping[str, list[str]]) -> str:
    """One line: 'cuda:0: embed_tokens, layers 0-15; cuda:1: layers 16-31, norm, lm_head'."""
    return "; ".join(f"{d}: {_compress(names)}" for d, names in layout.items())


@contextlib.contextmanager
def resident(*modules: nn.Module) -> Iterator[None]:
    """For the body, the offloaded weights of `modules` (and their submodules) are loaded on their compute device.

    A model loaded whole, or modules that are not offloaded, are left as they are. Tensors read in the
    body stay valid after it (they are the loaded copies); the module itself goes back to meta.
    """
    with contextlib.ExitStack() as stack:
        for module in modules:
            for m in module.modules():
                if has_offloaded_params(m):
                    stack.enter_context(align_module_device(m))
        yield


def require_whole(model: nn.Module, what: str) -> None:
    """Refuse `what` on a model split across devices: it reads every weight in one place."""
    if is_dispatched(model) and (is_offloaded(model) or len(device_layout(model)) > 1):
        raise ValueError(f"{what} needs the whole model on one device, and this one is split by a device map "
                         f"({describe_layout(device_layout(model))}); load it without --device-map for this step")


def meta_model(config: Any) -> nn.Module:
    """The model of `config` with no memory behind its weights (shapes and dtypes only, for sizes).

    A causal LM with its head when the config names one, else the bare model: an encoder's MLM
    head is a few MB either way, and only the sizes are read.
    """
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or (
        not archs and getattr(config, "is_decoder", True) and config.model_type != "bert")
    with init_empty_weights():
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.tie_weights()  # from_config leaves a tied LM head as its own tensor; loading ties it
    return model


def planned_device_map(model: nn.Module, dtype: torch.dtype, device_map: DeviceMap | None,
                       max_memory: str | Mapping[Any, Any] | None) -> tuple[dict[str, Any], dict[str, int]]:
    """(device map, {module: bytes}) that loading `model` (a `meta_model`) with this map would give, loading nothing.

    A dict map is returned as given; a strategy is solved by accelerate over the memory limits
    (default: what torch sees free on each GPU, and the CPU's RAM); None is the whole model on one device.
    """
    sizes = compute_module_sizes(model, dtype=dtype)
    device_map = parse_device_map(device_map)
    if isinstance(device_map, dict):
        return device_map, sizes
    if device_map is None:
        return {"": 0 if torch.cuda.is_available() else "cpu"}, sizes
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = parse_max_memory(max_memory) if max_memory is not None else None
    if device_map != "sequential" and torch.cuda.device_count() > 0:
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=device_map == "balanced_low_0")
    solved = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    return dict(solved), sizes


def bytes_per_device(device_map: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, int]:
    """Weight bytes each device of `device_map` holds (offloaded modules count under 'cpu' or 'disk')."""
    out: dict[str, int] = {}
    for name, d in device_map.items():
        key = f"cuda:{d}" if isinstance(d, int) else str(d)
        out[key] = out.get(key, 0) + sizes.get(name, 0)
    return out
