"""GGUF exports run in real llama.cpp (`make test-deploy`): its perplexity equals HeadLab's on the same tokens.

llama.cpp tokenizes a text (llama-tokenize) and scores the second half of each chunk
(llama-perplexity); HeadLab computes that protocol on the masked source model with the very token
ids llama.cpp used (headlab.engine.runtime.half_window). Tolerances: f32 files 1e-4 relative
(summation order only), the shipped SmolLM2 at f32 1e-3 (30 layers of float32 in two orders), at
q8_0 1% (the bound set for a quantised deployment).

Collected only when HEADLAB_DEPLOY=1 (tests/conftest.py): they need llama.cpp's tools, which
`make llama-cpp` builds once (about 10 minutes) into ~/.cache/headlab/llama.cpp.
"""

from __future__ import annotations

import pytest
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.data.datasets import WIKITEXT_FILE
from headlab.engine.export import llama_cpp
from headlab.engine.export.gguf import write_gguf
from headlab.engine.export.surgery import prune
from headlab.engine.models.load import shipped_gguf
from headlab.engine.runtime.half_window import half_window_perplexity
from tests.test_gguf_export import gemma3_masks, layout_masks, tiny_gemma3
from tests.tiny import tiny_handle

TINY_CTX = 64


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A slice of the shipped WikiText-2 test text."""
    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text(WIKITEXT_FILE.read_text()[:20_000])
    return path


def compare(handle, mask, gguf_path, text_file, n_ctx, chunks=None):
    ids = llama_cpp.tokenize(gguf_path, text_file)
    ours = half_window_perplexity(handle, ids, n_ctx, mask=mask, n_chunks=chunks, bos_id=llama_cpp.bos_id(gguf_path))
    theirs = llama_cpp.perplexity(gguf_path, text_file, n_ctx, chunks=ours.chunks)
    print(f"{gguf_path.name}: llama.cpp {theirs:.4f}, HeadLab {ours.perplexity:.4f} ({ours.describe()})")
    return theirs, ours.perplexity


@pytest.mark.parametrize("case", ["dense", "uniform", "uneven GQA", "attention removed", "FFN removed",
                                  "output biases", "uniform with output biases"])
def test_tiny_llama_exports_have_headlabs_perplexity_in_llama_cpp(case, tmp_path, text_file):
    h = tiny_handle("llama")
    mask = layout_masks(h.geometry)[case]
    info = write_gguf(prune(h, mask), tmp_path / "tiny.gguf", "f32")
    theirs, ours = compare(h, mask, info.path, text_file, TINY_CTX, chunks=8)
    assert theirs == pytest.approx(ours, rel=1e-4)


@pytest.mark.real_model
@pytest.mark.parametrize("out_type,rel", [("f32", 1e-3), ("q8_0", 1e-2)])
def test_shipped_smollm2_dense_in_llama_cpp(smollm, out_type, rel, tmp_path, text_file):
    info = write_gguf(smollm, tmp_path / f"smollm2-{out_type}.gguf", out_type, tokenizer_gguf=shipped_gguf(smollm.name))
    theirs, ours = compare(smollm, None, info.path, text_file, 512, chunks=4)
    assert theirs == pytest.approx(ours, rel=rel)


@pytest.mark.real_model
def test_shipped_smollm2_per_layer_pruned_in_llama_cpp(smollm, tmp_path, text_file):
    """Uneven per-layer heads (GQA groups split) and FFN widths, and a layer without FFN: llama.cpp's deci."""
    g = smollm.geometry
    mask = PruneMask.dense(g)
    gen = torch.Generator().manual_seed(0)
    for layer in range(g.n_layers):
        mask.heads[layer, torch.randperm(g.n_heads, generator=gen)[: layer % 3]] = 0
        mask.ffn[layer, torch.randperm(g.ffn_dim, generator=gen)[: 100 + 13 * layer]] = 0
    mask = mask.with_block(7, "ffn", 0.0)
    info = write_gguf(prune(smollm, mask), tmp_path / "smollm2-pruned.gguf", "f32",
                      tokenizer_gguf=shipped_gguf(smollm.name))
    assert info.arch == "deci" and any(lay["duplicated_kv_heads"] or lay["zero_query_heads"] for lay in info.layers)
    theirs, ours = compare(smollm, mask, info.path, text_file, 512, chunks=4)
    assert theirs == pytest.approx(ours, rel=1e-3)


def test_a_q4_k_m_export_is_made_by_llama_quantize_and_runs(tmp_path, text_file):
    from headlab.engine.export.deploy import export_gguf
    from headlab.engine.models.pruned import verify_files

    h = tiny_handle("llama")
    mask = layout_masks(h.geometry)["uneven GQA"]
    r = export_gguf(h, mask, tmp_path / "q4", "Q4_K_M", evaluate=False)
    assert sorted(p.name for p in r.folder.iterdir()) == ["Modelfile", "headlab_manifest.json", "q4-Q4_K_M.gguf"]
    assert verify_files(r.folder)["gguf"]["out_type"] == "Q4_K_M"
    theirs, ours = compare(h, mask, r.gguf.path, text_file, TINY_CTX, chunks=8)
    assert theirs == pytest.approx(ours, rel=0.02)  # rows of 64: llama-quantize falls back to small-block types


@pytest.mark.parametrize("case", ["dense", "uniform", "depth"])
def test_tiny_gemma3_exports_have_headlabs_perplexity_in_llama_cpp(case, tmp_path, text_file):
    """llama.cpp's gemma3: sliding window (5 tokens) and local rotary base on the layers the pattern marks."""
    h = tiny_gemma3()
    mask = gemma3_masks(h.geometry)[case]
    info = write_gguf(prune(h, mask), tmp_path / "tiny-gemma3.gguf", "f32")
    theirs, ours = compare(h, mask, info.path, text_file, TINY_CTX, chunks=8)
    assert theirs == pytest.approx(ours, rel=1e-4)


@pytest.mark.real_model
def test_shipped_gemma3_dense_and_uniform_pruned_in_llama_cpp(tmp_path, text_file):
    """Gemma 3 270M through llama.cpp's gemma3, tokenized by the shipped file's own vocabulary (BOS first)."""
    from headlab.engine.models.load import load_model

    h = load_model("gemma3-270m")
    g = h.geometry
    pruned = PruneMask.dense(g)
    pruned.heads[:, 3] = 0  # one of the 4 query heads sharing the single KV head, in every layer
    pruned.ffn[:, torch.randperm(g.ffn_dim, generator=torch.Generator().manual_seed(0))[:512]] = 0
    for label, mask in (("dense", None), ("pruned", pruned)):
        model = h if mask is None else prune(h, mask)
        info = write_gguf(model, tmp_path / f"gemma3-{label}.gguf", "f32", tokenizer_gguf=shipped_gguf(h.name))
        assert info.arch == "gemma3" and llama_cpp.bos_id(info.path) == 2
        theirs, ours = compare(h, mask, info.path, text_file, 512, chunks=3)
        assert theirs == pytest.approx(ours, rel=1e-3)
