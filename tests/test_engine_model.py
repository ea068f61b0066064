"""Loading models: local folders, clear errors, the offline defaults."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from headlab.engine.core.tokens import EmptyTextError, encode_batch
from headlab.engine.models.adapters import UnsupportedModelError, adapter_for, supported_model_types
from headlab.engine.models.load import ModelLoadError, load_model
from tests.tiny import save_tiny, tiny_handle


@pytest.fixture
def tiny_llama_folder(tmp_path):
    return save_tiny(tmp_path / "m", "llama"), tiny_handle("llama")


def test_local_folder_loads_with_the_same_weights(tiny_llama_folder):
    folder, original = tiny_llama_folder
    loaded = load_model(str(folder))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, original.model(ids).logits, atol=1e-6)
    assert loaded.adapter.family == "llama" and loaded.geometry.n_kv_heads == 2
    assert loaded.model.config._attn_implementation == "eager"
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_unknown_architecture_names_the_supported_families(tmp_path):
    folder = tmp_path / "t5ish"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(UnsupportedModelError, match=r"unsupported architecture 't5'.*llama.*gpt2.*bert"):
        load_model(str(folder))


def test_adapter_for_refuses_an_unknown_model():
    model = AutoModelForCausalLM.from_config(
        __import__("transformers").OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                                             vocab_size=50, max_position_embeddings=32, word_embed_proj_dim=16)
    )
    with pytest.raises(UnsupportedModelError, match="supported families"):
        adapter_for(model)
    assert {"llama", "mistral", "qwen2", "gpt2", "bert"} <= set(supported_model_types())


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a known alias"):
        load_model(str(tmp_path / "nope"))


def test_truncated_safetensors_is_a_clear_error(tiny_llama_folder):
    folder, _ = tiny_llama_folder
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated|cannot load"):
        load_model(str(folder))


def test_pickle_only_checkpoints_are_refused(tiny_llama_folder):
    folder, h = tiny_llama_folder
    (folder / "model.safetensors").unlink()
    torch.save(h.model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(folder))


def test_empty_text_is_a_clear_error():
    tok = tiny_handle("llama").tokenizer
    with pytest.raises(EmptyTextError, match="empty"):
        encode_batch(tok, ["fine", "   "], 16)
    with pytest.raises(EmptyTextError):
        encode_batch(tok, [], 16)
