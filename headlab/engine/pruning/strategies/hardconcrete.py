"""A static head mask optimised against the dense model's outputs, with an exact budget.

Voita, Talbot, Moiseev, Sennrich & Titov, "Analyzing Multi-Head Self-Attention: Specialized
Heads Do the Heavy Lifting, the Rest Can Be Pruned", ACL 2019: one stochastic hard-concrete
gate per head (Louizos, Welling & Kingma 2018), trained with the model frozen. Here the
objective is the KL from the dense model's next-token distribution (a distillation target
that needs no labels), and the budget is held by Lagrange multipliers trained by ascent
(Wang, Wohlwend & Lei 2020), the machinery headlab.engine.pruning.softmask uses for the router's masks
(HardConcreteGates, Lagrangian, kl_to_dense are reused from there). At the end the
`n - removed` heads with the largest log_alpha are kept: the budget is exact.

Two additions over a plain L0 mask, both optional:
- a prior: log_alpha starts from another method's scores (default: the measured
  mean-ablation KL) instead of all equal, so a short CPU run refines a good ranking rather
  than discovering one; `prior="entropy"` makes entropy a starting point, not a rule;
- compensation: a gate interpolates between the head's output and its calibration mean,
  z * x + (1 - z) * mu, so training optimises the mask that FLAP compensation will run.
FFN channels (when the budget asks for them) are cut first by fluctuation and stay fixed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.core.tokens import batches, context_length, encode_batch
from headlab.engine.importance.fluctuation import ffn_fluctuation
from headlab.engine.importance.mean_ablation import ffn_bias, soft_attention_bias
from headlab.engine.pruning.select import lowest
from headlab.engine.pruning.softmask import HardConcreteGates, Lagrangian, kl_to_dense
from headlab.engine.pruning.strategies.base import Budget, Calibration, Strategy
from headlab.engine.pruning.strategies.oneshot import finish, method_scores, standardize

__all__ = ["HardConcreteMask", "prior_log_alpha", "TrainLog"]

TrainLog = Callable[[int, int, float, float], None]  # (step, steps, kl, expected kept heads)


def prior_log_alpha(prior: torch.Tensor, base: float, spread: float) -> torch.Tensor:
    """Initial log_alpha [n]: `base` shifted by `spread` times the prior's z-scored log-ranks."""
    ranks = torch.empty_like(prior.reshape(-1))
    ranks[torch.sort(prior.reshape(-1).float(), stable=True).indices] = torch.arange(prior.numel(), dtype=ranks.dtype)
    z = (ranks - ranks.mean()) / ranks.std().clamp(min=1e-12)
    return base + spread * z


class HardConcreteMask(Strategy):
    name = "hardconcrete"
    description = ("static hard-concrete (L0) head mask trained on KL to the dense model, exact budget "
                   "(starts from the measured ablation ranking)")
    reference = ("Voita et al., ACL 2019 (hard-concrete head gates, Louizos et al. 2018); Lagrangian budget as "
                 "Wang et al. 2020; gates and multipliers from headlab.engine.pruning.softmask")
    cost_hint = "optimised"

    def __init__(self, steps: int = 80, lr: float = 0.1, lr_lambda: float = 0.05, prior: str | None = "ablation",
                 spread: float = 2.0, batch_size: int = 4, max_length: int = 128, seed: int = 0,
                 compensate: bool = False, log: TrainLog | None = None):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps, self.lr, self.lr_lambda, self.prior, self.spread = steps, lr, lr_lambda, prior, spread
        self.batch_size, self.max_length, self.seed, self.compensate, self.log = (
            batch_size, max_length, seed, compensate, log)

    def _base(self, handle: ModelHandle, f: int, calib: Calibration, progress) -> PruneMask:
        """The fixed part: FFN channels cut by fluctuation (with their bias when compensating)."""
        g = handle.geometry
        base = PruneMask.dense(g)
        if f:
            stats = calib.stats(handle, progress)
            base.ffn[lowest(ffn_fluctuation(handle.adapter, stats), f)] = 0.0
            if self.compensate:
                base.ffn_bias = ffn_bias(handle.adapter, base.ffn, stats.ffn_mean)
        return base

    def __call__(self, handle: ModelHandle, budget: Budget, calib: Calibration, *, progress=None) -> PruneMask:
        g = handle.geometry
        h, f = self.check_budget(handle, budget)
        n = g.n_layers * g.n_heads
        base = self._base(handle, f, calib, progress)
        stats = calib.stats(handle, progress) if self.compensate else None
        torch.manual_seed(self.seed)
        hc = HardConcreteGates(n, init_keep=1.0 - h / n)
        if self.prior is not None and h:
            prior = method_scores(handle, self.prior, calib, self.compensate, progress).heads
            with torch.no_grad():
                hc.log_alpha.copy_(prior_log_alpha(standardize(prior) if self.prior != "ablation" else prior,
                                                   float(hc.log_alpha[0]), self.spread))
        lagrangian = Lagrangian(["heads"])
        opt = torch.optim.Adam(hc.parameters(), lr=self.lr)
        opt_lambda = torch.optim.Adam(lagrangian.parameters(), lr=self.lr_lambda, maximize=True)
        target = {"heads": h / n}
        max_length = min(self.max_length, context_length(handle.model))
        encoded = [encode_batch(handle.tokenizer, chunk, max_length, handle.device)
                   for chunk in batches(calib.texts, self.batch_size)]
        dense: dict[int, torch.Tensor] = {}
        generator = torch.Generator().manual_seed(self.seed)
        for step in range(self.steps if h else 0):
            b = step % len(encoded)
            ids, am = encoded[b]
            if b not in dense:
                with torch.no_grad():  # bf16 keeps the cached targets small; KL needs no more precision
                    dense[b] = F.log_softmax(token_logits(handle, ids, am).float(), dim=-1).bfloat16()
            z = hc.sample(generator).view(g.n_layers, g.n_heads)  # (L, H)
            m = PruneMask(z, base.ffn, base.attn, base.ffn_block, ffn_bias=base.ffn_bias)
            if self.compensate:
                m.attn_bias = soft_attention_bias(handle.adapter, z, stats.head_in_mean)
            with gates.apply(handle, m):
                kl = kl_to_dense(dense[b].float(), token_logits(handle, ids, am), am.bool())
            expected = {"heads": 1.0 - hc.expected_l0() / n}
            loss = kl + lagrangian(expected, target)
            opt.zero_grad()
            opt_lambda.zero_grad()
            loss.backward()
            opt.step()
            opt_lambda.step()
            if self.log:
                self.log(step + 1, self.steps, kl.item(), hc.expected_l0().item())
            if progress:
                progress(step + 1, self.steps)
        mask = base.clone()
        mask.heads = hc.top_k(n - h).view(g.n_layers, g.n_heads)  # exactly h heads removed
        mask = mask.normalized()
        return finish(handle, mask, calib, self.compensate,
                      {"method": self.name + ("+comp" if self.compensate else ""), "steps": self.steps,
                       "prior": self.prior, "objective": "KL to the dense model", "reference": self.reference},
                      progress)
