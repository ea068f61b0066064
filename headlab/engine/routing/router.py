"""Input-dependent pruning (IG-Pruning style): a pool of cluster embeddings, one mask per cluster.

    router = train_router(handle, encoder, prompts, embeddings, clustering, MaskTarget(blocks=8))
    route = router.route(encoder, "Solve 3x + 5 = 11")[0]      # nearest pool entry -> that cluster's mask
    with gates.apply(handle, route.mask): ...

Stage 1 (`train_router`): calibration prompts -> sentence embeddings -> K-means -> one
hard-concrete mask trained per cluster on that cluster's texts (headlab.engine.pruning.softmask), plus one
static mask trained on all of them (the baseline at the same budget).
Stage 2 (`Router.route`): a prompt is embedded, the nearest pool entry (initialised from the
centroids; euclidean by default, which agrees with K-means' own assignment) picks the mask.
A batch of routed prompts runs at once with one mask per row (`routed_logits`): through the
grouped masked kernels where the kernel path runs the model (headlab.engine.runtime.sparse_forward,
rows grouped by mask digest), else through the gates with per-row masks. `Router.groups`
lists which inputs went to which cluster.

Files: `router.safetensors` holds the pool [k, d] (float32); `router.json` holds k, the
distance, the encoder's name, the per-cluster masks (PruneMask.to_dict), the static mask,
the clusters' categories and purity, the target and the training settings.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from headlab.engine.core import gates
from headlab.engine.core.adapter import Geometry
from headlab.engine.core.files import read_format_json
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.mask import MaskError, PruneMask
from headlab.engine.core.objective import token_logits
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import EmptyTextError, context_length, encode_batch
from headlab.engine.distributed.world import SINGLE, World
from headlab.engine.pruning.softmask import MaskTarget, StepLog, TrainConfig, train_mask
from headlab.engine.routing.clusters import CalibrationPrompt, Clustering, purity
from headlab.engine.routing.embeddings import SentenceEncoder, embed_texts
from headlab.engine.runtime.evaluate import generate
from headlab.engine.runtime.sparse_forward import sparse_logits, sparse_refusal

__all__ = [
    "DISTANCES",
    "ROUTER_FORMAT_VERSION",
    "RouterError",
    "Route",
    "RouteGroup",
    "Router",
    "train_router",
    "texts_nll",
    "routed_logits",
    "routed_nll",
    "ClusterPerplexity",
    "heldout_perplexity",
    "RoutedGeneration",
    "routed_generate",
    "pruned_blocks",
]

DISTANCES = ("euclidean", "cosine")
ROUTER_FORMAT_VERSION = 1
POOL_FILE = "router.safetensors"
META_FILE = "router.json"


class RouterError(ValueError):
    """A router file or call that does not fit: the message says what and where."""


@dataclass(frozen=True)
class Route:
    """Where one prompt goes."""

    text: str
    cluster: int
    distances: tuple[float, ...]  # to every pool entry
    mask: PruneMask
    notice: str | None = None  # set when the encoder read only part of the prompt


@dataclass(frozen=True)
class RouteGroup:
    """Inputs routed to the same cluster: they run together under one mask."""

    cluster: int
    indices: tuple[int, ...]
    mask: PruneMask


def pruned_blocks(mask: PruneMask) -> list[str]:
    """The removed sub-blocks as readable names: ["ATTN 3", "FFN 17", ...]."""
    out = [f"ATTN {l}" for l in range(mask.attn.numel()) if mask.attn[l] == 0]
    out += [f"FFN {l}" for l in range(mask.ffn_block.numel()) if mask.ffn_block[l] == 0]
    return sorted(out, key=lambda s: (int(s.split()[1]), s))


@dataclass
class Router:
    pool: torch.Tensor  # [k, d] float32
    masks: list[PruneMask]  # one per pool entry
    encoder: str
    distance: str = "euclidean"
    static_mask: PruneMask | None = None  # trained on all calibration data: the baseline
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise RouterError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.pool.dim() != 2 or self.pool.shape[0] < 1:
            raise RouterError(f"the pool must be a [k, d] matrix, got shape {tuple(self.pool.shape)}")
        if len(self.masks) != self.pool.shape[0]:
            raise RouterError(f"{self.pool.shape[0]} pool entries but {len(self.masks)} masks")
        if not torch.isfinite(self.pool).all():
            raise RouterError("the pool holds NaN or inf")

    @property
    def k(self) -> int:
        return self.pool.shape[0]

    # --- routing -----------------------------------------------------------------------
    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Distance of every embedding [N, d] to every pool entry: [N, k]."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.pool.shape[1]:
            raise RouterError(
                f"embeddings of shape {tuple(embeddings.shape)} do not fit a pool of dimension {self.pool.shape[1]}"
            )
        x, pool = embeddings.float(), self.pool.float()
        if self.distance == "cosine":
            return 1.0 - F.normalize(x, dim=-1) @ F.normalize(pool, dim=-1).T
        return torch.cdist(x, pool)

    def route_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The nearest pool entry per embedding: [N] int64 (ties go to the lower index)."""
        return self.distances(embeddings).argmin(dim=1)

    def check_encoder(self, encoder: SentenceEncoder) -> None:
        if encoder.name != self.encoder:
            raise RouterError(f"this router was built with the encoder {self.encoder!r}, not {encoder.name!r}")

    def route(self, encoder: SentenceEncoder, texts: str | Sequence[str]) -> list[Route]:
        """Embed and route each text; a text longer than the encoder's limit is cut, with a notice."""
        self.check_encoder(encoder)
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise EmptyTextError(f"prompt #{i} is empty: type something to route")
        d = self.distances(encoder.encode(texts))
        routes = []
        for t, row in zip(texts, d):
            c = int(row.argmin())
            n_tok = encoder.token_count(t)
            notice = (f"the prompt is {n_tok} tokens; the router embedded its first {encoder.max_length}"
                      if n_tok > encoder.max_length else None)
            routes.append(Route(t, c, tuple(float(x) for x in row), self.masks[c], notice))
        return routes

    def groups(self, clusters: torch.Tensor | Sequence[int]) -> list[RouteGroup]:
        """Inputs grouped by their cluster, in cluster order, each with its one mask."""
        rows: dict[int, list[int]] = {}
        for i, c in enumerate(clusters):
            rows.setdefault(int(c), []).append(i)
        return [RouteGroup(c, tuple(rows[c]), self.masks[c]) for c in sorted(rows)]

    # --- files -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "headlab.router",
            "version": ROUTER_FORMAT_VERSION,
            "k": self.k,
            "dim": int(self.pool.shape[1]),
            "distance": self.distance,
            "encoder": self.encoder,
            "masks": [m.to_dict() for m in self.masks],
            "static_mask": self.static_mask.to_dict() if self.static_mask is not None else None,
            "meta": self.meta,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write router.safetensors (the pool) and router.json (everything else) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp_pool = folder / f".{POOL_FILE}.tmp"
        tmp_meta = folder / f".{META_FILE}.tmp"
        save_file({"pool": self.pool.float().contiguous()}, str(tmp_pool), metadata={"format": "headlab.router"})
        tmp_meta.write_text(json.dumps(self.to_json()))
        os.replace(tmp_pool, folder / POOL_FILE)
        os.replace(tmp_meta, folder / META_FILE)
        return folder

    def export(self, folder: str | os.PathLike) -> list[Path]:
        """`save` plus every mask as its own mask file (masks/cluster_<c>.json, masks/static.json)."""
        folder = self.save(folder)
        (folder / "masks").mkdir(exist_ok=True)
        written = [folder / POOL_FILE, folder / META_FILE]
        for c, m in enumerate(self.masks):
            written.append(m.save(folder / "masks" / f"cluster_{c}.json"))
        if self.static_mask is not None:
            written.append(self.static_mask.save(folder / "masks" / "static.json"))
        return written

    @classmethod
    def load(cls, folder: str | os.PathLike, g: Geometry | None = None) -> "Router":
        """Read a router written by `save`; with `g`, also check every mask fits that model."""
        folder = Path(folder)
        pool_path, meta_path = folder / POOL_FILE, folder / META_FILE
        for p in (pool_path, meta_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} is missing: a router folder holds {POOL_FILE} and {META_FILE}")
        d = read_format_json(meta_path, "headlab.router", version=ROUTER_FORMAT_VERSION, what="router file",
                             error=RouterError)
        try:
            pool = load_file(str(pool_path))["pool"]
        except Exception as e:  # torn/foreign safetensors surface as assorted errors
            raise RouterError(f"{pool_path} is corrupt or not a router pool: {e}") from None
        try:
            k, dim = int(d["k"]), int(d["dim"])
            if tuple(pool.shape) != (k, dim):
                raise RouterError(f"{pool_path} holds a pool of shape {tuple(pool.shape)}, but {META_FILE} "
                                  f"says k = {k}, d = {dim}")
            masks = [PruneMask.from_dict(m) for m in d["masks"]]
            static = PruneMask.from_dict(d["static_mask"]) if d.get("static_mask") else None
            router = cls(pool.float(), masks, d["encoder"], d["distance"], static, dict(d.get("meta", {})))
        except KeyError as e:
            raise RouterError(f"{meta_path} is missing the field {e.args[0]!r}") from None
        except MaskError as e:
            raise RouterError(f"{meta_path}: {e}") from None
        if g is not None:
            for c, m in enumerate([*router.masks, *([static] if static else [])]):
                try:
                    m.check(g)
                except MaskError as e:
                    name = f"cluster {c}" if c < router.k else "the static mask"
                    raise RouterError(f"{meta_path}: the mask of {name} does not fit this model: {e}") from None
        return router


def train_router(
    handle: ModelHandle,
    encoder: SentenceEncoder,
    prompts: Sequence[CalibrationPrompt],
    embeddings: torch.Tensor,
    clustering: Clustering,
    target: MaskTarget,
    config: TrainConfig = TrainConfig(),
    *,
    distance: str = "euclidean",
    static: bool = True,
    progress: Callable[[str, StepLog], None] | None = None,
    world: World = SINGLE,
) -> Router:
    """One mask per cluster (on that cluster's score texts) and, with `static`, one on all of them.

    Under a data-parallel `world` the masks are dealt round-robin to the ranks, one training run per
    mask as in one process (same texts, same seed), and gathered: every rank returns the same router.
    `progress` sees this rank's masks only.
    """
    if len(prompts) != embeddings.shape[0] or len(prompts) != clustering.labels.numel():
        raise ValueError(f"{len(prompts)} prompts, {embeddings.shape[0]} embeddings and "
                         f"{clustering.labels.numel()} labels: they must match one to one")
    jobs: list[tuple[str, list[str]]] = []
    for c in range(clustering.k):
        jobs.append((f"cluster {c}", [p.score_text for p, l in zip(prompts, clustering.labels) if int(l) == c]))
    if static:
        jobs.append(("static", [p.score_text for p in prompts]))
    local: dict[str, _Trained] = {}

    def run_share() -> None:
        for _, (name, texts) in world.shard(jobs):
            cb = (lambda log, name=name: progress(name, log)) if progress else None
            r = train_mask(handle, texts, target, config, progress=cb)
            local[name] = _Trained(r.mask.to_dict(), r.removed, r.seconds, r.expected_sparsity)

    world.run("mask training", run_share)
    gathered = {name: t for share in world.all_gather(local) for name, t in share.items()}
    results = {name: gathered[name] for name, _ in jobs}  # in training order, as one process has them
    pur = purity(clustering.labels, [p.category for p in prompts], clustering.k)
    meta = {
        "model": handle.name,
        "target": target.to_dict(),
        "removed": results["cluster 0"].removed,
        "train": config.to_dict(),
        "n_prompts": len(prompts),
        "cluster_sizes": clustering.sizes(),
        "purity": pur.to_dict(),
        "kmeans_seed": clustering.seed,
        "train_seconds": {n: round(r.seconds, 1) for n, r in results.items()},
        "expected_sparsity_at_end": {n: r.expected_sparsity for n, r in results.items()},
        "prompt_keys": [[p.key for p, l in zip(prompts, clustering.labels) if int(l) == c]
                        for c in range(clustering.k)],
    }
    return Router(
        pool=clustering.centroids.clone().float(),
        masks=[PruneMask.from_dict(results[f"cluster {c}"].mask) for c in range(clustering.k)],
        encoder=encoder.name,
        distance=distance,
        static_mask=PruneMask.from_dict(results["static"].mask) if static else None,
        meta=meta,
    )


@dataclass(frozen=True)
class _Trained:
    """What the router keeps of one mask's training run; plain data, so ranks can exchange it."""

    mask: dict[str, Any]  # PruneMask.to_dict()
    removed: dict[str, int]
    seconds: float
    expected_sparsity: dict[str, float]


@torch.no_grad()
def texts_nll(
    handle: ModelHandle,
    texts: Sequence[str],
    mask: PruneMask | None = None,
    *,
    max_length: int = 256,
    batch_size: int = 4,
) -> tuple[float, int]:
    """(summed next-token NLL, scored tokens) over `texts`, each scored on its own (no packing)."""
    if not handle.is_causal_lm:
        raise ValueError(f"perplexity needs a causal language model; {handle.name} is an encoder")
    total, count = 0.0, 0
    with gates.apply(handle, mask):
        for i in range(0, len(texts), batch_size):
            ids, attn = encode_batch(handle.tokenizer, texts[i : i + batch_size], max_length, handle.device)
            logits = token_logits(handle, ids, attn)[:, :-1].float()  # (B, T-1, V): predicts token t+1
            valid = attn[:, 1:].bool()
            nll = F.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum")
            total, count = total + float(nll), count + int(valid.sum())
    return total, count


def routed_logits(
    handle: ModelHandle, masks: Sequence[PruneMask], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Logits [B, T, V] of a batch whose row b runs under masks[b].

    One pass through the grouped masked kernels when the kernel path runs this model, these
    masks and this padding (`sparse_refusal`); otherwise the gates with one mask per row.
    """
    if sparse_refusal(handle, masks, attention_mask) is None:
        return sparse_logits(handle, input_ids, masks, attention_mask=attention_mask)
    with gates.apply(handle, masks):
        return token_logits(handle, input_ids, attention_mask)


@torch.no_grad()
def routed_nll(
    handle: ModelHandle,
    texts: Sequence[str],
    masks: Sequence[PruneMask],
    *,
    max_length: int = 256,
    batch_size: int = 4,
) -> list[tuple[float, int]]:
    """(summed next-token NLL, scored tokens) of each text under its own mask, batched whatever the masks."""
    if not handle.is_causal_lm:
        raise ValueError(f"perplexity needs a causal language model; {handle.name} is an encoder")
    if len(texts) != len(masks):
        raise ValueError(f"{len(texts)} texts but {len(masks)} masks: pass one mask per text")
    out: list[tuple[float, int]] = []
    for i in range(0, len(texts), batch_size):
        ids, attn = encode_batch(handle.tokenizer, texts[i : i + batch_size], max_length, handle.device)
        logits = routed_logits(handle, masks[i : i + batch_size], ids, attn)[:, :-1].float()  # (B, T-1, V)
        valid = attn[:, 1:].bool()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * valid  # (B, T-1)
        out += [(float(s), int(n)) for s, n in zip(nll.sum(1), valid.sum(1))]
    return out


@dataclass(frozen=True)
class ClusterPerplexity:
    """Token-weighted perplexity of the held-out prompts routed to one cluster."""

    cluster: int | None  # None: all held-out prompts
    n_prompts: int
    n_tokens: int
    dense: float
    static: float | None
    routed: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def heldout_perplexity(
    handle: ModelHandle,
    router: Router,
    encoder: SentenceEncoder,
    prompts: Sequence[CalibrationPrompt],
    *,
    max_length: int = 256,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> list[ClusterPerplexity]:
    """Per routed cluster (and overall): perplexity dense, under the static mask and under the routed mask.

    The routed pass runs the prompts in mixed batches, each row under its own cluster's mask (`routed_nll`).
    """
    router.check_encoder(encoder)
    clusters = router.route_embeddings(embed_texts(encoder, [p.text for p in prompts]))
    groups = router.groups(clusters)
    per_prompt = routed_nll(handle, [p.score_text for p in prompts], [router.masks[int(c)] for c in clusters],
                            max_length=max_length, batch_size=batch_size)
    sums: dict[str, list[float]] = {"dense": [0.0, 0], "static": [0.0, 0], "routed": [0.0, 0]}
    rows = []
    for done, group in enumerate(groups, 1):
        texts = [prompts[i].score_text for i in group.indices]
        dense = texts_nll(handle, texts, None, max_length=max_length, batch_size=batch_size)
        routed = (sum(per_prompt[i][0] for i in group.indices), sum(per_prompt[i][1] for i in group.indices))
        static = (texts_nll(handle, texts, router.static_mask, max_length=max_length, batch_size=batch_size)
                  if router.static_mask is not None else None)
        for name, r in (("dense", dense), ("routed", routed), ("static", static)):
            if r is not None:
                sums[name][0] += r[0]
                sums[name][1] += r[1]
        rows.append(ClusterPerplexity(group.cluster, len(texts), dense[1], math.exp(dense[0] / dense[1]),
                                      math.exp(static[0] / static[1]) if static else None,
                                      math.exp(routed[0] / routed[1])))
        if progress:
            progress(done, len(groups))
    ppl = {n: math.exp(s / c) if c else None for n, (s, c) in sums.items()}
    rows.append(ClusterPerplexity(None, len(prompts), int(sums["dense"][1]), ppl["dense"], ppl["static"],
                                  ppl["routed"]))
    return rows


@dataclass(frozen=True)
class RoutedGeneration:
    route: Route
    pruned: list[str]  # removed sub-blocks, e.g. ["ATTN 3", "FFN 17"]
    text: str  # the generation
    notices: tuple[str, ...]  # truncation of the prompt by the encoder and/or the LM's context


def routed_generate(
    handle: ModelHandle, router: Router, encoder: SentenceEncoder, prompt: str, *, max_new_tokens: int = 40
) -> RoutedGeneration:
    """Route `prompt`, then generate greedily under its cluster's mask."""
    route = router.route(encoder, prompt)[0]
    notices = [route.notice] if route.notice else []
    limit = context_length(handle.model)
    n_tok = len(handle.tokenizer(prompt)["input_ids"])
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be below the model's context of {limit} tokens")
    if n_tok + max_new_tokens > limit:
        notices.append(f"the prompt is {n_tok} tokens; with {max_new_tokens} new tokens the model's context of "
                       f"{limit} holds only its last {limit - max_new_tokens}")
    text = generate(handle, prompt, route.mask, max_new_tokens=max_new_tokens)
    return RoutedGeneration(route, pruned_blocks(route.mask), text, tuple(notices))
