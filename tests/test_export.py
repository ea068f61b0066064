"""Exported folders: they reload (plain transformers or the engine loader) with the masked model's logits."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
import transformers

from headlab.engine.cli.main import main
from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.export.surgery import LAYERS_KEY
from headlab.engine.export.write import ExportError, export, preview, zip_folder
from headlab.engine.models.load import ModelLoadError, load_model, load_pruned
from headlab.engine.models.pruned import MANIFEST
from headlab.engine.models.wrap import wrap_model
from headlab.engine.runtime.cost import cost
from tests.test_surgery import make_mask
from tests.tiny import TINY_FAMILIES, tiny_handle


def uniform_mask(handle) -> PruneMask:
    """The same units pruned in every layer; heads only where the family's config can say so."""
    g = handle.geometry
    m = PruneMask.dense(g)
    m.ffn[:, 5:37] = 0.0
    if handle.adapter.config_decouples_heads:
        m.heads[:, 0] = 0.0
        m.heads[:, g.group_size] = 0.0  # one head of each of the first two groups
    return m


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(2))
    return ids, torch.ones_like(ids)


@torch.no_grad()
def _masked_logits(handle, mask) -> torch.Tensor:
    with gates.apply(handle, mask.normalized()):
        return token_logits(handle, *_ids())


def _plain_logits(model) -> torch.Tensor:
    ids, am = _ids()
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=am)
    return out.logits if getattr(out, "logits", None) is not None else \
        out.last_hidden_state @ model.get_input_embeddings().weight.t()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_uniform_export_reloads_with_plain_transformers(tmp_path, family):
    h = tiny_handle(family)
    mask = uniform_mask(h)
    r = export(h, mask, tmp_path / "out", evaluate=False)
    assert r.layout == "uniform"
    assert LAYERS_KEY not in json.loads((tmp_path / "out" / "config.json").read_text())
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_plain_logits(model), _masked_logits(h, mask), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("kind", ["heads", "attn_block", "mixed"])
def test_per_layer_export_reloads_with_the_engine_loader(tmp_path, family, kind):
    h = tiny_handle(family)
    mask = make_mask(h.geometry, kind)
    r = export(h, mask, tmp_path / "out", evaluate=False)
    assert r.layout == "per_layer"
    assert r.params_after == cost(h, mask).params_kept
    for loaded in (load_pruned(tmp_path / "out"), load_model(str(tmp_path / "out"))):
        assert sum(p.numel() for p in loaded.model.parameters()) == r.params_after
        with torch.no_grad():
            got = token_logits(loaded, *_ids())
        torch.testing.assert_close(got, _masked_logits(h, mask), atol=1e-4, rtol=0)


def test_per_layer_layout_can_be_forced_on_a_uniform_mask(tmp_path, llama_handle):
    mask = uniform_mask(llama_handle)
    r = export(llama_handle, mask, tmp_path / "out", layout="per_layer", evaluate=False)
    assert r.layout == "per_layer"
    assert LAYERS_KEY in json.loads((tmp_path / "out" / "config.json").read_text())
    with torch.no_grad():
        got = token_logits(load_pruned(tmp_path / "out"), *_ids())
    torch.testing.assert_close(got, _masked_logits(llama_handle, mask), atol=1e-4, rtol=0)


def test_uniform_layout_is_refused_when_layers_differ(tmp_path, llama_handle):
    mask = make_mask(llama_handle.geometry, "attn_block")
    with pytest.raises(ExportError, match="keep only one sub-block"):
        export(llama_handle, mask, tmp_path / "out", layout="uniform", evaluate=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())  # no temporary folder left behind


def test_exporting_into_a_non_empty_folder_fails_and_keeps_its_content(tmp_path, llama_handle):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export(llama_handle, uniform_mask(llama_handle), target, evaluate=False)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_the_folder_only_with_a_complete_export(tmp_path, llama_handle):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("old")
    export(llama_handle, uniform_mask(llama_handle), target, overwrite=True, evaluate=False)
    names = {p.name for p in target.iterdir()}
    assert "notes.txt" not in names and {"model.safetensors", "config.json", MANIFEST} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy was cleaned up


def test_exporting_into_an_empty_folder_is_allowed(tmp_path, llama_handle):
    (tmp_path / "out").mkdir()
    export(llama_handle, None, tmp_path / "out", evaluate=False)
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["uniform", "per_layer"])
def test_a_truncated_safetensors_file_gives_a_clear_error(tmp_path, llama_handle, kind):
    mask = uniform_mask(llama_handle) if kind == "uniform" else make_mask(llama_handle.geometry, "mixed")
    export(llama_handle, mask, tmp_path / "out", evaluate=False)
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated"):
        load_pruned(tmp_path / "out")
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_pruned(tmp_path / "out", verify=False)
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(str(tmp_path / "out"))


def test_manifest_records_source_mask_sizes_and_file_hashes(tmp_path, llama_handle):
    mask = make_mask(llama_handle.geometry, "mixed")
    mask.meta.update({"criterion": "magnitude", "budget": 0.25})
    r = export(llama_handle, mask, tmp_path / "out", evaluate=False)
    m = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert m["source"]["name"] == llama_handle.name
    assert PruneMask.from_dict(m["mask"]) == mask
    assert (m["criterion"], m["budget"]) == ("magnitude", 0.25)
    assert m["params"]["after"] == r.params_after == cost(llama_handle, mask).params_kept
    assert m["parity"]["max_abs_logit_diff"] < 1e-4
    on_disk = {p.name for p in (tmp_path / "out").iterdir()} - {MANIFEST}
    assert set(m["files"]) == on_disk and all(len(f["sha256"]) == 64 for f in m["files"].values())


def test_perplexity_before_and_after_is_recorded_with_its_protocol(tmp_path, smollm_like_protocol):
    h, protocol = smollm_like_protocol
    mask = PruneMask.dense(h.geometry).with_block(1, "ffn", 0.0)
    r = export(h, mask, tmp_path / "out", protocol=protocol)
    p = r.manifest["perplexity"]
    assert p["before"]["perplexity"] > 0 and p["after"]["perplexity"] > 0
    assert "window 32" in p["protocol"] and p["ratio"] == pytest.approx(
        p["after"]["perplexity"] / p["before"]["perplexity"])


@pytest.fixture
def smollm_like_protocol():
    """A tiny causal model and a short protocol: perplexity plumbing without the real model."""
    from headlab.engine.runtime.evaluate import PerplexityProtocol

    return tiny_handle("llama"), PerplexityProtocol(window=32, stride=32, n_windows=2)


def test_quantization_config_is_not_exported(tmp_path, llama_handle):
    llama_handle.model.config.quantization_config = {"quant_method": "gguf"}
    export(llama_handle, None, tmp_path / "out", evaluate=False)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_preview_gives_the_size_without_copying_the_model(llama_handle):
    mask = make_mask(llama_handle.geometry, "mixed")
    pv = preview(llama_handle, mask)
    assert pv.layout == "per_layer" and not pv.uniform_possible and pv.why_not_uniform
    assert pv.params_after == cost(llama_handle, mask).params_kept
    assert pv.bytes_estimate == pv.params_after * 4


def test_zip_holds_the_whole_folder(tmp_path, llama_handle):
    r = export(llama_handle, None, tmp_path / "out", evaluate=False)
    z = zip_folder(r.folder)
    with zipfile.ZipFile(z) as f:
        names = set(f.namelist())
    assert {f"out/{p.name}" for p in r.folder.iterdir()} == names


def test_cli_export_writes_a_loadable_folder(tmp_path, capsys):
    h = tiny_handle("llama")
    src = tmp_path / "src"
    h.model.save_pretrained(src)
    h.tokenizer.save_pretrained(src)
    mask_path = make_mask(h.geometry, "mixed").save(tmp_path / "mask.json")
    rc = main(["export", "--model", str(src), "--mask", str(mask_path), "--out", str(tmp_path / "out"), "--no-eval"])
    assert rc == 0
    assert "per_layer layout" in capsys.readouterr().out
    assert load_pruned(tmp_path / "out").geometry.n_layers == 2
    rc = main(["export", "--model", str(src), "--mask", str(mask_path), "--out", str(tmp_path / "out"), "--no-eval"])
    assert rc == 2 and "not empty" in capsys.readouterr().err


@pytest.mark.real_model
def test_default_model_export_keeps_tied_embeddings_and_matches(tmp_path, smollm):
    from headlab.engine.core.hooks import private_copy
    from headlab.engine.importance.criteria import ffn_magnitude

    g = smollm.geometry
    mask = PruneMask.dense(g).with_block(3, "attn", 0.0).with_block(3, "ffn", 0.0)
    mask.heads[:, [0, 3, 6]] = 0.0  # one head per KV group in every layer: uniform
    mask.ffn.scatter_(1, torch.sort(ffn_magnitude(smollm.adapter), dim=1).indices[:, :256], 0.0)
    r = export(smollm, mask, tmp_path / "out", evaluate=False)
    assert r.layout == "uniform" and r.params_after == cost(smollm, mask).params_kept
    # Compared in float64: in float32 the narrower matmuls sum in another order and 30 layers
    # grow that rounding to ~5e-4 on logits of ~30, which would hide a real mismatch.
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                                              dtype=torch.float64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == r.params_after
    ref_handle = wrap_model(private_copy(smollm.model).double(), smollm.tokenizer, "fp64 copy")
    ids = smollm.tokenizer("Pruned models must match their masked originals.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with gates.apply(ref_handle, mask):
            ref = ref_handle.model(input_ids=ids).logits
        got = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_export_page_previews_the_size_and_exports(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    h = tiny_handle("llama")
    h.model.save_pretrained(tmp_path / "model")
    h.tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HEADLAB_MODEL", str(tmp_path / "model"))
    page = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "pages" / "export.py")
    at = AppTest.from_file(page, default_timeout=120).run()
    assert not at.exception
    assert at.title[0].value == "Export"
    assert {m.label for m in at.metric} >= {"Parameters", "Layout"}
    at.text_input(key="w.export.folder").set_value(str(tmp_path / "out"))
    at.checkbox(key="w.export.evaluate").set_value(False)
    next(b for b in at.button if b.label == "Export").click()
    at.run()
    assert not at.exception
    assert (tmp_path / "out" / MANIFEST).exists()
    assert any("Wrote" in s.value for s in at.success)
    next(b for b in at.button if b.label == "Compute mask").click()
    at.run()
    assert not at.exception and any("depth (block_influence)" in s.value for s in at.success)


def test_export_page_writes_a_gguf_and_shows_how_to_run_it(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    h = tiny_handle("llama")
    h.model.save_pretrained(tmp_path / "model")
    h.tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HEADLAB_MODEL", str(tmp_path / "model"))
    page = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "pages" / "export.py")
    at = AppTest.from_file(page, default_timeout=120).run()
    at.radio(key="w.export.format").set_value("GGUF for llama.cpp / Ollama").run()
    at.selectbox(key="w.export.gguf_type").set_value("q8_0")
    at.text_input(key="w.export.folder").set_value(str(tmp_path / "out"))
    at.checkbox(key="w.export.evaluate").set_value(False)
    next(b for b in at.button if b.label == "Export").click()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert (tmp_path / "out" / "out-q8_0.gguf").is_file() and (tmp_path / "out" / "Modelfile").is_file()
    assert any("llama.cpp architecture `llama`, q8_0" in s.value for s in at.success)
    assert any("llama-quantize" in c.value and "ollama create" in c.value for c in at.code)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_the_documented_recipe_loads_a_per_layer_export_without_headlab(tmp_path, family):
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "export.md").read_text()
    section = doc.split("## Loading a per-layer export without HeadLab", 1)[1]
    recipe = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "import headlab" not in recipe and "from headlab" not in recipe
    namespace: dict = {}
    exec(compile(recipe, "docs/export.md", "exec"), namespace)  # noqa: S102  (the documented code itself)
    h = tiny_handle(family)
    # Layer 0: uneven GQA groups, no FFN; layer 1: no attention, fewer channels.
    mask = make_mask(h.geometry, "mixed").with_block(0, "ffn", 0.0)
    r = export(h, mask, tmp_path / "out", evaluate=False)
    assert r.layout == "per_layer"
    model = namespace["load_headlab_per_layer"](str(tmp_path / "out"))
    assert sum(p.numel() for p in model.parameters()) == r.params_after
    torch.testing.assert_close(_plain_logits(model), _masked_logits(h, mask), atol=1e-4, rtol=0)
