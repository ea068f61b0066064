"""The app's pure helpers: click edits, tables, figures, page registry, curves, shared cache."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.importance.criteria import Scores
from headlab.engine.runtime.attention_maps import attention_map
from headlab.engine.runtime.evaluate import perplexity
from headlab.engine.runtime.prefix_cache import live_protocol
from headlab.ui import figures, head_grid, tables
from headlab.ui.compute import digest
from headlab.ui.curves import perplexity_curves
from headlab.ui.pages import KNOWN_PAGES, available_pages
from headlab.ui.shared_cache import SharedCache


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


def test_head_grid_views_colour_every_cell_mark_pruned_heads_and_keep_the_kv_group_size():
    values = np.random.default_rng(0).random((30, 9))
    pruned = np.zeros((30, 9), dtype=bool)
    pruned[3, 4] = pruned[7, 0] = True
    hover = [[f"{l},{h}" for h in range(9)] for l in range(30)]
    view = head_grid.score_view(values, title="gradient", bar_title="|dL/dgate|", hover=hover, pruned=pruned,
                                group_size=3)
    assert (view["layers"], view["heads"], view["group"]) == (30, 9, 3)
    assert len(view["colors"]) == 270 and view["hover"][13] == "1,4"  # row-major: layer 1, head 4
    assert [i for i, p in enumerate(view["pruned"]) if p] == [3 * 9 + 4, 7 * 9 + 0]
    lo, hi = np.unravel_index(values.argmin(), values.shape), np.unravel_index(values.argmax(), values.shape)
    assert view["colors"][lo[0] * 9 + lo[1]] == view["bar"]["stops"][0]  # the scale's ends on the extreme cells
    assert view["colors"][hi[0] * 9 + hi[1]] == view["bar"]["stops"][-1]
    flipped = head_grid.score_view(values, title="entropy", bar_title="nats", hover=hover, pruned=pruned, reverse=True)
    assert flipped["colors"][lo[0] * 9 + lo[1]] == view["bar"]["stops"][-1]
    ranked = head_grid.rank_view(values, title="gradient", hover=hover, pruned=pruned)
    assert ranked["bar"]["ticks"] == [[0.0, "least useful"], [1.0, "most useful"]]


def test_gate_view_shows_soft_gate_values_without_marks(llama_handle):
    m = PruneMask.dense(llama_handle.geometry)
    m.heads[0, 1] = 0.25
    view = head_grid.gate_view(m)
    assert view["pruned"] is None and (view["layers"], view["heads"]) == (2, 4)
    assert "gate 0.25" in view["hover"][1] and view["colors"][1] != view["colors"][0]


def test_each_grid_click_is_applied_once_in_order_whatever_states_arrive():
    applied: dict[str, int] = {}
    first = {"grid": "a", "events": [[1, 0, 2], [2, 1, 3]]}
    cells, applied = head_grid.new_clicks(first, applied)
    assert cells == [(0, 2), (1, 3)] and applied == {"a": 2}
    assert head_grid.new_clicks(first, applied) == ([], applied)  # the same state again: a replay, nothing
    # Clicks made while the app was busy: the newest state still holds the unacknowledged ones.
    later = {"grid": "a", "events": [[4, 0, 0], [2, 1, 3], [3, 0, 2]]}
    cells, applied = head_grid.new_clicks(later, applied)
    assert cells == [(0, 2), (0, 0)] and applied == {"a": 4}  # seq order, 2 not again
    cells, applied = head_grid.new_clicks({"grid": "b", "events": [[1, 1, 1]]}, applied)  # a new mount
    assert cells == [(1, 1)] and applied == {"a": 4, "b": 1}
    for junk in (None, {}, {"grid": 3}, {"grid": "c", "events": [[1, "x", 0], [2, -1, 0], [3, 0]]}):
        assert head_grid.new_clicks(junk, applied) == ([], applied)


def test_attention_small_multiples_titles_pruned_heads(llama_handle):
    mask = PruneMask.dense(llama_handle.geometry).toggle_head(1, 2)
    m = attention_map(llama_handle, "a small test prompt", 1, mask=mask)
    fig = figures.attention_small_multiples(m, title="layer 1", group_size=2)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["head 0, KV 0", "head 1, KV 0", "head 2, KV 1 - pruned", "head 3, KV 1"]
    single = figures.attention_heatmap(m, 0, title="head 0")
    assert list(single.layout.xaxis.ticktext)[:2] == m.key_labels[:2]


def test_every_small_map_has_token_labels_and_square_cells(llama_handle):
    m = attention_map(llama_handle, "a small test prompt with a few more words in it", 1)
    fig = figures.attention_small_multiples(m, title="layer 1", group_size=2)
    for h in range(m.n_heads):
        x = fig.layout[f"xaxis{'' if h == 0 else h + 1}"]
        y = fig.layout[f"yaxis{'' if h == 0 else h + 1}"]
        assert list(x.ticktext) and list(y.ticktext), f"head {h}'s map has no token labels"
        assert y.scaleanchor == f"x{'' if h == 0 else h + 1}"  # square cells
    long_labels = [f"{i} token{i}" for i in range(300)]
    ticks = figures._axis_ticks(long_labels, 28)
    assert len(ticks["tickvals"]) <= 28 and ticks["tickvals"][0] == 0  # readable at any length


def test_the_difference_view_is_masked_minus_dense_and_zero_when_nothing_before_changes(llama_handle):
    g = llama_handle.geometry
    dense = attention_map(llama_handle, "a small test prompt", 1)
    same = attention_map(llama_handle, "a small test prompt", 1, mask=PruneMask.dense(g).toggle_head(1, 2))
    assert not figures.attention_difference(dense, same).any()  # a head of this layer: its map is unchanged
    earlier = attention_map(llama_handle, "a small test prompt", 1, mask=PruneMask.dense(g).toggle_head(0, 1))
    diff = figures.attention_difference(dense, earlier)
    assert diff.shape == tuple(dense.probs.shape) and abs(diff).max() > 0
    assert abs(diff.sum(-1)).max() < 1e-5  # every row of both maps sums to 1
    fig = figures.attention_heatmap(earlier, 0, title="diff", diff=diff[0])
    assert fig.data[0].zmid == 0 and fig.data[0].colorscale is not None
    other = attention_map(llama_handle, "another prompt of a different length entirely", 1)
    with pytest.raises(ValueError, match="differ in shape"):
        figures.attention_difference(dense, other)


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
