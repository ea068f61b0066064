"""The closed-form core of reconstruction: ridge least squares with an intercept, and structured OBS.

A linear map y = W x (W [d, n], x the projection's n input features) loses some input columns.
Over calibration tokens (rows of X [N, n], targets Y [N, d]) the columns `keep` that remain are
re-solved:

    min_{W_k, c}  || X_k W_k^T + 1 c^T - Y ||^2 + lam ||W_k||^2
    =>  (Xc_k^T Xc_k + lam I) W_k^T = Xc_k^T Yc,   c = mean(Y) - W_k mean(X_k)

with Xc, Yc centred, so the intercept c absorbs the mean of everything that was removed. With
`keep` empty this is FLAP's bias compensation (An et al., "Fluctuation-based Adaptive Structured
Pruning for Large Language Models", AAAI 2024): the removed part replaced by its mean. Ridge
damping lam = damp x mean(diag) as in SparseGPT/OBC (Frantar & Alistarh 2022/2023).

Which columns to drop, structured Optimal Brain Surgeon (SlimGPT: Ling et al., "SlimGPT: Layer-wise
Structured Pruning for Large Language Models", NeurIPS 2024; ZipLM: Kurtic, Frantar & Alistarh,
"ZipLM: Inference-Aware Structured Pruning of Language Models", NeurIPS 2023): with
H = Xc^T Xc + lam I and W* the fit on every column, the objective is, up to a constant,
(W - W*) H (W - W*)^T, so removing a group S of columns (a head's head_dim columns, one FFN
channel) costs at least

    dE_S = tr( W_S [(H^-1)_SS]^-1 W_S^T )

and the remaining columns absorb it by  W -= W_S [(H^-1)_SS]^-1 (H^-1)_S,:  (the exact re-solve).
Groups are removed greedily, cheapest first, re-scoring after each removal and updating H^-1 by
the same block elimination. Everything is accumulated and solved in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DEFAULT_DAMP", "Moments", "ObsResult", "obs_select", "ridge_fit", "spd_inverse"]

DEFAULT_DAMP = 0.01  # ridge damping as a fraction of the mean diagonal of the Gram matrix (SparseGPT's 1%)


@dataclass
class Moments:
    """Running sums over tokens of inputs x [n] and targets y [d]: enough for every least-squares fit."""

    n_in: int
    n_out: int
    count: int = 0
    sum_x: torch.Tensor = field(init=False)
    sum_y: torch.Tensor = field(init=False)
    xx: torch.Tensor = field(init=False)
    xy: torch.Tensor = field(init=False)
    yy: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        f64 = torch.float64
        self.sum_x = torch.zeros(self.n_in, dtype=f64)
        self.sum_y = torch.zeros(self.n_out, dtype=f64)
        self.xx = torch.zeros(self.n_in, self.n_in, dtype=f64)
        self.xy = torch.zeros(self.n_in, self.n_out, dtype=f64)
        self.yy = torch.zeros((), dtype=f64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens: x [N, n_in], y [N, n_out] (any leading shape is flattened)."""
        # One batch's products in the activations' own precision, at least float32 (a float64 [F, F] Gram costs
        # several times more on a CPU), summed across batches in float64.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.reshape(-1, self.n_in).detach().to("cpu", dtype)
        y = y.reshape(-1, self.n_out).detach().to("cpu", dtype)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} input rows for {y.shape[0]} target rows")
        self.count += x.shape[0]
        self.sum_x += x.double().sum(0)
        self.sum_y += y.double().sum(0)
        self.xx += (x.T @ x).double()
        self.xy += (x.T @ y).double()
        self.yy += (y.double() ** 2).sum()

    def centered(self, intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H [n, n], C [n, d], mean x [n], mean y [d]): centred Gram and cross moments (raw without intercept)."""
        if self.count == 0:
            raise ValueError("no calibration tokens were added")
        if not intercept:
            zero = torch.zeros(self.n_in, dtype=torch.float64)
            return self.xx, self.xy, zero, torch.zeros(self.n_out, dtype=torch.float64)
        mx, my = self.sum_x / self.count, self.sum_y / self.count
        return self.xx - self.count * torch.outer(mx, mx), self.xy - self.count * torch.outer(mx, my), mx, my


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    diag = torch.diagonal(h)
    lam = damp * float(diag.mean()) if diag.numel() else 0.0
    lam = lam if lam > 0 else 1e-8  # an all-zero input (a dead unit) still gives a solvable system
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype)


def spd_inverse(blocks: torch.Tensor) -> torch.Tensor:
    """Inverses of a batch of symmetric positive-definite blocks [..., w, w], through Cholesky.

    Not `torch.linalg.inv` on the batch: with 2 threads, torch 2.13's MKL build fails its batched LU
    for 4 blocks of 256 x 256 in float64 (Gemma 3's heads: "Pivots given to lu_solve must all be
    greater or equal to 1"). A block that rounding left indefinite is inverted alone by LU.
    """
    chol, info = torch.linalg.cholesky_ex(blocks)
    out = torch.cholesky_inverse(chol)
    bad = info != 0
    if bool(bad.any()):  # one at a time: a batched LU is what fails
        out[bad] = torch.stack([torch.linalg.inv(b) for b in blocks[bad]])
    return out


def ridge_fit(m: Moments, keep: torch.Tensor, *, damp: float = DEFAULT_DAMP,
              intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [d, len(keep)], c [d]) minimising ||X_keep W^T + c - Y||^2 + lam ||W||^2 (float64; see module doc)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    h, cxy, mx, my = m.centered(intercept)
    if keep.numel() == 0:
        return torch.zeros(m.n_out, 0, dtype=torch.float64), my.clone()
    hk = _damped(h[keep][:, keep], damp)
    w_t = torch.linalg.solve(hk, cxy[keep])  # (k, d)
    return w_t.T.contiguous(), my - w_t.T @ mx[keep]


@dataclass(frozen=True)
class ObsResult:
    """Which groups structured OBS removed, in order, and the error each removal added."""

    removed: tuple[int, ...]
    costs: tuple[float, ...]  # dE of each removal, in the order made (sum: the total added error)


def obs_select(m: Moments, n_groups: int, group_width: int, n_remove: int, *, damp: float = DEFAULT_DAMP,
               intercept: bool = True, allowed: torch.Tensor | None = None,
               group_of: torch.Tensor | None = None, max_per_bucket: int | None = None) -> ObsResult:
    """Greedily remove `n_remove` of `n_groups` column groups (each `group_width` wide) by structured OBS.

    `allowed` [n_groups] bool: groups that may go (default all). `group_of` [n_groups] int + `max_per_bucket`:
    at most that many removals per bucket (e.g. query heads per KV head, for an even GQA layout).
    """
    if m.n_in != n_groups * group_width:
        raise ValueError(f"{m.n_in} input columns are not {n_groups} groups of {group_width}")
    if not 0 <= n_remove < n_groups:
        raise ValueError(f"can remove 0..{n_groups - 1} of {n_groups} groups, asked {n_remove}")
    h, cxy, _, _ = m.centered(intercept)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(_damped(h, damp)))  # (n, n)
    w = (hinv @ cxy).T.contiguous()  # (d, n): the fit on every column, W*
    alive = torch.ones(n_groups, dtype=torch.bool) if allowed is None else allowed.clone().bool()
    taken: dict[int, int] = {}
    removed, costs = [], []
    cols = torch.arange(m.n_in).view(n_groups, group_width)  # (G, w)
    colsq = (w * w).sum(0)  # (n,) squared column norms, kept up to date for single columns
    for step in range(n_remove):
        if not bool(alive.any()):
            raise ValueError("fewer removable groups than asked to remove")
        if group_width == 1:
            if step % 64 == 0:
                colsq = (w * w).sum(0)  # refresh the running norms against rounding drift
            score = colsq / torch.diagonal(hinv).clamp(min=1e-300)  # (n,) ||W_j||^2 / (H^-1)_jj
            score = torch.where(alive, score, torch.full_like(score, float("inf")))
            pick = int(torch.argmin(score))
            cost = float(score[pick])
            row = hinv[pick].clone()  # (n,)
            a = w[:, pick] / row[pick]  # (d,)
            colsq = colsq - 2.0 * row * (a @ w) + row * row * float(a @ a)
            w.addr_(a, row, alpha=-1.0)  # in place: an outer-product temporary per step costs 8x more
            hinv.addr_(row, row, alpha=-1.0 / float(row[pick]))
        else:
            idx = alive.nonzero().flatten()
            c = cols[idx]  # (A, w)
            blocks = hinv[c[:, :, None], c[:, None, :]]  # (A, w, w)
            ws = w[:, c].permute(1, 0, 2)  # (A, d, w)
            score = (ws @ spd_inverse(blocks) * ws).sum(dim=(1, 2))  # (A,) tr(W_S B^-1 W_S^T)
            best = int(torch.argmin(score))
            pick, cost = int(idx[best]), float(score[best])
            s = cols[pick]
            b_inv = torch.linalg.inv(hinv[s][:, s])  # (w, w)
            w -= w[:, s] @ b_inv @ hinv[s, :]
            hinv -= hinv[:, s] @ b_inv @ hinv[s, :]
        s = cols[pick]
        w[:, s] = 0.0
        hinv[s, :] = 0.0
        hinv[:, s] = 0.0
        alive[pick] = False
        removed.append(pick)
        costs.append(cost)
        if group_of is not None and max_per_bucket is not None:
            bucket = int(group_of[pick])
            taken[bucket] = taken.get(bucket, 0) + 1
            if taken[bucket] >= max_per_bucket:
                alive &= group_of != bucket
    return ObsResult(tuple(removed), tuple(costs))
