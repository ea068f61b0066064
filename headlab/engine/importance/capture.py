"""One streaming pass over calibration texts: every statistic the criteria need.

Nothing proportional to T x T is kept: each layer's attention probabilities are reduced to
per-head sums inside a hook and dropped. What is averaged, exactly:

- `entropy` [L, H]: H(row) = -sum_j p_ij log p_ij (nats) of each query row, averaged over
  every non-padding query position of every text (token-weighted). Nothing is excluded: in a
  causal model row t can reach at most log(t + 1), so the first positions pull it down;
  `entropy_normalized` divides each row by log(number of keys it can see) and averages over
  rows that see at least two keys (a row that sees one key has no choice to measure).
- attention-position statistics [L, H], same averaging: `sink` (mass on the first token),
  `self_mass` (on the query's own position), `prev_mass` (on the previous token, rows t >= 1),
  `local_mass` (on the LOCAL_WINDOW nearest keys, itself included), `mean_distance`
  (expected |i - j| in tokens).
- `head_act_norm` [L, H]: mean L2 norm of each head's output (the O-projection's input slice).
- `head_in_mean`/`head_in_sq` [L, H*hd] and `ffn_mean`/`ffn_sq` [L, F]: first and second
  moments of the O/down-projection inputs (used for FLAP fluctuation and bias compensation).
- `ffn_act` [L, F]: mean |activation| of each FFN channel.
- `block_influence` [L, 2] (ATTN, FFN) and `layer_influence` [L]: 1 - cos(h_in, h_out) of
  the residual stream across each sub-block / layer (ShortGPT), averaged over tokens.
- with `gradients=True`: `head_grad` [L, H], `ffn_grad` [L, F], `block_grad` [L, 2]: |dL/dg| for
  gates g at 1 (Michel et al. 2019), the absolute value taken per batch, averaged over batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import lm_loss, objective_name
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import batches, context_length, encode_batch
from headlab.engine.distributed.world import SINGLE, World

__all__ = ["CaptureStats", "capture", "LOCAL_WINDOW", "row_entropy"]

LOCAL_WINDOW = 4


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of probabilities along the last dim (0 log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(dim=-1)


@dataclass
class CaptureStats:
    """Per-head, per-channel and per-block statistics of one calibration pass (CPU float32)."""

    entropy: torch.Tensor
    entropy_normalized: torch.Tensor
    sink: torch.Tensor
    self_mass: torch.Tensor
    prev_mass: torch.Tensor
    local_mass: torch.Tensor
    mean_distance: torch.Tensor
    head_act_norm: torch.Tensor
    head_in_mean: torch.Tensor
    head_in_sq: torch.Tensor
    ffn_act: torch.Tensor
    ffn_mean: torch.Tensor
    ffn_sq: torch.Tensor
    block_influence: torch.Tensor
    layer_influence: torch.Tensor
    head_grad: torch.Tensor | None = None
    ffn_grad: torch.Tensor | None = None
    block_grad: torch.Tensor | None = None
    n_texts: int = 0
    n_tokens: int = 0
    loss: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Tensors as nested lists (for JSON caches)."""
        return {
            f.name: (v.tolist() if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }


class _Accumulator:
    """Running sums filled by hooks during one batch after another."""

    def __init__(self, L: int, H: int, hd: int, F: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.sums = {n: z(L, H) for n in ("entropy", "sink", "self_mass", "local_mass", "mean_distance", "head_act_norm")}
        self.sums["entropy_normalized"] = z(L, H)
        self.sums["prev_mass"] = z(L, H)
        self.rows = z(L)  # query rows counted per layer (same for all heads)
        self.rows_norm = z(L)  # rows that see >= 2 keys
        self.rows_prev = z(L)  # rows t >= 1
        self.head_in = z(L, H * hd)
        self.head_in_sq = z(L, H * hd)
        self.ffn_abs = z(L, F)
        self.ffn = z(L, F)
        self.ffn_sq = z(L, F)
        self.tokens = z(L)
        self.block_influence = z(L, 2)
        self.layer_influence = z(L)
        self.valid: torch.Tensor | None = None  # (B, T) bool, set per batch
        self.layer_in: dict[int, torch.Tensor] = {}
        self.attn_mid: dict[int, torch.Tensor] = {}


def _attention_stats(acc: _Accumulator, layer: int, p: torch.Tensor, causal: bool) -> None:
    """Reduce probabilities p [B, H, Tq, Tk] of one layer into the accumulator."""
    p = p.detach().float()
    valid = acc.valid.to(p.device)  # (B, T)
    B, H, T, _ = p.shape
    vq = valid[:, None, :].to(p.dtype)  # (B, 1, Tq) query rows that count
    ent = row_entropy(p)  # (B, H, Tq)
    pos = torch.arange(T, device=p.device)
    n_keys = valid.sum(dim=1, keepdim=True)  # (B, 1)
    visible = torch.minimum(pos[None, :] + 1, n_keys) if causal else n_keys.expand(B, T)  # (B, Tq)
    log_vis = torch.log(visible.clamp(min=1).to(p.dtype))[:, None, :]
    norm_rows = vq * (visible[:, None, :] >= 2).to(p.dtype)
    ent_norm = torch.where(log_vis > 0, ent / log_vis.clamp(min=1e-9), torch.zeros_like(ent))
    dist = (pos[:, None] - pos[None, :]).abs().to(p.dtype)  # (Tq, Tk)
    local = (dist < LOCAL_WINDOW).to(p.dtype) if causal else (dist <= LOCAL_WINDOW // 2).to(p.dtype)
    diag = torch.diagonal(p, dim1=-2, dim2=-1)  # (B, H, T)
    prev = torch.diagonal(p, offset=-1, dim1=-2, dim2=-1)  # (B, H, T-1): row t, key t-1
    prev_rows = vq[:, :, 1:]
    s = acc.sums
    s["entropy"][layer] += (ent * vq).sum(dim=(0, 2)).double().cpu()
    s["entropy_normalized"][layer] += (ent_norm * norm_rows).sum(dim=(0, 2)).double().cpu()
    s["sink"][layer] += (p[..., 0] * vq).sum(dim=(0, 2)).double().cpu()
    s["self_mass"][layer] += (diag * vq).sum(dim=(0, 2)).double().cpu()
    s["prev_mass"][layer] += (prev * prev_rows).sum(dim=(0, 2)).double().cpu()
    s["local_mass"][layer] += ((p * local).sum(-1) * vq).sum(dim=(0, 2)).double().cpu()
    s["mean_distance"][layer] += ((p * dist).sum(-1) * vq).sum(dim=(0, 2)).double().cpu()
    acc.rows[layer] += float(vq.sum())
    acc.rows_norm[layer] += float(norm_rows.sum())
    acc.rows_prev[layer] += float(prev_rows.sum())


def _cos_distance(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    """Sum over valid tokens of 1 - cos(a_t, b_t)."""
    a = a.to(b.device)  # a layer's input may still be on the previous layer's device (a device map)
    cos = torch.nn.functional.cosine_similarity(a.detach().float(), b.detach().float(), dim=-1)  # (B, T)
    return float(((1 - cos) * valid.to(b.device)).sum())


def _install(hooks, handle: ModelHandle, acc: _Accumulator) -> None:
    adapter, g = handle.adapter, handle.geometry

    def first(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    for layer in range(g.n_layers):
        def on_attention(module, args, output, layer=layer):
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                _attention_stats(acc, layer, output[1], g.causal)

        def on_head_in(module, args, layer=layer):
            x = args[0].detach().float()  # (B, T, H * hd)
            v = acc.valid[..., None].to(device=x.device, dtype=x.dtype)
            B, T, D = x.shape
            acc.sums["head_act_norm"][layer] += (
                (x.view(B, T, g.n_heads, D // g.n_heads).norm(dim=-1) * v).sum(dim=(0, 1)).double().cpu()
            )
            acc.head_in[layer] += (x * v).sum(dim=(0, 1)).double().cpu()
            acc.head_in_sq[layer] += (x.square() * v).sum(dim=(0, 1)).double().cpu()

        def on_ffn_in(module, args, layer=layer):
            x = args[0].detach().float()  # (B, T, F)
            v = acc.valid[..., None].to(device=x.device, dtype=x.dtype)
            acc.ffn_abs[layer] += (x.abs() * v).sum(dim=(0, 1)).double().cpu()
            acc.ffn[layer] += (x * v).sum(dim=(0, 1)).double().cpu()
            acc.ffn_sq[layer] += (x.square() * v).sum(dim=(0, 1)).double().cpu()
            acc.tokens[layer] += float(v.sum())

        def on_layer_in(module, args, kwargs, layer=layer):
            acc.layer_in[layer] = first(args, kwargs)

        attn_sb = adapter.subblock(layer, "attn")

        def on_attn_out(module, args, kwargs, output, layer=layer, sb=attn_sb):
            out = output[0] if isinstance(output, tuple) else output
            h_in = acc.layer_in[layer].to(out.device)
            acc.attn_mid[layer] = out if sb.residual_inclusive else h_in + out
            acc.block_influence[layer, 0] += _cos_distance(h_in, acc.attn_mid[layer], acc.valid)

        def on_layer_out(module, args, kwargs, output, layer=layer):
            out = output[0] if isinstance(output, tuple) else output
            v = acc.valid
            acc.block_influence[layer, 1] += _cos_distance(acc.attn_mid.pop(layer), out, v)
            acc.layer_influence[layer] += _cos_distance(acc.layer_in.pop(layer), out, v)

        hooks.post(adapter.attention(layer), on_attention)
        hooks.pre(adapter.head_output_proj(layer), on_head_in)
        hooks.pre(adapter.ffn_output_proj(layer), on_ffn_in)
        block = adapter.layers()[layer]
        hooks.pre(block, on_layer_in, with_kwargs=True)
        hooks.post(attn_sb.module, on_attn_out, with_kwargs=True)
        hooks.post(block, on_layer_out, with_kwargs=True)


def _grad_mask(g) -> PruneMask:
    m = PruneMask.dense(g)
    for name in ("heads", "ffn", "attn", "ffn_block"):
        setattr(m, name, getattr(m, name).clone().requires_grad_(True))
    return m


def _sums(acc: _Accumulator, grads: dict[str, torch.Tensor], totals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every running sum of one rank's share, by name: what `World.all_sum` adds up across ranks."""
    out = {f"sum.{k}": v for k, v in acc.sums.items()}
    out.update({f"grad.{k}": v for k, v in grads.items()})
    for name in ("rows", "rows_norm", "rows_prev", "head_in", "head_in_sq", "ffn_abs", "ffn", "ffn_sq", "tokens",
                 "block_influence", "layer_influence"):
        out[name] = getattr(acc, name)
    out["totals"] = totals
    return out


def capture(
    handle: ModelHandle,
    texts: Sequence[str],
    *,
    gradients: bool = True,
    batch_size: int = 4,
    max_length: int = 256,
    mask: PruneMask | None = None,
    progress: Progress | None = None,
    world: World = SINGLE,
) -> CaptureStats:
    """One pass (forward, plus backward when `gradients`) over `texts`; see the module doc.

    Under a data-parallel `world` each rank runs every world.size-th batch (the batches are cut as
    in one process) and the running sums are added across ranks: every rank gets the statistics of
    the whole pass, equal to one process's up to the order of the float sums. `progress` counts
    this rank's batches.
    """
    g = handle.geometry
    if g.n_layers == 0:
        raise ValueError("the model has no layers")
    texts = list(texts)
    max_length = min(max_length, context_length(handle.model))
    acc = _Accumulator(g.n_layers, g.n_heads, g.head_dim, g.ffn_dim)
    grads = {"heads": torch.zeros(g.n_layers, g.n_heads), "ffn": torch.zeros(g.n_layers, g.ffn_dim),
             "attn": torch.zeros(g.n_layers), "ffn_block": torch.zeros(g.n_layers)}
    totals = torch.zeros(3, dtype=torch.float64)  # batches, loss * scored tokens, scored tokens
    mine = world.shard(list(batches(texts, batch_size)))

    def run_share() -> None:
        with temporary_hooks() as hooks:
            _install(hooks, handle, acc)
            for done, (_, chunk) in enumerate(mine):
                ids, valid = encode_batch(handle.tokenizer, chunk, max_length, handle.device)
                acc.valid = valid.bool()
                gm = _grad_mask(g) if gradients else None
                active = gm if gradients else mask
                if gradients and mask is not None:
                    active = PruneMask(gm.heads * mask.heads, gm.ffn * mask.ffn, gm.attn * mask.attn,
                                       gm.ffn_block * mask.ffn_block)
                with torch.set_grad_enabled(gradients), gates.apply(handle, active):
                    loss, n_tok = lm_loss(handle, ids, valid)
                    if gradients:
                        loss.backward()
                if gradients:
                    for name in grads:
                        grads[name] += getattr(gm, name).grad.detach().abs().cpu()
                totals.add_(torch.tensor([1.0, float(loss.detach()) * n_tok, n_tok], dtype=torch.float64))
                if progress:
                    progress(done + 1, len(mine))

    world.run("capture", run_share)
    t = world.all_sum(_sums(acc, grads, totals))
    n_batches, total_loss, total_tok = t["totals"].tolist()
    if (t["rows"] == 0).any():
        raise RuntimeError(
            "the attention modules returned no probabilities: load the model with "
            "attn_implementation='eager' (SDPA/flash kernels do not expose them)"
        )
    rows = t["rows"].clamp(min=1)[:, None]
    tokens = t["tokens"].clamp(min=1)[:, None]
    s = {k: (t[f"sum.{k}"] / rows).float() for k in acc.sums}
    s["entropy_normalized"] = (t["sum.entropy_normalized"] / t["rows_norm"].clamp(min=1)[:, None]).float()
    s["prev_mass"] = (t["sum.prev_mass"] / t["rows_prev"].clamp(min=1)[:, None]).float()
    grad = {k: t[f"grad.{k}"] / n_batches for k in grads} if gradients else {}
    return CaptureStats(
        **s,
        head_in_mean=(t["head_in"] / tokens).float(),
        head_in_sq=(t["head_in_sq"] / tokens).float(),
        ffn_act=(t["ffn_abs"] / tokens).float(),
        ffn_mean=(t["ffn"] / tokens).float(),
        ffn_sq=(t["ffn_sq"] / tokens).float(),
        block_influence=(t["block_influence"] / tokens).float(),
        layer_influence=(t["layer_influence"] / tokens[:, 0]).float(),
        head_grad=grad.get("heads"),
        ffn_grad=grad.get("ffn"),
        block_grad=torch.stack([grad["attn"], grad["ffn_block"]], dim=1) if gradients else None,
        n_texts=len(texts),
        n_tokens=int(t["tokens"][0]),
        loss=total_loss / max(total_tok, 1),
        meta={"objective": objective_name(handle), "batch_size": batch_size, "max_length": max_length},
    )
