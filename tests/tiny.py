"""Tiny random models of each supported family, built offline from configs."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from headlab.engine.models.load import ModelHandle
from headlab.engine.models.wrap import wrap_model

__all__ = ["TINY_FAMILIES", "tiny_model", "tiny_tokenizer", "tiny_handle", "save_tiny", "VOCAB"]

TINY_FAMILIES = ("gpt2", "bert", "llama", "qwen2", "gemma3")
VOCAB = 260  # 256 bytes + specials


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte): no files, no download."""
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_unicode))}
    for name in ("<pad>", "<eos>", "<bos>", "<unk>"):
        vocab[name] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, bos_token_id=258, eos_token_id=257,
                         **common)
        model = GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                         max_position_embeddings=128, **common)
        model = BertModel(cfg, add_pooling_layer=False)
    elif family == "llama":
        cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                          intermediate_size=128, max_position_embeddings=128, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                          intermediate_size=128, max_position_embeddings=128, **common)
        model = Qwen2ForCausalLM(cfg)
    elif family == "gemma3":
        # Gemma 3's shape in small: a sliding-window layer (window 8, shorter than most test inputs) then a
        # global one, GQA, head_dim decoupled from hidden / heads, q/k norms, the sqrt(hidden) embedding scale.
        cfg = Gemma3TextConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                               hidden_size=64, intermediate_size=128, max_position_embeddings=128, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=20,
                               pad_token_id=256, eos_token_id=257, bos_token_id=258, **common)
        model = Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # Gemma's RMSNorms scale by 1 + weight, initialised at 0: make every norm matter
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.3)
    else:
        raise ValueError(family)
    return finish_tiny(model)


def finish_tiny(model: torch.nn.Module) -> torch.nn.Module:
    """Eager attention, every bias non-zero (random init leaves some at exactly zero, so bias handling is
    tested), eval mode: what every tiny test model gets."""
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def tiny_handle(family: str, seed: int = 0) -> ModelHandle:
    return wrap_model(tiny_model(family, seed), tiny_tokenizer(), name=f"tiny-{family}")


def save_tiny(folder: str | Path, family: str = "llama", *, model: torch.nn.Module | None = None,
              context: int | None = None) -> Path:
    """A tiny random model of `family` (or `model`) saved as a Hugging Face folder: safetensors + tokenizer."""
    model = tiny_model(family) if model is None else model
    if context is not None:
        model.config.max_position_embeddings = context  # rotary positions: any length the config allows
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)
