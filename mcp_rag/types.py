"""The vocabulary every layer shares: vectors, the model identity, metadata values, search modes
and the limits of a query. Nothing here depends on any other module of the package."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

MetadataValue = str | int | float | bool
"""A filterable metadata value (lists of these are allowed in payloads and filters)."""

MetadataFilter = dict[str, MetadataValue | list[MetadataValue]]
"""Key -> a value (equality) or a list of values (any of)."""

SearchMode = Literal["hybrid", "dense", "lexical"]
SEARCH_MODES: tuple[SearchMode, ...] = ("hybrid", "dense", "lexical")

MAX_TOP_K = 50
MAX_QUERY_CHARS = 4000

Fusion = Literal["rrf", "dbsf"]


@dataclass(frozen=True, slots=True)
class SparseVector:
    indices: Sequence[int]
    values: Sequence[float]


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """The embedding model vectors were made with; a mismatch makes vectors meaningless."""

    name: str
    dimension: int
