"""sentence-transformers as the encoder: opening folders, embedding through their own modules, ST exports.

Tolerance: embeddings are unit vectors in float32; "equal" below means a max abs difference
<= 1e-5 per coordinate (the engine runs eager attention, sentence-transformers SDPA, and a
pruned model's narrower matmuls round differently; measured: about 2e-7 on the MiniLM).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from streamlit.testing.v1 import AppTest

from headlab.engine.cli.common import USER_ERROR_STATUS
from headlab.engine.cli.main import main
from headlab.engine.core.errors import ModelLoadError
from headlab.engine.core.mask import PruneMask
from headlab.engine.export.surgery import prune
from headlab.engine.export.write import export
from headlab.engine.models.load import load_model, resolve_source
from headlab.engine.models.sentence import (
    embed_handle,
    open_sentence_transformer,
    pool,
    read_modules,
    sentence_head,
)
from headlab.engine.recovery.distill import heldout_metric, sentence_cosine
from headlab.engine.recovery.quantize import export_student
from headlab.engine.routing.embeddings import SentenceEncoder, embed_texts
from headlab.ui import keys
from headlab.ui.clusters import OTHER_ENCODER
from tests.tiny import save_tiny, tiny_model
from tests.tiny_sentence import save_tiny_sentence

TOL = 1e-5
TEXTS = ["How do I sort a list in Python?", "Write a poem about the sea at night.",
         "What is 12 times 7?", "hi"]
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory) -> Path:
    return save_tiny_sentence(tmp_path_factory.mktemp("st") / "tiny-st")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def heads_mask(g) -> PruneMask:
    """Uneven heads per layer: no standard BERT config states it, so the export is per-layer."""
    m = PruneMask.dense(g)
    m.heads[0, :2] = 0
    m.heads[-1, 1] = 0
    return m


def ffn_mask(g) -> PruneMask:
    """The same number of FFN channels in every layer: BERT's standard config states it (uniform)."""
    m = PruneMask.dense(g)
    m.ffn[:, : g.ffn_dim // 4] = 0
    return m


# --- the shipped MiniLM -------------------------------------------------------------------
@pytest.mark.real_model
def test_engine_embeddings_of_the_shipped_minilm_equal_sentence_transformers_encode():
    folder = resolve_source("minilm")
    want = SentenceTransformer(folder, device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert torch.equal(SentenceEncoder.load().encode(TEXTS), want)  # the router's encoder is ST itself
    got = embed_handle(load_model("minilm"), TEXTS)  # the engine's own BERT (eager) + the folder's Pooling/Normalize
    assert got.shape == (4, 384) and max_diff(got, want) <= TOL


@pytest.mark.real_model
def test_a_head_pruned_minilm_export_is_a_sentence_transformers_folder_that_embeds_like_the_masked_engine(tmp_path):
    handle = load_model("minilm")
    mask = heads_mask(handle.geometry)
    result = export(handle, mask, tmp_path / "minilm-pruned", evaluate=False)
    assert result.layout == "per_layer"
    for name in ST_FILES:
        assert (result.folder / name).is_file(), name
    assert "1_Pooling/config.json" in result.manifest["files"]  # checksummed like the weights
    st = open_sentence_transformer(str(result.folder))
    assert [type(m).__name__ for m in st][1:] == ["Pooling", "Normalize"] and st.max_seq_length == 256
    got = st.encode(TEXTS, convert_to_tensor=True)
    want = embed_handle(handle, TEXTS, mask=mask)
    assert max_diff(got, want) <= TOL
    assert max_diff(got, embed_handle(handle, TEXTS)) > 1e-3  # the mask changed the embeddings


# --- exports of a tiny sentence-transformers BERT -----------------------------------------
def test_a_uniform_export_loads_with_plain_sentence_transformer_and_embeds_like_the_masked_engine(tiny_st, tmp_path):
    handle = load_model(str(tiny_st))
    mask = ffn_mask(handle.geometry)
    result = export(handle, mask, tmp_path / "uniform", evaluate=False)
    assert result.layout == "uniform"
    assert result.manifest["load"]["sentence_transformers"] == "sentence_transformers.SentenceTransformer(folder)"
    st = SentenceTransformer(str(result.folder), device="cpu")
    assert st[0].auto_model.config.intermediate_size == handle.geometry.ffn_dim * 3 // 4
    got = st.encode(TEXTS, convert_to_tensor=True)
    assert max_diff(got, embed_handle(handle, TEXTS, mask=mask)) <= TOL
    assert max_diff(got, embed_handle(handle, TEXTS)) > 1e-4


def test_a_per_layer_export_opens_through_headlab_and_plain_sentence_transformer_refuses_it(tiny_st, tmp_path):
    handle = load_model(str(tiny_st))
    mask = heads_mask(handle.geometry)
    result = export(handle, mask, tmp_path / "per-layer", evaluate=False)
    assert result.layout == "per_layer"
    assert "open_sentence_transformer" in result.manifest["load"]["sentence_transformers"]
    got = open_sentence_transformer(str(result.folder)).encode(TEXTS, convert_to_tensor=True)
    assert max_diff(got, embed_handle(handle, TEXTS, mask=mask)) <= TOL
    with pytest.raises(RuntimeError, match="mismatched_sizes"):  # refused, never silently re-initialised
        SentenceTransformer(str(result.folder), device="cpu")


def test_a_distilled_student_export_is_a_sentence_transformers_folder(tiny_st, tmp_path):
    teacher = load_model(str(tiny_st))
    student = prune(teacher, ffn_mask(teacher.geometry))
    folder = export_student(student, tmp_path / "student")
    for name in ST_FILES:
        assert (folder / name).is_file(), name
    got = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert max_diff(got, embed_handle(student, TEXTS)) <= TOL


def test_an_export_of_a_plain_bert_writes_no_sentence_files(tmp_path):
    handle = load_model(str(save_tiny(tmp_path / "bert", "bert")))
    result = export(handle, None, tmp_path / "out", evaluate=False)
    assert not (result.folder / "modules.json").exists() and "sentence_transformers" not in result.manifest["load"]


# --- the folder's own modules, wherever the engine pools ----------------------------------
@pytest.fixture(scope="module")
def cls_st(tmp_path_factory) -> Path:
    """A tiny ST folder that pools the first token and does not normalise: not the MiniLM recipe."""
    folder = tmp_path_factory.mktemp("cls") / "cls-st"
    save_tiny(folder, "bert", model=tiny_model("bert", seed=1))
    t = Transformer(str(folder), max_seq_length=64)
    SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), "cls")]).save(str(folder))
    return folder


def test_the_engine_pools_with_the_folders_own_modules_not_a_fixed_mean(cls_st):
    handle = load_model(str(cls_st))
    want = SentenceTransformer(str(cls_st), device="cpu").encode(TEXTS, convert_to_tensor=True)
    got = embed_handle(handle, TEXTS)
    assert max_diff(got, want) <= TOL
    assert not torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-3)  # no Normalize in this folder


def test_distillation_compares_sentence_embeddings_through_the_teachers_modules(cls_st):
    teacher = load_model(str(cls_st))
    student = prune(teacher, ffn_mask(teacher.geometry))
    t, s = embed_handle(teacher, TEXTS), embed_handle(student, TEXTS)
    want = float((1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean())
    assert heldout_metric(teacher, student, TEXTS, max_length=64) == pytest.approx(want, abs=1e-5)


def test_sentence_cosine_is_differentiable_through_st_pooling(tiny_st):
    head = sentence_head(tiny_st)
    h = torch.randn(2, 5, 64, requires_grad=True)
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    target = torch.randn(2, 5, 64)
    (1 - sentence_cosine(head, h, target, am)).sum().backward()
    assert h.grad is not None and h.grad[0, 3:].abs().sum() == 0 and h.grad[0, :3].abs().sum() > 0
    assert torch.allclose(pool(head, h, am).norm(dim=1), torch.ones(2), atol=1e-5)


def test_a_bare_bert_handle_pools_with_st_mean_pooling_and_normalize(tmp_path):
    handle = load_model(str(save_tiny(tmp_path / "bert", "bert")))
    assert [type(m) for m in sentence_head(handle)] == [Pooling, Normalize]


# --- refusing what is not a sentence-transformers model -----------------------------------
def test_a_folder_without_modules_json_is_refused_naming_what_is_missing(tmp_path):
    bert = save_tiny(tmp_path / "bert", "bert")
    with pytest.raises(ModelLoadError, match="not a sentence-transformers folder: it has no modules.json"):
        SentenceEncoder.load(str(bert))


def test_a_missing_pooling_folder_is_named(tiny_st, tmp_path):
    broken = shutil.copytree(tiny_st, tmp_path / "broken")
    shutil.rmtree(broken / "1_Pooling")
    with pytest.raises(ModelLoadError, match="1_Pooling is missing"):
        open_sentence_transformer(str(broken))


def test_a_module_type_from_outside_sentence_transformers_is_refused(tiny_st, tmp_path):
    foreign = shutil.copytree(tiny_st, tmp_path / "foreign")
    modules = json.loads((foreign / "modules.json").read_text())
    modules[1]["type"] = "my_package.MyPooling"
    (foreign / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        read_modules(foreign)


def test_a_missing_folder_is_refused_without_asking_the_hub(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_sentence_transformer(str(tmp_path / "nowhere"))


# --- the embeddings cache follows the encoder's identity ----------------------------------
def test_rewriting_the_encoder_folder_starts_a_new_cache_entry(tmp_path):
    folder = save_tiny_sentence(tmp_path / "enc", seed=0)
    first = SentenceEncoder.load(str(folder))
    before = embed_texts(first, TEXTS)
    assert torch.equal(embed_texts(first, TEXTS), before)  # a hit
    save_tiny_sentence(folder, seed=3)  # another model, same path
    second = SentenceEncoder.load(str(folder))
    assert second.identity != first.identity
    after = embed_texts(second, TEXTS)
    assert max_diff(after, second.encode(TEXTS)) <= TOL and max_diff(after, before) > 1e-3


# --- the command line ----------------------------------------------------------------------
def test_cli_cluster_embeds_with_the_encoder_given_by_folder(tiny_st, tmp_path, capsys):
    out = tmp_path / "clusters.json"
    assert main(["cluster", "--encoder", str(tiny_st), "--k", "2", "--per-source", "4", "--no-silhouette",
                 "--out", str(out)]) == 0
    assert f"encoder {tiny_st}: 64-d" in capsys.readouterr().err
    assert json.loads(out.read_text())["encoder"] == str(tiny_st)


def test_cli_export_of_a_sentence_transformers_model_says_how_to_use_it_as_the_encoder(tiny_st, tmp_path, capsys):
    handle = load_model(str(tiny_st))
    heads_mask(handle.geometry).save(tmp_path / "mask.json")
    out = tmp_path / "pruned"
    assert main(["export", "--model", str(tiny_st), "--mask", str(tmp_path / "mask.json"), "--out", str(out),
                 "--no-eval"]) == 0
    assert (f"as a sentence encoder: --encoder {out}, or headlab.engine.models.sentence.open_sentence_transformer(folder)"
            in capsys.readouterr().out)
    assert main(["cluster", "--encoder", str(out), "--k", "2", "--per-source", "4", "--no-silhouette",
                 "--out", ""]) == 0


def test_cli_refuses_an_encoder_folder_that_is_not_sentence_transformers(tmp_path, capsys):
    bert = save_tiny(tmp_path / "bert", "bert")
    assert main(["cluster", "--encoder", str(bert), "--out", ""]) == USER_ERROR_STATUS
    assert "no modules.json" in capsys.readouterr().err


# --- the app ---------------------------------------------------------------------------------
def clusters_page(encoder: Path) -> AppTest:
    """The Clusters page (the model: $HEADLAB_MODEL) with `encoder` typed into the encoder picker."""
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=180)
    at.session_state[keys.W_CLUSTERS_PER_SOURCE] = 20
    at.session_state[keys.W_CLUSTERS_K] = 2
    at.session_state[keys.W_CLUSTERS_ENCODER] = OTHER_ENCODER
    at.session_state[keys.W_CLUSTERS_ENCODER_PATH] = str(encoder)
    at.run()
    return at.switch_page("pages/clusters.py").run()


def test_the_clusters_page_embeds_with_the_encoder_folder_picked(tiny_st, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_MODEL", str(save_tiny(tmp_path / "tiny-llama", "llama")))
    at = clusters_page(tiny_st)
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error and len(at.dataframe) == 1 and len(at.dataframe[0].value) == 2  # one row per cluster


def test_the_clusters_page_names_what_a_non_sentence_transformers_folder_lacks(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_MODEL", str(save_tiny(tmp_path / "tiny-llama", "llama")))
    at = clusters_page(save_tiny(tmp_path / "bert", "bert"))
    assert not at.exception, [e.message for e in at.exception]
    assert len(at.error) == 1 and "no modules.json" in at.error[0].value and not at.dataframe
