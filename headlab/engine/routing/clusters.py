"""Calibration prompts for input-dependent pruning: the shipped sets, a held-out split, K-means, 2-D maps.

Prompts: the first turn of every MT-Bench and Vicuna-bench question (with their categories),
GSM8K test questions (category "math") and HumanEval prompts ("coding"); GSM8K and HumanEval
are capped (default 80 each) so that no source dominates the clusters.

What is embedded and what is scored:
- `text` is the user's prompt: the sentence encoder embeds it and the router routes it;
- `score_text` is what masks are trained on and held-out perplexity is measured on: the prompt
  itself as plain text (no chat template, whose fixed system preamble would dominate short
  prompts), followed for GSM8K by the reference solution (calculator annotations removed), so
  the math cluster is also scored on worked answers.

Split: within each (source, category) group, prompts are ordered by sha256(seed, source, id)
and the first `held_out` fraction is held out (at least one when the group has two or more
prompts), so the split depends neither on file order nor on which other sets are loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from headlab.engine.core.files import read_format_json, write_atomic_safetensors, write_atomic_text
from headlab.engine.core.progress import Progress
from headlab.engine.data.datasets import DATA_DIR, PROMPT_SETS, load_prompts
from headlab.engine.models.load import cache_dir
from headlab.engine.routing.embeddings import SentenceEncoder, embed_texts

__all__ = [
    "PROMPT_SOURCES",
    "CalibrationPrompt",
    "PromptSplit",
    "Clustering",
    "Purity",
    "calibration_prompts",
    "split_prompts",
    "kmeans",
    "silhouette_scores",
    "purity",
    "project_2d",
    "cached_projection",
    "PROJECTIONS",
    "ClusterRun",
    "cluster_prompts",
    "CLUSTERS_FORMAT_VERSION",
]

PROMPT_SOURCES = ("mt_bench", "vicuna_bench", "gsm8k", "humaneval")
PROJECTIONS = ("pca", "umap")
CLUSTERS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CalibrationPrompt:
    text: str  # the prompt as a user types it: embedded and routed
    score_text: str  # what masks train on and perplexity scores (see the module docstring)
    category: str
    source: str
    id: str

    @property
    def key(self) -> str:
        """A stable identifier, unique across sources: "source:id"."""
        return f"{self.source}:{self.id}"


@functools.lru_cache(maxsize=1)
def _gsm8k_answers() -> tuple[str, ...]:
    with (DATA_DIR / "prompts" / PROMPT_SETS["gsm8k"]).open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # "<<16-3-4=9>>" are the dataset's calculator annotations, not part of the solution text.
    return tuple(re.sub(r"<<[^>]*>>", "", r["answer"]) for r in rows)


def calibration_prompts(
    sources: Sequence[str] = PROMPT_SOURCES, per_source: int | None = 80
) -> tuple[CalibrationPrompt, ...]:
    """The shipped prompts of `sources`, at most `per_source` from each (None: all of them)."""
    if not sources:
        raise ValueError("choose at least one prompt set")
    out: list[CalibrationPrompt] = []
    for source in sources:
        if source not in PROMPT_SOURCES:
            raise ValueError(f"unknown prompt set {source!r}; choose from {', '.join(PROMPT_SOURCES)}")
        prompts = load_prompts(source)[:per_source]
        for i, p in enumerate(prompts):
            score = f"{p.text}\n{_gsm8k_answers()[i]}" if source == "gsm8k" else p.text
            out.append(CalibrationPrompt(p.text, score, p.category, source, p.id))
    return tuple(out)


@dataclass(frozen=True)
class PromptSplit:
    train: tuple[CalibrationPrompt, ...]
    held_out: tuple[CalibrationPrompt, ...]


def split_prompts(prompts: Sequence[CalibrationPrompt], held_out: float = 0.25, seed: int = 0) -> PromptSplit:
    """A deterministic train / held-out split, stratified by source and category."""
    if not 0.0 <= held_out < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {held_out}")
    by_cat: dict[tuple[str, str], list[CalibrationPrompt]] = {}
    for p in prompts:
        by_cat.setdefault((p.source, p.category), []).append(p)
    held: set[str] = set()
    for items in by_cat.values():
        items = sorted(items, key=lambda p: hashlib.sha256(f"{seed}:{p.key}".encode()).hexdigest())
        n_held = round(held_out * len(items))
        if held_out > 0 and len(items) >= 2:
            n_held = min(max(n_held, 1), len(items) - 1)
        held.update(p.key for p in items[:n_held])
    return PromptSplit(
        train=tuple(p for p in prompts if p.key not in held),
        held_out=tuple(p for p in prompts if p.key in held),
    )


@dataclass
class Clustering:
    """K-means over sentence embeddings: a label per prompt and the centroids [k, d]."""

    labels: torch.Tensor  # [N] int64
    centroids: torch.Tensor  # [k, d] float32
    inertia: float
    seed: int = 0

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def sizes(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.k).tolist()


def kmeans(embeddings: torch.Tensor, k: int = 4, seed: int = 0) -> Clustering:
    """K-means (k-means++, 10 restarts, seeded) on embeddings [N, d]."""
    from sklearn.cluster import KMeans

    n = embeddings.shape[0]
    if not 2 <= k <= n:
        raise ValueError(f"k = {k}: choose between 2 and the number of prompts ({n})")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(embeddings.double().numpy())
    labels = torch.as_tensor(km.labels_, dtype=torch.int64)
    if int(labels.bincount(minlength=k).min()) == 0:
        raise ValueError(f"K-means left a cluster empty at k = {k}: choose a smaller k")
    return Clustering(labels, torch.as_tensor(km.cluster_centers_, dtype=torch.float32), float(km.inertia_), seed)


def silhouette_scores(embeddings: torch.Tensor, ks: Sequence[int] = range(2, 11), seed: int = 0) -> dict[int, float]:
    """Mean silhouette (cosine) of the K-means labelling for each k; higher separates better."""
    from sklearn.metrics import silhouette_score

    x = embeddings.double().numpy()
    return {k: float(silhouette_score(x, kmeans(embeddings, k, seed).labels.numpy(), metric="cosine"))
            for k in ks if 2 <= k < len(x)}


@dataclass(frozen=True)
class Purity:
    """How well clusters match the prompt categories."""

    overall: float  # fraction of prompts whose category is their cluster's majority category
    majority: tuple[str, ...]  # per cluster
    majority_fraction: tuple[float, ...]  # per cluster
    counts: tuple[dict[str, int], ...]  # per cluster: category -> prompts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def purity(labels: torch.Tensor, categories: Sequence[str], k: int | None = None) -> Purity:
    """Cluster purity against `categories` (one per labelled prompt)."""
    labels_list = [int(x) for x in labels]
    if len(labels_list) != len(categories):
        raise ValueError(f"{len(labels_list)} labels but {len(categories)} categories")
    k = k if k is not None else max(labels_list) + 1
    counts = [Counter() for _ in range(k)]
    for c, cat in zip(labels_list, categories):
        counts[c][cat] += 1
    majority = tuple(cnt.most_common(1)[0][0] if cnt else "" for cnt in counts)
    frac = tuple(cnt.most_common(1)[0][1] / sum(cnt.values()) if cnt else 0.0 for cnt in counts)
    hits = sum(cnt.most_common(1)[0][1] for cnt in counts if cnt)
    return Purity(hits / max(len(labels_list), 1), majority, frac, tuple(dict(cnt) for cnt in counts))


def _projection_path(embeddings: torch.Tensor, method: str, seed: int) -> Path:
    digest = hashlib.sha256(embeddings.contiguous().numpy().tobytes()).hexdigest()[:32]
    return cache_dir() / "projections" / f"{digest}-{method}-{seed}.safetensors"


def cached_projection(embeddings: torch.Tensor, method: str = "umap", seed: int = 0) -> np.ndarray | None:
    """A projection computed before for exactly these embeddings, or None."""
    from safetensors.torch import load_file

    path = _projection_path(embeddings, method, seed)
    if not path.exists():
        return None
    try:
        xy = load_file(path)["xy"]
    except Exception:  # a torn file: recompute
        return None
    return xy.numpy() if tuple(xy.shape) == (embeddings.shape[0], 2) else None


def project_2d(
    embeddings: torch.Tensor,
    method: str = "pca",
    seed: int = 0,
    *,
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """A 2-D map [N, 2] of the embeddings: "pca" (instant) or "umap" (cosine; cached on disk)."""
    if method not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {method!r}")
    x = embeddings.float().numpy()
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x).astype(np.float32)
    if cache:
        hit = cached_projection(embeddings, method, seed)
        if hit is not None:
            return hit
    if progress:
        progress("computing the UMAP projection (the first use in a process compiles numba code: ~20 s)")
    import umap

    n_neighbors = max(2, min(15, len(x) - 1))
    xy = umap.UMAP(n_components=2, n_neighbors=n_neighbors, metric="cosine", random_state=seed).fit_transform(x)
    xy = np.asarray(xy, dtype=np.float32)
    if cache:
        path = _projection_path(embeddings, method, seed)
        write_atomic_safetensors(path, {"xy": torch.from_numpy(xy)})
    return xy


@dataclass
class ClusterRun:
    """Stage 1 up to the clusters: the prompts, their split, the training embeddings and K-means."""

    split: PromptSplit
    embeddings: torch.Tensor  # [N_train, d], one per split.train prompt
    clustering: Clustering
    encoder: str
    settings: dict[str, Any]  # sources, per_source, held_out, split_seed: enough to rebuild the prompts

    @property
    def prompts(self) -> tuple[CalibrationPrompt, ...]:
        return self.split.train

    def purity(self) -> Purity:
        return purity(self.clustering.labels, [p.category for p in self.prompts], self.clustering.k)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "headlab.clusters",
            "version": CLUSTERS_FORMAT_VERSION,
            "encoder": self.encoder,
            "settings": self.settings,
            "k": self.clustering.k,
            "kmeans_seed": self.clustering.seed,
            "inertia": self.clustering.inertia,
            "keys": [p.key for p in self.prompts],
            "labels": self.clustering.labels.tolist(),
            "centroids": self.clustering.centroids.tolist(),
            "sizes": self.clustering.sizes(),
            "purity": self.purity().to_dict(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the clusters as JSON (labels by prompt key, centroids, purity, the settings)."""
        return write_atomic_text(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: SentenceEncoder) -> "ClusterRun":
        """Read a clusters file; prompts are rebuilt from its settings and embeddings come from the cache."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: write it with `python -m headlab cluster --out {path}`")
        d = read_format_json(path, "headlab.clusters", what="clusters file")
        try:
            st = d["settings"]
            if d["encoder"] != encoder.name:
                raise ValueError(f"{path} was clustered with the encoder {d['encoder']!r}, not {encoder.name!r}")
            split = split_prompts(calibration_prompts(st["sources"], st["per_source"]), st["held_out"],
                                  st["split_seed"])
            if [p.key for p in split.train] != d["keys"]:
                raise ValueError(f"{path} lists prompts that the shipped prompt sets no longer produce "
                                 f"with its settings; cluster again")
            labels = torch.tensor(d["labels"], dtype=torch.int64)
            centroids = torch.tensor(d["centroids"], dtype=torch.float32)
            if labels.numel() != len(split.train) or centroids.dim() != 2 or centroids.shape[0] != d["k"]:
                raise ValueError(f"{path}: labels or centroids do not match k = {d['k']} and "
                                 f"{len(split.train)} prompts")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= centroids.shape[0]):
                raise ValueError(f"{path}: a label is outside 0..{centroids.shape[0] - 1}")
            clustering = Clustering(labels, centroids, float(d["inertia"]), int(d["kmeans_seed"]))
        except KeyError as e:
            raise ValueError(f"{path} is missing the field {e.args[0]!r}") from None
        emb = embed_texts(encoder, [p.text for p in split.train])
        return cls(split, emb, clustering, encoder.name, dict(st))


def cluster_prompts(
    encoder: SentenceEncoder,
    k: int = 4,
    *,
    sources: Sequence[str] = PROMPT_SOURCES,
    per_source: int | None = 80,
    held_out: float = 0.25,
    split_seed: int = 0,
    kmeans_seed: int = 0,
    progress: Progress | None = None,
) -> ClusterRun:
    """Shipped prompts -> split -> embeddings of the training part (cached) -> K-means with `k`."""
    split = split_prompts(calibration_prompts(sources, per_source), held_out, split_seed)
    emb = embed_texts(encoder, [p.text for p in split.train], progress=progress)
    settings = {"sources": list(sources), "per_source": per_source, "held_out": held_out, "split_seed": split_seed}
    return ClusterRun(split, emb, kmeans(emb, k, kmeans_seed), encoder.name, settings)
