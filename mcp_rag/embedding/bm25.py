"""The lexical half of every point: fastembed's BM25 sparse vectors, always computed locally
(whatever the dense provider), with the engine applying IDF at query time."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..types import SparseVector

BM25_MODEL = "Qdrant/bm25"

# Function words dropped by the BM25 tokenizer (fastembed would read them from the
# model folder it cannot download here).
ENGLISH_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves""".split()  # noqa: SIM905
)


class Bm25:
    """BM25 term weights from fastembed; needs nothing but a folder with an empty ``config.json``."""

    def __init__(self, models_dir: Path) -> None:
        self._models_dir = models_dir
        self._model: Any = None

    def load(self) -> None:
        if self._model is not None:
            return
        from fastembed import SparseTextEmbedding

        self._model = SparseTextEmbedding(
            BM25_MODEL,
            specific_model_path=str(_bm25_dir(self._models_dir)),
            cache_dir=str(self._models_dir / "fastembed"),
            stopwords=set(ENGLISH_STOPWORDS),
        )

    def embed_passages(self, texts: Sequence[str]) -> list[SparseVector]:
        return [_sparse_of(s) for s in self._model.passage_embed(list(texts), batch_size=max(1, len(texts)))]

    def embed_query(self, text: str) -> SparseVector:
        return _sparse_of(next(iter(self._model.query_embed(text))))


def _sparse_of(embedding: object) -> SparseVector:
    indices = embedding.indices.tolist()  # type: ignore[attr-defined]
    values = embedding.values.tolist()  # type: ignore[attr-defined]
    return SparseVector(indices=indices, values=values)


def _bm25_dir(models_dir: Path) -> Path:
    """fastembed's BM25 needs only a folder with an empty-object config.json."""
    folder = models_dir / "bm25"
    config = folder / "config.json"
    if not config.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".config.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps({}))
        tmp.replace(config)
    return folder
