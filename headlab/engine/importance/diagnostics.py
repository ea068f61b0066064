"""Why each head scores as it does: where its attention goes, and what that does to the criteria.

From one capture pass (CaptureStats) every head gets a *kind*, decided in this order:

| kind            | rule (averages over calibration query rows)                          |
|-----------------|-----------------------------------------------------------------------|
| sink            | sink >= 0.5: at least half the attention on the first token           |
| previous-token  | prev_mass >= 0.4: on the token just before the query                  |
| local           | local_mass >= 0.5: on the LOCAL_WINDOW nearest tokens (itself included) |
| broad           | normalized entropy >= 0.6 and no position above holds 0.3             |
| mixed           | none of the above                                                     |

and the numbers behind the label, plus two quantities that explain the naive criteria:

- `constant_share`: the fraction of the head's output energy through W_O that is its mean
  (||W_O mu||^2 / E||W_O x||^2, diagonal second moments): how much of the head a bias can
  stand in for once it is pruned with compensation.
- `write_rms`: the RMS of the head's output through W_O.

Why the naive criteria mislead, in these terms. Entropy calls a sink head "sharp" and keeps
it, although parking attention on the first token is how a head idles, and such heads are
often the cheapest to remove; it calls a broad head "unfocused" and prunes it first,
although early layers build each token's context by broad averaging (on SmolLM2-135M its
first 15 picks include all nine heads of layer 0). Weight magnitude ignores what flows through the
weights and that the residual stream a head writes into grows with depth, so it prunes
small-norm heads that matter, such as previous-token heads. `ablation_kl`, when given, is
the measured cost that settles it.

`prompt_diagnosis(handle, text)` labels heads the same way on one prompt of any length up to
the model's context: the statistics come from blockwise passes over each layer's Q and K
(headlab.engine.runtime.attention_maps.prompt_head_statistics), never from a T x T map per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from headlab.engine.core.adapter import Adapter
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.importance.capture import LOCAL_WINDOW, CaptureStats
from headlab.engine.importance.criteria import head_magnitude
from headlab.engine.runtime.attention_maps import prompt_head_statistics
from headlab.engine.runtime.layer_inputs import LayerInputCache

__all__ = ["HEAD_KINDS", "THRESHOLDS", "HeadDiagnosis", "PromptDiagnosis", "classify_head", "diagnose",
           "diagnosis_rows", "kind_counts", "prompt_diagnosis"]

HEAD_KINDS = ("sink", "previous-token", "local", "broad", "mixed")
THRESHOLDS = {"sink": 0.5, "prev": 0.4, "local": 0.5, "broad_entropy": 0.6, "broad_max_position": 0.3}


@dataclass(frozen=True)
class HeadDiagnosis:
    """One head: its kind, the statistics behind it, and plain-language reasons."""

    layer: int
    head: int
    kind: str
    sink: float
    prev_mass: float
    self_mass: float
    local_mass: float
    mean_distance: float
    entropy: float
    entropy_normalized: float
    magnitude: float
    write_rms: float
    constant_share: float
    entropy_rank: int  # 1 = the first head entropy would prune
    magnitude_rank: int  # 1 = the first head magnitude would prune
    reason: str
    why_entropy: str
    why_magnitude: str
    ablation_kl: float | None = None  # measured KL when the head alone is mean-ablated, if given


def classify_head(sink: float, prev: float, local: float, entropy_normalized: float) -> tuple[str, str]:
    """(kind, the rule that decided it) from a head's attention statistics."""
    t = THRESHOLDS
    if sink >= t["sink"]:
        return "sink", f"{sink:.0%} of its attention is on the first token (>= {t['sink']:.0%})"
    if prev >= t["prev"]:
        return "previous-token", f"{prev:.0%} of its attention is on the previous token (>= {t['prev']:.0%})"
    if local >= t["local"]:
        return "local", f"{local:.0%} of its attention is within {LOCAL_WINDOW} tokens of the query (>= {t['local']:.0%})"
    if entropy_normalized >= t["broad_entropy"] and max(sink, prev, local) < t["broad_max_position"]:
        return "broad", (f"normalized entropy {entropy_normalized:.2f} (>= {t['broad_entropy']}) with no position "
                         f"holding {t['broad_max_position']:.0%}")
    return "mixed", (f"no single pattern: sink {sink:.0%}, previous {prev:.0%}, local {local:.0%}, "
                     f"normalized entropy {entropy_normalized:.2f}")


def _output_energy(adapter: Adapter, stats: CaptureStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(E||W_O x_h||^2 with diagonal second moments, ||W_O mu_h||^2), both [L, H]."""
    g = adapter.geometry
    total = torch.zeros(g.n_layers, g.n_heads)
    const = torch.zeros(g.n_layers, g.n_heads)
    for layer in range(g.n_layers):
        o = adapter.head_weights(layer).o.detach().float().cpu()  # (H, d, hd)
        mu = stats.head_in_mean[layer].view(g.n_heads, g.head_dim)  # (H, hd)
        sq = stats.head_in_sq[layer].view(g.n_heads, g.head_dim)
        mean_out = torch.einsum("hdk,hk->hd", o, mu)  # (H, d)
        const[layer] = mean_out.square().sum(dim=1)
        var = (sq - mu.square()).clamp(min=0)
        total[layer] = const[layer] + (o.square().sum(dim=1) * var).sum(dim=1)
    return total, const


def _ranks(importance: torch.Tensor) -> torch.Tensor:
    """Rank 1 = lowest importance (pruned first), over all heads; [L, H]."""
    order = torch.sort(importance.reshape(-1).float(), stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1)
    return ranks.view_as(importance)


def _why_entropy(kind: str, ent_norm: float, rank: int, n: int, share: float, layer: int) -> str:
    pos = f"entropy ranks it {rank}/{n} for pruning"
    if kind == "sink":
        return (f"{pos}: parking its attention on the first token makes it look sharp (low entropy), so entropy "
                f"keeps it, yet a sink is how a head idles and such heads are often cheap to remove "
                f"({share:.0%} of its output is constant)")
    if kind in ("previous-token", "local"):
        return f"{pos}: attention on a few nearby tokens has low entropy, so it is kept; such heads carry word order"
    if kind == "broad":
        early = " and it sits in an early layer, where broad averaging builds each token's context" if layer < 3 else ""
        return f"{pos}: averaging over many tokens gives high entropy (normalized {ent_norm:.2f}), so it goes first{early}"
    return f"{pos}: normalized entropy {ent_norm:.2f}; entropy measures how spread the attention is, not what the head writes"


def _why_magnitude(rank: int, n: int, write_rms: float, layer_rms: float) -> str:
    rel = write_rms / layer_rms if layer_rms > 0 else 0.0
    return (f"magnitude ranks it {rank}/{n}: weight norms ignore how much flows through them; its output RMS is "
            f"{write_rms:.3g} ({rel:.1f}x its layer's mean head), and the residual stream it writes into grows with depth")


def diagnose(handle: ModelHandle, stats: CaptureStats, ablation: torch.Tensor | None = None) -> list[HeadDiagnosis]:
    """One HeadDiagnosis per head (layer-major) from a capture pass; `ablation` [L, H] adds the measured cost."""
    g = handle.geometry
    mag = head_magnitude(handle.adapter)
    energy, const = _output_energy(handle.adapter, stats)
    write = energy.sqrt()
    share = torch.where(energy > 0, const / energy.clamp(min=1e-30), torch.zeros_like(energy))
    ent_rank = _ranks(-stats.entropy)  # the entropy criterion's importance is -entropy
    mag_rank = _ranks(mag)
    n = g.n_layers * g.n_heads
    out = []
    for layer in range(g.n_layers):
        layer_rms = float(write[layer].mean())
        for head in range(g.n_heads):
            v = lambda t: float(t[layer, head])  # noqa: E731
            kind, reason = classify_head(v(stats.sink), v(stats.prev_mass), v(stats.local_mass),
                                         v(stats.entropy_normalized))
            out.append(HeadDiagnosis(
                layer=layer, head=head, kind=kind, sink=v(stats.sink), prev_mass=v(stats.prev_mass),
                self_mass=v(stats.self_mass), local_mass=v(stats.local_mass), mean_distance=v(stats.mean_distance),
                entropy=v(stats.entropy), entropy_normalized=v(stats.entropy_normalized), magnitude=v(mag),
                write_rms=v(write), constant_share=v(share), entropy_rank=int(ent_rank[layer, head]),
                magnitude_rank=int(mag_rank[layer, head]), reason=reason,
                why_entropy=_why_entropy(kind, v(stats.entropy_normalized), int(ent_rank[layer, head]), n,
                                         v(share), layer),
                why_magnitude=_why_magnitude(int(mag_rank[layer, head]), n, v(write), layer_rms),
                ablation_kl=v(ablation) if ablation is not None else None,
            ))
    return out


def diagnosis_rows(diagnoses: list[HeadDiagnosis]) -> list[dict[str, Any]]:
    """Plain dicts (one per head) for tables and CSV."""
    return [asdict(d) for d in diagnoses]


def kind_counts(diagnoses: list[HeadDiagnosis]) -> dict[str, int]:
    """How many heads of each kind (every kind listed, zeros included)."""
    counts = {k: 0 for k in HEAD_KINDS}
    for d in diagnoses:
        counts[d.kind] += 1
    return counts


PROMPT_STATISTICS = ("sink", "prev_mass", "self_mass", "local_mass", "mean_distance", "entropy", "entropy_normalized")


@dataclass(frozen=True)
class PromptDiagnosis:
    """Each head's kind and attention statistics on one prompt."""

    rows: list[dict[str, Any]]  # one per head, layer-major: layer, head, kind, reason and PROMPT_STATISTICS
    n_tokens: int
    truncated: bool  # the prompt was cut to the model's context / the layer-input budget

    def kind_counts(self) -> dict[str, int]:
        """How many heads of each kind (every kind listed, zeros included)."""
        counts = {k: 0 for k in HEAD_KINDS}
        for row in self.rows:
            counts[row["kind"]] += 1
        return counts


def prompt_diagnosis(handle: ModelHandle, text: str, *, mask: PruneMask | None = None,
                     cache: LayerInputCache | None = None, progress: Progress | None = None) -> PromptDiagnosis:
    """Each head's kind and the statistics behind it on `text` (any length up to the model's context)."""
    stats = prompt_head_statistics(handle, text, local_window=LOCAL_WINDOW, mask=mask, cache=cache, progress=progress)
    g = handle.geometry
    rows = []
    for layer in range(g.n_layers):
        for head in range(g.n_heads):
            v = {name: float(getattr(stats, name)[layer, head]) for name in PROMPT_STATISTICS}
            kind, reason = classify_head(v["sink"], v["prev_mass"], v["local_mass"], v["entropy_normalized"])
            rows.append({"layer": layer, "head": head, "kind": kind, "reason": reason, **v})
    return PromptDiagnosis(rows, stats.n_tokens, stats.truncated)
