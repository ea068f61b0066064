"""Parameter and FLOP accounting of a model under a PruneMask.

What a mask removes, exactly (the same rules `surgery` follows when it slices):
- a pruned query head: its Q rows (+bias) and its O-projection columns;
- a KV head: its K and V rows (+bias), only when every query head reading it is pruned;
- a pruned FFN channel: its up (and gate) rows (+bias) and its down-projection column;
- a removed sub-block: every parameter of its modules (adapter.subblock_modules), heads,
  channels, output biases and post-LN norms included;
- a layer with both sub-blocks removed is dropped whole: its remaining norms go too;
- a non-zero compensation bias (mask.attn_bias / ffn_bias) on a projection that has no bias
  adds one (hidden values).
Embeddings, the LM head and norms outside sub-blocks otherwise stay.
FLOPs are forward FLOPs per token (2 per multiply-add) for a sequence of `seq_len` tokens:
linear layers plus attention scores and weighting (4 * seq_len * head_dim per kept head,
the full-context upper bound), plus the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from headlab.engine.core.adapter import Adapter
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask

__all__ = ["Cost", "cost"]


@dataclass(frozen=True)
class Cost:
    params_total: int
    params_kept: int
    flops_dense: int
    flops_kept: int

    @property
    def params_removed(self) -> int:
        return self.params_total - self.params_kept

    @property
    def params_removed_fraction(self) -> float:
        return self.params_removed / self.params_total

    @property
    def flops_removed_fraction(self) -> float:
        return 1.0 - self.flops_kept / self.flops_dense

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "params_removed": self.params_removed,
                "params_removed_fraction": self.params_removed_fraction,
                "flops_removed_fraction": self.flops_removed_fraction}


def _numel(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _layer_unit_sizes(adapter: Adapter, layer: int) -> dict[str, int]:
    """Parameter counts of one query head, one KV head, one FFN channel, and the rest."""
    w = adapter.head_weights(layer)
    f = adapter.ffn_weights(layer)
    bias = lambda b: 0 if b is None else b.shape[-1]  # noqa: E731
    per_q = w.q[0].numel() + bias(w.q_bias) + w.o[0].numel()
    per_kv = w.k[0].numel() + w.v[0].numel() + bias(w.k_bias) + bias(w.v_bias)
    # One channel: a down-projection column (hidden values), its up/gate rows and their biases.
    per_ch = f["down"].shape[0] + sum(f[n].shape[1] for n in ("up", "gate") if n in f)
    per_ch += _ffn_in_bias_count(adapter, layer)
    g = adapter.geometry
    attn_total = _numel(adapter.subblock_modules(layer, "attn"))
    ffn_total = _numel(adapter.subblock_modules(layer, "ffn"))
    return {
        "q": per_q,
        "kv": per_kv,
        "ch": per_ch,
        "attn_total": attn_total,
        "attn_fixed": attn_total - g.n_heads * per_q - g.n_kv_heads * per_kv,
        "ffn_total": ffn_total,
        "ffn_fixed": ffn_total - g.ffn_dim * per_ch,
    }


def _ffn_in_bias_count(adapter: Adapter, layer: int) -> int:
    """Bias values per FFN channel on the input side (0 for bias-free Llama MLPs)."""
    proj = adapter.ffn_output_proj(layer)
    count = 0
    for m in adapter.subblock_modules(layer, "ffn"):
        for mod in m.modules():
            if mod is proj or not hasattr(mod, "bias") or mod.bias is None:
                continue
            if mod.bias.numel() == adapter.geometry.ffn_dim:
                count += 1
    return count


def _created_bias_params(adapter: Adapter, mask: PruneMask, layer: int) -> int:
    """Parameters surgery adds to fold a compensation bias into a projection that has none."""
    count = 0
    for name, kept, proj in (("attn_bias", mask.attn, adapter.head_output_proj),
                             ("ffn_bias", mask.ffn_block, adapter.ffn_output_proj)):
        bias = getattr(mask, name, None)
        if bias is not None and kept[layer] > 0 and bool(bias[layer].any()) and proj(layer).bias is None:
            count += bias.shape[-1]
    return count


def cost(handle: ModelHandle, mask: PruneMask | None = None, seq_len: int = 512) -> Cost:
    """Parameters and per-token forward FLOPs, dense and under `mask`."""
    adapter, g = handle.adapter, handle.geometry
    mask = (mask or PruneMask.dense(g)).normalized()
    total = sum(p.numel() for p in handle.model.parameters())
    removed = 0
    flops_dense = flops_kept = 0
    head = adapter.lm_head()
    lm_flops = 2 * g.hidden * g.vocab_size if head is not None else 0
    for layer in range(g.n_layers):
        s = _layer_unit_sizes(adapter, layer)
        heads_kept = mask.heads[layer] > 0
        n_q = int(heads_kept.sum())
        kv_kept = heads_kept.view(g.n_kv_heads, g.group_size).any(dim=1)
        n_kv = int(kv_kept.sum())
        n_ch = int((mask.ffn[layer] > 0).sum())
        attn_flops = lambda q, kv: 2 * (q * s["q"] + kv * s["kv"]) + 4 * seq_len * g.head_dim * q  # noqa: E731
        ffn_flops = lambda c: 2 * c * s["ch"]  # noqa: E731
        flops_dense += attn_flops(g.n_heads, g.n_kv_heads) + ffn_flops(g.ffn_dim)
        if mask.attn[layer] == 0:
            removed += s["attn_total"]
        else:
            removed += (g.n_heads - n_q) * s["q"] + (g.n_kv_heads - n_kv) * s["kv"]
            flops_kept += attn_flops(n_q, n_kv)
        if mask.ffn_block[layer] == 0:
            removed += s["ffn_total"]
        else:
            removed += (g.ffn_dim - n_ch) * s["ch"]
            flops_kept += ffn_flops(n_ch)
        if mask.attn[layer] == 0 and mask.ffn_block[layer] == 0:
            removed += _numel([adapter.layers()[layer]]) - s["attn_total"] - s["ffn_total"]
        removed -= _created_bias_params(adapter, mask, layer)
    return Cost(total, total - removed, flops_dense + lm_flops, flops_kept + lm_flops)
