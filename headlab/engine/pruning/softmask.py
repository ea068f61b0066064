"""Hard-concrete (L0) gates trained to an exact sparsity target: learned masks over sub-blocks and heads.

    target = MaskTarget(blocks=8)                        # remove 8 of the 2L ATTN/FFN sub-blocks
    result = train_mask(handle, texts, target, TrainConfig(steps=60))
    result.mask                                          # binary PruneMask, exactly 8 sub-blocks removed

The gates (Louizos, Welling & Kingma 2018, "Learning sparse neural networks through L0
regularization"): each unit has a trainable `log_alpha`; a training step samples
    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clip(s * (zeta - gamma) + gamma, 0, 1)
so z is exactly 0 or 1 with non-zero probability and differentiable in between. The
probability that a gate is non-zero, summed over units, is the expected L0 norm:
    E[kept] = sum sigmoid(log_alpha - beta * log(-gamma / zeta)).

Units: `blocks` are the 2L ATTN/FFN sub-blocks (unit 2l is layer l's ATTN, 2l+1 its FFN),
`heads` the L*H query heads (unit l*H + h). Either or both may be gated; each gated kind
has its own target and its own Lagrange multipliers.

The objective (the LLM's weights stay frozen; only log_alpha and the multipliers train):
    loss = D(dense, masked) + sum over kinds of
           lambda1 * (s_exp - s_target) + lambda2 * (s_exp - s_target) ** 2
where D is the KL divergence from the dense model's next-token distribution to the masked
model's (default) or the plain LM loss, s_exp = 1 - E[kept] / n is the expected sparsity and
s_target the target one. The multipliers are trained by gradient *ascent* (Wang et al. 2020,
"Structured pruning of large language models"; Sheared-LLaMA), which turns the penalty into
a constraint that pins the expected sparsity to the target instead of a soft preference.

Gates start near dense (P(kept) = `init_keep`, 0.97) and the target sparsity ramps linearly to
its final value over the first `warmup` fraction of the steps (the sparsity warm-up of CoFi and
Sheared-LLaMA): gates that start at the target drop critical blocks in many draws, and the KL
of a broken model no longer ranks the units.

The gates' log_alpha are trained with SharedScaleAdam (Adam with one second-moment scale
per tensor) so that step sizes stay proportional to gradients, which is what ranks units
in a short run; per-entry Adam is available as `TrainConfig(optimizer="adam")`. With that
normalisation the Lagrangian's push, the same small gradient on every gate, is tiny beside
the KL's gradients on the few critical gates, so in a 40-step run on SmolLM2 the expected
sparsity barely moves (0.02 against a target of 0.13 at 8 of 60 sub-blocks): the run ranks
the units near dense, and the final top-k makes the budget exact. `constraint="project"`
adds one shared `level` per kind to all its log_alpha, solved by bisection before every step
so the expected sparsity equals the step's target exactly (the level carries *how many* units
are kept, log_alpha *which*). It is not the default because it ranked worse in short runs:
with the draws at the target, the KL is measured on a damaged model and is noisy (4-6 nats
vs 0.5-1), and at 4 of 60 sub-blocks one cluster's mask removed layer 0's attention
(bench_router held-out perplexity routed/static 1.79 vs 1.00 with the default).

At the end `binary_mask` keeps exactly the `n - removed` units with the largest log_alpha of
each kind (ties go to the lower index), so the budget is exact whatever training reached.
A layer left with no head has its ATTN sub-block removed (PruneMask.normalized).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from headlab.engine.core import gates
from headlab.engine.core.adapter import Geometry
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.core.objective import lm_loss, token_logits
from headlab.engine.core.tokens import EmptyTextError, encode_batch
from headlab.engine.pruning.select import BudgetError, count_from_budget

__all__ = [
    "SOFT_UNIT_KINDS",
    "HardConcrete",
    "HardConcreteGates",
    "MaskTarget",
    "SoftMask",
    "Lagrangian",
    "SharedScaleAdam",
    "GATE_OPTIMIZERS",
    "TrainConfig",
    "StepLog",
    "SoftMaskResult",
    "train_mask",
    "kl_to_dense",
    "unit_count",
]

# The unit kinds a soft mask can gate (a subset of headlab.engine.core.mask.UNIT_KINDS: no FFN channels).
SOFT_UNIT_KINDS = ("blocks", "heads")


@dataclass(frozen=True)
class HardConcrete:
    """The stretched, clipped concrete distribution's constants (the paper's defaults)."""

    beta: float = 2.0 / 3.0  # temperature
    gamma: float = -0.1  # stretch interval (gamma, zeta) around [0, 1] ...
    zeta: float = 1.1  # ... so that clipping puts real mass on exactly 0 and exactly 1

    def __post_init__(self) -> None:
        if not (self.beta > 0 and self.gamma < 0 and self.zeta > 1):
            raise ValueError(f"hard-concrete needs beta > 0, gamma < 0, zeta > 1; got {self}")

    @property
    def l0_shift(self) -> float:
        """beta * log(-gamma / zeta): P(z != 0) = sigmoid(log_alpha - l0_shift)."""
        return self.beta * math.log(-self.gamma / self.zeta)

    def log_alpha_for(self, keep_probability: float) -> float:
        """The log_alpha at which a gate is non-zero with `keep_probability`."""
        p = min(max(keep_probability, 1e-4), 1 - 1e-4)
        return math.log(p / (1 - p)) + self.l0_shift


class HardConcreteGates(nn.Module):
    """`n` hard-concrete gates: `log_alpha` [n], plus an optional shared `level` (a scalar added to all).

    The level separates *how many* units are kept from *which*: `SoftMask.project_levels` sets it
    (a buffer, not trained) so the expected sparsity meets a target, while the trained per-unit
    log_alpha keep the ranking. It never changes the order, so `top_k` reads log_alpha alone.
    """

    def __init__(self, n: int, *, init_keep: float = 0.9, dist: HardConcrete = HardConcrete(),
                 with_level: bool = False):
        super().__init__()
        if n < 1:
            raise ValueError(f"need at least one gate, got n={n}")
        self.dist = dist
        self.log_alpha = nn.Parameter(torch.full((n,), dist.log_alpha_for(init_keep)))
        self.register_buffer("level", torch.zeros(()) if with_level else None)  # set by a constraint, not trained

    def effective_log_alpha(self) -> torch.Tensor:
        """log_alpha plus the shared level (when there is one) [n]."""
        return self.log_alpha if self.level is None else self.log_alpha + self.level

    @property
    def n(self) -> int:
        return self.log_alpha.numel()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of the gates [n], each in [0, 1] and differentiable in log_alpha."""
        d = self.dist
        u = torch.rand(self.n, generator=generator).clamp(1e-6, 1 - 1e-6).to(self.log_alpha.device)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.effective_log_alpha()) / d.beta)
        return (s * (d.zeta - d.gamma) + d.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The noise-free soft gates [n] (u = 1/2), used to look at a mask mid-training."""
        d = self.dist
        return (torch.sigmoid(self.effective_log_alpha()) * (d.zeta - d.gamma) + d.gamma).clamp(0.0, 1.0)

    def keep_probability(self) -> torch.Tensor:
        """P(gate != 0) per unit [n]."""
        return torch.sigmoid(self.effective_log_alpha() - self.dist.l0_shift)

    def expected_l0(self) -> torch.Tensor:
        """The expected number of non-zero gates (a differentiable scalar)."""
        return self.keep_probability().sum()

    def top_k(self, keep: int) -> torch.Tensor:
        """Binary gates [n] keeping exactly the `keep` units with the largest log_alpha."""
        if not 0 <= keep <= self.n:
            raise BudgetError(f"cannot keep {keep} of {self.n} units")
        order = torch.sort(-self.log_alpha.detach(), stable=True).indices  # largest first, ties -> lower index
        out = torch.zeros(self.n)
        out[order[:keep]] = 1.0
        return out


@dataclass(frozen=True)
class MaskTarget:
    """How many units of each kind to remove: an int count or a fraction in [0, 1); None = not gated."""

    blocks: int | float | None = None
    heads: int | float | None = None

    def removed(self, g: Geometry) -> dict[str, int]:
        """{kind: units removed} for every gated kind, checked against the model's sizes."""
        out: dict[str, int] = {}
        for kind in SOFT_UNIT_KINDS:
            budget = getattr(self, kind)
            if budget is not None:
                out[kind] = count_from_budget(budget, unit_count(g, kind), _KIND_WORDS[kind])
        if not out:
            raise BudgetError("the mask target gates nothing: set `blocks` and/or `heads`")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_KIND_WORDS = {"blocks": "ATTN/FFN sub-blocks", "heads": "attention heads"}


def unit_count(g: Geometry, kind: str) -> int:
    """How many units of `kind` the model has (2L sub-blocks, or L*H heads)."""
    if kind == "blocks":
        return 2 * g.n_layers
    if kind == "heads":
        return g.n_layers * g.n_heads
    raise ValueError(f"unit kind must be one of {SOFT_UNIT_KINDS}, got {kind!r}")


class SoftMask(nn.Module):
    """Hard-concrete gates for the chosen unit kinds of one model, convertible to a PruneMask."""

    def __init__(
        self,
        g: Geometry,
        kinds: Sequence[str],
        *,
        init_keep: float | dict[str, float] = 0.9,
        dist: HardConcrete = HardConcrete(),
        with_level: bool = False,
    ):
        super().__init__()
        for kind in kinds:
            unit_count(g, kind)  # validates the name
        if not kinds:
            raise ValueError("a soft mask needs at least one unit kind")
        self.geometry = g
        self.kinds = tuple(kinds)
        keep = init_keep if isinstance(init_keep, dict) else {k: init_keep for k in self.kinds}
        self.gates = nn.ModuleDict({k: HardConcreteGates(unit_count(g, k), init_keep=keep[k], dist=dist,
                                                         with_level=with_level) for k in self.kinds})

    @torch.no_grad()
    def project_levels(self, sparsity: dict[str, float]) -> None:
        """Set each kind's shared level so that its expected sparsity equals `sparsity[kind]` (bisection)."""
        for k, target in sparsity.items():
            gate = self.gates[k]
            if gate.level is None:
                raise ValueError("this soft mask has no shared level (with_level=False)")
            lo, hi = -40.0, 40.0  # expected sparsity falls as the level rises
            for _ in range(60):
                mid = (lo + hi) / 2
                gate.level.fill_(mid)
                if 1.0 - gate.expected_l0().item() / gate.n > target:
                    lo = mid
                else:
                    hi = mid
            gate.level.fill_((lo + hi) / 2)

    def _to_mask(self, values: dict[str, torch.Tensor]) -> PruneMask:
        g = self.geometry
        m = PruneMask.dense(g)
        if "blocks" in values:
            pair = values["blocks"].view(g.n_layers, 2)  # (L, [attn, ffn])
            m.attn, m.ffn_block = pair[:, 0], pair[:, 1]
        if "heads" in values:
            m.heads = values["heads"].view(g.n_layers, g.n_heads)  # (L, H)
        return m

    def sample_mask(self, generator: torch.Generator | None = None) -> PruneMask:
        """A soft PruneMask drawn from the gates (its tensors carry gradients to log_alpha)."""
        return self._to_mask({k: self.gates[k].sample(generator) for k in self.kinds})

    def deterministic_mask(self) -> PruneMask:
        """The noise-free soft mask (no gradient)."""
        with torch.no_grad():
            return self._to_mask({k: self.gates[k].deterministic() for k in self.kinds})

    def binary_mask(self, removed: dict[str, int]) -> PruneMask:
        """A hard mask removing exactly `removed[kind]` units of each kind, lowest log_alpha first."""
        values = {k: self.gates[k].top_k(self.gates[k].n - removed[k]) for k in self.kinds}
        return self._to_mask(values).normalized().check(self.geometry)

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """1 - E[kept] / n per kind (differentiable)."""
        return {k: 1.0 - self.gates[k].expected_l0() / self.gates[k].n for k in self.kinds}

    def keep_probabilities(self) -> dict[str, torch.Tensor]:
        """P(kept) per unit, shaped [L, 2] (ATTN, FFN) for blocks and [L, H] for heads."""
        g = self.geometry
        shapes = {"blocks": (g.n_layers, 2), "heads": (g.n_layers, g.n_heads)}
        with torch.no_grad():
            return {k: self.gates[k].keep_probability().view(shapes[k]).clone() for k in self.kinds}


class Lagrangian(nn.Module):
    """lambda1 * d + lambda2 * d**2 per unit kind, d = expected - target sparsity; lambdas trained by ascent."""

    def __init__(self, kinds: Sequence[str]):
        super().__init__()
        self.lambda1 = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in kinds})
        self.lambda2 = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in kinds})

    def forward(self, expected: dict[str, torch.Tensor], target: dict[str, float]) -> torch.Tensor:
        total = torch.zeros(())
        for k, s in expected.items():
            d = s - target[k]
            total = total + self.lambda1[k] * d + self.lambda2[k] * d * d
        return total


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam whose second-moment scale is shared by all entries of a parameter (one scalar per tensor).

    Per-entry Adam moves every gate by about `lr` per step whatever the size of its gradient;
    when all gates are pushed the same way (early on, the KL pushes every gate up) that
    erases the ranking the run is meant to find. A shared scale keeps the gates' relative
    step sizes proportional to their (momentum-averaged) gradients, so a block whose removal
    costs more rises faster, while the step size stays invariant to the loss's scale.
    """

    def __init__(self, params, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros((), device=p.device)
                st["t"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).add_((p.grad * p.grad).mean(), alpha=1 - b2)
                m_hat = st["m"] / (1 - b1 ** st["t"])
                v_hat = st["v"] / (1 - b2 ** st["t"])
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])


GATE_OPTIMIZERS = ("shared-adam", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one mask training run. The defaults fit a 135M model on a CPU in a few minutes."""

    steps: int = 60
    batch_size: int = 4
    max_length: int = 128
    objective: str = "kl"  # "kl" to the dense model, or "lm" (next-token / token reconstruction loss)
    lr: float = 0.1  # on log_alpha: gates need to cross a few nats of log_alpha within the short run
    optimizer: str = "shared-adam"  # for log_alpha: "shared-adam" (see SharedScaleAdam) or per-entry "adam"
    lr_lambda: float = 0.05  # Adam *ascent* on the Lagrange multipliers
    constraint: str = "lagrangian"  # "lagrangian": the multipliers alone; "project": also solve each kind's
    # shared level every step so the expected sparsity equals the (ramped) target (see the module doc)
    init_keep: float = 0.97  # P(kept) of every gate at step 0 (never below the target's keep fraction)
    warmup: float = 0.5  # fraction of the steps over which the target sparsity ramps up from the start's
    seed: int = 0
    dense_cache_mb: int = 256  # dense log-probabilities kept between steps (0: recompute every step)

    def __post_init__(self) -> None:
        if self.optimizer not in GATE_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {GATE_OPTIMIZERS}, got {self.optimizer!r}")
        if self.objective not in ("kl", "lm"):
            raise ValueError(f"objective must be 'kl' or 'lm', got {self.objective!r}")
        if self.steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("steps and batch_size must be >= 1 and max_length >= 2")
        if not 0 < self.init_keep < 1:
            raise ValueError(f"init_keep must be in (0, 1), got {self.init_keep}")
        if self.constraint not in ("project", "lagrangian"):
            raise ValueError(f"constraint must be 'project' or 'lagrangian', got {self.constraint!r}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1], got {self.warmup}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepLog:
    """What one training step did (the app's gate-activity view plots a list of these)."""

    step: int  # 1-based
    steps: int
    loss: float  # objective + penalty
    objective: float  # KL to dense (or LM loss) on this step's batch
    penalty: float  # the Lagrangian term
    expected_sparsity: dict[str, float]
    target_sparsity: dict[str, float]  # the target at this step (it ramps up during the warm-up)
    lambdas: dict[str, tuple[float, float]]
    keep_probability: dict[str, list[list[float]]]  # per kind, [L, 2] or [L, H]


@dataclass
class SoftMaskResult:
    """A trained mask: the exact-budget binary mask, the gates it came from, and the training curve."""

    mask: PruneMask
    soft: SoftMask
    target: MaskTarget
    removed: dict[str, int]
    config: TrainConfig
    history: list[StepLog] = field(default_factory=list)
    seconds: float = 0.0
    n_texts: int = 0

    @property
    def expected_sparsity(self) -> dict[str, float]:
        """The expected sparsity the gates ended at (the binary mask's is exact by construction)."""
        return {k: v.item() for k, v in self.soft.expected_sparsity().items()}


def kl_to_dense(dense_logp: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions of KL(dense || masked); dense_logp, logits [B, T, V], valid [B, T] bool."""
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (dense_logp.exp() * (dense_logp - logp)).sum(dim=-1)  # (B, T)
    return kl[valid].mean()


def _fixed_batches(texts: Sequence[str], size: int, seed: int) -> list[list[str]]:
    """Texts shuffled once (seeded) and cut into batches, so batch i is the same every epoch."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [texts[i] for i in order]
    return [shuffled[i : i + size] for i in range(0, len(shuffled), size)]


def _sample_runnable(soft: SoftMask, g: Geometry, generator: torch.Generator) -> PruneMask:
    """A sampled mask that leaves something to run (a draw that clips every sub-block to 0 is redrawn)."""
    for _ in range(16):
        m = soft.sample_mask(generator)
        try:
            return m.check(g)
        except MaskError:
            continue
    raise MaskError("every sampled mask removed the whole model: the target is too aggressive for this model")


def train_mask(
    handle: ModelHandle,
    texts: Sequence[str],
    target: MaskTarget,
    config: TrainConfig = TrainConfig(),
    *,
    progress: Callable[[StepLog], None] | None = None,
) -> SoftMaskResult:
    """Train hard-concrete gates on `texts` towards `target` and return the exact-budget binary mask."""
    g = handle.geometry
    removed = target.removed(g)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise EmptyTextError("no non-empty calibration text to train the mask on")
    torch.manual_seed(config.seed)
    final_sparsity = {k: removed[k] / unit_count(g, k) for k in removed}
    # Start near dense and ramp the target up (CoFi / Sheared-LLaMA's sparsity warm-up): a draw
    # from gates already at the target drops critical blocks in many steps, the KL then
    # measures a broken model and its gradients stop ranking the units.
    start_sparsity = {k: min(1.0 - config.init_keep, s) for k, s in final_sparsity.items()}
    soft = SoftMask(g, list(removed), init_keep={k: 1.0 - s for k, s in start_sparsity.items()},
                    with_level=config.constraint == "project")
    ramp_steps = config.warmup * config.steps
    soft.to(handle.device)
    lagrangian = Lagrangian(list(removed)).to(handle.device)
    opt_class = SharedScaleAdam if config.optimizer == "shared-adam" else torch.optim.Adam
    opt = opt_class(soft.parameters(), lr=config.lr)  # the log_alpha (a level is a buffer, set by projection)
    opt_lambda = torch.optim.Adam(lagrangian.parameters(), lr=config.lr_lambda, maximize=True)
    batches = _fixed_batches(texts, config.batch_size, config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    dense_cache: dict[int, torch.Tensor] = {}
    cache_bytes = 0
    history: list[StepLog] = []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        b = (step - 1) % len(batches)
        ids, attn = encode_batch(handle.tokenizer, batches[b], config.max_length, handle.device)
        if config.objective == "kl":
            dense_logp = dense_cache.get(b)
            if dense_logp is None:
                with torch.no_grad():
                    dense_logp = F.log_softmax(token_logits(handle, ids, attn).float(), dim=-1)
                if cache_bytes + dense_logp.numel() * 4 <= config.dense_cache_mb * 2**20:
                    dense_cache[b] = dense_logp
                    cache_bytes += dense_logp.numel() * 4
        ramp = min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0
        target_sparsity = {k: start_sparsity[k] + ramp * (final_sparsity[k] - start_sparsity[k]) for k in removed}
        if config.constraint == "project":
            soft.project_levels(target_sparsity)  # this step's draws have the target's expected sparsity
        mask = _sample_runnable(soft, g, generator)
        with gates.apply(handle, mask):
            if config.objective == "kl":
                objective = kl_to_dense(dense_logp, token_logits(handle, ids, attn), attn.bool())
            else:
                objective, _ = lm_loss(handle, ids, attn)
        expected = soft.expected_sparsity()
        penalty = lagrangian(expected, target_sparsity)
        loss = objective + penalty
        opt.zero_grad()
        opt_lambda.zero_grad()
        loss.backward()
        opt.step()
        opt_lambda.step()
        log = StepLog(
            step=step,
            steps=config.steps,
            loss=loss.item(),
            objective=objective.item(),
            penalty=penalty.item(),
            expected_sparsity={k: v.item() for k, v in expected.items()},  # what this step's draws used
            target_sparsity=target_sparsity,
            lambdas={k: (lagrangian.lambda1[k].item(), lagrangian.lambda2[k].item()) for k in removed},
            keep_probability={k: v.tolist() for k, v in soft.keep_probabilities().items()},
        )
        history.append(log)
        if progress is not None:
            progress(log)
    if config.constraint == "project":
        soft.project_levels(final_sparsity)  # the soft mask handed back sits exactly at the target
    binary = soft.binary_mask(removed)
    binary.meta.update({
        "method": "hard-concrete L0 gates + Lagrangian sparsity target",
        "objective": "KL to the dense model" if config.objective == "kl" else "LM loss",
        "target_removed": removed,
        "expected_sparsity_at_end": {k: round(v.item(), 4) for k, v in soft.expected_sparsity().items()},
        "train": config.to_dict(),
        "n_texts": len(texts),
    })
    return SoftMaskResult(
        mask=binary, soft=soft, target=target, removed=removed, config=config, history=history,
        seconds=time.perf_counter() - start, n_texts=len(texts),
    )
