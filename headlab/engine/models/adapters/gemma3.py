"""Gemma 3 text decoders (`gemma3_text`: Gemma3ForCausalLM), e.g. the shipped Gemma 3 270M.

Module names are Llama's (`model.layers[i].self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`model.embed_tokens`, `model.norm`), so this adapter is the Llama one with Gemma's steps:
- queries and keys go through per-head RMSNorms (`q_norm`, `k_norm`) before rotary;
- each sub-block's output goes through its own RMSNorm (`post_attention_layernorm`,
  `post_feedforward_layernorm`) before it joins the residual stream, and the FFN reads
  `pre_feedforward_layernorm` (four norms per layer);
- rotary tables per layer type: sliding-window layers (`layer_types`) use the local base, the
  full-attention layers the global one; sliding layers attend to the last `sliding_window` tokens;
- the embedding multiplies by sqrt(hidden) (Gemma3TextScaledWordEmbedding) and is tied to the LM head;
- GQA as in Llama (Gemma 3 270M: 4 query heads share 1 KV head of 256 dims).

Where the masks act: head h is its slice of the O-projection's input and channel c its column of
the down-projection's input, as in Llama; a removed sub-block's output is zero, so its post-norm
adds zero too. A compensation bias (FLAP) is added to the O / down output, before the post-norm
that a Gemma sub-block ends with (the gates, the kernels and surgery all agree on that place).
Because of that norm, a removed sub-block's mean cannot be folded into a neighbour's bias (the
sub-blocks are marked `output_normed`): a Gemma 3 layer whose heads are all pruned loses its
attention without compensation, and residual-target reconstruction (the depth stand-in) is refused.

What the family's config can say: `attention_bias` switches biases on for q/k/v/o together, so a
uniform export with a compensated attention keeps the standard config; the FFN has no bias switch,
so an FFN compensation bias is saved with per-layer sizes (headlab.engine.models.pruned reads it back).
Logit soft-capping (Gemma 2's) and bidirectional attention (EmbeddingGemma) are refused: the engine
reads logits as lm_head(norm(x)) and masks as causal.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from headlab.engine.core.adapter import Geometry, SubBlock, UnsupportedModelError
from headlab.engine.core.reshape import RemovedSubBlock
from headlab.engine.models.adapters.llama import LlamaAdapter

__all__ = ["Gemma3Adapter"]


class RemovedGemmaAttention(RemovedSubBlock):
    """A removed Gemma 3 attention: a zero output that still advances its KV-cache layer by the tokens it saw.

    Gemma 3 mixes sliding-window and full-attention layers, and the KV cache builds one layer per entry of
    `config.layer_types`, read by `layer_idx`; caches measure the sequence on their first layer and masks on
    the first layer of each type. So attention modules keep their own layer's index (renumbering them, as
    Llama does, would pair a full layer with a sliding cache), and a removed one writes zero heads into its
    cache layer, which still counts the tokens.
    """

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__("attn", residual_inclusive=False, returns_tuple=True)
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            x = args[0] if args else kwargs["hidden_states"]
            empty = x.new_zeros(x.shape[0], 0, x.shape[1], self.head_dim)  # (B, 0 heads, T, hd)
            cache.update(empty, empty, self.layer_idx)
        return super().forward(*args, **kwargs)


class Gemma3Adapter(LlamaAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    config_decouples_heads = True

    def _geometry(self, config: Any) -> Geometry:
        for key, what in (("final_logit_softcapping", "soft-caps its logits"),
                          ("attn_logit_softcapping", "soft-caps its attention logits")):
            if getattr(config, key, None) is not None:
                raise UnsupportedModelError(
                    f"gemma3: this model {what} ({key}={getattr(config, key)}), which the engine does not "
                    f"reproduce outside the model's own forward (logits as lm_head(norm(x)), kernels without a cap)")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("gemma3: use_bidirectional_attention is set (an encoder such as "
                                        "EmbeddingGemma); the engine supports the causal Gemma 3 decoders")
        return super()._geometry(config)

    # --- Gemma's steps of a layer (see LlamaAdapter) -----------------------------------------
    def subblock(self, layer: int, kind: str) -> SubBlock:
        """Llama's sub-blocks, marked: each output is normalised (post-norm) before it joins the stream."""
        return replace(super().subblock(layer, kind), output_normed=True)

    def _ffn_norm(self, block: nn.Module) -> nn.Module:
        return block.pre_feedforward_layernorm

    def sublayer_norm(self, layer: int, kind: str) -> nn.Module:
        """Gemma's norm in front of a sub-block: input_layernorm (attention), pre_feedforward_layernorm (FFN)."""
        if kind == "ffn":
            return self.layers()[layer].pre_feedforward_layernorm
        return super().sublayer_norm(layer, kind)

    def _sub_out(self, block: nn.Module, kind: str, out: torch.Tensor) -> torch.Tensor:
        norm = block.post_attention_layernorm if kind == "attn" else block.post_feedforward_layernorm
        return norm(out)

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.q_norm(q), attn.k_norm(k)

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per layer type: the local and the global rotary base."""
        return {t: self._base.rotary_emb(x, position_ids, t) for t in set(self.model.config.layer_types)}

    def _layer_pos(self, layer: int, pos: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return pos[self.model.config.layer_types[layer]]

    # --- the kernel path ------------------------------------------------------------------
    def sparse_refusal(self) -> str | None:
        types = getattr(self.model.config, "layer_types", None)
        if not types or len(types) != len(self.layers()):
            return "the config has no layer_types entry per layer, which says each layer's attention and rotary"
        return super().sparse_refusal()

    # --- physical reshaping ----------------------------------------------------------------
    def can_switch_output_bias(self, kind: str) -> bool:
        # Gemma3Attention: q/k/v/o_proj all take bias=config.attention_bias; Gemma3MLP has no bias at all.
        return kind == "attn" and hasattr(self.model.config, "attention_bias")

    def remove_subblock_(self, layer: int, kind: str) -> None:
        if kind != "attn":
            return super().remove_subblock_(layer, kind)
        block = self.layers()[layer]
        block.self_attn = RemovedGemmaAttention(block.self_attn.layer_idx, self.geometry.head_dim)

    def renumber_cache_layers_(self) -> None:
        """Each attention, kept or removed, reads the cache layer of its own position (see RemovedGemmaAttention)."""
        for i, block in enumerate(self.layers()):
            block.self_attn.layer_idx = i
