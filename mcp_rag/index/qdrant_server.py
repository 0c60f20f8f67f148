"""VectorIndex over a Qdrant server, through the sync ``QdrantClient``.

The async client is not used: in local mode (``QdrantClient(":memory:")``, used by the
tests) it runs everything on the event loop. Every blocking call goes through
``anyio.to_thread.run_sync`` instead. Local mode is plain Python state with no locking,
so there every call is serialised; the remote HTTP client is thread-safe and is not.

Everything used here (``MatchPrefix``, ``Rrf`` weights, the IDF modifier, ``query_points``
with prefetches) works in local mode as well as on a server. Local mode ignores payload
indexes (and warns when one is created), so they are only created on a server. For an
on-disk local client (``path=...``) pass ``force_disable_check_same_thread=True``: calls
come from worker threads (serialised here).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from mcp_rag.errors import IndexUnavailableError, ModelMismatchError
from mcp_rag.index.base import (
    DENSE_VECTOR,
    SPARSE_VECTOR,
    Cursor,
    CursorConflictError,
    Hit,
    IndexPoint,
    IndexQuery,
    SearchFilter,
    VectorIndex,
    identity_from_meta,
    identity_meta,
    mismatch_message,
)
from mcp_rag.index.payload import HIT_PAYLOAD, conditions_of, equals, hit_of, int_id, one_of, payload_of
from mcp_rag.settings import Settings
from mcp_rag.types import MetadataValue, ModelIdentity

T = TypeVar("T")

_META_POINT_ID = 0
_UPSERT_BATCH = 256
_SCROLL_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ClusterParams:
    """How the collections are laid out on a Qdrant cluster, and how writes are acknowledged.

    The defaults suit a three-node cluster: three shards, each on two nodes, a write acknowledged
    by one replica and ordered through a dynamically elected leader, so reads and writes go on when
    one node is lost (``strong`` ordering would stop while the permanent leader is down, and a write
    consistency factor equal to the replication factor would fail writes to the lost node's shards).
    A single-node server (or local mode) takes the same arguments."""

    shards: int = 3
    replication_factor: int = 2
    write_consistency_factor: int = 1
    ordering: str = "medium"

    def write_ordering(self) -> models.WriteOrdering:
        return models.WriteOrdering(self.ordering)


def cluster_params(settings: Settings) -> ClusterParams:
    return ClusterParams(
        shards=settings.qdrant_shards,
        replication_factor=settings.qdrant_replication_factor,
        write_consistency_factor=settings.qdrant_write_consistency_factor,
        ordering=settings.qdrant_write_ordering,
    )


class QdrantServerIndex(VectorIndex):
    """Chunks in ``collection``; model identity, cursor and the ``clearing`` flag in ``<collection>__meta``."""

    def __init__(
        self, client: QdrantClient, collection: str = "mcp_rag_chunks", cluster: ClusterParams | None = None
    ) -> None:
        self._client = client
        self._cluster = cluster or ClusterParams()
        self._ordering = self._cluster.write_ordering()
        self._collection = collection
        self._meta = f"{collection}__meta"
        self._owns_client = False
        options = client.init_options
        self._local = options.get("location") == ":memory:" or options.get("path") is not None
        self._where = str(options.get("url") or options.get("host") or options.get("path") or options.get("location"))
        self._lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if self._local else contextlib.nullcontext()
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        api_key: str | None = None,
        collection: str = "mcp_rag_chunks",
        timeout: float = 10.0,
        cluster: ClusterParams | None = None,
    ) -> QdrantServerIndex:
        # check_compatibility=False: it would make a blocking request right here.
        client = QdrantClient(url=url, api_key=api_key, timeout=max(1, math.ceil(timeout)), check_compatibility=False)
        index = cls(client, collection, cluster)
        index._owns_client = True
        return index

    async def _call(self, fn: Callable[[], T]) -> T:
        def run() -> T:
            with self._lock:
                try:
                    return fn()
                except ResponseHandlingException as e:
                    raise IndexUnavailableError(f"cannot reach Qdrant at {self._where}: {e.source}") from e
                except UnexpectedResponse as e:
                    if e.status_code is not None and (e.status_code >= 500 or e.status_code in (401, 403)):
                        raise IndexUnavailableError(
                            f"Qdrant at {self._where} answered {e.status_code} {e.reason_phrase}"
                        ) from e
                    raise

        return await anyio.to_thread.run_sync(run)

    # -- lifecycle -----------------------------------------------------------------

    async def open(self, model: ModelIdentity) -> None:
        await self._call(lambda: self._open(model))

    def _open(self, model: ModelIdentity) -> None:
        c = self._client
        exists = c.collection_exists(self._collection)
        meta = self._read_meta() if c.collection_exists(self._meta) else None
        if meta is not None and not meta[0].matches(model):
            raise ModelMismatchError(mismatch_message(self._collection, meta[0], model))
        if meta is not None and meta[2] and exists:
            # A clear() was interrupted after it reset the cursor: finish it.
            c.delete_collection(self._collection)
            exists = False
        if meta is None and exists:
            # Chunks without a model identity (meta lost): adopt them only if the sizes
            # agree, and start over from cursor 0 (upserts then overwrite every point).
            size = self._dense_size()
            if size != model.dimension:
                raise ModelMismatchError(mismatch_message(self._collection, ModelIdentity("<unknown>", size), model))
        if not exists:
            self._create_chunks(model)
        if meta is None:
            if not c.collection_exists(self._meta):
                one_d = models.VectorParams(size=1, distance=models.Distance.DOT)
                c.create_collection(
                    self._meta,
                    vectors_config=one_d,
                    shard_number=1,
                    replication_factor=self._cluster.replication_factor,
                    write_consistency_factor=self._cluster.write_consistency_factor,
                )
            self._write_meta(model, Cursor())
        elif not exists:
            self._write_meta(model, Cursor())  # the chunks are gone: the cursor must not claim otherwise

    def _create_chunks(self, model: ModelIdentity) -> None:
        c = self._client
        c.create_collection(
            self._collection,
            vectors_config={DENSE_VECTOR: models.VectorParams(size=model.dimension, distance=models.Distance.COSINE)},
            sparse_vectors_config={SPARSE_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)},
            shard_number=self._cluster.shards,
            replication_factor=self._cluster.replication_factor,
            write_consistency_factor=self._cluster.write_consistency_factor,
        )
        if self._local:
            return  # local mode ignores payload indexes and warns about them
        for name in ("tenant", "collection", "document_id", "source_uri"):
            c.create_payload_index(
                self._collection,
                name,
                field_schema=models.KeywordIndexParams(
                    type=models.KeywordIndexType.KEYWORD,
                    is_tenant=name == "tenant" or None,
                    prefix=name == "source_uri" or None,
                ),
                wait=True,
            )

    def _dense_size(self) -> int:
        vectors = self._client.get_collection(self._collection).config.params.vectors
        if isinstance(vectors, dict) and DENSE_VECTOR in vectors:
            return vectors[DENSE_VECTOR].size
        return 0

    async def close(self) -> None:
        if self._owns_client:
            await self._call(self._client.close)

    async def ping(self) -> None:
        await self._call(self._client.get_collections)

    # -- meta: model identity and cursor --------------------------------------------

    def _read_meta(self) -> tuple[ModelIdentity, Cursor, bool] | None:
        """(model, cursor, clearing) or None when the meta point is missing."""
        records = self._client.retrieve(self._meta, [_META_POINT_ID], with_payload=True)
        if not records or records[0].payload is None:
            return None
        p = records[0].payload
        model = identity_from_meta(p)
        return model, Cursor(int(p["cursor"]), str(p.get("origin", ""))), bool(p.get("clearing", False))

    def _write_meta(
        self, model: ModelIdentity, cursor: Cursor, *, clearing: bool = False, expected: int | None = None
    ) -> None:
        """Replace the meta point (one atomic point write). With ``expected``, a conditional
        update: applied only if the stored cursor still is ``expected`` (checked by reading back)."""
        payload = {
            **identity_meta(model),
            "cursor": cursor.seq,
            "origin": cursor.origin,
            "clearing": clearing,
        }
        point = models.PointStruct(id=_META_POINT_ID, vector=[1.0], payload=payload)
        if expected is None:
            self._client.upsert(self._meta, [point], wait=True, ordering=self._ordering)
            return
        still = models.Filter(must=[models.FieldCondition(key="cursor", match=models.MatchValue(value=expected))])
        self._client.upsert(
            self._meta,
            [point],
            wait=True,
            update_filter=still,
            update_mode=models.UpdateMode.UPDATE_ONLY,
            ordering=self._ordering,
        )
        meta = self._read_meta()
        if meta is None or meta[1] != cursor:
            found = "missing" if meta is None else str(meta[1].seq)
            raise CursorConflictError(f"index '{self._collection}': cursor is {found}, expected {expected}")

    async def read_cursor(self) -> Cursor:
        meta = await self._call(self._read_meta)
        return Cursor() if meta is None else meta[1]

    async def set_cursor(self, seq: int, origin: str = "", *, expected: int | None = None) -> None:
        def set_cursor() -> None:
            meta = self._read_meta()
            if meta is None:
                raise IndexUnavailableError(f"index '{self._collection}' at {self._where} is not open")
            if expected is not None and meta[1].seq != expected:
                raise CursorConflictError(f"index '{self._collection}': cursor is {meta[1].seq}, expected {expected}")
            # The conditional write (checked by reading back) covers a writer between the two requests.
            self._write_meta(meta[0], Cursor(seq, origin), expected=expected)

        await self._call(set_cursor)

    # -- writes --------------------------------------------------------------------

    async def upsert(self, points: Sequence[IndexPoint]) -> None:
        structs = [
            models.PointStruct(
                id=p.id,
                vector={
                    DENSE_VECTOR: list(p.dense),
                    SPARSE_VECTOR: models.SparseVector(indices=list(p.sparse.indices), values=list(p.sparse.values)),
                },
                payload=payload_of(p.payload),
            )
            for p in points
        ]
        for start in range(0, len(structs), _UPSERT_BATCH):
            batch = structs[start : start + _UPSERT_BATCH]
            await self._call(
                functools.partial(self._client.upsert, self._collection, batch, wait=True, ordering=self._ordering)
            )

    async def delete_points(self, ids: Sequence[int]) -> None:
        if ids:
            await self._delete(models.PointIdsList(points=list(ids)))

    async def delete_documents(self, tenant: str, document_ids: Sequence[str], keep_ids: Sequence[int] = ()) -> None:
        if not document_ids:
            return
        keep: list[models.Condition] = [models.HasIdCondition(has_id=list(keep_ids))] if keep_ids else []
        must = [_equals("tenant", tenant), _any_of("document_id", document_ids)]
        await self._delete(models.FilterSelector(filter=models.Filter(must=must, must_not=keep)))

    async def delete_collection(self, tenant: str, collection: str) -> None:
        must = [_equals("tenant", tenant), _equals("collection", collection)]
        await self._delete(models.FilterSelector(filter=models.Filter(must=must)))

    async def _delete(self, selector: models.PointIdsList | models.FilterSelector) -> None:
        await self._call(
            lambda: self._client.delete(self._collection, points_selector=selector, wait=True, ordering=self._ordering)
        )

    async def clear(self) -> None:
        def clear() -> None:
            meta = self._read_meta()
            if meta is None:
                raise IndexUnavailableError(f"index '{self._collection}' at {self._where} is not open")
            # Recreating (rather than deleting every point) also resets the IDF statistics.
            # The reset cursor and the flag that an open must finish the clear are written
            # first: an interruption at any later step leaves cursor 0, never an emptied
            # collection under the old cursor.
            self._write_meta(meta[0], Cursor(), clearing=True)
            self._client.delete_collection(self._collection)
            self._create_chunks(meta[0])
            self._write_meta(meta[0], Cursor())

        await self._call(clear)

    # -- reads ---------------------------------------------------------------------

    async def query(self, query: IndexQuery) -> list[Hit]:
        flt = _filter(query.filter)
        dense = list(query.dense) if query.dense is not None else None
        sparse = (
            models.SparseVector(indices=list(query.sparse.indices), values=list(query.sparse.values))
            if query.sparse is not None and query.sparse.indices
            else None
        )
        if dense is None and query.sparse is None:
            raise ValueError("an IndexQuery needs a dense or a sparse vector")
        kwargs: dict[str, Any]
        if dense is not None and sparse is not None:
            fusion = query.fusion
            fused: models.FusionQuery | models.RrfQuery = (
                models.FusionQuery(fusion=models.Fusion.DBSF)
                if fusion.method == "dbsf"
                else models.RrfQuery(
                    rrf=models.Rrf(k=fusion.rrf_k, weights=list(fusion.weights) if fusion.weights else None)
                )
            )
            prefetch = [
                models.Prefetch(query=dense, using=DENSE_VECTOR, filter=flt, limit=fusion.prefetch_limit),
                models.Prefetch(query=sparse, using=SPARSE_VECTOR, filter=flt, limit=fusion.prefetch_limit),
            ]
            kwargs = {"query": fused, "prefetch": prefetch}
        elif dense is not None:
            kwargs = {"query": dense, "using": DENSE_VECTOR}
        elif sparse is not None:
            kwargs = {"query": sparse, "using": SPARSE_VECTOR}
        else:
            return []  # an empty sparse query (e.g. only stop words) matches nothing

        response = await self._call(
            lambda: self._client.query_points(
                self._collection, query_filter=flt, limit=query.limit, with_payload=HIT_PAYLOAD, **kwargs
            )
        )
        return [hit_of(p.id, p.score, p.payload) for p in response.points]

    async def count(self, filter: SearchFilter | None = None) -> int:
        flt = _filter(filter) if filter is not None else None
        result = await self._call(lambda: self._client.count(self._collection, count_filter=flt, exact=True))
        return result.count

    async def point_ids(self, filter: SearchFilter | None = None) -> set[int]:
        flt = _filter(filter) if filter is not None else None

        def scroll_all() -> set[int]:
            ids: set[int] = set()
            offset: models.ExtendedPointId | None = None
            while True:
                records, offset = self._client.scroll(
                    self._collection, scroll_filter=flt, limit=_SCROLL_PAGE, offset=offset,
                    with_payload=False, with_vectors=False,
                )  # fmt: skip
                ids.update(int_id(r.id) for r in records)
                if offset is None:
                    return ids

        return await self._call(scroll_all)


class _ServerConditions:
    """qdrant-client's condition constructors, for ``payload.conditions_of``."""

    def match(self, key: str, value: str | int | bool) -> models.Condition:
        return models.FieldCondition(key=key, match=models.MatchValue(value=value))

    def match_float(self, key: str, value: float) -> models.Condition:
        return models.FieldCondition(key=key, range=models.Range(gte=value, lte=value))

    def match_any(self, key: str, values: list[str] | list[int]) -> models.Condition:
        return models.FieldCondition(key=key, match=models.MatchAny(any=values))

    def prefix(self, key: str, prefix: str) -> models.Condition:
        return models.FieldCondition(key=key, match=models.MatchPrefix(prefix=prefix))

    def any_of(self, conditions: list[models.Condition]) -> models.Condition:
        return models.Filter(should=conditions)


_CONDITIONS = _ServerConditions()


def _equals(key: str, value: MetadataValue) -> models.Condition:
    return equals(_CONDITIONS, key, value)


def _any_of(key: str, values: Sequence[MetadataValue]) -> models.Condition:
    return one_of(_CONDITIONS, key, values)


def _filter(f: SearchFilter) -> models.Filter:
    return models.Filter(must=conditions_of(_CONDITIONS, f))
