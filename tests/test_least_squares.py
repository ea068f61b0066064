"""Ridge least squares with an intercept and structured OBS, on small random problems with known answers."""

from __future__ import annotations

import torch

from headlab.engine.pruning.reconstruct.least_squares import Moments, obs_select, ridge_fit, spd_inverse


def _problem(n: int = 12, d: int = 5, tokens: int = 400, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) + torch.linspace(-1, 1, n, dtype=torch.float64)
    w = torch.randn(d, n, generator=gen, dtype=torch.float64)
    c = torch.randn(d, generator=gen, dtype=torch.float64)
    return x, w, c


def _moments(x: torch.Tensor, y: torch.Tensor, chunks: int = 3) -> Moments:
    m = Moments(x.shape[1], y.shape[1])
    for xs, ys in zip(x.chunk(chunks), y.chunk(chunks)):
        m.add(xs, ys)
    return m


def test_nothing_removed_and_self_targets_return_the_same_weights():
    x, w, _ = _problem()
    fit_w, fit_c = ridge_fit(_moments(x, x @ w.T), torch.arange(x.shape[1]), damp=0.0)
    torch.testing.assert_close(fit_w, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(fit_c, torch.zeros_like(fit_c), atol=1e-6, rtol=0)


def test_exact_linear_targets_on_the_kept_columns_are_recovered_with_their_intercept():
    x, w, c = _problem()
    keep = torch.tensor([0, 2, 3, 7, 11])
    y = x[:, keep] @ w[:, keep].T + c  # the removed columns carry nothing: an exact model exists
    fit_w, fit_c = ridge_fit(_moments(x, y), keep, damp=0.0)
    torch.testing.assert_close(fit_w, w[:, keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(fit_c, c, atol=1e-6, rtol=0)


def test_with_no_column_kept_the_intercept_is_the_mean_of_the_targets():
    x, w, c = _problem()
    y = x @ w.T + c
    fit_w, fit_c = ridge_fit(_moments(x, y), torch.tensor([], dtype=torch.long))
    assert fit_w.shape == (w.shape[0], 0)
    torch.testing.assert_close(fit_c, y.mean(0))


def _objective(x, y, keep, damp):
    """The ridge objective at its optimum for the columns `keep`, computed from the raw data."""
    m = _moments(x, y)
    fw, fc = ridge_fit(m, keep, damp=damp)
    xk = x[:, keep]
    h = (xk - xk.mean(0)).T @ (xk - xk.mean(0))
    lam = damp * float(torch.diagonal(h).mean())
    return float(((xk @ fw.T + fc - y) ** 2).sum() + lam * (fw ** 2).sum())


def test_obs_first_removal_cost_is_the_exact_increase_of_the_error():
    # Ridge damping is applied once over all columns here, so compare without it (damp 0).
    x, w, c = _problem(n=8, d=3)
    y = x @ w.T + c + 0.3 * torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    m = _moments(x, y)
    full = _objective(x, y, torch.arange(8), 0.0)
    res = obs_select(m, n_groups=4, group_width=2, n_remove=1, damp=0.0)
    exact = [_objective(x, y, torch.tensor([i for i in range(8) if i // 2 != g]), 0.0) - full for g in range(4)]
    assert res.removed[0] == min(range(4), key=exact.__getitem__)
    assert abs(res.costs[0] - min(exact)) < 1e-6 * max(1.0, min(exact))


def test_obs_removes_redundant_columns_first_and_respects_bucket_limits():
    x, w, c = _problem(n=6, d=4)
    x[:, 4] = x[:, 0] + x[:, 1]  # column 4 is redundant: removing it costs nothing once the rest re-solve
    w[:, 5] = 0.0  # column 5 carries nothing
    y = x @ w.T + c
    res = obs_select(_moments(x, y), n_groups=6, group_width=1, n_remove=2, damp=1e-9)
    assert set(res.removed) == {4, 5}
    assert max(res.costs) < 1e-4
    bucket = torch.tensor([0, 0, 0, 1, 1, 1])
    limited = obs_select(_moments(x, y), n_groups=6, group_width=1, n_remove=2, damp=1e-9,
                         group_of=bucket, max_per_bucket=1)
    assert sorted(bucket[list(limited.removed)].tolist()) == [0, 1]


def test_spd_inverse_matches_each_block_on_two_threads():
    """4 blocks of 256 x 256 in float64 on 2 threads: torch 2.13's batched LU fails there (Gemma 3's heads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(4, 256, 296, dtype=torch.float64, generator=g)
        blocks = a @ a.transpose(1, 2) + 0.1 * torch.eye(256, dtype=torch.float64)
        blocks[3] = -blocks[3]  # an indefinite block (rounding can leave one) is inverted alone
        expect = torch.stack([torch.linalg.inv(b) for b in blocks])
        torch.testing.assert_close(spd_inverse(blocks), expect, rtol=1e-7, atol=1e-10)
        m = Moments(4 * 256, 8)  # and structured OBS over 4 head-wide groups of 256 columns runs
        x = torch.randn(2000, 4 * 256, dtype=torch.float64, generator=g)
        m.add(x, x[:, :8] * 2.0)
        res = obs_select(m, 4, 256, 3)
        assert sorted(res.removed) == [1, 2, 3] and all(c == c for c in res.costs)  # the group that feeds y stays
    finally:
        torch.set_num_threads(threads)
