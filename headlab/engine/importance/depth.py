"""Depth-pruning criteria: how much each sub-block and each whole layer matters.

Every criterion gives sub-block scores `Scores.blocks` [L, 2] (ATTN, FFN) and whole-layer
scores `Scores.meta["layers"]` [L]; higher = keep, as everywhere in headlab.engine.importance.criteria.

| name            | score of a sub-block / a layer                               | reference                    |
|-----------------|--------------------------------------------------------------|------------------------------|
| block_influence | 1 - cos(h_in, h_out) of the residual stream                  | ShortGPT, Men et al. 2024    |
| block_ppl       | calibration perplexity rise when that unit alone is removed  | Shortened LLaMA "PPL"        |
| taylor_plus     | sum over its parameters of |W * dL/dW| (first-order change   | Shortened LLaMA "Taylor+",   |
|                 | of the loss); the first 4 and last 2 layers protected        | Kim et al. 2024              |

block_ppl and taylor_plus read calibration text (wikitext calibration comes from the end of
the file, disjoint from the evaluated windows at its start), never the evaluation windows.
Whole-layer scores by any criterion: headlab.engine.importance.layer_importance.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from headlab.engine.core import gates
from headlab.engine.core.adapter import Adapter
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import private_copy
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.objective import lm_loss, objective_name
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import batches, context_length, encode_batch
from headlab.engine.data.datasets import calibration_texts
from headlab.engine.importance.criteria import Criterion, Scores
from headlab.engine.models.adapters import adapter_for

__all__ = ["BlockPPL", "TaylorPlus", "DEPTH_CRITERIA", "protect_ends", "calibration_or_default"]

DEPTH_CRITERIA = ("block_influence", "block_ppl", "taylor_plus")


def calibration_or_default(texts: Sequence[str] | None, n_texts: int) -> list[str]:
    """`texts` as a list, or `n_texts` shipped wikitext calibration texts when None."""
    return list(texts) if texts is not None else calibration_texts("wikitext", n_texts)


def _encoded(handle: ModelHandle, texts: list[str], batch_size: int, max_length: int) -> list[tuple[torch.Tensor, ...]]:
    max_length = min(max_length, context_length(handle.model))
    return [encode_batch(handle.tokenizer, chunk, max_length, handle.device) for chunk in batches(texts, batch_size)]


@torch.no_grad()
def _mean_nll(handle: ModelHandle, encoded: list[tuple[torch.Tensor, torch.Tensor]], mask: PruneMask | None) -> float:
    """Token-weighted mean loss of the model's objective over the encoded batches, under `mask`."""
    total, count = 0.0, 0
    with gates.apply(handle, mask):
        for ids, am in encoded:
            loss, n = lm_loss(handle, ids, am)
            total, count = total + float(loss) * n, count + n
    return total / count


def protect_ends(scores: torch.Tensor, first: int, last: int) -> tuple[torch.Tensor, list[int]]:
    """Raise the scores of the first `first` and last `last` layers above every other (rows of [L] or [L, k]).

    Applied only when at least half of the layers stay candidates, so small models are not frozen.
    """
    L = scores.shape[0]
    protected = sorted(set(range(min(first, L))) | set(range(max(L - last, 0), L)))
    if L - len(protected) < max(1, L // 2):
        return scores, []
    out = scores.clone()
    top = float(scores.max())
    span = float(scores.max() - scores.min()) or 1.0
    for rank, layer in enumerate(protected):
        out[layer] = top + span * (1 + rank)  # finite, distinct, above every candidate
    return out, protected


class BlockPPL(Criterion):
    name = "block_ppl"
    needs = "none"  # runs its own forward passes on calibration text
    units = ("blocks",)
    description = ("Shortened LLaMA PPL: calibration perplexity rise when each sub-block / layer is removed alone; "
                   "prune the smallest rise")

    def __init__(self, texts: Sequence[str] | None = None, n_texts: int = 8, max_length: int = 128,
                 batch_size: int = 4, layers_only: bool = False, progress: Progress | None = None):
        self.texts, self.n_texts, self.max_length, self.batch_size = texts, n_texts, max_length, batch_size
        self.layers_only, self.progress = layers_only, progress

    def __call__(self, handle: ModelHandle, stats: Any) -> Scores:
        g = handle.geometry
        if g.n_layers < 2:
            raise ValueError("depth criteria need a model with at least two layers")
        texts = calibration_or_default(self.texts, self.n_texts)
        encoded = _encoded(handle, texts, self.batch_size, self.max_length)
        dense = math.exp(_mean_nll(handle, encoded, None))
        dense_mask = PruneMask.dense(g)
        kinds = [] if self.layers_only else ["attn", "ffn"]
        blocks = torch.zeros(g.n_layers, 2)
        layers = torch.zeros(g.n_layers)
        total, done = g.n_layers * (len(kinds) + 1), 0
        for layer in range(g.n_layers):
            for col, kind in enumerate(kinds):
                removed = dense_mask.with_block(layer, kind, 0.0)
                blocks[layer, col] = math.exp(_mean_nll(handle, encoded, removed)) - dense
                done += 1
                if self.progress:
                    self.progress(done, total)
            whole = dense_mask.with_block(layer, "attn", 0.0).with_block(layer, "ffn", 0.0)
            layers[layer] = math.exp(_mean_nll(handle, encoded, whole)) - dense
            done += 1
            if self.progress:
                self.progress(done, total)
        if self.layers_only:
            blocks = layers[:, None].repeat(1, 2)
        n_tok = sum(int(am.sum()) for _, am in encoded)
        return Scores(self.name, blocks=blocks,
                      note=f"perplexity rise ({objective_name(handle)}) over {len(texts)} calibration texts, "
                           f"{n_tok} tokens; dense {dense:.3f}",
                      meta={"layers": layers, "dense_perplexity": dense, "n_tokens": n_tok})


class TaylorPlus(Criterion):
    name = "taylor_plus"
    needs = "none"  # runs its own backward passes on calibration text
    units = ("blocks",)
    description = ("Shortened LLaMA Taylor+: sum of |W * dL/dW| over each sub-block / layer, first 4 and last 2 "
                   "layers protected; prune the smallest")

    def __init__(self, texts: Sequence[str] | None = None, n_texts: int = 8, max_length: int = 128,
                 batch_size: int = 4, protect_first: int = 4, protect_last: int = 2,
                 progress: Progress | None = None):
        self.texts, self.n_texts, self.max_length, self.batch_size = texts, n_texts, max_length, batch_size
        self.protect_first, self.protect_last, self.progress = protect_first, protect_last, progress

    def __call__(self, handle: ModelHandle, stats: Any) -> Scores:
        g = handle.geometry
        texts = calibration_or_default(self.texts, self.n_texts)
        encoded = _encoded(handle, texts, self.batch_size, self.max_length)
        # Weight gradients need weights that require grad; a private copy keeps the shared model untouched.
        model = private_copy(handle.model)
        adapter = adapter_for(model)
        shim = _Shim(model, handle.tokenizer, adapter)
        owned = {id(p): layer for layer in range(g.n_layers) for p in adapter.layers()[layer].parameters()}
        params = [p for p in model.parameters() if id(p) in owned]
        for p in model.parameters():
            p.requires_grad_(id(p) in owned)
        salience = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for i, (ids, am) in enumerate(encoded):
            loss, _ = lm_loss(shim, ids, am)
            grads = torch.autograd.grad(loss, params)
            for s, p, gr in zip(salience, params, grads, strict=True):
                s += (p.detach() * gr).float()  # signed sum over batches, |.| taken at the end (as the paper)
            if self.progress:
                self.progress(i + 1, len(encoded))
        per_param = {id(p): float(s.abs().sum()) for p, s in zip(params, salience, strict=True)}
        layers = torch.zeros(g.n_layers)
        blocks = torch.zeros(g.n_layers, 2)
        for layer in range(g.n_layers):
            layers[layer] = sum(per_param[id(p)] for p in adapter.layers()[layer].parameters())
            for col, kind in enumerate(("attn", "ffn")):
                blocks[layer, col] = sum(per_param[id(p)] for m in adapter.subblock_modules(layer, kind)
                                         for p in m.parameters())
        del model
        layers, protected = protect_ends(layers, self.protect_first, self.protect_last)
        blocks, _ = protect_ends(blocks, self.protect_first, self.protect_last) if protected else (blocks, [])
        note = f"sum |W * dL/dW| over {len(texts)} calibration texts ({objective_name(handle)})"
        note += f"; layers {protected} protected" if protected else "; no layer protected (model too shallow)"
        return Scores(self.name, blocks=blocks, note=note, meta={"layers": layers, "protected": protected})


class _Shim:
    """The parts of a ModelHandle that headlab.engine.core.objective reads, over a private model copy."""

    def __init__(self, model: Any, tokenizer: Any, adapter: Adapter):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.geometry = adapter.geometry
