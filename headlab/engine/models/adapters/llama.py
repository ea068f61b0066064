"""Llama-style decoders: q/k/v/o_proj with grouped-query attention, gated FFN.

Covers Llama, Mistral, Qwen2 and SmolLM (all `LlamaDecoderLayer`-shaped: pre-RMSNorm,
`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`). Their layers also run through the
masked kernels (`sparse_layer_forward`), compact from each projection to the next, sliding-window
layers (Mistral's, Qwen2's) included. A family with the same module names and a few more steps per
layer (Gemma 3: q/k norms, norms after each sub-block, rotary per layer type) subclasses this one and
overrides the small step methods (`_ffn_norm`, `_sub_out`, `_qk_norm`, `_layer_pos`, `_rotary`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from headlab.engine.core.adapter import (
    Adapter,
    FFNOverride,
    Geometry,
    HeadChooser,
    HeadWeights,
    SparseAttention,
    SparseFFN,
    SparseLayer,
    SubBlock,
)
from headlab.engine.core.reshape import GatheredHeads, RemovedSubBlock, add_bias_, is_removed, slice_in_, slice_out_

__all__ = ["LlamaAdapter"]


def _runs(sorted_heads: list[int]) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive heads: [0, 1, 2, 5, 7, 8] -> [(0, 3), (5, 6), (7, 9)]."""
    runs: list[tuple[int, int]] = []
    for h in sorted_heads:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    config_decouples_heads = True

    def _geometry(self, config: Any) -> Geometry:
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return Geometry(
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            hidden=config.hidden_size,
            ffn_dim=config.intermediate_size,
            causal=True,
            vocab_size=config.vocab_size,
        )

    @property
    def _base(self) -> nn.Module:
        return getattr(self.model, "model", self.model)

    def layers(self) -> nn.ModuleList:
        return self._base.layers

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].self_attn

    def head_output_proj(self, layer: int) -> nn.Module:
        return self.attention(layer).o_proj

    def ffn_output_proj(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp.down_proj

    def subblock(self, layer: int, kind: str) -> SubBlock:
        block = self.layers()[layer]
        if kind == "attn":
            return SubBlock(block.self_attn, residual_inclusive=False)
        if kind == "ffn":
            return SubBlock(block.mlp, residual_inclusive=False)
        raise ValueError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")

    def subblock_modules(self, layer: int, kind: str) -> list[nn.Module]:
        block = self.layers()[layer]
        return [block.self_attn] if kind == "attn" else [block.mlp]

    def head_weights(self, layer: int) -> HeadWeights:
        g, attn = self.geometry, self.attention(layer)
        hd, d = g.head_dim, g.hidden

        def bias(lin: nn.Linear, n: int) -> torch.Tensor | None:
            return None if lin.bias is None else lin.bias.view(n, hd)

        return HeadWeights(
            q=attn.q_proj.weight.view(g.n_heads, hd, d),
            k=attn.k_proj.weight.view(g.n_kv_heads, hd, d),
            v=attn.v_proj.weight.view(g.n_kv_heads, hd, d),
            o=attn.o_proj.weight.view(d, g.n_heads, hd).permute(1, 0, 2),  # (H, d, hd)
            q_bias=bias(attn.q_proj, g.n_heads),
            k_bias=bias(attn.k_proj, g.n_kv_heads),
            v_bias=bias(attn.v_proj, g.n_kv_heads),
        )

    def ffn_weights(self, layer: int) -> dict[str, torch.Tensor]:
        mlp = self.layers()[layer].mlp
        return {"up": mlp.up_proj.weight, "gate": mlp.gate_proj.weight, "down": mlp.down_proj.weight}

    def projections(self, layer: int) -> dict[str, nn.Linear]:
        block = self.layers()[layer]
        attn, mlp = block.self_attn, block.mlp
        maps = {} if is_removed(attn) else {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
        return maps | ({} if is_removed(mlp) else {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj})

    def sublayer_norm(self, layer: int, kind: str) -> nn.Module:
        block = self.layers()[layer]
        if kind not in ("attn", "ffn"):
            raise ValueError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")
        return block.input_layernorm if kind == "attn" else block.post_attention_layernorm

    def ffn_activation(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layers()[layer].mlp.act_fn

    def final_norm(self) -> nn.Module | None:
        return self._base.norm

    def lm_head(self) -> nn.Module | None:
        return getattr(self.model, "lm_head", None)

    def input_embeddings(self) -> nn.Embedding:
        return self._base.embed_tokens

    # --- the steps of a layer that differ between the families this class covers -----------
    def _ffn_norm(self, block: nn.Module) -> nn.Module:
        """The norm in front of the FFN sub-block."""
        return block.post_attention_layernorm

    def _sub_out(self, block: nn.Module, kind: str, out: torch.Tensor) -> torch.Tensor:
        """What the layer adds to the residual stream from its `kind` sub-block's output (Llama: the output)."""
        return out

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys [B, heads, T, hd] after any per-head norm the family applies before rotary."""
        return q, k

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """What every layer needs to place positions 0..T-1 (Llama: one (cos, sin) pair)."""
        return self._base.rotary_emb(x, position_ids)

    def _layer_pos(self, layer: int, pos: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) of `layer` from what `_rotary` returned."""
        return pos

    def attention_window(self, layer: int) -> int | None:
        """The tokens a query of `layer` attends to, itself included (a sliding window); None: every earlier one."""
        cfg = self.model.config
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types:
            return window if types[layer] == "sliding_attention" else None
        return window  # Mistral: one window for every layer (None without one)

    def attention_qk(
        self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block, attn = self.layers()[layer], self.attention(layer)
        x = block.input_layernorm(hidden)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        q, k = self._qk_norm(attn, q, k)
        q, k = apply_rotary_pos_emb(q, k, *self._layer_pos(layer, self._rotary(x, position_ids)))
        return q * attn.scaling, k

    # --- the kernel path (headlab.engine.runtime.sparse_forward) ----------------------------------
    def sparse_refusal(self) -> str | None:
        cfg, g = self.model.config, self.geometry
        types = list(getattr(cfg, "layer_types", None) or [])
        other = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if other:
            return f"layer types {other} are not the causal (full or sliding-window) attention the kernels compute"
        if getattr(self._base, "rotary_emb", None) is None:
            return "the model has no rotary embedding module (model.rotary_emb) to place positions"
        expected = {"heads": g.n_heads, "kv_heads": g.n_kv_heads, "ffn": g.ffn_dim, "kv_index": None,
                    "attn": True, "ffn_block": True}
        for layer in range(g.n_layers):
            sizes = self.layer_sizes(layer)
            changed = {k: sizes[k] for k, v in expected.items() if sizes[k] != v}
            if changed:
                return (f"layer {layer} was physically pruned ({changed}), and the kernel path needs every layer "
                        f"at the sizes masks are shaped by ({g.n_heads} heads, {g.n_kv_heads} KV heads, "
                        f"{g.ffn_dim} FFN channels, both sub-blocks)")
        return None

    def sparse_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x = self.input_embeddings()(input_ids)  # (B, T, d)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # (1, T)
        return x, self._rotary(x, position_ids)  # Llama: (cos, sin), each (1, T, head_dim)

    def sparse_layer_forward(
        self, layer: int, x: torch.Tensor, keep: SparseLayer, pos: Any, backend: str
    ) -> torch.Tensor:
        block = self.layers()[layer]
        if keep.attn is not None:
            a = self._sparse_attention(layer, block.self_attn, block.input_layernorm(x), keep.attn, pos, backend)
            x = x + self._sub_out(block, "attn", a)
        if keep.ffn is not None:
            f = self._sparse_ffn(block.mlp, self._ffn_norm(block)(x), keep.ffn, backend)
            x = x + self._sub_out(block, "ffn", f)
        return x

    def _sparse_attention(self, layer: int, attn: nn.Module, x: torch.Tensor, keep: SparseAttention, pos: Any,
                          backend: str) -> torch.Tensor:
        """Kept heads only, compact from the Q/K/V projections through rotary and attention to the O projection."""
        B, T, _ = x.shape
        hd = self.geometry.head_dim
        q = keep.q.rows(x, attn.q_proj.weight, attn.q_proj.bias, backend=backend)  # (B, T, nq * hd)
        k = keep.kv.rows(x, attn.k_proj.weight, attn.k_proj.bias, backend=backend)  # (B, T, nkv * hd)
        v = keep.kv.rows(x, attn.v_proj.weight, attn.v_proj.bias, backend=backend)
        q = q.view(B, T, -1, hd).transpose(1, 2)  # (B, nq, T, hd)
        k = k.view(B, T, -1, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, -1, hd).transpose(1, 2)
        q, k = self._qk_norm(attn, q, k)  # per head: the same on the kept heads as on all
        q, k = apply_rotary_pos_emb(q, k, *self._layer_pos(layer, pos))
        o = keep.heads.attend(q, k, v, scale=attn.scaling, window=self.attention_window(layer),
                              backend=backend)  # (B, T, nq * hd)
        return keep.finish(keep.q.cols(o, attn.o_proj.weight, attn.o_proj.bias, backend=backend))  # (B, T, d)

    def _sparse_ffn(self, mlp: nn.Module, x: torch.Tensor, keep: SparseFFN, backend: str) -> torch.Tensor:
        """Kept channels only: gate and up compute them, down reads them."""
        ch = keep.channels
        gate = ch.rows(x, mlp.gate_proj.weight, mlp.gate_proj.bias, backend=backend)  # (B, T, kept channels)
        up = ch.rows(x, mlp.up_proj.weight, mlp.up_proj.bias, backend=backend)
        return keep.finish(ch.cols(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias, backend=backend))

    # --- batch-1 decoding with the KV cache (headlab.engine.dynamic.decode) -------------------------
    def decode_refusal(self) -> str | None:
        if self.lm_head() is None:
            return "the model has no LM head to pick the next token"
        # The same limits as the kernel path: one query token attends to its layer's whole cache, unmasked
        # (DynamicCache(config=...) keeps a sliding-window layer's last window - 1 tokens only).
        return self.sparse_refusal()

    def decode_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def decode_token(self, token: torch.Tensor, position: int, cache: DynamicCache,
                     ffn: FFNOverride | None, heads: HeadChooser | None = None) -> torch.Tensor:
        x = self.input_embeddings()(token)  # (1, 1, d)
        rotary = self._rotary(x, torch.tensor([[position]], device=token.device))
        for layer, block in enumerate(self.layers()):
            pos = self._layer_pos(layer, rotary)  # (cos, sin)
            a_in = block.input_layernorm(x)
            kept = None if heads is None else heads(layer, a_in)
            if kept is None:
                # A single query sees every cached key: no mask (a sliding-window layer's cache holds only the
                # window); the module appends this token's K/V to the cache.
                a, _ = block.self_attn(hidden_states=a_in, position_embeddings=pos, attention_mask=None, cache=cache)
            else:
                a = self._decode_attention(layer, block.self_attn, a_in, kept, pos, cache)
            x = x + self._sub_out(block, "attn", a)
            h = self._ffn_norm(block)(x)
            x = x + self._sub_out(block, "ffn", block.mlp(h) if ffn is None else ffn(layer, h))
        return self.lm_head()(self._base.norm(x))[:, -1]  # (1, V)

    def _decode_attention(self, layer: int, attn: nn.Module, x: torch.Tensor, kept: torch.Tensor, pos: Any,
                          cache: DynamicCache) -> torch.Tensor:
        """One token's attention [1, 1, d] reading the Q rows and O columns of the `kept` query heads only.

        Keys and values are computed for every KV head and appended to the cache, so later tokens see the
        exact cache whatever this one kept; no kept head means no attention output (the sub-block rule).
        """
        g = self.geometry
        hd = g.head_dim
        k = attn.k_proj(x).view(1, 1, -1, hd).transpose(1, 2)  # (1, H_kv, 1, hd)
        v = attn.v_proj(x).view(1, 1, -1, hd).transpose(1, 2)
        _, k = self._qk_norm(attn, k, k)
        runs = _runs(kept.tolist())  # consecutive kept heads: one contiguous block of rows each
        if not runs:
            _, k = apply_rotary_pos_emb(k, k, *pos)
            cache.update(k, v, layer)
            return x.new_zeros(x.shape)
        wq, bq, wo = attn.q_proj.weight, attn.q_proj.bias, attn.o_proj.weight
        q = torch.cat([F.linear(x, wq[a * hd : b * hd], None if bq is None else bq[a * hd : b * hd])
                       for a, b in runs], dim=-1)  # (1, 1, n_kept * hd)
        q = q.view(1, 1, -1, hd).transpose(1, 2)  # (1, n_kept, 1, hd)
        q, _ = self._qk_norm(attn, q, q)
        q, k = apply_rotary_pos_emb(q, k, *pos)
        keys, values = cache.update(k, v, layer)  # (1, H_kv, T, hd)
        kv_head = kept.to(keys.device) // g.group_size  # the KV head each kept query head reads
        o = F.scaled_dot_product_attention(q, keys.index_select(1, kv_head), values.index_select(1, kv_head),
                                           scale=attn.scaling)  # (1, n_kept, 1, hd)
        o = o.transpose(1, 2).reshape(1, 1, -1)  # (1, 1, n_kept * hd), kept heads in order
        out, start = None, 0
        for a, b in runs:  # O columns of each run of kept heads
            n = (b - a) * hd
            part = F.linear(o[..., start : start + n], wo[:, a * hd : b * hd])
            out = part if out is None else out + part
            start += n
        return out if attn.o_proj.bias is None else out + attn.o_proj.bias

    # --- physical reshaping ---------------------------------------------------------------
    def resize_attention_(
        self, layer: int, q_heads: Sequence[int], kv_heads: Sequence[int], kv_index: Sequence[int] | None = None
    ) -> None:
        attn = self.attention(layer)
        n_q, n_kv = len(q_heads), len(kv_heads)
        if n_q == 0 or n_kv == 0 or (kv_index is None and n_q % n_kv):
            raise ValueError(f"layer {layer}: {n_q} query heads cannot share {n_kv} KV heads evenly")
        q, kv = self._head_rows(q_heads), self._head_rows(kv_heads)
        slice_out_(attn.q_proj, q)
        slice_in_(attn.o_proj, q)
        if kv_index is not None and len(kv_index) != n_q:
            raise ValueError(f"layer {layer}: kv_index needs one entry per query head ({n_q})")
        for name in ("k_proj", "v_proj"):
            proj = getattr(attn, name)
            if isinstance(proj, GatheredHeads):
                raise ValueError(f"layer {layer}: its K/V heads were already regrouped; prune the source model instead")
            slice_out_(proj, kv)
            if kv_index is not None:
                setattr(attn, name, GatheredHeads(proj, kv_index, self.geometry.head_dim))
        # repeat_kv expands each KV head to this many consecutive query heads.
        attn.num_key_value_groups = 1 if kv_index is not None else n_q // n_kv

    def resize_ffn_(self, layer: int, channels: Sequence[int]) -> None:
        mlp = self.layers()[layer].mlp
        slice_out_(mlp.gate_proj, channels)
        slice_out_(mlp.up_proj, channels)
        slice_in_(mlp.down_proj, channels)

    def remove_subblock_(self, layer: int, kind: str) -> None:
        block = self.layers()[layer]
        if kind == "attn":
            block.self_attn = RemovedSubBlock("attn", residual_inclusive=False, returns_tuple=True)
        elif kind == "ffn":
            block.mlp = RemovedSubBlock("ffn", residual_inclusive=False)
        else:
            raise ValueError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")

    def set_sizes_(self, n_heads: int, n_kv_heads: int, ffn_dim: int) -> None:
        cfg = self.model.config
        cfg.head_dim = self.geometry.head_dim  # explicit: hidden // heads no longer gives it
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = n_heads, n_kv_heads, ffn_dim
        self.geometry = self._geometry(cfg)

    # Llama's config switches biases on per group: attention_bias (q, k, v, o), mlp_bias (gate, up, down).
    # Mistral and Qwen2 give o_proj no switch, so only the llama model type has one.
    _BIAS_SWITCHES = {"attn": ("attention_bias", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                      "ffn": ("mlp_bias", "mlp", ("gate_proj", "up_proj", "down_proj"))}

    def can_switch_output_bias(self, kind: str) -> bool:
        return self.model.config.model_type == "llama" and hasattr(self.model.config, self._BIAS_SWITCHES[kind][0])

    def switch_on_output_bias_(self, kind: str) -> int:
        if not self.can_switch_output_bias(kind):
            return super().switch_on_output_bias_(kind)
        flag, owner, names = self._BIAS_SWITCHES[kind]
        added = 0
        for layer in self.layers():
            module = getattr(layer, owner)
            if is_removed(module):
                continue
            for name in names:
                proj = getattr(module, name)
                if proj.bias is None:
                    added += proj.out_features
                    add_bias_(proj, torch.zeros(proj.out_features))
        setattr(self.model.config, flag, True)
        return added

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self._base.layers = layers

    def layer_sizes(self, layer: int) -> dict[str, Any]:
        hd = self.geometry.head_dim
        attn_gone, ffn_gone = self.is_subblock_removed(layer, "attn"), self.is_subblock_removed(layer, "ffn")
        attn, mlp = self.attention(layer), self.layers()[layer].mlp
        return {
            "heads": 0 if attn_gone else attn.q_proj.out_features // hd,
            "kv_heads": 0 if attn_gone else attn.k_proj.out_features // hd,
            "kv_index": attn.k_proj.head_index.tolist() if not attn_gone and isinstance(attn.k_proj, GatheredHeads)
            else None,
            "ffn": 0 if ffn_gone else mlp.up_proj.out_features,
            "attn": not attn_gone,
            "ffn_block": not ffn_gone,
            "attn_out_bias": not attn_gone and attn.o_proj.bias is not None,
            "ffn_out_bias": not ffn_gone and mlp.down_proj.bias is not None,
        }
