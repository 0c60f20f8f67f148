"""The embedder: every point's dense + sparse vector pair, and the token budget chunking uses.

It composes a dense provider (``factory`` picks it from the settings), the local BM25 model and the
provider's token budget. Models load once per process, off the event loop; embedding runs in a
worker thread in batches, one batch at a time (the ONNX session already uses every core it is given).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import anyio

from ..errors import ConfigurationError
from ..logging import get_logger
from ..settings import Settings
from ..types import FINGERPRINT_PROBE, ModelIdentity, SparseVector, fingerprint_of
from .base import DenseProvider, DenseVector
from .bm25 import Bm25
from .factory import create_provider
from .tokens import TokenBudget

log = get_logger(__name__)


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

    def __init__(
        self, settings: Settings, on_batch: BatchObserver | None = None, *, provider: DenseProvider | None = None
    ) -> None:
        self.provider = provider or create_provider(settings)
        self._bm25 = Bm25(settings.models_dir)
        self._batch_size = settings.embedding_batch_size
        self._on_batch = on_batch
        self._identity: ModelIdentity | None = None
        self._budget: TokenBudget | None = None
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
            started = time.perf_counter()
            identity = self.provider.load()
            probe = self.provider.embed_passages([FINGERPRINT_PROBE])[0]
            if probe.shape[0] != identity.dimension:
                raise ConfigurationError(
                    f"embedding model {identity.describe()} answered a {probe.shape[0]}-d vector for the probe text"
                )
            identity = replace(identity, fingerprint=fingerprint_of(probe.tolist()))
            self._bm25.load()
            self._budget = self.provider.token_budget()
            self._identity = identity
            log.info(
                "embedding model loaded",
                provider=identity.provider,
                model=identity.name,
                dimension=identity.dimension,
                seconds=round(time.perf_counter() - started, 3),
            )
            return identity

    @property
    def budget(self) -> TokenBudget:
        self.load_sync()
        assert self._budget is not None
        return self._budget

    async def embed_passages(self, texts: Sequence[str]) -> list[Embedding]:
        if not texts:
            return []
        return await anyio.to_thread.run_sync(self.embed_passages_sync, texts)

    def embed_passages_sync(self, texts: Sequence[str]) -> list[Embedding]:
        self.load_sync()
        batch = self.provider.passages_per_call(self._batch_size)
        # A batch is padded to its longest text: batching texts of similar length (sorted by
        # characters, a cheap proxy for tokens) wastes far less compute on padding. The results
        # go back in the caller's order (docs/benchmarks.md has the measurements).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Embedding | None] = [None] * len(texts)
        serial = self._lock if self.provider.serial else contextlib.nullcontext()
        with serial:
            for start in range(0, len(order), batch):
                positions = order[start : start + batch]
                part = [texts[i] for i in positions]
                began = time.perf_counter()
                dense = self.provider.embed_passages(part)
                with self._lock if not self.provider.serial else contextlib.nullcontext():
                    sparse = self._bm25.embed_passages(part)
                if self._on_batch is not None:
                    self._on_batch(len(part), time.perf_counter() - began)
                for i, d, s in zip(positions, dense, sparse, strict=True):
                    out[i] = Embedding(d, s)
        return out  # type: ignore[return-value]  # every slot is filled above

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Model tokens in each text (no special tokens, no truncation): what chunking measures."""
        return self.budget.count(texts)

    @property
    def window_tokens(self) -> int:
        """Tokens of text the dense model reads per passage (its window less the special tokens)."""
        return self.budget.window_tokens

    def clip_tokens(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut at a token boundary to its first ``max_tokens`` model tokens."""
        return self.budget.clip(texts, max_tokens)

    async def embed_query(self, text: str, *, dense: bool = True) -> QueryEmbedding:
        return await anyio.to_thread.run_sync(lambda: self.embed_query_sync(text, dense=dense))

    def embed_query_sync(self, text: str, *, dense: bool = True) -> QueryEmbedding:
        self.load_sync()
        vector = self.provider.embed_query(text) if dense else None
        return QueryEmbedding(vector, self._bm25.embed_query(text))
