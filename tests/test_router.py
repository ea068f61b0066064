"""Routing to the nearest pool entry, grouping, router files, and the two-stage pipeline end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from headlab.engine.core import gates
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.tokens import EmptyTextError
from headlab.engine.pruning.softmask import MaskTarget, TrainConfig
from headlab.engine.routing.clusters import calibration_prompts, kmeans, split_prompts
from headlab.engine.routing.embeddings import SentenceEncoder
from headlab.engine.routing.router import (
    Router,
    RouterError,
    heldout_perplexity,
    pruned_blocks,
    routed_generate,
    routed_logits,
    routed_nll,
    texts_nll,
    train_router,
)
from tests.tiny import save_tiny, tiny_handle
from tests.tiny_sentence import save_tiny_sentence


@pytest.fixture(autouse=True)
def private_cache_one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """A tiny random BERT as a sentence-transformers folder (64-token limit)."""
    return save_tiny_sentence(tmp_path_factory.mktemp("encoder") / "tiny-st")


def block_masks(g, k):
    """k distinct hard masks: mask c removes the FFN sub-block of layer c % L."""
    return [PruneMask.dense(g).with_block(c % g.n_layers, "ffn" if c < g.n_layers else "attn", 0.0) for c in range(k)]


def hand_router(g, pool, distance="euclidean"):
    return Router(pool, block_masks(g, pool.shape[0]), encoder="tiny-bert", distance=distance)


@pytest.fixture(scope="module")
def trained(encoder_folder):
    """A router trained end to end on tiny models (llama LM, bert sentence encoder), 2 clusters."""
    torch.set_num_threads(1)
    lm, enc = tiny_handle("llama"), SentenceEncoder.load(str(encoder_folder))
    split = split_prompts(calibration_prompts(["gsm8k", "humaneval"], per_source=8), 0.25)
    emb = enc.encode([p.text for p in split.train])
    clustering = kmeans(emb, 2)
    router = train_router(lm, enc, split.train, emb, clustering, MaskTarget(blocks=1),
                          TrainConfig(steps=3, max_length=32))
    return lm, enc, split, emb, clustering, router


def test_routing_picks_the_nearest_centroid():
    g = tiny_handle("llama").geometry
    pool = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    router = hand_router(g, pool)
    x = torch.tensor([[1.0, 1.0], [9.0, 2.0], [-1.0, 7.0], [5.1, 0.0]])
    assert router.route_embeddings(x).tolist() == [0, 1, 2, 1]
    brute = ((x[:, None] - pool[None]) ** 2).sum(-1).argmin(1)  # (N, k) squared distances
    assert torch.equal(router.route_embeddings(x), brute)


def test_cosine_routing_ignores_the_embedding_norm():
    g = tiny_handle("llama").geometry
    router = hand_router(g, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), distance="cosine")
    x = torch.tensor([[100.0, 1.0], [0.01, 0.02]])
    assert router.route_embeddings(x).tolist() == [0, 1]


def test_routing_agrees_with_kmeans_assignment_on_training_points(trained):
    _, _, _, emb, clustering, router = trained
    assert torch.equal(router.route_embeddings(emb), clustering.labels)


def test_groups_partition_the_batch_with_one_mask_each():
    g = tiny_handle("llama").geometry
    router = hand_router(g, torch.eye(3))
    groups = router.groups([2, 0, 2, 1, 0])
    assert [(gr.cluster, gr.indices) for gr in groups] == [(0, (1, 4)), (1, (3,)), (2, (0, 2))]
    assert all(gr.mask is router.masks[gr.cluster] for gr in groups)


def mixed_masks(g):
    """Three hard masks that differ in heads (uneven GQA groups), channels, sub-blocks and biases."""
    a = PruneMask.dense(g).with_block(0, "attn", 0.0)
    a.heads[1, 1] = 0.0
    b = PruneMask.dense(g)
    b.heads[0, 0] = 0.0
    b.ffn[1, ::2] = 0.0
    b.attn_bias = torch.randn(g.n_layers, g.hidden, generator=torch.Generator().manual_seed(0)) * 0.1
    c = PruneMask.dense(g).with_block(1, "ffn", 0.0)
    return a, b, c


def row_alone(handle, ids, mask):
    """Logits [T, V] of one unpadded row under its mask, through the gates."""
    with torch.no_grad(), gates.apply(handle, mask):
        return handle.model(input_ids=ids[None]).logits[0]


@pytest.mark.parametrize("soft", [False, True], ids=["kernels", "gates"])
def test_a_mixed_mask_batch_equals_running_each_row_alone(soft):
    from headlab.engine.core.tokens import encode_batch
    from headlab.engine.runtime.sparse_forward import sparse_refusal

    h = tiny_handle("llama")
    a, b, c = mixed_masks(h.geometry)
    if soft:  # a soft gate sends the batch through the gates with one mask per row
        c.ffn[0, 3] = 0.5
    masks = [a, b, a, c]
    texts = ["The quick brown fox.", "abc def", "Numbers 1 2 3 4 5 6 7 8", "xyz"]
    ids, attn = encode_batch(h.tokenizer, texts, 32)
    assert (sparse_refusal(h, masks, attn) is None) != soft
    with torch.no_grad():
        out = routed_logits(h, masks, ids, attn)
    for row, mask in enumerate(masks):
        n = int(attn[row].sum())
        assert torch.allclose(out[row, :n], row_alone(h, ids[row, :n], mask), atol=1e-4, rtol=1e-4), row


def test_routed_nll_scores_each_text_under_its_own_mask():
    h = tiny_handle("llama")
    a, b, c = mixed_masks(h.geometry)
    texts = ["The quick brown fox.", "abc def", "xyz uvw"]
    per_text = routed_nll(h, texts, [a, b, c], batch_size=3)
    for text, mask, (nll, n) in zip(texts, (a, b, c), per_text):
        alone = texts_nll(h, [text], mask)
        assert n == alone[1] and nll == pytest.approx(alone[0], rel=1e-5)
    with pytest.raises(ValueError, match="one mask per text"):
        routed_nll(h, texts, [a, b])


def test_each_cluster_mask_and_the_static_mask_remove_exactly_the_budget(trained):
    *_, router = trained
    for m in [*router.masks, router.static_mask]:
        assert m.is_hard and int((m.attn == 0).sum() + (m.ffn_block == 0).sum()) == 1
    assert sum(router.meta["cluster_sizes"]) == len(trained[2].train)


def test_saved_router_reloads_and_routes_identically(trained, tmp_path):
    lm, enc, split, *_, router = trained
    router.save(tmp_path / "r")
    again = Router.load(tmp_path / "r", lm.geometry)
    texts = [p.text for p in split.held_out]
    a, b = router.route(enc, texts), again.route(enc, texts)
    assert [r.cluster for r in a] == [r.cluster for r in b]
    assert all(x.mask == y.mask for x, y in zip(a, b))
    assert torch.equal(again.pool, router.pool) and again.static_mask == router.static_mask
    assert again.meta["purity"] == json.loads(json.dumps(router.meta["purity"]))


def test_export_writes_every_mask_as_a_mask_file(trained, tmp_path):
    lm, *_, router = trained
    written = router.export(tmp_path / "exp")
    names = sorted(p.name for p in written)
    assert names == ["cluster_0.json", "cluster_1.json", "router.json", "router.safetensors", "static.json"]
    assert PruneMask.load(tmp_path / "exp" / "masks" / "cluster_1.json", lm.geometry) == router.masks[1]


def test_missing_router_file_is_named(tmp_path, trained):
    *_, router = trained
    router.save(tmp_path / "r")
    (tmp_path / "r" / "router.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="router.safetensors"):
        Router.load(tmp_path / "r")


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.write_text("{not json"), "not valid JSON"),
    (lambda d: d.write_text(json.dumps({"format": "something.else"})), "not a router file"),
])
def test_corrupt_router_json_gives_a_clear_error(tmp_path, trained, corrupt, message):
    *_, router = trained
    router.save(tmp_path / "r")
    corrupt(tmp_path / "r" / "router.json")
    with pytest.raises(RouterError, match=message):
        Router.load(tmp_path / "r")


def test_corrupt_pool_file_gives_a_clear_error(tmp_path, trained):
    *_, router = trained
    router.save(tmp_path / "r")
    (tmp_path / "r" / "router.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(RouterError, match="corrupt"):
        Router.load(tmp_path / "r")


def test_pool_shape_that_disagrees_with_the_json_is_refused(tmp_path, trained):
    *_, router = trained
    router.save(tmp_path / "r")
    d = json.loads((tmp_path / "r" / "router.json").read_text())
    d["k"] = 5
    (tmp_path / "r" / "router.json").write_text(json.dumps(d))
    with pytest.raises(RouterError, match="shape"):
        Router.load(tmp_path / "r")


def test_router_for_another_model_is_refused_on_load(tmp_path, trained):
    *_, router = trained
    router.save(tmp_path / "r")
    with pytest.raises(RouterError, match="does not fit this model"):
        Router.load(tmp_path / "r", tiny_handle("qwen2").geometry)


def test_router_refuses_a_different_encoder(trained):
    enc, router = trained[1], trained[5]
    other = SentenceEncoder(enc.model, "another-encoder")
    with pytest.raises(RouterError, match="another-encoder"):
        router.route(other, "hello")


def test_empty_prompt_gives_a_clear_message(trained):
    enc, router = trained[1], trained[5]
    with pytest.raises(EmptyTextError, match="empty"):
        router.route(enc, "   ")
    with pytest.raises(EmptyTextError, match="#1"):
        router.route(enc, ["fine", ""])


def test_prompt_longer_than_the_encoder_limit_is_cut_with_a_notice(trained):
    enc, router = trained[1], trained[5]
    route = router.route(enc, "word " * 200)[0]
    assert route.notice is not None and "first 64" in route.notice
    assert router.route(enc, "short")[0].notice is None


def test_routed_generation_reports_context_truncation_and_pruned_blocks(trained):
    lm, enc, *_, router = trained
    out = routed_generate(lm, router, enc, "x" * 300, max_new_tokens=4)  # tiny llama: 128-token context
    assert any("context of 128" in n for n in out.notices)
    assert out.pruned == pruned_blocks(out.route.mask) and len(out.pruned) == 1
    assert isinstance(out.text, str)


def test_pruned_blocks_names_removed_sub_blocks_in_layer_order():
    g = tiny_handle("llama").geometry
    m = PruneMask.dense(g).with_block(1, "attn", 0.0).with_block(0, "ffn", 0.0)
    assert pruned_blocks(m) == ["FFN 0", "ATTN 1"]


def test_texts_nll_weights_by_tokens_and_grows_when_blocks_are_removed(trained):
    lm = trained[0]
    texts = ["The quick brown fox jumps over the lazy dog.", "abc"]
    total, n = texts_nll(lm, texts)
    assert n == len("The quick brown fox jumps over the lazy dog.") - 1 + 2  # byte tokenizer
    worse, _ = texts_nll(lm, texts, PruneMask.dense(lm.geometry).with_block(0, "attn", 0.0))
    assert worse != total


def test_heldout_perplexity_reports_every_routed_cluster_and_the_total(trained):
    lm, enc, split, *_, router = trained
    rows = heldout_perplexity(lm, router, enc, split.held_out, max_length=32)
    assert rows[-1].cluster is None and rows[-1].n_prompts == len(split.held_out)
    assert sum(r.n_prompts for r in rows[:-1]) == len(split.held_out)
    assert sum(r.n_tokens for r in rows[:-1]) == rows[-1].n_tokens
    assert all(r.dense > 0 and r.routed > 0 and r.static > 0 for r in rows)


@pytest.mark.real_model
def test_clusters_page_trains_masks_and_routes_a_prompt_on_a_tiny_model(tmp_path, monkeypatch):
    """The Clusters page end to end (the shipped MiniLM embeds 20 prompts per set; the LM is a tiny Llama)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("HEADLAB_CACHE")  # reuse the real embedding cache: the page embeds real prompts
    save_tiny(tmp_path / "tiny-llama", "llama")
    monkeypatch.setenv("HEADLAB_MODEL", str(tmp_path / "tiny-llama"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300)
    at.session_state["w.clusters.per_source"] = 20
    at.session_state["w.clusters.k"] = 2
    at.session_state["w.clusters.removed"] = 1
    at.session_state["w.clusters.steps"] = 2
    at.run()
    at.switch_page("pages/clusters.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.title[0].value == "Clusters"
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 2  # one row per cluster
    next(b for b in at.button if b.label == "Train masks").click()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    router = at.session_state["headlab.clusters.router"][4]
    assert router.k == 2 and router.static_mask is not None
    next(b for b in at.button if b.label == "Route and generate").click()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("removes" in m.value for m in at.markdown)
    assert len(at.text) == 1  # the generation
