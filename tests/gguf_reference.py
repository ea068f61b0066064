"""A GGUF file of the `llama`, `deci` or `gemma3` architecture run the way llama.cpp's graphs run it, in numpy.

An oracle independent of HeadLab's modules: it reads only the file (gguf.GGUFReader), applies
rotary embeddings to adjacent dimension pairs (ggml's normal RoPE mode; gemma3: NEOX mode, the two
halves), lets query head h read KV head h // (n_head / n_head_kv), skips attention where a deci layer
has 0 heads, and follows src/models/deci.cpp (an FFN-less layer keeps its input). gemma3 follows
src/models/gemma3.cpp: embeddings times sqrt(d), RMS-normed queries and keys, post-norms on both
sub-blocks, tanh-GELU, the sliding window and local rotary base on the layers the pattern marks.
Logits are float64.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _per_layer(value, n_layers: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers


def read_weights(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    n_layers = int(_field(reader, f"{arch}.block_count"))
    hp = {
        "arch": arch,
        "n_layers": n_layers,
        "n_head": _per_layer(_field(reader, f"{arch}.attention.head_count"), n_layers),
        "n_head_kv": _per_layer(_field(reader, f"{arch}.attention.head_count_kv"), n_layers),
        "n_ff": _per_layer(_field(reader, f"{arch}.feed_forward_length"), n_layers),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length")),
        "eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "base": float(_field(reader, f"{arch}.rope.freq_base")),
        "base_swa": _field(reader, f"{arch}.rope.freq_base_swa"),
        "window": _field(reader, f"{arch}.attention.sliding_window"),
        "swa": _field(reader, f"{arch}.attention.sliding_window_pattern"),
    }
    weights = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        weights[t.name] = np.asarray(data, dtype=np.float64).reshape([int(n) for n in reversed(t.shape)])
    return hp, weights


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, base: float, neox: bool = False) -> np.ndarray:
    """x: (T, heads, hd); pairs (2j, 2j+1) (NEOX: (j, j + hd/2)) rotated by pos * base^(-2j/hd)."""
    T, _, hd = x.shape
    theta = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]  # (T, hd/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    first, second = (slice(0, hd // 2), slice(hd // 2, hd)) if neox else (slice(0, None, 2), slice(1, None, 2))
    x0, x1 = x[..., first], x[..., second]
    out = np.empty_like(x)
    out[..., first] = x0 * cos - x1 * sin
    out[..., second] = x0 * sin + x1 * cos
    return out


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gguf_logits(path: str | Path, ids: list[int]) -> np.ndarray:
    """(T, vocab) logits of the token ids, causal, positions 0..T-1."""
    hp, w = read_weights(path)
    gemma = hp["arch"] == "gemma3"
    x = w["token_embd.weight"][ids]  # (T, d)
    if gemma:
        x = x * np.sqrt(x.shape[1])
    T, hd = len(ids), hp["head_dim"]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    distance = np.arange(T)[:, None] - np.arange(T)[None, :]
    for i in range(hp["n_layers"]):
        p = lambda name: w.get(f"blk.{i}.{name}")  # noqa: E731
        n_head, n_kv, n_ff = hp["n_head"][i], hp["n_head_kv"][i], hp["n_ff"][i]
        sliding = gemma and hp["window"] and bool(hp["swa"][i])
        base = float(hp["base_swa"]) if sliding else hp["base"]
        mask = np.where(distance >= hp["window"], -np.inf, causal) if sliding else causal
        layer_input = x
        if n_head:
            h = _rms(x, p("attn_norm.weight"), hp["eps"])
            q = (h @ p("attn_q.weight").T).reshape(T, n_head, hd)
            k = (h @ p("attn_k.weight").T).reshape(T, n_kv, hd)
            if gemma:
                q, k = _rms(q, p("attn_q_norm.weight"), hp["eps"]), _rms(k, p("attn_k_norm.weight"), hp["eps"])
            q, k = _rope(q, base, neox=gemma), _rope(k, base, neox=gemma)
            v = (h @ p("attn_v.weight").T).reshape(T, n_kv, hd)
            kv = np.arange(n_head) // (n_head // n_kv)
            scores = np.einsum("thd,shd->hts", q, k[:, kv]) / np.sqrt(hd) + mask
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", probs, v[:, kv]).reshape(T, n_head * hd) @ p("attn_output.weight").T
            if p("attn_output.bias") is not None:
                o = o + p("attn_output.bias")
            if gemma:
                o = _rms(o, p("post_attention_norm.weight"), hp["eps"])
            x = x + o
        if n_ff == 0:
            x = layer_input  # deci.cpp: `continue` before `inpL = cur` drops the whole layer's update
            continue
        h = _rms(x, p("ffn_norm.weight"), hp["eps"])
        gate = h @ p("ffn_gate.weight").T
        act = _gelu_tanh(gate) if gemma else gate / (1 + np.exp(-gate))
        f = (act * (h @ p("ffn_up.weight").T)) @ p("ffn_down.weight").T
        if p("ffn_down.bias") is not None:
            f = f + p("ffn_down.bias")
        if gemma:
            f = _rms(f, p("post_ffw_norm.weight"), hp["eps"])
        x = x + f
    x = _rms(x, w["output_norm.weight"], hp["eps"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T
