"""Per-layer budgets: exact totals, caps, and OWL's direction (more outliers, less removed)."""

from __future__ import annotations

import pytest
import torch

from headlab.engine.core.mask import PruneMask
from headlab.engine.importance.capture import capture
from headlab.engine.pruning.reconstruct.budgets import allocate, apportion, counts_of, outlier_ratios, owl_ratios
from tests.tiny import tiny_handle


@pytest.mark.parametrize("total", [0, 1, 73, 12455, 29 * 1535])
def test_per_layer_budgets_sum_to_the_global_budget_exactly(total):
    gen = torch.Generator().manual_seed(total)
    ratios = (0.2 + 0.3 * torch.rand(30, generator=gen)).tolist()
    counts = allocate(total, ratios, [1536] * 30)
    assert sum(counts) == total
    assert all(0 <= c <= 1535 for c in counts)


def test_apportion_follows_the_shares_and_hands_on_what_a_capped_layer_cannot_take():
    assert apportion(10, [1, 1, 3], [10, 10, 10]) == [2, 2, 6]
    assert apportion(10, [1, 1, 8], [10, 10, 4]) == [3, 3, 4]
    assert apportion(5, [0, 0, 0], [2, 2, 2]) in ([2, 2, 1], [2, 1, 2], [1, 2, 2])
    assert apportion(18, [1, 9, 8], [8, 8, 8]) == [2, 8, 8]  # a full layer's extra goes by share, not by index
    with pytest.raises(ValueError, match="at most"):
        apportion(7, [1, 1, 1], [2, 2, 2])


def test_owl_ratios_average_the_global_ratio_and_spare_the_outlier_layers():
    lod = torch.tensor([0.01, 0.05, 0.02, 0.03])
    r = owl_ratios(lod, 0.3, lam=0.08)
    assert abs(float(r.mean()) - 0.3) < 1e-6
    assert int(torch.argmin(r)) == 1 and int(torch.argmax(r)) == 0
    assert float(r.max() - r.min()) == pytest.approx(0.16, abs=1e-6)


def test_outlier_ratios_are_fractions_per_layer_and_counts_read_a_mask_back():
    h = tiny_handle("llama")
    stats = capture(h, ["some calibration text for the outlier ratio", "and a second one"], gradients=False)
    for kind in ("attn", "ffn"):
        lod = outlier_ratios(h, stats, kind)
        assert lod.shape == (2,) and ((lod >= 0) & (lod <= 1)).all()
    m = PruneMask.dense(h.geometry)
    m.ffn[1, :7] = 0.0
    m = m.with_block(0, "attn", 0.0)
    assert counts_of(m, "ffn") == [0, 7] and counts_of(m, "attn") == [h.geometry.n_heads, 0]


def test_aligned_counts_leave_whole_blocks_and_land_within_a_block_of_the_total():
    from headlab.engine.pruning.reconstruct.budgets import apportion_aligned

    sizes = [1536] * 30
    counts = apportion_aligned(9000, [1.0 + (i % 5) for i in range(30)], sizes, 256)
    assert all((n - c) % 256 == 0 and n - c >= 256 for n, c in zip(sizes, counts))
    assert abs(sum(counts) - 9000) <= 128
    odd = apportion_aligned(100, [1.0, 1.0], [100, 90], 32)  # sizes not multiples of 32 lose their remainder first
    assert [(n - c) % 32 for n, c in zip([100, 90], odd)] == [0, 0] and abs(sum(odd) - 100) <= 16
    assert apportion_aligned(0, [1.0], [64], 32) == [0]
    with pytest.raises(ValueError, match="no whole block"):
        apportion_aligned(10, [1.0], [16], 32)
