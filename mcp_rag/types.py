"""The vocabulary every layer shares: vectors, the model identity, metadata values, search modes,
the limits of a query and the count of tool calls in flight. Nothing here depends on any other
module of the package."""

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


FINGERPRINT_PROBE = "mcp-rag fingerprint probe: the quick brown fox jumps over the lazy dog."
"""The fixed text whose vector identifies a model build (see ``ModelIdentity.fingerprint``)."""

FINGERPRINT_COMPONENTS = 16
"""How many leading components of the probe's unit vector the fingerprint keeps."""

FINGERPRINT_TOLERANCE = 1e-3
"""Largest difference of any fingerprint component between two builds taken as the same model: the
same weights on other hardware or thread counts differ by about 1e-6, an int8 build or another
model under the same name by 1e-2 and more."""


INT8_SUFFIX = "@int8-unfused"
"""Ends the name of an int8 build's identity (``embedding/fastembed.py`` says why it runs unfused)."""
FUSED_INT8_SUFFIX = "@int8"
"""Ends the name of the int8 build run with the SkipLayerNormalization fusion (before 2026-12-01)."""


def base_model_name(name: str) -> str:
    """The model an identity's name names, without the suffix of its build."""
    return name.removesuffix(INT8_SUFFIX).removesuffix(FUSED_INT8_SUFFIX)


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """The embedding model vectors were made with; a mismatch makes vectors meaningless.

    ``provider`` + ``name`` + ``dimension`` say what was configured; ``fingerprint`` (the leading
    components of the unit vector of ``FINGERPRINT_PROBE``) says what actually answered, so another
    model served under the same name, or another build of it, is told apart. An identity recorded
    before fingerprints existed has an empty one and matches on the rest."""

    name: str
    dimension: int
    provider: str = "fastembed"
    fingerprint: tuple[float, ...] = ()

    def matches(self, other: ModelIdentity, tolerance: float = FINGERPRINT_TOLERANCE) -> bool:
        if (self.provider, self.name, self.dimension) != (other.provider, other.name, other.dimension):
            return False
        return self.fingerprint_distance(other) <= tolerance

    def fingerprint_distance(self, other: ModelIdentity) -> float:
        """The largest component difference of the two fingerprints (0 when either has none)."""
        if not self.fingerprint or not other.fingerprint:
            return 0.0
        if len(self.fingerprint) != len(other.fingerprint):
            return float("inf")
        return max(abs(a - b) for a, b in zip(self.fingerprint, other.fingerprint, strict=True))

    def describe(self) -> str:
        """``provider:name (N-d, fingerprint a, b, c...)`` for messages."""
        head = ", ".join(f"{v:+.4f}" for v in self.fingerprint[:3])
        print_ = f", fingerprint {head}..." if self.fingerprint else ""
        return f"{self.provider}:{self.name} ({self.dimension}-d{print_})"


def fingerprint_of(vector: Sequence[float]) -> tuple[float, ...]:
    """The fingerprint of a model from its vector of ``FINGERPRINT_PROBE``."""
    norm = sum(float(v) * float(v) for v in vector) ** 0.5 or 1.0
    return tuple(round(float(v) / norm, 6) for v in list(vector)[:FINGERPRINT_COMPONENTS])


class InFlight:
    """How many tool calls are running now: a server lets them finish before it stops."""

    def __init__(self) -> None:
        self.count = 0
