"""Sentence embeddings from the shipped MiniLM encoder, cached on disk by content hash.

all-MiniLM-L6-v2 as sentence-transformers runs it: the BERT's last hidden states, mean-pooled
over the non-padding tokens, then L2-normalised; inputs are cut at 256 tokens (its
`max_seq_length`), so two texts that agree on their first 256 tokens embed identically.
Embeddings of a list of texts are stored as safetensors under
`cache_dir()/embeddings/<sha256 of encoder name + texts>.safetensors`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from engine.core.progress import Progress
from engine.core.tokens import EmptyTextError, encode_batch
from engine.models.load import ENCODER_MODEL, ModelHandle, cache_dir, load_model

__all__ = ["ENCODER_MAX_LENGTH", "SentenceEncoder", "embedding_key", "embed_texts", "embeddings_cache_dir"]

ENCODER_MAX_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config max_seq_length


class SentenceEncoder:
    """A BERT-style encoder turned into a sentence embedder (mean pooling + L2 normalisation)."""

    def __init__(self, handle: ModelHandle, max_length: int = ENCODER_MAX_LENGTH):
        if handle.geometry.causal:
            raise ValueError(f"{handle.name} is a causal LM; the sentence encoder must be a BERT-style encoder")
        self.handle = handle
        self.max_length = max_length

    @classmethod
    def load(cls, name: str = ENCODER_MODEL, **load_kwargs: Any) -> "SentenceEncoder":
        """Open the encoder by alias or folder (default: the shipped MiniLM)."""
        return cls(load_model(name, **load_kwargs))

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def dim(self) -> int:
        return self.handle.geometry.hidden

    def token_count(self, text: str) -> int:
        """How many tokens (with [CLS]/[SEP]) the encoder would see before truncation."""
        return len(self.handle.tokenizer(text)["input_ids"])

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], *, batch_size: int = 32, progress: Progress | None = None
    ) -> torch.Tensor:
        """Unit-norm embeddings [N, d], one per text (no cache)."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        n = len(texts)
        if n == 0:
            raise EmptyTextError("no text to embed")
        for i in range(0, n, batch_size):
            ids, attn = encode_batch(self.handle.tokenizer, texts[i : i + batch_size], self.max_length,
                                     self.handle.device)
            hidden = self.handle.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, T, d)
            w = attn.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # (B, d)
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
            if progress:
                progress(min(i + batch_size, n), n)
        return torch.cat(out)


def embeddings_cache_dir() -> Path:
    return cache_dir() / "embeddings"


def embedding_key(encoder_name: str, texts: Sequence[str], max_length: int = ENCODER_MAX_LENGTH) -> str:
    """sha256 over the encoder's name, its truncation length and every text (length-prefixed)."""
    h = hashlib.sha256(f"{encoder_name}\0{max_length}\0{len(texts)}\0".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _read_cached(path: Path, n: int, dim: int) -> torch.Tensor | None:
    from safetensors.torch import load_file

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
    """Embeddings [N, d] of `texts`, read from the disk cache when this exact list was embedded before."""
    from safetensors.torch import save_file

    texts = list(texts)
    path = embeddings_cache_dir() / f"{embedding_key(encoder.name, texts, encoder.max_length)}.safetensors"
    if cache and path.exists():
        emb = _read_cached(path, len(texts), encoder.dim)
        if emb is not None:
            if progress:
                progress(len(texts), len(texts))
            return emb
    emb = encoder.encode(texts, batch_size=batch_size, progress=progress)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"encoder": encoder.name})
        os.replace(tmp, path)
    return emb
