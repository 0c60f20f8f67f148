"""The vector index interface: one small contract, several real engines.

The index is *derived* data: every point is a chunk whose source of truth lives in
Postgres. Point ids are the chunks' bigint ids. Each point carries a named dense
vector, a named sparse (BM25, IDF-weighted by the engine) vector and a payload used
for filtering.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CursorConflictError as CursorConflictError
from ..errors import IndexDivergedError as IndexDivergedError
from ..errors import IndexError_ as IndexError_
from ..errors import IndexUnavailableError as IndexUnavailableError
from ..errors import ModelMismatchError as ModelMismatchError
from ..types import FUSED_INT8_SUFFIX, Fusion, MetadataValue, ModelIdentity, SparseVector, base_model_name

DENSE_VECTOR = "dense"
SPARSE_VECTOR = "bm25"


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far the index has applied the change log, and which history of the log that was."""

    seq: int = 0
    """The last change-log sequence number applied (0: nothing yet)."""
    origin: str = ""
    """The stamp of change-log entry ``seq`` (``Store.log_stamp``); "" when unknown (a new index,
    or one written before stamps were recorded)."""


@dataclass(frozen=True, slots=True)
class PointPayload:
    tenant: str
    collection: str
    document_id: str
    source_uri: str
    metadata: Mapping[str, MetadataValue | Sequence[MetadataValue]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IndexPoint:
    id: int
    dense: Sequence[float]
    sparse: SparseVector
    payload: PointPayload


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """Restricts a query or count. ``tenant`` is always applied.

    ``source_prefix`` matches source URIs that start with the given string.
    ``metadata`` maps a key to a value (exact match) or a list of values (any of).
    """

    tenant: str
    collections: Sequence[str] | None = None
    document_ids: Sequence[str] | None = None
    source_prefix: str | None = None
    metadata: Mapping[str, MetadataValue | Sequence[MetadataValue]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FusionParams:
    method: Fusion = "rrf"
    rrf_k: int = 60
    weights: tuple[float, float] | None = None
    """(dense, sparse) weights for RRF; ``None`` weighs both equally."""
    prefetch_limit: int = 100


@dataclass(frozen=True, slots=True)
class IndexQuery:
    """Dense only, sparse only, or both fused, under a filter."""

    filter: SearchFilter
    limit: int
    dense: Sequence[float] | None = None
    sparse: SparseVector | None = None
    fusion: FusionParams = field(default_factory=FusionParams)


@dataclass(frozen=True, slots=True)
class Hit:
    id: int
    score: float
    document_id: str
    """The chunk's document (from the point's payload): lets a search group hits before it reads
    their text from Postgres."""


def identity_meta(model: ModelIdentity) -> dict[str, Any]:
    """The model identity as an index engine stores it beside its cursor."""
    return {
        "model_name": model.name,
        "dimension": model.dimension,
        "provider": model.provider,
        "fingerprint": list(model.fingerprint),
    }


def identity_from_meta(data: Mapping[str, Any]) -> ModelIdentity:
    """Read back ``identity_meta`` (meta written before providers and fingerprints: fastembed, none)."""
    return ModelIdentity(
        str(data["model_name"]),
        int(data["dimension"]),
        provider=str(data.get("provider") or "fastembed"),
        fingerprint=tuple(float(v) for v in data.get("fingerprint") or ()),
    )


def _difference(built: ModelIdentity, configured: ModelIdentity) -> str:
    same = (built.provider, built.name, built.dimension) == (configured.provider, configured.name, configured.dimension)
    if same:
        return (
            " — same name, but the vector of a fixed probe text differs by "
            f"{built.fingerprint_distance(configured):.4f} (another model served under that name, or another build of it)"
        )
    if built.provider != configured.provider or base_model_name(built.name) != base_model_name(configured.name):
        return ""
    int8 = (_is_int8(built.name), _is_int8(configured.name))
    if int8 == (True, True):
        fused = "true" if built.name.endswith(FUSED_INT8_SUFFIX) else "false"
        return (
            " (the int8 build run with and without ONNX Runtime's SkipLayerNormalization fusion; "
            f"MCP_RAG_EMBEDDING_FUSED_LAYER_NORM={fused} selects this data's)"
        )
    wanted = "int8" if int8[0] else "none"
    return f" (the float32 and int8 builds of one model; MCP_RAG_EMBEDDING_QUANTIZATION={wanted} selects this data's)"


def _is_int8(name: str) -> bool:
    return name != base_model_name(name)


def mismatch_message(index: str, built: ModelIdentity, configured: ModelIdentity) -> str:
    return (
        f"index '{index}' was built with model {built.describe()} but the server is "
        f"configured with {configured.describe()}{_difference(built, configured)}: their vectors are not comparable. "
        "Configure the model the index was built with; to switch models, ingest the documents again into "
        "a new database and index (the stored vectors belong to the old model)"
    )


def model_mismatch_message(stored: ModelIdentity, configured: ModelIdentity) -> str:
    return (
        f"the database holds vectors of model {stored.describe()} but the server is "
        f"configured with {configured.describe()}{_difference(stored, configured)}: their vectors are not "
        "comparable, and a reindex would copy the old model's vectors. Configure the model the database was built "
        "with; to switch models, ingest the documents again into a new database and index"
    )


class VectorIndex(abc.ABC):
    """One interface, several engines. All methods are safe to call from the event loop."""

    exclusive: bool = False
    """Whether only the process that opened the index can write to it (the engine locks it): then
    no other process's sync pass shares it, and index sync takes no lock in the database."""

    @abc.abstractmethod
    async def open(self, model: ModelIdentity) -> None:
        """Create the index if missing, else verify it was built with ``model``.

        Raises ModelMismatchError naming both models when they differ.
        """

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise IndexUnavailableError if the engine does not answer."""

    @abc.abstractmethod
    async def upsert(self, points: Sequence[IndexPoint]) -> None: ...

    @abc.abstractmethod
    async def delete_points(self, ids: Sequence[int]) -> None: ...

    @abc.abstractmethod
    async def delete_documents(self, tenant: str, document_ids: Sequence[str], keep_ids: Sequence[int] = ()) -> None:
        """Delete every point of these documents except the ids in ``keep_ids``."""

    @abc.abstractmethod
    async def delete_collection(self, tenant: str, collection: str) -> None: ...

    @abc.abstractmethod
    async def query(self, query: IndexQuery) -> list[Hit]: ...

    @abc.abstractmethod
    async def count(self, filter: SearchFilter | None = None) -> int:
        """Number of points (all tenants when ``filter`` is None)."""

    @abc.abstractmethod
    async def point_ids(self, filter: SearchFilter | None = None) -> set[int]:
        """Ids of the points matching ``filter`` (all when None); for consistency checks."""

    @abc.abstractmethod
    async def read_cursor(self) -> Cursor:
        """The stored cursor (``Cursor()`` when new)."""

    async def get_cursor(self) -> int:
        """The last change-log sequence number applied to this index (0 when new)."""
        return (await self.read_cursor()).seq

    @abc.abstractmethod
    async def set_cursor(self, seq: int, origin: str = "", *, expected: int | None = None) -> None:
        """Store the cursor durably. With ``expected``, only if the stored ``seq`` still equals it
        (compare-and-set); otherwise raise CursorConflictError and change nothing."""

    async def settle(self) -> None:
        """Finish background upkeep that is due (the end of a bulk ingest). Most engines have none."""
        return None

    @abc.abstractmethod
    async def clear(self) -> None:
        """Drop every point and reset the cursor to ``Cursor()`` (for a rebuild); keeps the model identity.

        The reset is durable *before* any point is destroyed: an interruption at any step leaves
        an index whose cursor is 0, which a catch-up or reindex fills from Postgres."""
