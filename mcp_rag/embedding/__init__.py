"""Embeddings: a dense provider (one module each, chosen by ``factory``), BM25 (always local), the
token budget chunking measures with, and the offline build of the default model.

``Embedder`` is what the rest of the package uses."""

from .base import DenseProvider, DenseVector
from .embedder import BatchObserver, Embedder, Embedding, QueryEmbedding
from .fastembed import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "BatchObserver", "DenseProvider", "DenseVector", "Embedder", "Embedding", "QueryEmbedding"]
