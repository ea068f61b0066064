"""Training-free per-token sparsity rules, and the per-layer thresholds they run with.

Each rule decides, for every token separately, which entries of some projections' inputs
are zeroed (so the matching weight columns need not be read). A rule has *sites*: the
projections (adapter roles "q", "k", "v", "o", "gate", "up", "down") whose input it
sparsifies, and one threshold per site and layer, calibrated (headlab.engine.dynamic.calibrate) as
the quantile of the rule's score distribution at the target sparsity. Entries whose score is
below the threshold are zeroed; a threshold of -inf zeroes nothing (the dense model).

- oracle: per token, keep exactly k FFN channels in every layer, those with the largest true
  |act(gate(x)) * up(x)| (the down projection's input), and zero the rest; its "threshold" is the
  keep count k per layer. It is the best k channels of one token in one layer taken alone, not an
  upper bound: a method that keeps more in one layer or token and fewer in another at the same
  average (a per-layer threshold, the importance network) can and does beat it.
- exact: the oracle's score |act(gate(x)) * up(x)| with a per-layer threshold calibrated to the
  target, instead of a fixed k: the count varies per token, the average per layer is the target.
  The oracle's rival at the same operating point as the other thresholded rules; like the oracle
  it computes every channel's gate and up before it can choose.
- CATS (Lee et al. 2024, "CATS: Contextually-Aware Thresholding for Sparsity in Large
  Language Models"): zero FFN channel j for a token when |act(gate(x))_j| is below a
  per-layer threshold (the channel is then skipped in up and down).
- TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models"):
  magnitude sparsity on the input of every matrix: zero x_i when |x_i| is below that matrix's
  threshold (q/k/v share one input, as do gate/up; each matrix still has its own threshold).
- WINA (Chen et al. 2025, "WINA: Weight Informed Neuron Activation for Accelerating Large
  Language Model Inference"): like TEAL, but the score of input i of matrix W is
  |x_i| * ||W[:, i]||_2, the column norm saying how much that input can move the output.
- teal-ffn / wina-ffn: TEAL and WINA restricted to the FFN's three matrices (gate, up, down), the
  attention's inputs left dense: the same part of the model the oracle, CATS and the importance
  network sparsify, so "50%" means the same matrices for all of them (the down input's sparsity is
  the fraction of FFN channels dropped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "Rule",
    "RULES",
    "ORACLE",
    "EXACT",
    "CATS",
    "TEAL",
    "WINA",
    "TEAL_FFN",
    "WINA_FFN",
    "ALL_SITES",
    "FFN_SITES",
    "get_rule",
    "Thresholds",
    "ThresholdsError",
    "threshold_at",
    "oracle_keep",
    "magnitude_score",
    "weighted_score",
    "column_norms",
]

#: Every projection role a rule may sparsify, in the order a layer runs them.
ALL_SITES = ("q", "k", "v", "o", "gate", "up", "down")
#: The FFN's projections: what a rule restricted to the FFN sparsifies.
FFN_SITES = ("gate", "up", "down")


class ThresholdsError(ValueError):
    """Thresholds that do not fit the model or rule, or a thresholds file that cannot be read."""


@dataclass(frozen=True)
class Rule:
    """A per-token sparsity rule: its name, the paper it follows, and the projections it sparsifies.

    weighted: an input's score is |x_i| times the norm of the weight column it meets (WINA), not |x_i|.
    """

    name: str
    citation: str
    sites: tuple[str, ...]
    summary: str
    weighted: bool = False


ORACLE = Rule("oracle", "true top-k channels, exactly k per token in every layer", ("down",),
              "keep the k FFN channels with the largest |act(gate(x)) * up(x)| per token, the same k in every layer")
EXACT = Rule("exact", "the oracle's score, thresholded per layer", ("down",),
             "zero FFN channel j when |act(gate(x))_j * up(x)_j| < per-layer threshold")
CATS = Rule("cats", "Lee et al. 2024, CATS", ("down",),
            "zero FFN channel j when |act(gate(x))_j| < per-layer threshold")
TEAL = Rule("teal", "Liu et al. 2024, TEAL", ALL_SITES,
            "zero input x_i of every matrix when |x_i| < that matrix's threshold")
WINA = Rule("wina", "Chen et al. 2025, WINA", ALL_SITES,
            "zero input x_i of matrix W when |x_i| * ||W[:, i]||_2 < that matrix's threshold", weighted=True)
TEAL_FFN = Rule("teal-ffn", "Liu et al. 2024, TEAL, on the FFN's matrices only", FFN_SITES,
                "zero input x_i of gate, up and down when |x_i| < that matrix's threshold (attention dense)")
WINA_FFN = Rule("wina-ffn", "Chen et al. 2025, WINA, on the FFN's matrices only", FFN_SITES,
                "zero input x_i of gate, up and down when |x_i| * ||W[:, i]||_2 < that matrix's threshold "
                "(attention dense)", weighted=True)

RULES: dict[str, Rule] = {r.name: r for r in (ORACLE, EXACT, CATS, TEAL, WINA, TEAL_FFN, WINA_FFN)}


def get_rule(rule: str | Rule) -> Rule:
    """The rule named `rule` (or `rule` itself)."""
    if isinstance(rule, Rule):
        return rule
    if rule not in RULES:
        raise ThresholdsError(f"unknown dynamic sparsity rule {rule!r}; choose one of {', '.join(RULES)}")
    return RULES[rule]


@dataclass
class Thresholds:
    """Per-layer thresholds of one rule: values[site] is [n_layers] (oracle: the keep count k per layer).

    `target` is the sparsity they were calibrated for (None when built by hand).
    """

    rule: str
    values: dict[str, torch.Tensor]
    target: float | None = None
    meta: dict = field(default_factory=dict)

    def check(self, n_layers: int, ffn_dim: int) -> "Thresholds":
        """Raise ThresholdsError unless the sites are the rule's and every tensor is [n_layers]."""
        rule = get_rule(self.rule)
        if set(self.values) != set(rule.sites):
            raise ThresholdsError(f"{rule.name} thresholds need sites {list(rule.sites)}, got {sorted(self.values)}")
        for site, t in self.values.items():
            if tuple(t.shape) != (n_layers,):
                raise ThresholdsError(f"{rule.name} thresholds for {site!r} have shape {tuple(t.shape)}, "
                                      f"the model needs ({n_layers},): one per layer")
        if rule is ORACLE:
            k = self.values["down"]
            if bool(((k < 0) | (k > ffn_dim) | (k != k.round())).any()):
                raise ThresholdsError(f"oracle keep counts must be whole numbers in [0, {ffn_dim}], got {k.tolist()}")
        return self

    @classmethod
    def dense(cls, rule: str | Rule, n_layers: int, ffn_dim: int) -> "Thresholds":
        """Thresholds that zero nothing: -inf everywhere (oracle: keep every channel)."""
        rule = get_rule(rule)
        if rule is ORACLE:
            return cls(rule.name, {"down": torch.full((n_layers,), float(ffn_dim))}, target=0.0)
        return cls(rule.name, {s: torch.full((n_layers,), -math.inf) for s in rule.sites}, target=0.0)

    @classmethod
    def oracle_budgets(cls, keep: Sequence[float], ffn_dim: int) -> Thresholds:
        """Oracle keep counts per layer: k_l = round(keep[l]) channels per token in layer l (e.g. another
        method's mean kept count per layer, so the oracle runs at that method's per-layer budgets)."""
        k = torch.as_tensor([float(v) for v in keep]).round()
        if bool(((k < 0) | (k > ffn_dim)).any()):
            raise ThresholdsError(f"oracle keep counts must lie in [0, {ffn_dim}], got {k.tolist()}")
        return cls(ORACLE.name, {"down": k}, target=1.0 - float(k.mean()) / ffn_dim,
                   meta={"budgets": "per layer"})

    @classmethod
    def oracle(cls, n_layers: int, ffn_dim: int, sparsity: float) -> "Thresholds":
        """Oracle keep counts: k = round((1 - sparsity) * ffn_dim) channels per token in every layer."""
        _check_sparsity(sparsity)
        k = round((1.0 - sparsity) * ffn_dim)
        return cls(ORACLE.name, {"down": torch.full((n_layers,), float(k))}, target=sparsity)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ThresholdsError(f"target sparsity must be a fraction in [0, 1], got {sparsity}")


def threshold_at(scores: torch.Tensor, sparsity: float) -> float:
    """The score below which a fraction `sparsity` of `scores` lies (zeroing `score < t` hits it, barring ties)."""
    _check_sparsity(sparsity)
    flat = scores.detach().reshape(-1).float()
    n = flat.numel()
    k = round(sparsity * n)
    if k <= 0:
        return -math.inf
    if k >= n:
        return math.inf
    return float(torch.kthvalue(flat, k + 1).values)  # the (k+1)-th smallest: exactly k lie below it


def oracle_keep(h: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [..., F]: per token, the k entries of h with the largest |h| (exactly k, ties broken by topk)."""
    keep = torch.zeros_like(h, dtype=torch.bool)
    if k > 0:
        keep.scatter_(-1, h.abs().topk(min(k, h.shape[-1]), dim=-1).indices, True)
    return keep


def magnitude_score(x: torch.Tensor) -> torch.Tensor:
    """|x| (TEAL's score of a matrix input; CATS's score of act(gate(x)))."""
    return x.abs().float()


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 for a Linear weight [out, in]: one norm per input feature [in]."""
    return weight.detach().float().norm(dim=0)


def weighted_score(x: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """WINA's score |x_i| * ||W[:, i]||_2 for x [..., in]."""
    return x.abs().float() * col_norm.to(x.device)
