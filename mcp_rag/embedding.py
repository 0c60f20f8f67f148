"""Dense (fastembed ONNX model) and sparse (fastembed BM25) embeddings.

Models load once per process, off the event loop; embedding runs in a worker thread in
batches, one batch at a time (the ONNX session already uses every core it is given).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt

from .errors import ConfigurationError
from .index.base import ModelIdentity, SparseVector
from .logging import get_logger
from .settings import Settings

log = get_logger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
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

DenseVector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Embedding:
    dense: DenseVector
    sparse: SparseVector


@dataclass(frozen=True, slots=True)
class QueryEmbedding:
    """A query's vectors; ``dense`` is None when it was not asked for (a lexical search needs
    only the BM25 terms, and the dense model is most of a query's cost)."""

    dense: DenseVector | None
    sparse: SparseVector


BatchObserver = Callable[[int, float], None]
"""Called after each embedded batch with (number of texts, seconds)."""


class Embedder:
    """Turns text into the dense + sparse vector pair every index point carries."""

    def __init__(self, settings: Settings, on_batch: BatchObserver | None = None) -> None:
        self._settings = settings
        self._on_batch = on_batch
        self._dense: Any = None
        self._sparse: Any = None
        self._identity: ModelIdentity | None = None
        self._tokenizer: Any = None
        self._window = 0
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._identity is not None

    @property
    def identity(self) -> ModelIdentity:
        if self._identity is None:
            raise RuntimeError("embedder used before load()")
        return self._identity

    async def load(self) -> ModelIdentity:
        return await anyio.to_thread.run_sync(self.load_sync)

    def load_sync(self) -> ModelIdentity:
        with self._load_lock:
            if self._identity is not None:
                return self._identity
            from fastembed import SparseTextEmbedding, TextEmbedding

            started = time.perf_counter()
            settings = self._settings
            cache_dir = settings.models_dir / "fastembed"
            model_dir = resolve_model_dir(settings)
            kwargs: dict[str, Any] = {"cache_dir": str(cache_dir)}
            if settings.embedding_threads:
                kwargs["threads"] = settings.embedding_threads
            if model_dir is not None:
                kwargs["specific_model_path"] = str(model_dir)
            try:
                dense = TextEmbedding(settings.embedding_model, **kwargs)
            except Exception as exc:
                hint = (
                    f"from {model_dir}"
                    if model_dir
                    else "(fastembed downloads it; set MCP_RAG_EMBEDDING_MODEL_DIR offline)"
                )
                raise ConfigurationError(
                    f"cannot load embedding model {settings.embedding_model!r} {hint}: {exc}"
                ) from exc
            sparse = SparseTextEmbedding(
                BM25_MODEL,
                specific_model_path=str(_bm25_dir(settings.models_dir)),
                cache_dir=str(cache_dir),
                stopwords=set(ENGLISH_STOPWORDS),
            )
            probe = np.asarray(next(iter(dense.query_embed("dimension probe"))), dtype=np.float32)
            self._tokenizer = _untruncated_tokenizer(dense)
            self._window = _window_of(dense)
            self._dense, self._sparse = dense, sparse
            self._identity = ModelIdentity(name=settings.embedding_model, dimension=int(probe.shape[0]))
            log.info(
                "embedding model loaded",
                model=self._identity.name,
                dimension=self._identity.dimension,
                seconds=round(time.perf_counter() - started, 3),
            )
            return self._identity

    async def embed_passages(self, texts: Sequence[str]) -> list[Embedding]:
        if not texts:
            return []
        return await anyio.to_thread.run_sync(self.embed_passages_sync, texts)

    def embed_passages_sync(self, texts: Sequence[str]) -> list[Embedding]:
        self.load_sync()
        batch = self._settings.embedding_batch_size
        # A batch is padded to its longest text: batching texts of similar length (sorted by
        # characters, a cheap proxy for tokens) wastes far less compute on padding. The results
        # go back in the caller's order (docs/benchmarks.md has the measurements).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Embedding | None] = [None] * len(texts)
        with self._lock:
            for start in range(0, len(order), batch):
                positions = order[start : start + batch]
                part = [texts[i] for i in positions]
                began = time.perf_counter()
                dense = list(self._dense.passage_embed(part, batch_size=batch))
                sparse = list(self._sparse.passage_embed(part, batch_size=batch))
                if self._on_batch is not None:
                    self._on_batch(len(part), time.perf_counter() - began)
                for i, d, s in zip(positions, dense, sparse, strict=True):
                    out[i] = Embedding(np.asarray(d, dtype=np.float32), _sparse_of(s))
        return out  # type: ignore[return-value]  # every slot is filled above

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Model tokens in each text (no special tokens, no truncation): what chunking measures."""
        self.load_sync()
        if not texts:
            return []
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def window_tokens(self) -> int:
        """Tokens of text the dense model reads per passage (its window less the special tokens)."""
        self.load_sync()
        return self._window

    def clip_tokens(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut at a token boundary to its first ``max_tokens`` model tokens."""
        self.load_sync()
        if not texts:
            return []
        out = []
        for text, encoding in zip(
            texts, self._tokenizer.encode_batch(list(texts), add_special_tokens=False), strict=True
        ):
            if len(encoding.ids) <= max_tokens:
                out.append(text)
            else:
                out.append(text[: encoding.offsets[max_tokens - 1][1]] if max_tokens > 0 else "")
        return out

    async def embed_query(self, text: str, *, dense: bool = True) -> QueryEmbedding:
        return await anyio.to_thread.run_sync(lambda: self.embed_query_sync(text, dense=dense))

    def embed_query_sync(self, text: str, *, dense: bool = True) -> QueryEmbedding:
        self.load_sync()
        vector = np.asarray(next(iter(self._dense.query_embed(text))), dtype=np.float32) if dense else None
        sparse = next(iter(self._sparse.query_embed(text)))
        return QueryEmbedding(vector, _sparse_of(sparse))


def _untruncated_tokenizer(dense: Any) -> Any:
    from tokenizers import Tokenizer

    source = dense.model.tokenizer
    tokenizer = Tokenizer.from_str(source.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _window_of(dense: Any) -> int:
    """The model's window in text tokens: its tokenizer's max_length less [CLS] and [SEP]."""
    truncation = dense.model.tokenizer.truncation or {}
    return int(truncation.get("max_length", 512)) - 2


def _sparse_of(embedding: object) -> SparseVector:
    indices = embedding.indices.tolist()  # type: ignore[attr-defined]
    values = embedding.values.tolist()  # type: ignore[attr-defined]
    return SparseVector(indices=indices, values=values)


def resolve_model_dir(settings: Settings) -> Path | None:
    """The local folder to load the dense model from, building the default one if needed.

    ``None`` means: let fastembed fetch the named model itself (needs internet).
    """
    if settings.embedding_model_dir is not None:
        return settings.embedding_model_dir
    if settings.embedding_model != DEFAULT_MODEL:
        return None
    from .model_build import provision_default_model

    try:
        return provision_default_model(settings.models_dir)
    except FileNotFoundError as exc:
        raise ConfigurationError(str(exc)) from exc


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
