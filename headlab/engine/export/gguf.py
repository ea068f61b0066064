"""A Llama-family model, dense or physically pruned, as one GGUF file that llama.cpp runs.

    info = write_gguf(surgery.prune(handle, mask), "model.gguf", "q8_0")

Two llama.cpp architectures:
- `llama`: every layer keeps the same heads, KV heads and FFN channels and both sub-blocks (optional
  `attn_output.bias` / `ffn_down.bias`);
- `deci` (llama.cpp's per-layer Llama, src/models/deci.cpp): the per-layer arrays
  `deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length`, where
  0 heads is a layer without attention; optional `attn_output.bias` / `ffn_down.bias`.

What ggml needs, and how each need is met exactly:
- Q and K rows in llama.cpp's rotary order (pairs of adjacent dimensions): each head's rows are
  permuted as llama.cpp's own converter permutes them (`_rope_rows`);
- every KV head shared by a contiguous, equal group of query heads. Uneven groups (surgery's
  `kv_index`, when GQA groups keep different numbers of query heads) are regrouped: the query heads
  are reordered group by group (their O-projection columns with them) into groups of a common size g:
  a KV head whose group holds n queries is written ceil(n / g) times, and the last of its groups is
  filled up with query heads of zero weights (whose zero O columns add exactly nothing). g is the size
  that writes the fewest extra rows (a duplicated K/V head costs as many as a zero Q/O head), the
  larger on a tie (a smaller KV cache). The extra rows are counted in `GgufLayer.duplicated_kv_heads`,
  `GgufLayer.zero_query_heads` and the manifest; a mask with equal groups per layer (the pruning
  methods' `even_groups`) needs none;
- deci's graph skips the residual update of a layer that has no FFN (`if (n_ff == 0) continue;`
  comes before `inpL = cur`), which would drop a kept attention sub-block's output. Such a layer gets
  an FFN of `STAND_IN_FFN` zero channels, which adds exactly nothing (`GgufLayer.zero_ffn_channels`);
- llama.cpp reads the head size (`attention.key_length`) only when layer 0 has heads
  (src/llama-model.cpp: `if (hparams.n_head() > 0)`, n_head() being layer 0's), so a first layer
  without attention gets a stand-in of one head with zero weights, which adds exactly nothing
  (`GgufLayer.zero_attn_heads`);
- biases: llama.cpp reads output biases only. The O and down biases (compensation, re-fit
  intercepts) are written; other projections' biases must be the zeros a config's bias switch adds.

Types: "f32", "f16", "bf16" and "q8_0" are written directly (norms and biases stay F32). A matrix
whose rows are not a whole number of quantisation blocks stays F16, as llama.cpp's converter does;
`GgufInfo.fallbacks` names each. K-quants come from llama.cpp's `llama-quantize` on the f16 file.

The tokenizer: the shipped SmolLM2's own GGUF fields (the tokenizer llama.cpp users run) when the
model came from it, else the Hugging Face tokenizer's byte-level BPE vocabulary, merges, special
tokens and chat template, with llama.cpp's pre-tokenizer name read off its pre-tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.reshape import GatheredHeads
from headlab.engine.models.gguf_tokenizer import copy_tokenizer_fields

__all__ = ["GGUF_TYPES", "STAND_IN_FFN", "GgufError", "GgufInfo", "GgufLayer", "gguf_layers", "write_gguf"]

Q = gguf.GGMLQuantizationType
GGUF_TYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
STAND_IN_FFN = 32  # zero channels for a deci layer whose FFN was removed but attention kept (one Q8_0 block)
_NUL = "\u0100"  # byte 0 in byte-level BPE's alphabet: text never holds it
_MODEL_TYPES = ("llama",)  # rotary in Llama's rotate-half layout, no sliding window: what `llama`/`deci` compute


class GgufError(ValueError):
    """The model cannot be stated in GGUF for llama.cpp; the message says what and why."""


@dataclass
class GgufLayer:
    """One layer as llama.cpp sees it."""

    n_head: int
    n_head_kv: int
    n_ff: int
    duplicated_kv_heads: int = 0  # K/V heads written more than once to make the GQA groups equal
    zero_ffn_channels: int = 0  # a stand-in FFN of zero channels (deci skips the update of an FFN-less layer)
    zero_attn_heads: int = 0  # a stand-in attention head of zeros (llama.cpp needs heads in layer 0)
    zero_query_heads: int = 0  # query heads of zeros that fill a GQA group up to the common size
    tensors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def sizes(self) -> dict[str, int]:
        return {"n_head": self.n_head, "n_head_kv": self.n_head_kv, "n_ff": self.n_ff,
                "duplicated_kv_heads": self.duplicated_kv_heads, "zero_ffn_channels": self.zero_ffn_channels,
                "zero_attn_heads": self.zero_attn_heads, "zero_query_heads": self.zero_query_heads}


@dataclass
class GgufInfo:
    path: Path
    arch: str
    out_type: str
    layers: list[dict[str, int]]
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    fallbacks: list[str]  # tensors kept at F16 because their rows are not whole quantisation blocks
    params_written: int
    extra_params: int  # duplicated K/V rows and stand-in FFN channels, beyond the pruned model's own
    bytes: int
    tokenizer: str

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Each head's rows from rotate-half order (first half, second half) to llama.cpp's adjacent pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(w: np.ndarray, head_dim: int) -> np.ndarray:
    return w.reshape(-1, head_dim, *w.shape[1:])  # (heads, head_dim, ...)


def _regroup(kv_of_query: list[int]) -> tuple[list[int], list[int], int]:
    """(query order, the KV head of each written KV slot, group size): contiguous, equal GQA groups.

    kv_of_query[h] is the KV head query head h reads. Queries are taken group by group (KV heads in
    order, queries in their order within a group); a group of n queries gets ceil(n / g) copies of its KV
    head and is filled up to a multiple of g with zero query heads, written as -1 in the order. g writes
    the fewest extra heads (duplicated KV + zero queries), the largest such g on a tie.
    """
    groups: dict[int, list[int]] = {}
    for q, kv in enumerate(kv_of_query):
        groups.setdefault(kv, []).append(q)

    def extra(g: int) -> int:
        slots = sum(-(-len(qs) // g) for qs in groups.values())
        return (slots - len(groups)) + (g * slots - len(kv_of_query))

    g = min(range(max(len(qs) for qs in groups.values()), 0, -1), key=extra)
    order = [q for kv in sorted(groups) for q in groups[kv] + [-1] * (-len(groups[kv]) % g)]
    slots = [kv for kv in sorted(groups) for _ in range(-(-len(groups[kv]) // g))]
    return order, slots, g


def _bias_must_be_zero(name: str, proj: torch.nn.Module) -> None:
    if proj.bias is not None and bool(proj.bias.detach().abs().max() > 0):
        raise GgufError(f"{name} has a non-zero bias, which llama.cpp's llama/deci graphs do not read (they read "
                        "output biases only); this model cannot be written as GGUF without changing its outputs")


def _attention(handle: ModelHandle, i: int,
               rope_pairs: bool = True) -> tuple[dict[str, np.ndarray], int, int, int, int]:
    """(tensors, n_head, n_head_kv, duplicated KV heads, zero query heads) of layer i's kept attention, in
    llama.cpp's layout."""
    a, hd = handle.adapter, handle.geometry.head_dim
    p = a.projections_of(i, "attn")
    for role in ("q", "k", "v"):
        _bias_must_be_zero(f"layer {i} {role} projection", p[role])
    wq, wk, wv, wo = (_np(p[r].weight) for r in ("q", "k", "v", "o"))
    n_q, n_kv = wq.shape[0] // hd, wk.shape[0] // hd
    if isinstance(p["k"], GatheredHeads):
        kv_of_query = p["k"].head_index.tolist()
    else:
        kv_of_query = [h // (n_q // n_kv) for h in range(n_q)]
    order, slots, _ = _regroup(kv_of_query)
    zero = np.zeros((1, hd, wq.shape[1]), dtype=wq.dtype)  # index -1 after the append: a zero query head
    wq = np.concatenate([_heads(wq, hd), zero])[order].reshape(-1, wq.shape[1])
    wo = np.concatenate([_heads(wo.T, hd), zero])[order].reshape(-1, wo.shape[0]).T  # O columns follow queries
    wk, wv = (_heads(w, hd)[slots].reshape(-1, w.shape[1]) for w in (wk, wv))
    if rope_pairs:  # llama.cpp's normal RoPE mode rotates adjacent pairs; NEOX mode (gemma3) the halves, as HF
        wq, wk = _rope_rows(wq, len(order)), _rope_rows(wk, len(slots))
    tensors = {"attn_q.weight": wq, "attn_k.weight": wk,
               "attn_v.weight": wv, "attn_output.weight": np.ascontiguousarray(wo)}
    if p["o"].bias is not None:
        tensors["attn_output.bias"] = _np(p["o"].bias)
    return tensors, len(order), len(slots), len(slots) - n_kv, order.count(-1)


def _ffn(handle: ModelHandle, i: int) -> dict[str, np.ndarray]:
    p = handle.adapter.projections_of(i, "ffn")
    for role in ("gate", "up"):
        _bias_must_be_zero(f"layer {i} {role} projection", p[role])
    tensors = {"ffn_gate.weight": _np(p["gate"].weight), "ffn_up.weight": _np(p["up"].weight),
               "ffn_down.weight": _np(p["down"].weight)}
    if p["down"].bias is not None:
        tensors["ffn_down.bias"] = _np(p["down"].bias)
    return tensors


def _arch_family(handle: ModelHandle) -> str | None:
    """"llama" (written as llama/deci) or "gemma3" (llama.cpp's gemma3), or None."""
    model_type = getattr(handle.model.config, "model_type", None)
    if handle.adapter.family == "llama" and model_type in _MODEL_TYPES:
        return "llama"
    if handle.adapter.family == "gemma3" and model_type == "gemma3_text":
        return "gemma3"
    return None


def _refusal(handle: ModelHandle) -> str | None:
    cfg = handle.model.config
    family = _arch_family(handle)
    if family is None:
        return (f"GGUF export writes model_type {[*_MODEL_TYPES, 'gemma3_text']} (SmolLM2, Llama, Gemma 3); "
                f"{getattr(cfg, 'model_type', handle.adapter.family)!r} is not written")
    rope = getattr(cfg, "rope_parameters", None) or {}
    ropes = list(rope.values()) if family == "gemma3" and "full_attention" in rope else [rope]
    for r in ropes:
        if r.get("rope_type", "default") != "default":
            return f"RoPE scaling {r.get('rope_type')!r} is not written (only the default rotary)"
    if family == "llama":
        if getattr(cfg, "sliding_window", None):
            return "a sliding-window attention has no llama/deci GGUF form"
        return None
    # llama.cpp's gemma3 graph (src/models/gemma3.cpp) fixes what the config could vary
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping (Gemma 2's) is not in llama.cpp's gemma3 graph"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention (EmbeddingGemma) is not the causal gemma3 graph"
    if getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        return f"FFN activation {cfg.hidden_activation!r}: llama.cpp's gemma3 computes tanh-GELU"
    if int(cfg.query_pre_attn_scalar) != handle.geometry.head_dim:
        return (f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from the head size "
                f"{handle.geometry.head_dim}; llama.cpp's gemma3 scales queries by 1/sqrt(head size)")
    return None


def gguf_layers(handle: ModelHandle) -> list[GgufLayer]:
    """Every layer of `handle` (dense or from surgery.prune) in llama.cpp's layout, with its tensors."""
    why = _refusal(handle)
    if why:
        raise GgufError(why)
    a, d = handle.adapter, handle.geometry.hidden
    gemma = _arch_family(handle) == "gemma3"
    layers = []
    for i in range(len(a.layers())):
        attn = not a.is_subblock_removed(i, "attn")
        ffn = not a.is_subblock_removed(i, "ffn")
        layer = GgufLayer(0, 0, 0)
        if attn:
            (tensors, layer.n_head, layer.n_head_kv, layer.duplicated_kv_heads,
             layer.zero_query_heads) = _attention(handle, i, rope_pairs=not gemma)
            layer.tensors.update(tensors)
            layer.tensors["attn_norm.weight"] = _np(a.sublayer_norm(i, "attn").weight)
            if gemma:
                block = a.layers()[i]
                layer.tensors.update({"attn_q_norm.weight": _np(block.self_attn.q_norm.weight),
                                      "attn_k_norm.weight": _np(block.self_attn.k_norm.weight),
                                      "post_attention_norm.weight": _np(block.post_attention_layernorm.weight)})
        elif i == 0:
            hd = handle.geometry.head_dim
            layer.n_head = layer.n_head_kv = layer.zero_attn_heads = 1
            layer.tensors.update({"attn_q.weight": np.zeros((hd, d), np.float32),
                                  "attn_k.weight": np.zeros((hd, d), np.float32),
                                  "attn_v.weight": np.zeros((hd, d), np.float32),
                                  "attn_output.weight": np.zeros((d, hd), np.float32),
                                  "attn_norm.weight": np.ones(d, np.float32)})
        if ffn:
            layer.tensors.update(_ffn(handle, i))
        elif layer.n_head:
            layer.zero_ffn_channels = STAND_IN_FFN
            layer.tensors.update({"ffn_gate.weight": np.zeros((STAND_IN_FFN, d), np.float32),
                                  "ffn_up.weight": np.zeros((STAND_IN_FFN, d), np.float32),
                                  "ffn_down.weight": np.zeros((d, STAND_IN_FFN), np.float32)})
        if "ffn_up.weight" in layer.tensors:
            layer.n_ff = layer.tensors["ffn_up.weight"].shape[0]
            layer.tensors["ffn_norm.weight"] = _np(a.sublayer_norm(i, "ffn").weight)
            if gemma and ffn:
                layer.tensors["post_ffw_norm.weight"] = _np(a.layers()[i].post_feedforward_layernorm.weight)
        if gemma:  # Gemma3RMSNorm computes x * (1 + w); llama.cpp reads the factor itself, as its converter writes
            for name in [n for n in layer.tensors if n.endswith("norm.weight")]:
                layer.tensors[name] = layer.tensors[name] + 1.0
        layers.append(layer)
    return layers


def _check_gemma3_layers(layers: list[GgufLayer]) -> None:
    """llama.cpp's gemma3 reads one size for all layers and no biases: what a Gemma export must be."""
    if not _is_uniform(layers):
        sizes = sorted({(lay.n_head, lay.n_head_kv, lay.n_ff) for lay in layers})
        raise GgufError(f"llama.cpp's gemma3 architecture has one size for every layer (no per-layer sizes, no "
                        f"removed sub-blocks), and these layers differ: (heads, KV heads, FFN) {sizes[:4]}; export "
                        "a uniform mask (`--layout uniform`) or drop whole layers (`--route depth`)")
    biased = [n for n in ("attn_output.bias", "ffn_down.bias") if any(n in lay.tensors for lay in layers)]
    if biased:
        raise GgufError(f"llama.cpp's gemma3 graph reads no output biases, and this model has {biased[0]} "
                        "(compensation or a re-fit intercept); prune without them for a Gemma GGUF")


def _gemma3_keys(writer: gguf.GGUFWriter, cfg: Any, arch: str) -> None:
    """Rotary bases, sliding window and its per-layer pattern, as llama.cpp's gemma3 reads them."""
    rope = cfg.rope_parameters
    writer.add_rope_freq_base(float(rope["full_attention"]["rope_theta"]))
    types = list(cfg.layer_types)
    if "sliding_attention" in types:
        writer.add_float32(f"{arch}.rope.freq_base_swa", float(rope["sliding_attention"]["rope_theta"]))
        writer.add_sliding_window(int(cfg.sliding_window))
        # the layers' own pattern (a depth export drops some of the every-sixth-layer default's)
        writer.add_array(f"{arch}.attention.sliding_window_pattern", [t == "sliding_attention" for t in types])
    if getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _is_uniform(layers: list[GgufLayer]) -> bool:
    first = layers[0]
    return all(lay.n_head and lay.n_ff and not lay.zero_ffn_channels and not lay.zero_attn_heads and
               (lay.n_head, lay.n_head_kv, lay.n_ff) == (first.n_head, first.n_head_kv, first.n_ff)
               for lay in layers)  # llama's graph reads the optional output biases too (src/models/llama.cpp)


# ---- the tokenizer ------------------------------------------------------------------------------------------------

def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read off tokenizer.json's `pre_tokenizer`."""
    parts = (spec or {}).get("pretokenizers", [spec]) if (spec or {}).get("type") == "Sequence" else [spec]
    kinds = [(p or {}).get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise GgufError(f"the tokenizer's pre-tokenizer {json.dumps(spec)[:200]} has no llama.cpp name HeadLab knows "
                    "(gpt-2, smollm); pass the GGUF file of the source model as the tokenizer source")


def _hf_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> str:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GgufError(f"only byte-level BPE tokenizers are written; this one is {model.get('type')!r}")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp refuses a BPE vocabulary without merges: one that never fires (two NUL bytes)
        if _NUL not in by_id.values():
            raise GgufError("the tokenizer has no BPE merges, and llama.cpp needs at least one")
        merges = [f"{_NUL} {_NUL}"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return f"Hugging Face tokenizer (byte-level BPE, pre-tokenizer {pre})"


def _copied_tokenizer(writer: gguf.GGUFWriter, source: Path) -> str:
    copy_tokenizer_fields(gguf.GGUFReader(source), writer)
    return f"copied from {source.name}"


# ---- writing ------------------------------------------------------------------------------------------------------

def _encode(name: str, w: np.ndarray, out_type: str, fallbacks: list[str]) -> tuple[np.ndarray, Q]:
    if w.ndim == 1 or out_type == "f32":
        return w.astype(np.float32), Q.F32
    qtype = GGUF_TYPES[out_type]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if w.shape[-1] % block:
        fallbacks.append(f"{name} ({w.shape[-1]} columns, not a multiple of {block})")
        qtype = Q.F16
    if qtype == Q.F16:
        return w.astype(np.float16), Q.F16
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def _tied(handle: ModelHandle) -> bool:
    head, embed = handle.adapter.lm_head(), handle.adapter.input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def write_gguf(handle: ModelHandle, path: str | os.PathLike, out_type: str = "f16", *,
               tokenizer_gguf: str | os.PathLike | None = None, name: str | None = None) -> GgufInfo:
    """Write `handle` (dense, or a surgery.prune result) to `path` as a GGUF file llama.cpp loads.

    `tokenizer_gguf`: a GGUF file whose tokenizer fields are copied (the source model's own); else
    the Hugging Face tokenizer is converted. The file is written in place: callers publish it atomically.
    """
    if out_type not in GGUF_TYPES:
        raise GgufError(f"unknown GGUF type {out_type!r}; choose one of {sorted(GGUF_TYPES)} (K-quants: run "
                        "llama.cpp's llama-quantize on the f16 file)")
    layers = gguf_layers(handle)
    if not layers:
        raise GgufError("the model has no layers left")
    cfg, g = handle.model.config, handle.geometry
    gemma = _arch_family(handle) == "gemma3"
    if gemma:
        _check_gemma3_layers(layers)
    arch = "gemma3" if gemma else "llama" if _is_uniform(layers) else "deci"
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name or handle.name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(g.hidden)
    writer.add_block_count(len(layers))
    if arch != "deci":
        writer.add_feed_forward_length(layers[0].n_ff)
        writer.add_head_count(layers[0].n_head)
        writer.add_head_count_kv(layers[0].n_head_kv)
    else:
        writer.add_feed_forward_length([lay.n_ff for lay in layers])
        writer.add_head_count([lay.n_head for lay in layers])
        writer.add_head_count_kv([lay.n_head_kv for lay in layers])
    if gemma:
        _gemma3_keys(writer, cfg, arch)
    else:
        rope = getattr(cfg, "rope_parameters", None) or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_key_length(g.head_dim)
    writer.add_value_length(g.head_dim)
    writer.add_rope_dimension_count(g.head_dim)
    writer.add_vocab_size(g.vocab_size)
    writer.add_file_type(_FILE_TYPES[out_type])
    if out_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = (_copied_tokenizer(writer, Path(tokenizer_gguf)) if tokenizer_gguf is not None
                 else _hf_tokenizer(writer, handle.tokenizer, g.vocab_size))

    fallbacks: list[str] = []
    counts: dict[str, int] = {}
    params = 0

    def add(tensor_name: str, w: np.ndarray) -> None:
        nonlocal params
        data, qtype = _encode(tensor_name, w, out_type, fallbacks)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        params += w.size

    add("token_embd.weight", _np(handle.adapter.input_embeddings().weight))
    for i, layer in enumerate(layers):
        for tensor_name, w in layer.tensors.items():
            add(f"blk.{i}.{tensor_name}", w)
    add("output_norm.weight", _np(handle.adapter.final_norm().weight) + (1.0 if gemma else 0.0))
    if not _tied(handle):
        add("output.weight", _np(handle.adapter.lm_head().weight))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    extra = sum(2 * (lay.duplicated_kv_heads + lay.zero_query_heads) * g.head_dim * g.hidden
                + 3 * lay.zero_ffn_channels * g.hidden
                + 4 * lay.zero_attn_heads * g.head_dim * g.hidden for lay in layers)
    return GgufInfo(path, arch, out_type, [lay.sizes() for lay in layers], counts, fallbacks, params, extra,
                    path.stat().st_size, tokenizer)
