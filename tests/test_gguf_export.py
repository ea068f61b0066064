"""GGUF export: the file, run the way llama.cpp runs it (tests/gguf_reference.py), gives the masked model's logits.

The oracle reads only the file; HeadLab's side is the masked shared model (gates, no surgery).
Real llama.cpp runs the same comparisons in `make test-deploy` (tests/deploy/).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.export.gguf import STAND_IN_FFN, GgufError, _regroup, write_gguf
from headlab.engine.export.surgery import prune
from headlab.engine.models.wrap import wrap_model
from tests.gguf_reference import gguf_logits
from tests.tiny import VOCAB, finish_tiny, tiny_handle, tiny_tokenizer

IDS = [5, 77, 130, 9, 200, 41, 3, 250, 18, 66, 91, 120]


@torch.no_grad()
def masked_logits(handle, mask: PruneMask) -> np.ndarray:
    ids = torch.tensor([IDS])
    with gates.apply(handle, mask.normalized()):
        return handle.model(ids).logits[0].double().numpy()


def export_and_run(handle, mask, tmp_path, out_type="f32"):
    info = write_gguf(prune(handle, mask), tmp_path / f"m-{out_type}.gguf", out_type)
    return info, gguf_logits(info.path, IDS)


def layout_masks(g) -> dict[str, PruneMask]:
    """One mask per layout the GGUF writer states differently (shared with tests/deploy, real llama.cpp)."""
    dense = PruneMask.dense(g)
    uniform = dense.clone()
    uniform.heads[:, 1] = 0  # the same head of every layer: llama.cpp's `llama` architecture
    uniform.heads[:, 3] = 0
    uniform.ffn[:, 64:] = 0
    uneven = dense.clone()
    uneven.heads[0, 0] = 0  # layer 0's groups keep 1 and 2 query heads
    uneven.ffn[1, :40] = 0
    no_attn = dense.clone().with_block(0, "attn", 0.0)
    no_ffn = dense.clone().with_block(1, "ffn", 0.0)
    biased = uneven.clone()
    biased.attn_bias = torch.randn(g.n_layers, g.hidden, generator=torch.Generator().manual_seed(1)) * 0.05
    biased.ffn_bias = torch.randn(g.n_layers, g.hidden, generator=torch.Generator().manual_seed(2)) * 0.05
    uniform_biased = uniform.clone()
    uniform_biased.attn_bias, uniform_biased.ffn_bias = biased.attn_bias, biased.ffn_bias
    return {"dense": dense, "uniform": uniform, "uneven GQA": uneven, "attention removed": no_attn,
            "FFN removed": no_ffn, "output biases": biased, "uniform with output biases": uniform_biased}


@pytest.mark.parametrize("case", ["dense", "uniform", "uneven GQA", "attention removed", "FFN removed",
                                  "output biases", "uniform with output biases"])
def test_the_gguf_file_computes_the_masked_models_logits(case, tmp_path):
    h = tiny_handle("llama")
    mask = layout_masks(h.geometry)[case]
    info, got = export_and_run(h, mask, tmp_path)
    ref = masked_logits(h, mask)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert info.arch == ("llama" if case.startswith(("dense", "uniform")) else "deci")


def test_uneven_groups_are_regrouped_with_a_zero_query_head_and_the_cost_is_stated(tmp_path):
    h = tiny_handle("llama")  # 4 query heads in 2 groups of 2; layer 0 keeps groups of 1 and 2
    info, _ = export_and_run(h, layout_masks(h.geometry)["uneven GQA"], tmp_path)
    assert info.layers[0]["n_head"] == 4 and info.layers[0]["n_head_kv"] == 2
    assert info.layers[0]["zero_query_heads"] == 1 and info.layers[0]["duplicated_kv_heads"] == 0
    assert info.extra_params == 2 * 16 * 64  # one Q row block and one O column block, head_dim 16, hidden 64
    assert info.layers[1] == {"n_head": 4, "n_head_kv": 2, "n_ff": 88, "duplicated_kv_heads": 0,
                              "zero_ffn_channels": 0, "zero_attn_heads": 0, "zero_query_heads": 0}


def test_groups_of_one_and_four_get_a_kv_copy_and_a_zero_query(tmp_path):
    """GQA 8:2 keeping groups of 1 and 4: groups of 2 write the fewest extra heads (one copy of the big
    group's KV head, one zero query beside the lone query); the logits are the masked model's."""
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=128, max_position_embeddings=128, vocab_size=VOCAB)
    h = wrap_model(finish_tiny(LlamaForCausalLM(cfg)), tiny_tokenizer(), name="tiny-llama-8-2")
    mask = PruneMask.dense(h.geometry)
    mask.heads[0, 1:4] = 0  # KV head 0 keeps one query, KV head 1 all four
    info, got = export_and_run(h, mask, tmp_path)
    assert info.layers[0]["n_head"] == 6 and info.layers[0]["n_head_kv"] == 3
    assert info.layers[0]["duplicated_kv_heads"] == 1 and info.layers[0]["zero_query_heads"] == 1
    ref = masked_logits(h, mask)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_regroup_writes_the_fewest_extra_heads():
    assert _regroup([0, 0, 1, 1]) == ([0, 1, 2, 3], [0, 1], 2)
    # groups of 1 and 3: g=3 adds two zero queries, g=1 two KV copies; the tie goes to the larger group
    assert _regroup([1, 0, 1, 1]) == ([1, -1, -1, 0, 2, 3], [0, 1], 3)
    assert _regroup([0, 0, 1, 1, 1, 1]) == ([0, 1, 2, 3, 4, 5], [0, 1, 1], 2)
    assert _regroup([0, 1, 1, 1, 1]) == ([0, -1, 1, 2, 3, 4], [0, 1, 1], 2)
    assert _regroup([0, 0, 0, 1, 1, 1, 2, 2]) == ([0, 1, 2, 3, 4, 5, 6, 7, -1], [0, 1, 2], 3)


def test_a_layer_without_ffn_gets_a_zero_stand_in_that_deci_needs(tmp_path):
    h = tiny_handle("llama")
    info, _ = export_and_run(h, layout_masks(h.geometry)["FFN removed"], tmp_path)
    assert info.layers[1]["zero_ffn_channels"] == STAND_IN_FFN and info.layers[1]["n_ff"] == STAND_IN_FFN
    assert info.layers[0]["zero_ffn_channels"] == 0


def test_a_first_layer_without_attention_gets_a_zero_head_llama_cpp_needs(tmp_path):
    """llama.cpp reads the head size only when layer 0 has heads; a zero head there adds nothing."""
    h = tiny_handle("llama")
    info, _ = export_and_run(h, layout_masks(h.geometry)["attention removed"], tmp_path)
    assert info.layers[0]["zero_attn_heads"] == 1 and info.layers[0]["n_head"] == 1
    assert info.extra_params == 4 * 16 * 64


@pytest.mark.parametrize("out_type,tol", [("f16", 3e-2), ("bf16", 2e-1), ("q8_0", 2e-1)])
def test_half_and_8_bit_files_stay_close(out_type, tol, tmp_path):
    h = tiny_handle("llama")
    mask = layout_masks(h.geometry)["uneven GQA"]
    info, got = export_and_run(h, mask, tmp_path, out_type)
    ref = masked_logits(h, mask)
    assert np.abs(got - ref).max() < tol
    reader = gguf.GGUFReader(info.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    expected = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[out_type]
    assert types["blk.0.attn_q.weight"] == expected
    # layer 1 keeps 88 FFN channels, not a whole number of Q8_0 blocks of 32; layer 0's three heads of 16 are
    # written as four (a zero query fills the GQA group), 64 columns: whole blocks
    if out_type == "q8_0":
        assert types["blk.1.ffn_down.weight"] == "F16" and types["blk.0.attn_output.weight"] == "Q8_0"
        assert info.fallbacks == ["blk.1.ffn_down.weight (88 columns, not a multiple of 32)"]
    else:
        assert not info.fallbacks


def tiny_gemma3(query_pre_attn_scalar: int = 24):
    """Gemma 3 in small, as llama.cpp's gemma3 can state it: queries scaled by 1/sqrt(head size); three layers
    (sliding, full, sliding), so dropping one changes the sliding-window pattern the file must carry."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                           hidden_size=64, intermediate_size=128, max_position_embeddings=128, sliding_window=5,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           query_pre_attn_scalar=query_pre_attn_scalar, pad_token_id=256, eos_token_id=257,
                           bos_token_id=258, vocab_size=VOCAB)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # Gemma's RMSNorms scale by 1 + weight, initialised at 0: make every norm matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return wrap_model(finish_tiny(model), tiny_tokenizer(), name="tiny-gemma3")


def gemma3_masks(g) -> dict[str, PruneMask]:
    """The layouts llama.cpp's gemma3 states (shared with tests/deploy, real llama.cpp)."""
    dense = PruneMask.dense(g)
    uniform = dense.clone()
    uniform.heads[:, [1, 3]] = 0  # one query head of each GQA group, in every layer
    uniform.ffn[:, 64:] = 0
    depth = dense.clone().with_block(1, "attn", 0.0).with_block(1, "ffn", 0.0)  # the full-attention layer
    return {"dense": dense, "uniform": uniform, "depth": depth}


@pytest.mark.parametrize("case", ["dense", "uniform", "depth"])
def test_a_gemma3_gguf_computes_the_masked_models_logits(case, tmp_path):
    h = tiny_gemma3()
    mask = gemma3_masks(h.geometry)[case]
    info, got = export_and_run(h, mask, tmp_path)
    ref = masked_logits(h, mask)
    assert info.arch == "gemma3" and not info.extra_params
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    pattern = gguf.GGUFReader(info.path).fields["gemma3.attention.sliding_window_pattern"].contents()
    assert pattern == ([True, True] if case == "depth" else [True, False, True])


def test_what_gemma3_cannot_state_in_llama_cpp_is_refused_by_name(tmp_path):
    h = tiny_gemma3()
    per_layer = PruneMask.dense(h.geometry)
    per_layer.ffn[0, :32] = 0
    with pytest.raises(GgufError, match="one size for every layer"):
        write_gguf(prune(h, per_layer), tmp_path / "a.gguf", "f32")
    biased = gemma3_masks(h.geometry)["uniform"]
    biased.ffn_bias = torch.full((h.geometry.n_layers, h.geometry.hidden), 0.01)
    with pytest.raises(GgufError, match="no output biases"):
        write_gguf(prune(h, biased), tmp_path / "b.gguf", "f32")
    with pytest.raises(GgufError, match="query_pre_attn_scalar"):
        write_gguf(tiny_gemma3(query_pre_attn_scalar=20), tmp_path / "c.gguf", "f32")
    assert not list(tmp_path.iterdir()), "nothing is written for a refused model"


def test_the_tokenizer_is_written_as_llama_cpp_reads_it(tmp_path):
    h = tiny_handle("llama")
    info = write_gguf(h, tmp_path / "dense.gguf", "f32")
    fields = gguf.GGUFReader(info.path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # llama.cpp's name (src/llama-vocab.cpp)
    assert fields["tokenizer.ggml.merges"].contents() == ["\u0100 \u0100"]  # a merge that never fires
    assert len(tokens) == VOCAB and tokens[h.tokenizer.convert_tokens_to_ids("<eos>")] == "<eos>"
    assert types[h.tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert types[h.tokenizer.convert_tokens_to_ids("a")] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == h.tokenizer.eos_token_id


def test_what_llama_cpp_cannot_run_is_refused_by_name(tmp_path):
    with pytest.raises(GgufError, match="qwen2"):
        write_gguf(tiny_handle("qwen2"), tmp_path / "q.gguf")
    with pytest.raises(GgufError, match="q4_k"):
        write_gguf(tiny_handle("llama"), tmp_path / "x.gguf", "q4_k")
    h = tiny_handle("llama")
    pruned = prune(h, PruneMask.dense(h.geometry))
    with torch.no_grad():
        pruned.model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.ones(64))
    with pytest.raises(GgufError, match="layer 0 q projection has a non-zero bias"):
        write_gguf(pruned, tmp_path / "b.gguf")
    assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "x.gguf").exists()


def test_cli_writes_an_atomic_folder_with_the_file_a_modelfile_and_checksums(tmp_path, capsys):
    import json

    from headlab.cli import main
    from headlab.engine.models.pruned import verify_files
    from tests.tiny import save_tiny

    folder = save_tiny(tmp_path / "tiny-llama", "llama")
    h = tiny_handle("llama")
    mask_file = layout_masks(h.geometry)["uneven GQA"].save(tmp_path / "mask.json")
    out = tmp_path / "gguf-out"
    argv = ["export", "--model", str(folder), "--mask", str(mask_file), "--format", "gguf", "--gguf-type", "q8_0",
            "--no-eval", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "deci architecture, q8_0" in printed and "llama-quantize" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "gguf-out-q8_0.gguf", "headlab_manifest.json"]
    manifest = verify_files(out)  # every file's size and sha256
    assert manifest["gguf"]["arch"] == "deci" and manifest["params"]["added_for_llama_cpp"] == 2 * 16 * 64
    assert "FROM ./gguf-out-q8_0.gguf" in (out / "Modelfile").read_text()
    assert json.loads((out / "headlab_manifest.json").read_text())["format"] == "headlab.gguf_export"
    assert main(argv) == 2, "a second export into the same folder is refused unless --overwrite"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gguf-out")]  # no temporary folder left


@pytest.mark.parametrize("layout", ["per_layer", "uniform"])
def test_a_gguf_size_target_keeps_whole_blocks_and_even_groups_so_nothing_is_added(layout, tmp_path, capsys):
    """--keep with --format gguf --gguf-type q8_0: FFN widths in blocks of 32 and, per layer, GQA groups of
    equal size, chosen by the method at those counts; the file then needs no extra rows."""
    from headlab.cli import main
    from headlab.engine.models.pruned import verify_files
    from tests.tiny import save_tiny

    folder = save_tiny(tmp_path / "tiny-llama", "llama")  # 2 layers, 4 query heads in 2 groups, FFN 128
    out = tmp_path / "sized"
    assert main(["export", "--model", str(folder), "--keep", "0.75", "--route", "width", "--layout", layout,
                 "--format", "gguf", "--gguf-type", "q8_0", "--n-texts", "4", "--refit-texts", "4", "--no-eval",
                 "--save-mask", str(tmp_path / "mask.json"), "--out", str(out)]) == 0
    manifest = verify_files(out)
    assert manifest["params"]["added_for_llama_cpp"] == 0 and not manifest["gguf"]["fallbacks"]
    layers = manifest["gguf"]["layers"]
    assert all(lay["n_ff"] % 32 == 0 and lay["n_head"] % lay["n_head_kv"] == 0 for lay in layers)
    assert sum(lay["n_ff"] for lay in layers) < 2 * 128, "the size target removed FFN channels"
    if layout == "uniform":
        assert len({(lay["n_head"], lay["n_ff"]) for lay in layers}) == 1 and manifest["gguf"]["arch"] == "llama"


@pytest.mark.real_model
def test_the_shipped_smollm2_keeps_its_own_tokenizer_in_the_gguf(smollm, tmp_path):
    from headlab.engine.models.load import shipped_gguf

    info = write_gguf(smollm, tmp_path / "smollm2.gguf", "q8_0", tokenizer_gguf=shipped_gguf(smollm.name))
    ours, source = gguf.GGUFReader(info.path).fields, gguf.GGUFReader(shipped_gguf(smollm.name)).fields
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours[key].contents() == source[key].contents(), key
    assert ours["tokenizer.ggml.pre"].contents() == "smollm"
    assert info.arch == "llama" and not info.fallbacks and info.extra_params == 0


def test_a_k_quant_without_llama_cpp_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    from headlab.engine.export.deploy import export_gguf
    from headlab.engine.export.llama_cpp import LlamaCppMissing

    monkeypatch.setenv("HEADLAB_LLAMA_CPP", str(tmp_path / "no-build"))
    with pytest.raises(LlamaCppMissing, match="make llama-cpp"):
        export_gguf(tiny_handle("llama"), None, tmp_path / "out", "Q4_K_M", evaluate=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(GgufError, match="unknown GGUF type"):
        export_gguf(tiny_handle("llama"), None, tmp_path / "out", "q3", evaluate=False)
