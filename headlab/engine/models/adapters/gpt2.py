"""GPT-2: fused `c_attn` Conv1D (weight [in, 3 * hidden]), `c_proj`, pre-LN blocks."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from headlab.engine.core.adapter import Adapter, Geometry, HeadWeights, SubBlock
from headlab.engine.core.reshape import RemovedSubBlock, slice_in_, slice_out_

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

    def attention_qk(
        self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Positions are already in `hidden` (learned position embeddings): position_ids is unused.
        attn = self.attention(layer)
        x = self.layers()[layer].ln_1(hidden)
        B, T, _ = x.shape
        q, k, _ = attn.c_attn(x).split(attn.split_size, dim=2)  # each (B, T, H * hd)
        q = q.view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, hd)
        return q * attn.scaling, k

    # --- physical reshaping ---------------------------------------------------------------
    def resize_attention_(
        self, layer: int, q_heads: Sequence[int], kv_heads: Sequence[int], kv_index: Sequence[int] | None = None
    ) -> None:
        if list(q_heads) != list(kv_heads) or not q_heads or kv_index is not None:
            raise ValueError(f"layer {layer}: GPT-2 keeps one K/V head per query head (got {q_heads} / {kv_heads})")
        attn = self.attention(layer)
        rows, width = self._head_rows(q_heads), attn.split_size
        # c_attn's output is [q | k | v], each `split_size` wide.
        slice_out_(attn.c_attn, torch.cat([rows, rows + width, rows + 2 * width]))
        slice_in_(attn.c_proj, rows)
        attn.num_heads = len(q_heads)
        attn.split_size = len(q_heads) * self.geometry.head_dim

    def resize_ffn_(self, layer: int, channels: Sequence[int]) -> None:
        mlp = self.layers()[layer].mlp
        slice_out_(mlp.c_fc, channels)
        slice_in_(mlp.c_proj, channels)

    def remove_subblock_(self, layer: int, kind: str) -> None:
        block = self.layers()[layer]
        if kind == "attn":
            block.attn = RemovedSubBlock("attn", residual_inclusive=False, returns_tuple=True)
        elif kind == "ffn":
            block.mlp = RemovedSubBlock("ffn", residual_inclusive=False)
        else:
            raise ValueError(f"sub-block kind must be 'attn' or 'ffn', got {kind!r}")

    def set_sizes_(self, n_heads: int, n_kv_heads: int, ffn_dim: int) -> None:
        g, cfg = self.geometry, self.model.config
        if n_heads != g.n_heads or n_kv_heads != g.n_kv_heads:
            raise ValueError("a GPT-2 config cannot state fewer heads than hidden / head_dim")
        cfg.n_inner = ffn_dim
        self.geometry = self._geometry(cfg)

    def keep_layers_(self, keep: Sequence[int]) -> None:
        if getattr(self.model.config, "scale_attn_by_inverse_layer_idx", False):
            # The scale depends on the layer's position, which dropping layers changes.
            raise ValueError("this GPT-2 scales attention by layer index: layers cannot be dropped")
        super().keep_layers_(keep)

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self._base.h = layers

    def layer_sizes(self, layer: int) -> dict[str, Any]:
        hd = self.geometry.head_dim
        attn_gone, ffn_gone = self.is_subblock_removed(layer, "attn"), self.is_subblock_removed(layer, "ffn")
        attn, mlp = self.attention(layer), self.layers()[layer].mlp
        return {
            "heads": 0 if attn_gone else attn.c_attn.nf // 3 // hd,
            "kv_heads": 0 if attn_gone else attn.c_attn.nf // 3 // hd,
            "ffn": 0 if ffn_gone else mlp.c_fc.nf,
            "attn": not attn_gone,
            "ffn_block": not ffn_gone,
            "attn_out_bias": not attn_gone and attn.c_proj.bias is not None,
            "ffn_out_bias": not ffn_gone and mlp.c_proj.bias is not None,
        }
