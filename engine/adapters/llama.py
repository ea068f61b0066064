"""Llama-style decoders: q/k/v/o_proj with grouped-query attention, gated FFN.

Covers Llama, Mistral, Qwen2 and SmolLM (all `LlamaDecoderLayer`-shaped: pre-RMSNorm,
`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.adapters.base import Adapter, Geometry, HeadWeights, SubBlock

__all__ = ["LlamaAdapter"]


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")

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

    def final_norm(self) -> nn.Module | None:
        return self._base.norm

    def lm_head(self) -> nn.Module | None:
        return getattr(self.model, "lm_head", None)

    def input_embeddings(self) -> nn.Embedding:
        return self._base.embed_tokens
