"""GPT-2: fused `c_attn` Conv1D (weight [in, 3 * hidden]), `c_proj`, pre-LN blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.adapters.base import Adapter, Geometry, HeadWeights, SubBlock

__all__ = ["GPT2Adapter"]


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)

    def _geometry(self, config: Any) -> Geometry:
        return Geometry(
            n_layers=config.n_layer,
            n_heads=config.n_head,
            n_kv_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            hidden=config.n_embd,
            ffn_dim=config.n_inner or 4 * config.n_embd,
            causal=True,
            vocab_size=config.vocab_size,
        )

    @property
    def _base(self) -> nn.Module:
        return getattr(self.model, "transformer", self.model)

    def layers(self) -> nn.ModuleList:
        return self._base.h

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attn

    def head_output_proj(self, layer: int) -> nn.Module:
        return self.attention(layer).c_proj

    def ffn_output_proj(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp.c_proj

    def subblock(self, layer: int, kind: str) -> SubBlock:
        block = self.layers()[layer]
        if kind == "attn":
            return SubBlock(block.attn, residual_inclusive=False)
        if kind == "ffn":
            return SubBlock(block.mlp, residual_inclusive=False)
        raise ValueError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")

    def subblock_modules(self, layer: int, kind: str) -> list[nn.Module]:
        block = self.layers()[layer]
        return [block.attn] if kind == "attn" else [block.mlp]

    def head_weights(self, layer: int) -> HeadWeights:
        g, attn = self.geometry, self.attention(layer)
        H, hd, d = g.n_heads, g.head_dim, g.hidden
        # Conv1D stores [in, out]; transpose to the [out, in] orientation used everywhere.
        w = attn.c_attn.weight.t()  # (3d, d)
        b = attn.c_attn.bias.view(3, H, hd)
        q, k, v = (w[i * d : (i + 1) * d].view(H, hd, d) for i in range(3))
        return HeadWeights(
            q=q,
            k=k,
            v=v,
            o=attn.c_proj.weight.view(H, hd, d).permute(0, 2, 1),  # (H, d, hd)
            q_bias=b[0],
            k_bias=b[1],
            v_bias=b[2],
        )

    def ffn_weights(self, layer: int) -> dict[str, torch.Tensor]:
        mlp = self.layers()[layer].mlp
        return {"up": mlp.c_fc.weight.t(), "down": mlp.c_proj.weight.t()}

    def final_norm(self) -> nn.Module | None:
        return self._base.ln_f

    def lm_head(self) -> nn.Module | None:
        return getattr(self.model, "lm_head", None)

    def input_embeddings(self) -> nn.Embedding:
        return self._base.wte
