"""Sentence embeddings from a sentence-transformers model, cached on disk by content hash.

The encoder is any sentence-transformers model (default: the shipped all-MiniLM-L6-v2 folder,
offline): a folder with `modules.json`, a hub id, or a HeadLab export of one
(headlab.engine.models.sentence opens it; a folder without the ST files is refused, naming what is
missing). Embeddings are exactly `SentenceTransformer.encode`'s: the model's own pooling and
normalisation, inputs cut at its `max_seq_length` (256 for the MiniLM), so two texts that agree
on their first 256 tokens embed identically.
Embeddings of a list of texts are stored as safetensors under
`cache_dir()/embeddings/<sha256 of the encoder's identity + texts>.safetensors`; the identity of a
folder covers its path and every file's size and modification time, so rewriting it (a new
export into the same folder) starts a new cache entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from headlab.engine.core.files import write_atomic_safetensors
from headlab.engine.core.progress import Progress
from headlab.engine.core.tokens import EmptyTextError
from headlab.engine.models.load import ENCODER_MODEL, cache_dir, resolve_source
from headlab.engine.models.sentence import encoder_identity, open_sentence_transformer

__all__ = ["SentenceEncoder", "embedding_key", "embed_texts", "embeddings_cache_dir"]


class SentenceEncoder:
    """A sentence-transformers model that embeds prompts for the router (unit-norm when its pipeline normalises)."""

    def __init__(self, model: SentenceTransformer, name: str, *, identity: str | None = None,
                 max_length: int | None = None):
        self.model = model
        self.name = name
        self.identity = identity or name
        if max_length is not None:
            model.max_seq_length = max_length

    @classmethod
    def load(cls, name: str = ENCODER_MODEL, *, device: str = "cpu", max_length: int | None = None
             ) -> "SentenceEncoder":
        """Open the encoder by alias, sentence-transformers folder or hub id (default: the shipped MiniLM)."""
        model = open_sentence_transformer(name, device=device)
        return cls(model, name, identity=encoder_identity(resolve_source(name)), max_length=max_length)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_length(self) -> int:
        """Tokens the encoder reads per text (its max_seq_length, else the tokenizer's limit)."""
        return int(self.model.max_seq_length or self.model.tokenizer.model_max_length)

    def token_count(self, text: str) -> int:
        """How many tokens (with [CLS]/[SEP]) the encoder would see before truncation."""
        return len(self.model.tokenizer(text)["input_ids"])

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], *, batch_size: int = 32, progress: Progress | None = None
    ) -> torch.Tensor:
        """Embeddings [N, d] (float32, CPU), one per text, as SentenceTransformer.encode gives them (no cache)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise EmptyTextError("no text to embed")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise EmptyTextError(f"text #{i} is empty: type something to embed")
        out = []
        n = len(texts)
        for i in range(0, n, batch_size):
            emb = self.model.encode(texts[i : i + batch_size], batch_size=batch_size, convert_to_tensor=True,
                                    show_progress_bar=False)
            out.append(emb.float().cpu())
            if progress:
                progress(min(i + batch_size, n), n)
        return torch.cat(out)


def embeddings_cache_dir() -> Path:
    return cache_dir() / "embeddings"


def embedding_key(encoder_identity: str, texts: Sequence[str], max_length: int) -> str:
    """sha256 over the encoder's identity, its truncation length and every text (length-prefixed)."""
    h = hashlib.sha256(f"{encoder_identity}\0{max_length}\0{len(texts)}\0".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _read_cached(path: Path, n: int, dim: int) -> torch.Tensor | None:
    try:
        emb = load_file(path)["embeddings"]
    except Exception:  # a torn or foreign file: recompute and overwrite it
        return None
    return emb if tuple(emb.shape) == (n, dim) and torch.isfinite(emb).all() else None


def embed_texts(
    encoder: SentenceEncoder,
    texts: Sequence[str],
    *,
    cache: bool = True,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Embeddings [N, d] of `texts`, read from the disk cache when this encoder embedded this exact list before."""
    texts = list(texts)
    path = embeddings_cache_dir() / f"{embedding_key(encoder.identity, texts, encoder.max_length)}.safetensors"
    if cache and path.exists():
        emb = _read_cached(path, len(texts), encoder.dim)
        if emb is not None:
            if progress:
                progress(len(texts), len(texts))
            return emb
    emb = encoder.encode(texts, batch_size=batch_size, progress=progress)
    if cache:
        write_atomic_safetensors(path, {"embeddings": emb}, metadata={"encoder": encoder.name})
    return emb
