"""A tiny random BERT saved as a sentence-transformers folder, built and written by sentence-transformers itself."""

from __future__ import annotations

from pathlib import Path

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

from tests.tiny import save_tiny, tiny_model

__all__ = ["save_tiny_sentence"]


def save_tiny_sentence(folder: str | Path, *, seed: int = 0, max_seq_length: int = 64) -> Path:
    """Transformer (tiny BERT, 2 layers, 4 heads, hidden 64) + mean Pooling + Normalize, saved by ST into `folder`."""
    folder = Path(folder)
    save_tiny(folder, "bert", model=tiny_model("bert", seed))
    t = Transformer(str(folder), max_seq_length=max_seq_length)
    SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), "mean"), Normalize()]).save(str(folder))
    return folder
