"""What a dense embedding provider is: passages and queries in, vectors out, and how to measure text
for its window. One module per provider implements it; ``factory`` picks one from the settings."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..types import ModelIdentity
from .tokens import TokenBudget

DenseVector = npt.NDArray[np.float32]


class DenseProvider(abc.ABC):
    """A dense model. Every method blocks (the embedder calls them in a worker thread)."""

    serial: bool = True
    """Calls must not overlap (a local model already uses every core); a remote provider that
    bounds its own concurrency sets this False."""

    def passages_per_call(self, default: int) -> int:
        """How many passages the embedder hands over per ``embed_passages`` call."""
        return default

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Release connections or sessions (the process is ending)."""

    @abc.abstractmethod
    def load(self) -> ModelIdentity:
        """Make the model ready (idempotent) and say what it is; raise ``ConfigurationError`` if it cannot load."""

    @abc.abstractmethod
    def embed_passages(self, texts: Sequence[str]) -> list[DenseVector]:
        """One vector per text, in order (the caller batches)."""

    @abc.abstractmethod
    def embed_query(self, text: str) -> DenseVector: ...

    @abc.abstractmethod
    def token_budget(self) -> TokenBudget:
        """How chunking measures text for this model's window (after ``load``)."""
