"""Calibration prompts, the held-out split, sentence embeddings and their cache, K-means, 2-D maps."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from headlab.engine.core.tokens import EmptyTextError
from headlab.engine.routing.clusters import (
    cached_projection,
    calibration_prompts,
    kmeans,
    project_2d,
    purity,
    silhouette_scores,
    split_prompts,
)
from headlab.engine.routing.embeddings import SentenceEncoder, embed_texts, embedding_key
from tests.tiny_sentence import save_tiny_sentence


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Embedding and projection caches go to a fresh folder per test."""
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path))


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    return save_tiny_sentence(tmp_path_factory.mktemp("encoder") / "tiny-st")


@pytest.fixture
def tiny_encoder(encoder_folder):
    return SentenceEncoder.load(str(encoder_folder))


def blobs(k=3, per=20, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.eye(d)[:k] * 5
    x = torch.cat([c + 0.1 * torch.randn(per, d, generator=gen) for c in centers])
    return x, torch.arange(k).repeat_interleave(per)


def test_prompts_cover_every_source_with_their_categories():
    prompts = calibration_prompts(per_source=80)
    sources = {p.source for p in prompts}
    assert sources == {"mt_bench", "vicuna_bench", "gsm8k", "humaneval"}
    assert {p.category for p in prompts if p.source == "gsm8k"} == {"math"}
    assert {p.category for p in prompts if p.source == "humaneval"} == {"coding"}
    assert len({p.key for p in prompts}) == len(prompts), "keys must be unique across sources"


def test_gsm8k_score_text_appends_the_solution_without_calculator_annotations():
    p = calibration_prompts(["gsm8k"], per_source=1)[0]
    assert p.score_text.startswith(p.text) and len(p.score_text) > len(p.text)
    assert "<<" not in p.score_text and "####" in p.score_text


def test_split_is_deterministic_disjoint_and_stratified_by_category():
    prompts = calibration_prompts(per_source=40)
    a, b = split_prompts(prompts, 0.25), split_prompts(prompts, 0.25)
    assert a == b
    train, held = {p.key for p in a.train}, {p.key for p in a.held_out}
    assert not train & held and len(train | held) == len(prompts)
    for cat in {p.category for p in prompts}:
        n = sum(p.category == cat for p in prompts)
        if n >= 2:
            assert any(p.category == cat for p in a.held_out), f"category {cat} has no held-out prompt"
            assert any(p.category == cat for p in a.train), f"category {cat} has no training prompt"
    assert split_prompts(prompts, 0.25, seed=1) != a


def test_split_does_not_depend_on_which_other_sets_are_loaded():
    alone = split_prompts(calibration_prompts(["mt_bench"]), 0.25)
    together = split_prompts(calibration_prompts(), 0.25)
    held_mt = {p.key for p in together.held_out if p.source == "mt_bench"}
    assert {p.key for p in alone.held_out} == held_mt


def test_unknown_prompt_set_is_named_in_the_error():
    with pytest.raises(ValueError, match="wikipedia"):
        calibration_prompts(["wikipedia"])


def test_embeddings_are_unit_norm_and_ignore_padding(tiny_encoder):
    short, long = "hi there", "a much longer sentence that forces padding of the short one"
    batch = tiny_encoder.encode([short, long])
    alone = tiny_encoder.encode([short])
    assert torch.allclose(batch.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(batch[0], alone[0], atol=1e-5), "padding must not change a text's embedding"


def test_embedding_cache_is_hit_for_the_same_texts_and_missed_for_others(tiny_encoder, monkeypatch):
    texts = ["one prompt", "another prompt"]
    first = embed_texts(tiny_encoder, texts)

    def refuse(*a, **k):
        raise AssertionError("the encoder ran although the embeddings were cached")

    monkeypatch.setattr(tiny_encoder, "encode", refuse)
    assert torch.equal(embed_texts(tiny_encoder, texts), first)
    with pytest.raises(AssertionError, match="encoder ran"):
        embed_texts(tiny_encoder, texts + ["a third"])


def test_embedding_key_separates_text_boundaries_encoders_and_lengths():
    assert embedding_key("minilm", ["ab", "c"], 256) != embedding_key("minilm", ["a", "bc"], 256)
    assert embedding_key("minilm", ["ab"], 256) != embedding_key("other", ["ab"], 256)
    assert embedding_key("minilm", ["ab"], 256) != embedding_key("minilm", ["ab"], 128)


def test_a_torn_cache_file_is_recomputed(tiny_encoder, tmp_path):
    texts = ["cache me"]
    first = embed_texts(tiny_encoder, texts)
    for f in (tmp_path / "embeddings").iterdir():
        f.write_bytes(b"not safetensors")
    assert torch.allclose(embed_texts(tiny_encoder, texts), first)


def test_empty_text_is_refused_with_a_clear_error(tiny_encoder):
    with pytest.raises(EmptyTextError):
        tiny_encoder.encode(["fine", "  "])


def test_kmeans_recovers_separated_blobs():
    x, truth = blobs()
    c = kmeans(x, 3)
    assert c.centroids.shape == (3, 8) and sorted(c.sizes()) == [20, 20, 20]
    assert purity(c.labels, [str(int(t)) for t in truth]).overall == 1.0


def test_kmeans_refuses_k_outside_its_range():
    x, _ = blobs()
    with pytest.raises(ValueError, match="k = 1"):
        kmeans(x, 1)
    with pytest.raises(ValueError, match="k = 61"):
        kmeans(x, 61)


def test_silhouette_is_highest_at_the_true_number_of_clusters():
    x, _ = blobs(k=4, d=8)
    scores = silhouette_scores(x, range(2, 7))
    assert max(scores, key=scores.get) == 4


def test_purity_counts_the_majority_category_per_cluster():
    p = purity(torch.tensor([0, 0, 0, 1, 1]), ["math", "math", "code", "code", "code"])
    assert p.majority == ("math", "code")
    assert p.majority_fraction == pytest.approx((2 / 3, 1.0))
    assert p.overall == pytest.approx(4 / 5)


def test_pca_projection_is_two_dimensional():
    x, _ = blobs()
    assert project_2d(x, "pca").shape == (60, 2)


def test_umap_projection_is_computed_once_then_read_from_the_cache(monkeypatch):
    calls = []

    class FakeUMAP:
        def __init__(self, **kw):
            calls.append(kw)

        def fit_transform(self, x):
            return np.asarray(x)[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    x, _ = blobs()
    assert cached_projection(x, "umap") is None
    first = project_2d(x, "umap")
    second = project_2d(x, "umap")
    assert len(calls) == 1 and np.array_equal(first, second)
    assert np.array_equal(cached_projection(x, "umap"), first)


@pytest.mark.real_model
def test_minilm_embeds_paraphrases_closer_than_unrelated_prompts():
    enc = SentenceEncoder.load()
    e = enc.encode(["How do I sort a list in Python?", "What is the way to order a Python list?",
                    "Write a poem about the sea at night."])
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
