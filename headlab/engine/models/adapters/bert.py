"""BERT encoders: `attention.self.{query,key,value}`, `attention.output.dense`, post-LN.

Post-LN means each sub-block's output already contains the residual stream
(`LayerNorm(dense(x) + residual)`); removing a sub-block passes its residual input through.
The shipped all-MiniLM-L6-v2 sentence encoder is a real model of this family.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from headlab.engine.core.adapter import Adapter, Geometry, HeadWeights, SubBlock
from headlab.engine.core.reshape import RemovedSubBlock, slice_in_, slice_out_

__all__ = ["BertAdapter"]


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _second_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[1] if len(args) > 1 else kwargs["input_tensor"]


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert",)

    def _geometry(self, config: Any) -> Geometry:
        return Geometry(
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_attention_heads,
            head_dim=config.hidden_size // config.num_attention_heads,
            hidden=config.hidden_size,
            ffn_dim=config.intermediate_size,
            causal=False,
            vocab_size=config.vocab_size,
        )

    @property
    def _base(self) -> nn.Module:
        return getattr(self.model, "bert", self.model)

    def layers(self) -> nn.ModuleList:
        return self._base.encoder.layer

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attention.self

    def head_output_proj(self, layer: int) -> nn.Module:
        return self.layers()[layer].attention.output.dense

    def ffn_output_proj(self, layer: int) -> nn.Module:
        return self.layers()[layer].output.dense

    def subblock(self, layer: int, kind: str) -> SubBlock:
        block = self.layers()[layer]
        if kind == "attn":
            return SubBlock(block.attention, residual_inclusive=True, residual_input=_first_arg)
        if kind == "ffn":
            return SubBlock(block.output, residual_inclusive=True, residual_input=_second_arg)
        raise ValueError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")

    def subblock_modules(self, layer: int, kind: str) -> list[nn.Module]:
        block = self.layers()[layer]
        return [block.attention] if kind == "attn" else [block.intermediate, block.output]

    def head_weights(self, layer: int) -> HeadWeights:
        g, attn = self.geometry, self.attention(layer)
        H, hd, d = g.n_heads, g.head_dim, g.hidden
        out = self.head_output_proj(layer)
        return HeadWeights(
            q=attn.query.weight.view(H, hd, d),
            k=attn.key.weight.view(H, hd, d),
            v=attn.value.weight.view(H, hd, d),
            o=out.weight.view(d, H, hd).permute(1, 0, 2),  # (H, d, hd)
            q_bias=attn.query.bias.view(H, hd),
            k_bias=attn.key.bias.view(H, hd),
            v_bias=attn.value.bias.view(H, hd),
        )

    def ffn_weights(self, layer: int) -> dict[str, torch.Tensor]:
        block = self.layers()[layer]
        return {"up": block.intermediate.dense.weight, "down": block.output.dense.weight}

    def final_norm(self) -> nn.Module | None:
        return None

    def lm_head(self) -> nn.Module | None:
        cls = getattr(self.model, "cls", None)
        return cls if cls is not None else None

    def input_embeddings(self) -> nn.Embedding:
        return self._base.embeddings.word_embeddings

    def attention_qk(
        self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Post-LN: the self-attention reads the layer input as is; positions are in the embeddings.
        attn = self.attention(layer)
        B, T, _ = hidden.shape
        hd = attn.attention_head_size
        q = attn.query(hidden).view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = attn.key(hidden).view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        return q * attn.scaling, k

    # --- physical reshaping ---------------------------------------------------------------
    def resize_attention_(
        self, layer: int, q_heads: Sequence[int], kv_heads: Sequence[int], kv_index: Sequence[int] | None = None
    ) -> None:
        if list(q_heads) != list(kv_heads) or not q_heads or kv_index is not None:
            raise ValueError(f"layer {layer}: BERT keeps one K/V head per query head (got {q_heads} / {kv_heads})")
        attn, rows = self.attention(layer), self._head_rows(q_heads)
        for proj in (attn.query, attn.key, attn.value):
            slice_out_(proj, rows)
        slice_in_(self.head_output_proj(layer), rows)
        attn.num_attention_heads = len(q_heads)
        attn.all_head_size = len(q_heads) * self.geometry.head_dim

    def resize_ffn_(self, layer: int, channels: Sequence[int]) -> None:
        block = self.layers()[layer]
        slice_out_(block.intermediate.dense, channels)
        slice_in_(block.output.dense, channels)

    def remove_subblock_(self, layer: int, kind: str) -> None:
        block = self.layers()[layer]
        if kind == "attn":
            block.attention = RemovedSubBlock("attn", residual_inclusive=True, residual_input=_first_arg,
                                              returns_tuple=True)
        elif kind == "ffn":
            # The output stand-in ignores the intermediate activations, so skip computing them.
            block.intermediate = nn.Identity()
            block.output = RemovedSubBlock("ffn", residual_inclusive=True, residual_input=_second_arg)
        else:
            raise ValueError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")

    def set_sizes_(self, n_heads: int, n_kv_heads: int, ffn_dim: int) -> None:
        g, cfg = self.geometry, self.model.config
        if n_heads != g.n_heads or n_kv_heads != g.n_kv_heads:
            raise ValueError("a BERT config cannot state fewer heads than hidden / head size")
        cfg.intermediate_size = ffn_dim
        self.geometry = self._geometry(cfg)

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self._base.encoder.layer = layers

    def drop_unsaved_optional_(self, saved_keys: set[str]) -> None:
        # BertModel builds a pooler by default; a model saved without one must not get a random one.
        base = self._base
        if getattr(base, "pooler", None) is not None:
            prefix = "pooler." if base is self.model else "bert.pooler."
            if not any(k.startswith(prefix) for k in saved_keys):
                base.pooler = None

    def layer_sizes(self, layer: int) -> dict[str, Any]:
        hd = self.geometry.head_dim
        attn_gone, ffn_gone = self.is_subblock_removed(layer, "attn"), self.is_subblock_removed(layer, "ffn")
        block = self.layers()[layer]
        return {
            "heads": 0 if attn_gone else self.attention(layer).query.out_features // hd,
            "kv_heads": 0 if attn_gone else self.attention(layer).query.out_features // hd,
            "ffn": 0 if ffn_gone else block.intermediate.dense.out_features,
            "attn": not attn_gone,
            "ffn_block": not ffn_gone,
            "attn_out_bias": not attn_gone and self.head_output_proj(layer).bias is not None,
            "ffn_out_bias": not ffn_gone and block.output.dense.bias is not None,
        }
