"""The default dense provider: a fastembed ONNX model in this process, loaded from a local folder
(the default model is built offline from a PyPI package, so nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..types import ModelIdentity
from .base import DenseProvider, DenseVector
from .model_build import Quantization, identity_name
from .tokens import TokenBudget, TokenizerBudget

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class FastembedProvider(DenseProvider):
    def __init__(
        self,
        model: str,
        model_dir: Path | None,
        cache_dir: Path,
        *,
        threads: int | None = None,
        batch_size: int = 8,
        quantization: Quantization = "none",
    ) -> None:
        self._name = model
        self._quantization: Quantization = quantization
        self._model_dir = model_dir
        self._cache_dir = cache_dir
        self._threads = threads
        self._batch_size = batch_size
        self._model: Any = None
        self._query_model: Any = None
        self._identity: ModelIdentity | None = None
        self._budget: TokenizerBudget | None = None

    def load(self) -> ModelIdentity:
        if self._identity is not None:
            return self._identity
        from fastembed import TextEmbedding

        kwargs: dict[str, Any] = {"cache_dir": str(self._cache_dir)}
        if self._threads:
            kwargs["threads"] = self._threads
        if self._model_dir is not None:
            kwargs["specific_model_path"] = str(self._model_dir)
        try:
            model: Any = TextEmbedding(self._name, **kwargs)
            # A query is a few tokens: splitting it over threads costs more than it saves, and on a
            # busy machine the threads' wait for each other is most of its time. Queries get their
            # own single-threaded session of the same model (unless passages already have one thread).
            query_model: Any = model if self._threads == 1 else TextEmbedding(self._name, **{**kwargs, "threads": 1})
        except Exception as exc:
            hint = (
                f"from {self._model_dir}"
                if self._model_dir
                else "(fastembed downloads it; set MCP_RAG_EMBEDDING_MODEL_DIR offline)"
            )
            raise ConfigurationError(f"cannot load embedding model {self._name!r} {hint}: {exc}") from exc
        probe = np.asarray(next(iter(query_model.query_embed("dimension probe"))), dtype=np.float32)
        tokenizer = model.model.tokenizer
        # The window in text tokens: the tokenizer's max_length less [CLS] and [SEP].
        window = int((tokenizer.truncation or {}).get("max_length", 512)) - 2
        self._budget = TokenizerBudget(tokenizer, window)
        self._model = model
        self._query_model = query_model
        # fastembed knows the model (and its pooling) by its own name; the identity says which build.
        self._identity = ModelIdentity(
            name=identity_name(self._name, self._quantization), dimension=int(probe.shape[0])
        )
        return self._identity

    def embed_passages(self, texts: Sequence[str]) -> list[DenseVector]:
        return [
            np.asarray(v, dtype=np.float32) for v in self._model.passage_embed(list(texts), batch_size=self._batch_size)
        ]

    def embed_query(self, text: str) -> DenseVector:
        return np.asarray(next(iter(self._query_model.query_embed(text))), dtype=np.float32)

    def token_budget(self) -> TokenBudget:
        if self._budget is None:
            raise RuntimeError("token_budget() before load()")
        return self._budget
