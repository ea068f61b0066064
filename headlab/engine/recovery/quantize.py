"""Fake-quantised 1-bit and 2-bit weights for the Q/K/V/O and FFN projections, trained through a STE.

Quantisers (per output row r of a weight W [out, in]; `codes` are small integers):
- 1-bit "binary" (XNOR-Net / BinaryBERT): W_q = sign(W) * a_r, a_r = mean |W_r|; sign(0) = +1, so
  each row takes exactly two values, +a_r and -a_r.
- 2-bit "ternary" (TWN, Li et al. 2016): d_r = 0.7 * mean |W_r|; codes = sign(W) where |W| > d_r
  else 0; W_q = codes * a_r with a_r the mean |W| over the kept entries.
- 2-bit "uniform": four symmetric levels (-1.5, -0.5, 0.5, 1.5) * s_r, codes in {-2, -1, 0, 1},
  W_q = (codes + 0.5) * s_r with s_r = 1.25 * mean |W_r| (the MSE-optimal 4-level uniform step for
  Gaussian rows is 0.996 sigma, and sigma = 1.2533 mean|W| for a Gaussian).

Training keeps the full-precision ("latent") weight and quantises it on every forward; the
backward is the straight-through estimator with a clipped identity: the gradient passes to
latent entries with |W| <= STE_CLIP * (the row's largest level) and is zero beyond, so latent
outliers whose quantised value can no longer change stop drifting.

Quantisers are attached as `torch.nn.utils.parametrize` parametrizations of each projection's
`weight`, so every family's module (nn.Linear, GPT-2 Conv1D, uneven-GQA GatheredHeads) keeps its
class, its forward and its attributes. Which modules: every Linear / Conv1D inside the adapter's
ATTN and FFN sub-block modules (Q/K/V/O, up/gate/down). Embeddings, the LM head and norms stay
in full precision.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from headlab.engine.core.handle import ModelHandle
from headlab.engine.models.adapters import adapter_for
from headlab.engine.models.sentence import write_sentence_files

__all__ = [
    "SCHEMES",
    "STE_CLIP",
    "QuantizedWeight",
    "QuantizeError",
    "FakeQuantize",
    "default_scheme",
    "quantize_rows",
    "dequantize_rows",
    "fake_quantize",
    "quantizable_modules",
    "set_quantization_",
    "quantization_of",
    "materialize",
    "quantized_state",
    "dequantize_state",
    "export_student",
    "load_quantized",
    "QUANTIZED_FILE",
    "QUANTIZATION_JSON",
    "STUDENT_MANIFEST",
]

SCHEMES: dict[int, tuple[str, ...]] = {1: ("binary",), 2: ("ternary", "uniform")}
STE_CLIP = 2.0
_TERNARY_THRESHOLD = 0.7
_UNIFORM_STEP = 1.25


class QuantizeError(ValueError):
    """A bit width or scheme that does not exist."""


def default_scheme(bits: int) -> str:
    """The scheme used when only a bit width is given (binary for 1 bit, ternary for 2)."""
    _check(bits, None)
    return SCHEMES[bits][0]


def _check(bits: int, scheme: str | None) -> str:
    if bits not in SCHEMES:
        raise QuantizeError(f"weights can be quantised to 1 or 2 bits, not {bits!r}")
    scheme = scheme or SCHEMES[bits][0]
    if scheme not in SCHEMES[bits]:
        raise QuantizeError(f"{bits}-bit scheme must be one of {', '.join(SCHEMES[bits])}, got {scheme!r}")
    return scheme


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes [out, in] (int8) and one scale per row [out]; see `dequantize_rows` for the value."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    scheme: str

    def dequantize(self) -> torch.Tensor:
        return dequantize_rows(self.codes, self.scale, self.scheme)


def quantize_rows(w: torch.Tensor, bits: int, scheme: str | None = None) -> QuantizedWeight:
    """Quantise each row of `w` [out, in] to `bits` bits with `scheme` (module doc)."""
    scheme = _check(bits, scheme)
    w = w.detach()
    a = w.abs()
    mean_abs = a.mean(dim=1)  # (out,)
    if scheme == "binary":
        codes = torch.where(w >= 0, 1, -1)
        scale = mean_abs
    elif scheme == "ternary":
        keep = a > _TERNARY_THRESHOLD * mean_abs[:, None]
        codes = torch.sign(w) * keep
        scale = (a * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    else:
        scale = _UNIFORM_STEP * mean_abs
        step = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.floor(w / step[:, None]).clamp(-2, 1)
    return QuantizedWeight(codes.to(torch.int8), scale.to(torch.float32), bits, scheme)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """Float weights [out, in] from integer codes and per-row scales."""
    c = codes.to(scale.dtype)
    if scheme == "uniform":
        c = c + 0.5
    elif scheme not in ("binary", "ternary"):
        raise QuantizeError(f"unknown scheme {scheme!r}")
    return c * scale[:, None]


def _largest_level(scale: torch.Tensor, scheme: str) -> torch.Tensor:
    return 1.5 * scale if scheme == "uniform" else scale


class _FakeQuant(torch.autograd.Function):
    """Forward: quantise-dequantise per row. Backward: straight-through, clipped at STE_CLIP x largest level."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
        q = quantize_rows(w, bits, scheme)
        clip = STE_CLIP * _largest_level(q.scale, scheme).to(w.dtype)
        ctx.save_for_backward(w.abs() <= clip[:, None])
        return q.dequantize().to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (passes,) = ctx.saved_tensors
        return grad * passes, None, None


def fake_quantize(w: torch.Tensor, bits: int, scheme: str | None = None) -> torch.Tensor:
    """Quantised-then-dequantised `w` [out, in] whose gradient is the clipped straight-through one."""
    return _FakeQuant.apply(w, bits, _check(bits, scheme))


class FakeQuantize(nn.Module):
    """Parametrization of a projection weight: fake-quantise it on every read.

    `transposed` is True for GPT-2's Conv1D, whose weight is stored [in, out]: rows are still
    output features. `bits` and `scheme` may be changed in place (multi-stage recipes).
    """

    def __init__(self, bits: int, scheme: str | None = None, transposed: bool = False):
        super().__init__()
        self.scheme = _check(bits, scheme)
        self.bits = bits
        self.transposed = transposed

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return fake_quantize(w.t(), self.bits, self.scheme).t()
        return fake_quantize(w, self.bits, self.scheme)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme!r}"


def _is_projection(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Conv1D))


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Q/K/V/O and FFN projection of `model`, by dotted name (the adapter says where they are)."""
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, nn.Module] = {}
    for layer in range(len(adapter.layers())):
        for kind in ("attn", "ffn"):
            if adapter.is_subblock_removed(layer, kind):
                continue
            for parent in adapter.subblock_modules(layer, kind):
                for m in parent.modules():
                    if _is_projection(m):
                        found[names[id(m)]] = m
    return found


def _quantizer(module: nn.Module) -> FakeQuantize | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, FakeQuantize)), None)


def set_quantization_(model: nn.Module, bits: int | None, scheme: str | None = None) -> int:
    """Fake-quantise every projection of `model` (in place) to `bits` (None: leave full precision).

    A projection that already carries a quantiser has its bits and scheme changed; quantisers
    cannot be removed (go back to full precision by re-pruning). Returns the number of modules.
    """
    modules = quantizable_modules(model)
    if bits is None:
        if any(_quantizer(m) is not None for m in modules.values()):
            raise QuantizeError("this student is already quantised; a full-precision stage must come first")
        return 0
    scheme = _check(bits, scheme)
    for m in modules.values():
        q = _quantizer(m)
        if q is None:
            parametrize.register_parametrization(m, "weight", FakeQuantize(bits, scheme, isinstance(m, Conv1D)))
        else:
            q.bits, q.scheme = bits, scheme
    return len(modules)


def quantization_of(model: nn.Module) -> tuple[int, str] | None:
    """(bits, scheme) of the model's quantised projections, or None when it has none."""
    for m in quantizable_modules(model).values():
        q = _quantizer(m)
        if q is not None:
            return q.bits, q.scheme
    return None


def _quantizer_input(module: nn.Module) -> torch.Tensor:
    """The weight as the quantiser sees it: the latent weight through the parametrizations before it."""
    w = module.parametrizations.weight.original.detach()
    for p in module.parametrizations.weight:
        if isinstance(p, FakeQuantize):
            return w
        w = p(w)
    return w


def _parametrized(model: nn.Module) -> Iterator[nn.Module]:
    yield from (m for m in model.modules() if parametrize.is_parametrized(m))


def materialize(model: nn.Module) -> nn.Module:
    """A plain copy of `model`: every parametrized weight (quantiser, low-rank delta) baked into a normal Parameter.

    Not `remove_parametrizations` on a deep copy: the copy shares its generated Parametrized*
    class with the original, and removal deletes the property from that shared class.
    """
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for m in list(_parametrized(plain)):
            baked = {name: getattr(m, name).detach().clone() for name in m.parametrizations}
            m.__class__ = m.__class__.__bases__[0]  # the module's own class, without the properties
            del m._modules["parametrizations"]
            for name, t in baked.items():
                m.register_parameter(name, nn.Parameter(t, requires_grad=False))
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain.eval()


@torch.no_grad()
def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, description) of a quantised model: int8 codes + scales for each projection, the rest as is.

    Tensors: `{module}.weight.codes` [out, in] int8 and `{module}.weight.scale` [out] float32 for
    every quantised projection ([out, in] even for Conv1D, see `transposed` in the description),
    and every other state-dict entry under its plain name. `dequantize_state` inverts it.
    """
    plain = materialize(model)
    projections = {name: m for name, m in quantizable_modules(model).items() if _quantizer(m) is not None}
    quantized = {name: {"bits": _quantizer(m).bits, "scheme": _quantizer(m).scheme,
                        "transposed": _quantizer(m).transposed} for name, m in projections.items()}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in plain.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in quantized:
            info = quantized[module]
            # Quantise the quantiser's own input: re-quantising the dequantised copy could shift a scale.
            w = _quantizer_input(projections[module])
            qw = quantize_rows(w.t() if info["transposed"] else w, info["bits"], info["scheme"])
            tensors[f"{key}.codes"] = qw.codes.contiguous()
            tensors[f"{key}.scale"] = qw.scale.contiguous()
        else:
            tensors[key] = t.detach().contiguous()
    description = {
        "format": "headlab.quantized",
        "version": 1,
        "value": {"binary": "codes * scale", "ternary": "codes * scale", "uniform": "(codes + 0.5) * scale"},
        "layout": "codes [out, in] int8, scale [out] float32 per output row; transposed=true means the module "
                  "stores its weight [in, out] (GPT-2 Conv1D), so transpose the dequantised matrix",
        "modules": quantized,
    }
    return tensors, description


def dequantize_state(tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The plain state dict (what `materialize(model).state_dict()` holds) from `quantized_state`'s output."""
    state = {k: v for k, v in tensors.items() if not k.endswith((".weight.codes", ".weight.scale"))}
    for module, info in description["modules"].items():
        key = f"{module}.weight"
        w = dequantize_rows(tensors[f"{key}.codes"], tensors[f"{key}.scale"], info["scheme"])
        state[key] = w.t().contiguous() if info["transposed"] else w
    return state


# --- writing a trained student -------------------------------------------------------------
QUANTIZED_FILE = "quantized.safetensors"
QUANTIZATION_JSON = "quantization.json"
STUDENT_MANIFEST = "headlab_student.json"


def export_student(student: ModelHandle, folder: str | os.PathLike, *, manifest: dict[str, Any] | None = None,
                   overwrite: bool = False) -> Path:
    """Write a trained student: a dequantised Hugging Face folder, plus integer codes + scales when quantised.

    - `model.safetensors` + `config.json` + tokenizer: the plain (dequantised, LoRA-merged) weights. A
      uniformly pruned student has the family's standard config, so plain transformers loads it; a
      per-layer one records its sizes in config.json (headlab.engine.models.load.load_pruned / load_model read it).
    - `quantized.safetensors` + `quantization.json` (quantised students only): int8 codes [out, in] and
      float32 scales [out] per projection, everything else as is; `load_quantized` turns them back.
    - `headlab_student.json`: `manifest` (recipe, steps, metrics) as given.
    - a student of a sentence-transformers source (the MiniLM) gets that folder's ST files
      (modules.json, 1_Pooling/, ...): the folder is a sentence-transformers model too.
    Written into a temporary sibling folder renamed into place; a non-empty target needs `overwrite`.
    """
    folder = Path(folder).expanduser().resolve()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise FileExistsError(f"{folder} already exists and is not empty; choose a new folder or overwrite it")
    plain = materialize(student.model)
    if hasattr(plain.config, "quantization_config"):  # a GGUF record must not travel with plain weights
        delattr(plain.config, "quantization_config")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        student.tokenizer.save_pretrained(tmp)
        write_sentence_files(student.source, tmp)
        quant = quantization_of(student.model)
        if quant is not None:
            tensors, description = quantized_state(student.model)
            save_file(tensors, str(tmp / QUANTIZED_FILE))
            (tmp / QUANTIZATION_JSON).write_text(json.dumps(description, indent=1))
        (tmp / STUDENT_MANIFEST).write_text(json.dumps({"format": "headlab.student", "version": 1,
                                                       "quantization": None if quant is None else
                                                       {"bits": quant[0], "scheme": quant[1]},
                                                       **(manifest or {})}, indent=1, default=str))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_quantized(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The plain state dict rebuilt from a folder's integer codes and scales (`export_student`)."""
    folder = Path(folder)
    if not (folder / QUANTIZED_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {QUANTIZED_FILE}: the student was not quantised")
    description = json.loads((folder / QUANTIZATION_JSON).read_text())
    return dequantize_state(load_file(str(folder / QUANTIZED_FILE)), description)
