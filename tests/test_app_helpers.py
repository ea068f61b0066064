"""The app's pure helpers: click edits, tables, figures, page registry, curves, shared cache."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from engine.core.mask import PruneMask
from engine.importance.criteria import Scores
from engine.runtime.attention_maps import attention_map
from engine.runtime.evaluate import perplexity
from engine.runtime.prefix_cache import live_protocol
from ui import figures, tables
from ui.compute import digest
from ui.curves import perplexity_curves
from ui.pages import KNOWN_PAGES, available_pages
from ui.shared_cache import SharedCache


def test_turning_off_the_last_head_of_a_layer_removes_its_attention_and_turning_one_on_restores_it(llama_handle):
    g = llama_handle.geometry
    m = PruneMask.dense(g).toggle_heads([(1, h) for h in range(g.n_heads)])
    assert m.attn[1] == 0 and m.attn[0] == 1
    back = m.toggle_heads([(1, 2)])
    assert back.attn[1] == 1 and back.heads[1].tolist() == [0, 0, 1, 0]


def test_a_head_inside_a_removed_attention_block_counts_as_pruned_and_a_click_brings_it_back(llama_handle):
    m = PruneMask.dense(llama_handle.geometry).with_block(0, "attn", 0.0)
    on = m.toggle_heads([(0, 1)])
    assert on.attn[0] == 1 and on.heads[0].tolist() == [1, 1, 1, 1]


def test_reset_unit_clears_only_that_unit(llama_handle):
    g = llama_handle.geometry
    m = PruneMask.dense(g).toggle_head(0, 1)
    m.ffn[1, :10] = 0
    m = m.with_block(1, "attn", 0.0)
    heads = m.reset_unit("heads")
    assert heads.heads.min() == 1 and heads.ffn[1, :10].max() == 0 and heads.attn[1] == 0  # block kept: heads remain
    ffn = m.reset_unit("ffn")
    assert ffn.ffn.min() == 1 and ffn.heads[0, 1] == 0
    blocks = m.reset_unit("blocks")
    assert blocks.attn.min() == 1 and blocks.heads[0, 1] == 0
    with pytest.raises(ValueError, match="unit"):
        m.reset_unit("layers")


def test_mask_digest_is_equal_for_equal_masks_and_differs_otherwise(llama_handle):
    g = llama_handle.geometry
    a, b = PruneMask.dense(g), PruneMask.dense(g)
    assert a.digest() == b.digest() != a.toggle_head(0, 0).digest()
    assert digest(None) == "dense"


def test_pages_appear_when_their_file_exists_known_ones_first(tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    for name in ("prune.py", "heads.py", "export.py", "my_tool.py", "_helpers.py"):
        (pages / name).write_text("")
    found = available_pages(tmp_path)
    assert [p.path for p in found] == ["pages/heads.py", "pages/prune.py", "pages/export.py", "pages/my_tool.py"]
    assert found[0].default and [p.title for p in found][-1] == "My tool"


def test_the_repository_registers_the_three_app_pages_first():
    paths = [p.path for p in available_pages()]
    assert paths[:3] == ["pages/heads.py", "pages/attention.py", "pages/prune.py"]
    assert {p.path for p in KNOWN_PAGES} >= {"pages/export.py", "pages/clusters.py", "pages/diagnostics.py",
                                             "pages/distill.py"}


def _scores(g, values: torch.Tensor, name: str = "gradient") -> Scores:
    return Scores(name, heads=values.view(g.n_layers, g.n_heads))


def test_heads_table_lists_the_least_useful_head_first_with_entropy_in_nats(llama_handle):
    g = llama_handle.geometry
    imp = torch.arange(8, dtype=torch.float32).flip(0)  # head (1, 3) is least important
    scores = {"gradient": _scores(g, imp), "entropy": _scores(g, -torch.full((8,), 2.5), "entropy")}
    mask = PruneMask.dense(g).toggle_head(1, 3)
    table = tables.heads_table(scores, mask, g, "gradient")
    first = table.iloc[0]
    assert (first["layer"], first["head"], first["gate"]) == (1, 3, 0.0)
    assert first["rank by gradient (1 = least useful)"] == 1 and first["KV group"] == 1
    assert (table["entropy (nats)"] == 2.5).all()


def test_least_useful_rank_breaks_ties_by_index():
    assert tables.least_useful_rank(torch.tensor([[1.0, 0.0], [0.0, 2.0]])).tolist() == [[3, 1], [2, 4]]


def test_criteria_correlation_is_one_on_the_diagonal_and_minus_one_for_reversed_rankings(llama_handle):
    g = llama_handle.geometry
    up = torch.arange(8, dtype=torch.float32)
    corr = tables.criteria_correlation({"a": _scores(g, up, "a"), "b": _scores(g, -up, "b")}, ["a", "b"])
    assert corr.loc["a", "a"] == pytest.approx(1.0) and corr.loc["a", "b"] == pytest.approx(-1.0)


def test_head_heatmap_separates_kv_groups_crosses_pruned_heads_and_has_a_clickable_cell_each():
    values = np.random.default_rng(0).random((30, 9))
    pruned = np.zeros((30, 9), dtype=bool)
    pruned[3, 4] = pruned[7, 0] = True
    fig = figures.head_heatmap(values, title="gradient", colorbar_title="|dL/dgate|", group_size=3, pruned=pruned)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(s.x0 for s in lines) == [2.5, 5.5]  # 3 KV groups of 3 heads
    click = next(t for t in fig.data if t.name == figures.CLICK_TRACE_NAME)
    assert len(click.x) == 270 and (click.y[13], click.x[13]) == (1, 4)  # x = head, y = layer
    crosses = next(t for t in fig.data if t.name == "pruned")
    assert sorted(zip(crosses.y, crosses.x)) == [(3, 4), (7, 0)]
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"


def test_mask_grid_shows_soft_gate_values(llama_handle):
    m = PruneMask.dense(llama_handle.geometry)
    m.heads[0, 1] = 0.25
    z = np.asarray(figures.mask_grid(m).data[0].z)
    assert z[0, 1] == pytest.approx(0.25) and z.shape == (2, 4)


def test_attention_small_multiples_titles_pruned_heads(llama_handle):
    mask = PruneMask.dense(llama_handle.geometry).toggle_head(1, 2)
    m = attention_map(llama_handle, "a small test prompt", 1, mask=mask)
    fig = figures.attention_small_multiples(m, title="layer 1", group_size=2)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["head 0, KV 0", "head 1, KV 0", "head 2, KV 1 - pruned", "head 3, KV 1"]
    single = figures.attention_heatmap(m, 0, title="head 0")
    assert list(single.layout.xaxis.ticktext)[:2] == m.key_labels[:2]


def test_curve_at_zero_pruned_is_the_dense_perplexity_and_rises_with_pruning(llama_handle):
    g = llama_handle.geometry
    scores = {"magnitude": _scores(g, torch.rand(8), "magnitude")}
    protocol = live_protocol(llama_handle)
    seen = []
    points = perplexity_curves(llama_handle, scores, ["magnitude"], (0.0, 0.5), protocol,
                               progress=lambda d, t, p: seen.append((d, t)))
    dense = perplexity(llama_handle, None, protocol).perplexity
    assert points["magnitude"][0] == (0.0, pytest.approx(dense, abs=1e-5))
    assert points["magnitude"][1][1] != pytest.approx(dense, abs=1e-3)
    assert seen == [(1, 2), (2, 2)]


def test_shared_cache_computes_a_value_once_for_concurrent_callers_and_bounds_its_size():
    cache = SharedCache(max_entries=2)
    calls = []

    def slow(progress) -> int:
        calls.append(1)
        time.sleep(0.05)
        return 42

    threads = [threading.Thread(target=cache.get_or_compute, args=("k", slow)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and cache.get("k") == 42
    cache.get_or_compute("a", lambda progress: 1)
    cache.get_or_compute("b", lambda progress: 2)
    assert cache.get("k") is None and cache.get("b") == 2


def test_curve_figure_keeps_its_log_axis_on_the_data_and_draws_dense_as_a_line():
    fig = figures.curve_figure({"gradient": [(0.0, 27.7), (0.5, 60.0)], "random": [(0.0, 27.7), (0.5, 400.0)]}, 27.7)
    assert fig.layout.yaxis.type == "log"
    assert not fig.layout.annotations and not fig.layout.shapes  # nothing placed in log10 units
    dense = next(t for t in fig.data if t.name.startswith("dense"))
    assert list(dense.y) == [27.7, 27.7] and list(dense.x) == [0.0, 0.5]


def test_mask_digest_tells_apart_masks_that_differ_only_in_compensation_biases(llama_handle):
    g = llama_handle.geometry
    a = PruneMask.dense(g).toggle_head(0, 1)
    b = a.clone()
    b.ffn_bias = torch.full((g.n_layers, g.hidden), 0.01)
    assert a.digest() != b.digest()
