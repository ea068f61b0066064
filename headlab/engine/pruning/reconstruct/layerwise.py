"""Reconstruction layer by layer: each pruned layer re-fits what it keeps to reproduce its dense output.

    mask = refit(handle, mask, texts)                        # keep the mask's units, re-solve their weights
    mask = obs_prune(handle, heads, channels, texts)          # OBS chooses the units per layer, then re-solves

Walking the layers in order over calibration batches (headlab.engine.runtime.replay: one dense record and
one record under the mask being built, advanced one layer at a time), for each layer l:

1. the dense layer runs on its dense input; the inputs of its O and down projections give the
   targets Y = X_dense W^T (what the dense projections output, without their own bias);
2. the pruned layer runs on the input the already-reconstructed layers 0..l-1 produce; the O
   projection's input X over every head's columns is accumulated against Y (headlab.engine.pruning.reconstruct.
   least_squares.Moments). Structured OBS may choose the heads that go (`obs_prune`); the kept
   columns are re-solved by ridge least squares with an intercept, which becomes the mask's
   attention compensation bias (FLAP's bias is the special case of keeping nothing);
3. the same for the FFN down projection, on inputs that already see the refitted attention.

Targets (RefitConfig.target):
- "output": each projection reproduces its own dense output, Y = X_dense W^T;
- "residual" (pre-LN models): each kept sub-block brings the pruned residual stream to the dense
  one at the next kept sub-block, Y = h_dense(next) - h_pruned(before) - bias. A sub-block also
  corrects the error its input carries, and one in front of removed sub-blocks or whole layers
  stands in for them (depth pruning): a least-squares linear map from that projection's inputs to
  the removed run's contribution, folded into weights the model already has (no new parameter
  beyond an output bias, so the checkpoint stays plain). FLAP's mean of a dropped layer folded
  into the preceding sub-block's bias (headlab.engine.importance.mean_ablation) is its zeroth-order case.

This is the closed-form, training-free reconstruction of SlimGPT (Ling et al., NeurIPS 2024) and
ZipLM (Kurtic et al., NeurIPS 2023) restricted to the output projections, so the result is still an
ordinary checkpoint after surgery (headlab.engine.core.refit: compact refits carried by the mask). The
targets are the dense model's outputs, so a layer also absorbs part of the error that earlier
layers left in its input. Cost per layer, over the calibration tokens: the dense layer, the pruned layer
once before the FFN's refit (which then corrects the layer's output in place), and the pruned layer only as
far as the attention's O projection before its refit and as far as each sub-block's norm before an input map
(LayerInputs.run_until: the rest is not computed); plus one dense forward to start and the solves (an
[F, F] system per FFN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headlab.engine.core.adapter import Geometry
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.core.progress import Progress
from headlab.engine.core.refit import REFIT_KINDS, LayerRefit, unit_features
from headlab.engine.core.tokens import batches, context_length, encode_batch
from headlab.engine.pruning.reconstruct.least_squares import DEFAULT_DAMP, Moments, obs_select, ridge_fit
from headlab.engine.runtime.replay import LayerInputs, layer_output, record_layers

__all__ = ["INPUT_MODES", "TARGETS", "RefitConfig", "fit_input_map", "obs_prune", "output_weight", "refit",
           "relative_error", "supports_input_maps", "with_refit"]

TARGETS = ("output", "residual")
INPUT_MODES = ("none", "pruned", "all")


@dataclass(frozen=True)
class RefitConfig:
    """How reconstruction fits: ridge damping, intercept, which sub-blocks, calibration batching."""

    damp: float = DEFAULT_DAMP
    intercept: bool = True
    units: str = "both"  # "heads", "ffn" or "both": which output projections are refitted
    refit_unpruned: bool = False  # also re-solve layers that lost nothing (they still see shifted inputs)
    target: str = "output"  # "output": each projection's dense output; "residual": the dense residual stream
    # the input side (Q/K/V, gate/up rows) re-fitted as one input map per sub-block (headlab.engine.core.refit):
    # "none"; "pruned": sub-blocks that lose units; "all": every sub-block; either only after the first loss
    # (before it the inputs are the dense ones)
    inputs: str = "none"
    input_damp: float = DEFAULT_DAMP
    max_length: int = 256
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.units not in ("heads", "ffn", "both"):
            raise ValueError(f"units must be 'heads', 'ffn' or 'both', got {self.units!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.damp < 0 or self.input_damp < 0:
            raise ValueError(f"damping must be >= 0, got {self.damp} and {self.input_damp}")
        if self.inputs not in INPUT_MODES:
            raise ValueError(f"inputs must be one of {', '.join(INPUT_MODES)}, got {self.inputs!r}")

    def refits(self, kind: str) -> bool:
        return self.units == "both" or self.units == ("heads" if kind == "attn" else "ffn")


def output_weight(handle: ModelHandle, layer: int, kind: str) -> torch.Tensor:
    """The O ("attn") or down ("ffn") projection's weight of `layer` as [hidden, inputs] (a view of the model)."""
    if kind == "attn":
        o = handle.adapter.head_weights(layer).o  # (H, d, hd)
        return o.permute(1, 0, 2).reshape(o.shape[1], -1)  # (d, H * hd)
    return handle.adapter.ffn_weights(layer)["down"]  # (d, F)


def relative_error(m: Moments, keep: torch.Tensor, w: torch.Tensor, intercept: bool) -> float:
    """||X_keep W^T + c - Y||^2 / ||Y - mean(Y)||^2 at the fitted intercept (0: the dense output exactly)."""
    h, cxy, _, my = m.centered(intercept)
    yc = float(m.yy) - m.count * float(my @ my) if intercept else float(m.yy)
    if keep.numel() == 0:
        return 1.0
    hk, ck = h[keep][:, keep], cxy[keep]
    err = yc - 2.0 * float((w.T * ck).sum()) + float(((w @ hk) * w).sum())
    return max(err, 0.0) / max(yc, 1e-30)


def supports_input_maps(handle: ModelHandle) -> bool:
    """The family maps a norm in front of each sub-block and its input projections (Llama, Gemma 3)."""
    try:
        handle.adapter.sublayer_norm(0, "attn")
        handle.adapter.projections(0)
    except Exception:  # noqa: BLE001  (UnsupportedModelError or a family without those modules)
        return False
    return True


def fit_input_map(pruned: Sequence[torch.Tensor], dense: Sequence[torch.Tensor], valid: Sequence[torch.Tensor],
                  damp: float) -> torch.Tensor:
    """M [d, d] minimising sum ||x_p M^T - x_d||^2 + lam ||M - I||^2 over the valid tokens (float64 solve).

    Every kept row w of an input projection re-solved against its dense output, min ||X_p w' - X_d w||^2 +
    lam ||w' - w||^2, is w' = M^T w: one map serves them all (headlab.engine.core.refit). The damping pulls
    toward the identity (no change), lam = damp x mean diagonal of X_p^T X_p.
    """
    d = pruned[0].shape[-1]
    h = torch.zeros(d, d, dtype=torch.float64)
    c = torch.zeros(d, d, dtype=torch.float64)
    for xp, xd, v in zip(pruned, dense, valid):
        xp, xd = xp[v].reshape(-1, d).float(), xd[v].reshape(-1, d).float()
        h += (xp.T @ xp).double()
        c += (xp.T @ xd).double()
    lam = damp * float(torch.diagonal(h).mean())
    lam = lam if lam > 0 else 1e-8
    eye = torch.eye(d, dtype=torch.float64)
    m_t = torch.linalg.solve(h + lam * eye, c + lam * eye)  # (d, d) = M^T
    return m_t.T.float().contiguous()


def _run_layer(record: LayerInputs, layer: int, mask: PruneMask | None, inputs_of: Sequence[torch.nn.Module],
               post: Sequence[torch.nn.Module] = (), *, until: torch.nn.Module | None = None,
               until_input: bool = False) -> tuple[LayerInputs | None, list[list[torch.Tensor]], ...]:
    """Run `layer` alone under `mask`: (the record at layer + 1, per batch the input of each `inputs_of` module,
    per batch the output of each `post` module). Captured before any gate acts (hooks registered first).

    `until`: the layer runs only as far as that module (its output; its input with `until_input`), so what
    comes after it is not computed and no record is returned (None): the captures are the same.
    """
    seen_in: list[list[torch.Tensor]] = [[] for _ in inputs_of]
    seen_out: list[list[torch.Tensor]] = [[] for _ in post]
    with temporary_hooks() as hooks:
        for module, into in zip(inputs_of, seen_in):
            hooks.pre(module, lambda mod, args, into=into: into.append(args[0].detach()))
        for module, into in zip(post, seen_out):
            hooks.post(module, lambda mod, args, out, into=into: into.append(layer_output(out).detach()))
        if until is not None:
            record.run_until(layer, mask, until, pre=until_input)
            return None, seen_in, seen_out
        out = record.run_from(layer, mask, stop=layer + 1)
    return out.starting_at(layer + 1), seen_in, seen_out


def with_refit(mask: PruneMask, g, layer: int, kind: str, keep_units: tuple[int, ...], w: torch.Tensor,
                c: torch.Tensor) -> PruneMask:
    """`mask` with `layer`'s `kind` gates set to keep exactly `keep_units`, its refit and its intercept bias."""
    m = mask.clone()
    gates_ = m.heads if kind == "attn" else m.ffn
    row = torch.zeros(gates_.shape[1])
    row[list(keep_units)] = 1.0
    gates_[layer] = row
    name = "attn_bias" if kind == "attn" else "ffn_bias"
    bias = getattr(m, name)
    bias = torch.zeros(g.n_layers, g.hidden) if bias is None else bias.clone()
    bias[layer] = c.float()
    setattr(m, name, bias)
    m.refits(kind)[layer] = LayerRefit(keep_units, w.float())
    return m


def _obs_keep(g, kind: str, m: Moments, kept: tuple[int, ...], count: int, config: RefitConfig,
              even_groups: bool, layer: int) -> tuple[int, ...]:
    """The units of `kept` that stay after structured OBS removes `count` of them."""
    n_units, width = (g.n_heads, g.head_dim) if kind == "attn" else (g.ffn_dim, 1)
    if count >= len(kept):
        raise ValueError(f"layer {layer} keeps {len(kept)} {'heads' if kind == 'attn' else 'channels'}; "
                         f"cannot remove {count} of them (at least one must stay)")
    allowed = torch.zeros(n_units, dtype=torch.bool)
    allowed[list(kept)] = True
    limit = {}
    if kind == "attn" and even_groups:
        limit = {"group_of": torch.arange(g.n_heads) // g.group_size, "max_per_bucket": count // g.n_kv_heads}
    res = obs_select(m, n_units, width, count, damp=config.damp, intercept=config.intercept, allowed=allowed,
                     **limit)
    gone = set(res.removed)
    return tuple(u for u in kept if u not in gone)


class _Stream:
    """The dense model's residual stream at every sub-block boundary, for residual targets.

    Position p = 2 l is the input of layer l's attention, p = 2 l + 1 the input of its FFN (pre-LN
    models: the layer input plus the attention's output), p = 2 L the last layer's output.
    """

    def __init__(self, handle: ModelHandle, record: LayerInputs) -> None:
        # `record` holds the layers `at` is asked for past the walk's next position (_stream_layers)
        self.handle, self.record = handle, record
        self._mid: dict[int, list[torch.Tensor]] = {}
        self._next: dict[int, list[torch.Tensor]] = {}

    def set_mid(self, layer: int, hidden: list[torch.Tensor], attn_out: list[torch.Tensor]) -> None:
        """The dense stream in front of `layer`'s FFN, from the walk's own dense input and attention output."""
        self._mid = {layer: [h + a for h, a in zip(hidden, attn_out)]}

    def set_next(self, layer: int, hidden: list[torch.Tensor]) -> None:
        """The dense input of `layer`, the walk's own next dense record (held by the walk anyway: no copy)."""
        self._next = {layer: hidden}

    def at(self, position: int) -> list[torch.Tensor]:
        layer, odd = divmod(position, 2)
        if not odd and layer in self._next:
            return self._next[layer]
        if not self.record.hidden[layer] and not (odd and layer in self._mid):
            raise RuntimeError(f"the dense stream at layer {layer} was not recorded (_stream_layers missed it)")
        if not odd:
            return self.record.hidden[layer]
        if layer not in self._mid:
            attn = self.handle.adapter.subblock(layer, "attn").module
            _, _, (out,) = _run_layer(self.record, layer, None, [], post=[attn], until=attn)
            self._mid[layer] = [h + a for h, a in zip(self.record.hidden[layer], out)]
        return self._mid[layer]


def _site(g: Geometry, mask: PruneMask, counts: dict[str, list[int]] | None, config: RefitConfig, runs: list[bool],
          pos: int, residual: bool) -> tuple[int, int, bool]:
    """For the sub-block at position `pos`: (the next running position, the units it is to lose, whether a run of it
    is re-fitted: it lost or will lose units, config.refit_unpruned, or with residual targets it stands next to
    removed sub-blocks and stands in for them)."""
    layer, kind = pos // 2, REFIT_KINDS[pos % 2]
    nxt = next(q for q in range(pos + 1, 2 * g.n_layers + 1) if runs[q])
    count = counts[kind][layer] if counts is not None else 0
    beside_removed = residual and (nxt != pos + 1 or (pos > 0 and not runs[pos - 1]))
    n_units = g.n_heads if kind == "attn" else g.ffn_dim
    changed = len(mask.kept_units(layer, kind)) < n_units or count > 0 or config.refit_unpruned or beside_removed
    return nxt, count, changed


def _stream_layers(g: Geometry, mask: PruneMask, counts: dict[str, list[int]] | None, config: RefitConfig,
                   runs: list[bool]) -> set[int]:
    """The layers whose dense input `_Stream.at` can be asked for beyond what the walk itself holds: the one at or
    after the next running position of every sub-block the walk may re-fit (L: the model's output) where that
    position lies past the sub-block's own neighbour (removed sub-blocks between). The neighbour's stream is the
    walk's: the next layer's dense input (`set_next`) or the same layer's middle (`set_mid`). Only these are
    recorded, not all L + 1: 146,000 tokens of SmolLM2's stream are 0.3 GB a layer, and a width mask, which
    removes no sub-block, records none (it held every layer, 20 GB, before)."""
    out = set()
    for pos in range(2 * g.n_layers):
        nxt, count, changed = _site(g, mask, counts, config, runs, pos, residual=True)
        if runs[pos] and changed and (config.refits(REFIT_KINDS[pos % 2]) or count) and nxt != pos + 1:
            out.add(nxt // 2)
    return out


def _with_input_map(mask: PruneMask, layer: int, kind: str, m: torch.Tensor) -> PruneMask:
    out = mask.clone()
    out.input_maps(kind)[layer] = m
    return out


def _kept_positions(mask: PruneMask) -> list[bool]:
    """Per sub-block position (2 l: attention, 2 l + 1: FFN), whether it runs under `mask`."""
    heads, ffn = mask.heads_effective().sum(1) > 0, mask.ffn_effective().sum(1) > 0
    return [bool(x) for pair in zip(heads, ffn) for x in pair]


def _bias(module: torch.nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


@torch.no_grad()
def _walk(handle: ModelHandle, mask: PruneMask, texts: Sequence[str], config: RefitConfig,
          counts: dict[str, list[int]] | None, even_groups: bool, progress: Progress | None) -> PruneMask:
    g, adapter = handle.geometry, handle.adapter
    mask.check(g)
    if not mask.is_hard:
        raise MaskError("reconstruction needs a hard mask (every gate 0 or 1)")
    residual = config.target == "residual"
    if residual and any(adapter.subblock(l, k).residual_inclusive for l in range(g.n_layers) for k in REFIT_KINDS):
        raise ValueError(f"residual targets need a pre-LN model (sub-blocks that add a delta); {adapter.family} "
                         "sub-blocks return the new residual stream: use target='output'")
    if residual and any(adapter.subblock(l, k).output_normed for l in range(g.n_layers) for k in REFIT_KINDS):
        raise ValueError(f"residual targets need sub-blocks that add their projection's output to the stream as it "
                         f"is; {adapter.family} normalises each sub-block's output first (post-norms): use "
                         "target='output' (and no depth stand-in)")
    max_length = min(config.max_length, context_length(handle.model))
    encoded = [encode_batch(handle.tokenizer, list(chunk), max_length, handle.device)
               for chunk in batches(list(texts), config.batch_size)]
    valid = [am.bool() for _, am in encoded]  # (B, T): padding never enters a fit
    inputs = [{"input_ids": ids, "attention_mask": am} for ids, am in encoded]
    # Refits, input maps and intercepts are re-solved; FLAP biases of the input mask are replaced, never stacked.
    mask = mask.without_refit()
    mask.attn_bias = mask.ffn_bias = None
    runs = _kept_positions(mask)
    runs.append(True)  # the model's output
    # the walk holds one layer's states at a time; residual targets also keep the dense stream where they read it
    full = record_layers(handle, None, inputs, keep={0, *(_stream_layers(g, mask, counts, config, runs) if residual
                                                          else ())})
    stream = _Stream(handle, full) if residual else None
    dense = full.starting_at(0)
    pruned = full.starting_at(0)
    del full
    maps_on = config.inputs != "none"
    if maps_on and not supports_input_maps(handle):
        raise ValueError(f"input re-fits need a norm in front of each sub-block and mapped Q/K/V and gate/up "
                         f"projections; {adapter.family} has none: use inputs='none'")
    # the first sub-block position that loses something: every later one reads shifted inputs
    lost = [2 * l + (k == "ffn") for l in range(g.n_layers) for k in REFIT_KINDS
            if not runs[2 * l + (k == "ffn")] or (counts is not None and counts[k][l] > 0)
            or len(mask.kept_units(l, k)) < (g.n_heads if k == "attn" else g.ffn_dim)]
    first_loss = min(lost, default=2 * g.n_layers)
    errors: dict[str, list[float | None]] = {"attn": [None] * g.n_layers, "ffn": [None] * g.n_layers}
    for layer in range(g.n_layers):
        projs = {"attn": adapter.head_output_proj(layer), "ffn": adapter.ffn_output_proj(layer)}
        attn_module = adapter.subblock(layer, "attn").module
        norms = {k: adapter.sublayer_norm(layer, k) for k in REFIT_KINDS} if maps_on else {}
        dense_next, (x_o, x_d), (a_d, *n_d) = _run_layer(dense, layer, None, [projs["attn"], projs["ffn"]],
                                                         post=[attn_module, *norms.values()])
        dense_norm = dict(zip(norms, n_d))
        if residual:
            stream.set_mid(layer, dense.hidden[layer], a_d)
            stream.set_next(layer + 1, dense_next.hidden[layer + 1])
        else:
            targets = {kind: [x @ output_weight(handle, layer, kind).T.to(x.dtype) for x in xs]
                       for kind, xs in (("attn", x_o), ("ffn", x_d))}
        del x_o, x_d, a_d, n_d
        current: LayerInputs | None = None  # the pruned record at layer + 1 under the current mask, if run
        for kind in REFIT_KINDS:
            pos = 2 * layer + (kind == "ffn")
            kept = mask.kept_units(layer, kind)
            nxt, count, changed = _site(g, mask, counts, config, runs, pos, residual)
            if not runs[pos]:
                continue
            if maps_on and pos > first_loss and (changed or config.inputs == "all"):
                _, _, (n_p,) = _run_layer(pruned, layer, mask, [], post=[norms[kind]], until=norms[kind])
                mask = _with_input_map(mask, layer, kind, fit_input_map(n_p, dense_norm[kind], valid,
                                                                        config.input_damp))
                current = None
                del n_p
            if not changed or not (config.refits(kind) or count):
                continue
            ffn_module = adapter.subblock(layer, "ffn").module
            if kind == "attn":  # O's input is all the attention's refit needs: the FFN runs after it, refitted
                current, a_p, f_p, raw = None, None, None, None
                _, (x_p,), _ = _run_layer(pruned, layer, mask, [projs[kind]], until=projs[kind], until_input=True)
            else:
                current, (x_p,), (a_p, f_p, raw) = _run_layer(pruned, layer, mask, [projs[kind]],
                                                              post=[attn_module, ffn_module, projs[kind]])
            if residual:
                before = pruned.hidden[layer]
                if kind == "ffn" and runs[2 * layer]:
                    before = [h + a for h, a in zip(before, a_p)]
                b = _bias(projs[kind])
                ys = [d - h - (0 if b is None else b.to(h.dtype)) for d, h in zip(stream.at(nxt), before)]
            else:
                ys = targets[kind]
            del a_p
            m = Moments(x_p[0].shape[-1], g.hidden)
            for x, y, v in zip(x_p, ys, valid):
                m.add(x[v], y[v])
            del ys
            keep_units = _obs_keep(g, kind, m, kept, count, config, even_groups, layer) if count else kept
            width = g.head_dim if kind == "attn" else 1
            feats = unit_features(keep_units, width)
            w, c = ridge_fit(m, feats, damp=config.damp, intercept=config.intercept)
            errors[kind][layer] = relative_error(m, feats, w, config.intercept)
            mask = with_refit(mask, g, layer, kind, keep_units, w, c)
            # The record ran before this refit. When the FFN sub-block just adds its projection's output to the
            # stream (pre-LN, nothing after the projection: checked on this very run), swap that output for the
            # refit one instead of running the layer again.
            shortcut = (kind == "ffn" and not adapter.subblock(layer, "ffn").residual_inclusive
                        and all(torch.equal(a, b) for a, b in zip(f_p, raw)))
            if shortcut:
                b = _bias(projs[kind])
                new = [torch.nn.functional.linear(x.index_select(-1, feats.to(x.device)), w.to(x.dtype),
                                                  None if b is None else b.to(x.dtype)) + c.to(x.dtype)
                       for x in x_p]
                hidden = [h - r + n for h, r, n in zip(current.hidden[layer + 1], raw, new)]
                current = LayerInputs(handle, [hidden if i == layer + 1 else [] for i in range(g.n_layers + 1)],
                                      current.calls)
            else:
                current = None
            del x_p, f_p, raw
        if current is None:
            current, _, _ = _run_layer(pruned, layer, mask, [])
        pruned = current
        dense = dense_next
        if progress:
            progress(layer + 1, g.n_layers)
    for name in ("attn_bias", "ffn_bias"):  # without an intercept no bias is made (an export stays bias-free)
        if getattr(mask, name) is not None and not getattr(mask, name).any():
            setattr(mask, name, None)
    n_tokens = sum(int(v.sum()) for v in valid)
    mask.meta["reconstruction"] = {
        "method": "layer-wise ridge least squares (SlimGPT / ZipLM style), "
                  + ("matching the dense residual stream after each sub-block" if residual
                     else "matching each projection's dense output"),
        "target": config.target, "damp": config.damp, "intercept": config.intercept, "units": config.units,
        "refit_unpruned": config.refit_unpruned,
        "inputs": config.inputs, "input_damp": config.input_damp,
        "input_maps": {"attn": sorted(mask.attn_in), "ffn": sorted(mask.ffn_in)},
        "calibration_texts": len(texts), "calibration_tokens": n_tokens,
        "relative_error": {k: [None if e is None else round(e, 5) for e in v] for k, v in errors.items()},
    }
    return mask.check(g)


def refit(handle: ModelHandle, mask: PruneMask, texts: Sequence[str], *, config: RefitConfig | None = None,
          progress: Progress | None = None) -> PruneMask:
    """`mask` with every layer that lost heads or channels re-solved on `texts` (the units stay as they are)."""
    return _walk(handle, mask, texts, config or RefitConfig(), None, False, progress)


def obs_prune(handle: ModelHandle, heads: Sequence[int], channels: Sequence[int], texts: Sequence[str], *,
              base: PruneMask | None = None, even_groups: bool = False, config: RefitConfig | None = None,
              progress: Progress | None = None) -> PruneMask:
    """Remove `heads[l]` query heads and `channels[l]` FFN channels from each layer l, chosen by structured OBS
    on the inputs the already-pruned layers produce, then re-solve what remains (see module doc).

    `base`: units already removed (OBS removes more among the rest). `even_groups`: every KV group of a layer
    loses the same number of query heads, so an export keeps the family's standard GQA layout (without GQA,
    one query head per KV head, every count is even and the flag changes nothing).
    """
    g = handle.geometry
    even_groups = even_groups and g.group_size > 1
    base = base if base is not None else PruneMask.dense(g)
    heads, channels = list(heads), list(channels)
    if len(heads) != g.n_layers or len(channels) != g.n_layers:
        raise ValueError(f"need one head count and one channel count per layer ({g.n_layers}), "
                         f"got {len(heads)} and {len(channels)}")
    if even_groups and any(h % g.n_kv_heads for h in heads):
        raise ValueError(f"even GQA groups need head counts that are multiples of {g.n_kv_heads} KV heads")
    counts = {"attn": heads, "ffn": channels}
    mask = _walk(handle, base, texts, config or RefitConfig(), counts, even_groups, progress)
    mask.meta["reconstruction"]["selection"] = "structured OBS, greedy per layer (SlimGPT / ZipLM)"
    mask.meta["reconstruction"]["removed_per_layer"] = {k: list(v) for k, v in counts.items()}
    return mask
