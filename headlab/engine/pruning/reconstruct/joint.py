"""Joint allocation: how many heads and FFN channels each layer loses, from one global cost.

The per-layer allocations of budgets.py fix each layer's count in advance from a proxy (FLAP's
fluctuation, measured ablation, OWL's outliers). Here every layer is scored by what OBS itself
would pay: on the dense model's own inputs, structured OBS (least_squares.obs_select) removes units
of each layer's O and down projections greedily and reports the error each removal adds, dE_k.
Those are made comparable across layers by a normalisation (`NORMALISATIONS`):

- "stream": every token's least-squares rows weighted by 1 / ||h_t|| (h the residual stream at the layer's
  input), so dE sums ||delta_t||^2 / ||h_t||^2: how much each removal perturbs the stream relative to its
  size at that token, which is what the later layers' norms see (and a few tokens of huge norm, such as
  attention sinks, no longer dominate);
- "output": dE divided by the centred energy of the projection's dense output (its relative error).

The cheapest increments overall are taken until the budget's head and channel totals are reached
(each layer's increments made non-decreasing first, so a layer's count is always a prefix of its own
greedy order; chunks of `n_kv_heads` heads or `ffn_align` channels when a layout needs whole groups or
blocks). The counts then go to `obs_prune`, which re-chooses and re-solves the units on the pruned
model's own inputs. ZipLM (Kurtic et al. 2023) and SlimGPT's global variants allocate the same way:
one ordered list of OBS costs across layers.

`allocation="joint"` goes one step further: only the parameters the budget removes are fixed, and heads
compete with FFN channels by cost per parameter (both are measured in the same unit, the stream's relative
perturbation), so the split between attention and FFN is chosen too.

Cost: one dense pass over the texts, one [n, n] Gram per projection, and the greedy OBS removals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import batches, context_length, encode_batch
from headlab.engine.pruning.reconstruct.layerwise import RefitConfig, output_weight
from headlab.engine.pruning.reconstruct.least_squares import Moments, ObsResult, obs_select
from headlab.engine.runtime.cost import cost
from headlab.engine.runtime.replay import record_layers

__all__ = ["NORMALISATIONS", "counts_from_costs", "joint_counts", "obs_costs", "unit_params"]

NORMALISATIONS = ("stream", "output")


@torch.no_grad()
def obs_costs(handle: ModelHandle, texts: Sequence[str], config: RefitConfig, normalise: str = "stream",
              max_fraction: float = 0.9, progress: Progress | None = None,
              visit: Callable[[int, str, Moments, ObsResult], None] | None = None,
              kinds: Sequence[str] = ("attn", "ffn")) -> dict[str, list[torch.Tensor]]:
    """Per kind ("attn", "ffn") and layer, the normalised OBS cost of each greedy removal, in order (float64).

    `visit(layer, kind, moments, result)`, if given, is called for each measured projection with its plain
    (unweighted) moments on the dense inputs and the greedy OBS result, before the walk moves on (measured.py).
    Only `kinds` are measured (a heads-only budget skips the FFN's [F, F] Grams and its greedy removals);
    another kind gets no costs (an empty tensor per layer: none of its units can be taken).
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {', '.join(NORMALISATIONS)}, got {normalise!r}")
    if not set(kinds) <= {"attn", "ffn"}:
        raise ValueError(f"kinds must be 'attn' and/or 'ffn', got {list(kinds)}")
    g, adapter = handle.geometry, handle.adapter
    max_length = min(config.max_length, context_length(handle.model))
    encoded = [encode_batch(handle.tokenizer, list(chunk), max_length, handle.device)
               for chunk in batches(list(texts), config.batch_size)]
    valid = [am.bool() for _, am in encoded]
    # layer by layer from the first layer's inputs: one layer's states held at a time
    record = record_layers(handle, None, [{"input_ids": ids, "attention_mask": am} for ids, am in encoded], keep=(0,))
    out: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": []}
    for layer in range(g.n_layers):
        seen: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": []}
        projs = {"attn": adapter.head_output_proj(layer), "ffn": adapter.ffn_output_proj(layer)}
        with temporary_hooks() as hooks:  # thread-scoped: the model may be shared with other sessions
            for k in kinds:  # only what is measured is captured (an FFN's inputs are 8/3 of the stream's size)
                hooks.pre(projs[k], lambda mod, args, into=seen[k]: into.append(args[0].detach()))
            nxt = record.run_from(layer, None, stop=layer + 1).starting_at(layer + 1)
        # per token, 1 / ||h_t||: the stream's later layers see a perturbation relative to the stream's own size
        scale = [x.float().norm(dim=-1).clamp(min=1e-6).reciprocal()[..., None] for x in record.hidden[layer]]
        record = nxt
        for kind in ("attn", "ffn"):
            if kind not in kinds:
                out[kind].append(torch.zeros(0, dtype=torch.float64))
                continue
            n_units, width = (g.n_heads, g.head_dim) if kind == "attn" else (g.ffn_dim, 1)
            w = output_weight(handle, layer, kind).detach().float()
            m = Moments(n_units * width, g.hidden)
            plain = Moments(n_units * width, g.hidden) if visit is not None and normalise == "stream" else m
            for x, v, sc in zip(seen[kind], valid, scale):
                x = x.float()[v]
                if plain is not m:
                    plain.add(x, x @ w.T.to(x.device))
                x = x * sc[v] if normalise == "stream" else x  # each token's rows weighted
                m.add(x, x @ w.T.to(x.device))
            n_remove = max(1, min(n_units - 1, round(max_fraction * n_units)))
            res = obs_select(m, n_units, width, n_remove, damp=config.damp, intercept=config.intercept)
            if visit is not None:
                visit(layer, kind, plain, res)
            costs = torch.tensor(res.costs, dtype=torch.float64)
            if normalise == "output":
                _, _, _, my = m.centered(config.intercept)
                costs = costs / max(float(m.yy) - m.count * float(my @ my), 1e-30)
            out[kind].append(costs)
        if progress:
            progress(layer + 1, g.n_layers)
    return out


def _take(costs: list[torch.Tensor], total: int, chunk: int, sizes: list[int]) -> list[int]:
    """Counts per layer (multiples of `chunk`) taking the `total` cheapest removals, chunk by chunk."""
    if total <= 0:
        return [0] * len(costs)
    items = []  # (cost of the chunk, layer)
    for layer, c in enumerate(costs):
        c = torch.cummax(c, 0).values  # a layer's order is its own greedy prefix: never cheaper later
        n_chunks = min(len(c), sizes[layer] - chunk) // chunk  # keep at least one chunk
        for j in range(n_chunks):
            items.append((float(c[j * chunk:(j + 1) * chunk].sum()), layer, j))
    items.sort()
    counts = [0] * len(costs)
    want = round(total / chunk)
    taken = 0
    for _, layer, j in items:  # sorted (cost, layer, chunk): a layer's chunks come in order, as a prefix
        if taken >= want:
            break
        if counts[layer] == j * chunk:
            counts[layer] += chunk
            taken += 1
    if taken < want:
        raise ValueError(f"cannot remove {total} units in chunks of {chunk} while every layer keeps one chunk")
    return counts


def _take_mixed(costs: dict[str, list[torch.Tensor]], params: dict[str, int], budget: int, chunks: dict[str, int],
                sizes: dict[str, int]) -> dict[str, list[int]]:
    """Counts per kind and layer removing about `budget` parameters, cheapest cost per parameter first."""
    items = []  # (cost per parameter, kind, layer, chunk index)
    for kind, per_layer in costs.items():
        chunk = chunks[kind]
        for layer, c in enumerate(per_layer):
            c = torch.cummax(c, 0).values
            for j in range(min(len(c), sizes[kind] - chunk) // chunk):
                items.append((float(c[j * chunk:(j + 1) * chunk].sum()) / (chunk * params[kind]), kind, layer, j))
    items.sort()
    counts = {kind: [0] * len(per_layer) for kind, per_layer in costs.items()}
    removed = 0
    for _, kind, layer, j in items:
        if removed >= budget:
            break
        if counts[kind][layer] == j * chunks[kind]:
            step = chunks[kind] * params[kind]
            if removed + step - budget > budget - removed:  # overshoots more than it helps: try smaller chunks
                continue
            counts[kind][layer] += chunks[kind]
            removed += step
    return counts


def joint_counts(handle: ModelHandle, heads: int, channels: int, texts: Sequence[str], config: RefitConfig, *,
                 normalise: str = "stream", even_groups: bool = False, ffn_align: int = 1, mix: bool = False,
                 progress: Progress | None = None) -> tuple[list[int], list[int]]:
    """(heads, channels) to remove per layer: the budget's totals taken cheapest-first from one global cost.

    `mix`: only the parameters the two totals remove are kept fixed; heads and channels compete for them
    by cost per parameter (a head of a GQA model weighs its Q rows and O columns).
    """
    kinds = [k for k, n in (("attn", heads), ("ffn", channels)) if n or mix]
    costs = obs_costs(handle, texts, config, normalise, progress=progress, kinds=kinds)
    return counts_from_costs(handle, costs, heads, channels, even_groups=even_groups, ffn_align=ffn_align, mix=mix)


def counts_from_costs(handle: ModelHandle, costs: dict[str, list[torch.Tensor]], heads: int, channels: int, *,
                      even_groups: bool = False, ffn_align: int = 1, mix: bool = False) -> tuple[list[int], list[int]]:
    """(heads, channels) to remove per layer, taken cheapest-first from `costs` (per kind and layer, in the
    layer's greedy order) as joint_counts does; any costs comparable across layers and kinds will do."""
    g = handle.geometry
    chunks = {"attn": g.n_kv_heads if even_groups and g.group_size > 1 else 1, "ffn": ffn_align}
    sizes = {"attn": g.n_heads, "ffn": g.ffn_dim}
    if mix:
        params = unit_params(handle)
        budget = heads * params["attn"] + channels * params["ffn"]
        counts = _take_mixed(costs, params, budget, chunks, sizes)
        return counts["attn"], counts["ffn"]
    h = _take(costs["attn"], heads, chunks["attn"], [g.n_heads] * g.n_layers)
    f = _take(costs["ffn"], channels, chunks["ffn"], [g.ffn_dim] * g.n_layers)
    return h, f


def unit_params(handle: ModelHandle) -> dict[str, int]:
    """Parameters one query head ("attn") and one FFN channel ("ffn") of layer 0 carry."""
    g = handle.geometry
    total = cost(handle).params_total
    head = PruneMask.dense(g).with_head(0, 0, 0.0)
    channel = PruneMask.dense(g)
    channel.ffn[0, 0] = 0.0
    return {"attn": total - cost(handle, head).params_kept, "ffn": total - cost(handle, channel).params_kept}
