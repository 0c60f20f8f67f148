"""The Postgres store: the source of truth for collections, documents, chunks and the change log.

Writes go to the primary pool; reads go to the read pool (a local replica when one is
configured, else the primary).
"""

from __future__ import annotations

import base64
import json
import math
import random
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import anyio
import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import ConflictError, InvalidInputError, NotFoundError, RagError, UnavailableError
from ..logging import get_logger
from ..types import ModelIdentity, SparseVector

log = get_logger(__name__)
T = TypeVar("T")

CHANGE_LOG_LOCK_KEY = 0x6D63_7072_6167_0002
"""Writers serialise on this lock just before logging a change, so seq order is commit order."""
SYNC_LOCK_KEY = 0x6D63_7072_6167_0003
"""Index sync passes of one region take turns on this lock (on the read database)."""
SYNC_LOCK_WAIT = 30.0
SYNC_LOCK_POLL = 0.1
WRITE_ATTEMPTS = 5
"""A write transaction chosen as a deadlock victim (or failing serialisation) is run again this many times."""

Metadata = dict[str, Any]
FileStat = tuple[int, int]
"""A file's (size in bytes, modification time in nanoseconds)."""


@dataclass(frozen=True, slots=True)
class NewChunk:
    position: int
    text: str
    start_char: int
    end_char: int
    heading_path: tuple[str, ...]
    dense: np.ndarray[Any, np.dtype[np.float32]]
    sparse: SparseVector


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """A document (new or changed) with every chunk it has now."""

    tenant: str
    collection: str
    source_uri: str
    title: str
    metadata: Metadata
    content: str
    content_hash: str
    chunks: Sequence[NewChunk]
    file_stat: FileStat | None = None
    """(size, mtime in ns) of the file the document was read from, if it was."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    document_id: str
    status: str  # "added" | "updated"
    chunks: int


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    id: str
    tenant: str
    collection: str
    source_uri: str
    title: str
    metadata: Metadata
    content_hash: str
    chunk_count: int
    created_at: datetime
    updated_at: datetime
    content: str | None = None


@dataclass(frozen=True, slots=True)
class ChunkHit:
    chunk_id: int
    document_id: str
    collection: str
    source_uri: str
    title: str
    metadata: Metadata
    position: int
    text: str
    start_char: int
    end_char: int
    heading_path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IndexableChunk:
    """A chunk as the index needs it: vectors plus the payload fields."""

    chunk_id: int
    document_id: str
    tenant: str
    collection: str
    source_uri: str
    metadata: Metadata
    dense: np.ndarray[Any, np.dtype[np.float32]]
    sparse: SparseVector


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    tenant: str
    collection: str
    document_id: str | None
    op: str
    stamp: str = ""
    """Identifies this entry within the change log's history (see ``Store.log_stamp``)."""


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    documents: int
    chunks: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StoreStats:
    collections: int
    documents: int
    chunks: int
    last_change_seq: int


@dataclass(frozen=True, slots=True)
class Page:
    documents: list[DocumentInfo]
    next_cursor: str | None = None


@dataclass(slots=True)
class ReplicationStatus:
    is_replica: bool
    lag_seconds: float | None = None
    """0 on a replica that is streaming and has replayed all it received; an upper bound on its
    staleness otherwise; None on the primary (or when it cannot be known yet)."""
    streaming: bool | None = None
    """Whether the replica's WAL receiver is connected to the primary (None on the primary)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _translate(exc: Exception) -> UnavailableError:
    if isinstance(exc, psycopg.errors.DiskFull):
        return UnavailableError("the database's disk is full: writes fail until its operator frees space")
    return UnavailableError(
        f"the database is unavailable ({type(exc).__name__}: {str(exc).strip()[:200]}); retry shortly"
    )


def _translate_refusal(exc: psycopg.Error) -> RagError:
    """A database error that is not an outage, in the caller's terms (no psycopg class reaches a client)."""
    detail = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    if isinstance(exc, psycopg.errors.TransactionRollback | psycopg.errors.IntegrityError):
        return ConflictError(f"the write conflicted with a concurrent change ({detail}); retry it")
    if isinstance(exc, psycopg.errors.DataError):
        return InvalidInputError(f"the database rejected a value ({detail})")
    return RagError(f"the database refused the operation ({detail})")


class Store:
    def __init__(
        self,
        write_dsn: str,
        read_dsn: str | None = None,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        probe_idle_seconds: float = 1.0,
    ) -> None:
        self.write_dsn = write_dsn
        self.read_dsn = read_dsn or write_dsn
        self._timeout = timeout
        # Autocommit: a read is one round trip instead of BEGIN + query + COMMIT (every read here is
        # one statement); writes open their transactions explicitly with ``conn.transaction()``.
        common: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "timeout": timeout,
            "open": False,
            "kwargs": {"connect_timeout": max(1, int(timeout)), "autocommit": True},
            "reconnect_timeout": 0,
        }
        self._probe = _ProbeIfIdle(probe_idle_seconds)
        self._write = AsyncConnectionPool(write_dsn, name="write", check=self._probe, **common)
        self._read = (
            self._write
            if self.read_dsn == write_dsn
            else AsyncConnectionPool(self.read_dsn, name="read", check=self._probe, **common)
        )
        self._caught_up_at: float | None = None  # monotonic time the replica was last seen fully caught up

    async def open(self) -> None:
        await self._write.open(wait=False)
        if self._read is not self._write:
            await self._read.open(wait=False)

    async def close(self) -> None:
        await self._write.close()
        if self._read is not self._write:
            await self._read.close()

    # --- health ----------------------------------------------------------------------

    async def ping(self, *, include_primary: bool = True) -> None:
        """Raise UnavailableError unless the read database (and, by default, the primary) answers.

        ``include_primary=False`` checks the read database only: a region reading from its
        replica can serve reads while the primary is away (when reads go to the primary,
        that check covers it anyway).
        """
        pools = [self._read] if not include_primary or self._read is self._write else [self._write, self._read]
        for pool in pools:
            try:
                async with pool.connection(timeout=self._timeout) as conn:
                    await conn.execute("SELECT 1")
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                raise _translate(exc) from exc

    async def replication_status(self) -> ReplicationStatus:
        """Whether reads come from a replica and how far behind the primary it is (seconds).

        A replica that is streaming and has replayed all the WAL it received is current: 0.
        Otherwise the lag is the time since the last replayed transaction committed on the
        primary (it grows while the primary is idle, so it is an upper bound) - or, when
        smaller, the time since this process last saw the replica streaming and caught up.
        That also covers a replica cut off from the primary: its receive and replay
        positions are then equal but frozen, and the lag must keep growing, not read 0.
        (Without the pg_read_all_stats role the WAL receiver's status is hidden; a
        receiver process then counts as streaming.)
        """
        async with self._reading() as conn:
            cur = await conn.execute(
                """SELECT pg_is_in_recovery(),
                          EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status IS NULL OR status = 'streaming'),
                          pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn(),
                          greatest(0, extract(epoch FROM now() - pg_last_xact_replay_timestamp()))::float8"""
            )
            row = await cur.fetchone()
        assert row is not None
        is_replica, streaming, replayed_all, since_last_replay = bool(row[0]), bool(row[1]), bool(row[2]), row[3]
        if not is_replica:
            return ReplicationStatus(is_replica=False)
        now = time.monotonic()
        if streaming and replayed_all:
            self._caught_up_at = now
            return ReplicationStatus(is_replica=True, lag_seconds=0.0, streaming=True)
        bounds = [float(since_last_replay)] if since_last_replay is not None else []
        if self._caught_up_at is not None:
            bounds.append(now - self._caught_up_at)
        return ReplicationStatus(is_replica=True, lag_seconds=min(bounds) if bounds else None, streaming=streaming)

    # --- connections -------------------------------------------------------------------

    def _writing(self) -> Any:
        return _guarded(self._write, self._timeout, self._probe)

    def _reading(self) -> Any:
        return _guarded(self._read, self._timeout, self._probe)

    # --- the embedding model of the stored vectors ------------------------------------

    async def recorded_model(self) -> ModelIdentity | None:
        """The model the stored vectors belong to; None before the first process claimed one."""
        async with self._writing() as conn:
            cur = await conn.execute("SELECT name, dimension, provider, fingerprint FROM embedding_model")
            row = await cur.fetchone()
        if row is None:
            return None
        return ModelIdentity(row[0], row[1], provider=row[2], fingerprint=tuple(row[3] or ()))

    async def claim_model(self, model: ModelIdentity) -> ModelIdentity:
        """Record ``model`` as the one the stored vectors belong to unless one already is;
        returns the recorded one (``model`` itself on first use, whatever concurrent callers do).

        A row recorded before fingerprints existed gets ``model``'s fingerprint when the rest agrees."""
        fingerprint = list(model.fingerprint) or None
        async with self._writing() as conn:
            await conn.execute(
                "INSERT INTO embedding_model (name, dimension, provider, fingerprint) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (model.name, model.dimension, model.provider, fingerprint),
            )
            await conn.execute(
                "UPDATE embedding_model SET fingerprint = %s"
                " WHERE fingerprint IS NULL AND name = %s AND dimension = %s AND provider = %s",
                (fingerprint, model.name, model.dimension, model.provider),
            )
            cur = await conn.execute("SELECT name, dimension, provider, fingerprint FROM embedding_model")
            row = await cur.fetchone()
        assert row is not None
        return ModelIdentity(row[0], row[1], provider=row[2], fingerprint=tuple(row[3] or ()))

    # --- writes ------------------------------------------------------------------------

    async def _write_transaction(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction on the primary; a deadlock victim (or a serialisation
        failure) is rolled back and run again, a few times, before it is reported as a conflict."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                async with _guarded(self._write, self._timeout, self._probe, retrying=True) as conn, conn.transaction():
                    return await work(conn)
            except psycopg.errors.TransactionRollback as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise _translate_refusal(exc) from exc
                log.info(
                    "write transaction rolled back by a conflict; retrying", error=type(exc).__name__, attempt=attempt
                )
                await anyio.sleep(random.uniform(0.005, 0.05) * attempt)  # noqa: S311 (jitter)
        raise AssertionError("unreachable")

    async def existing_hashes(self, tenant: str, collection: str, source_uris: Sequence[str]) -> dict[str, str]:
        """source_uri -> content_hash of the documents already stored (read from the primary)."""
        if not source_uris:
            return {}
        async with self._writing() as conn:
            cur = await conn.execute(
                "SELECT source_uri, content_hash FROM documents WHERE tenant = %s AND collection = %s"
                " AND source_uri = ANY(%s)",
                (tenant, collection, list(source_uris)),
            )
            return {row[0]: row[1] for row in await cur.fetchall()}

    async def file_stats(self, tenant: str, collection: str, source_uris: Sequence[str]) -> dict[str, FileStat]:
        """source_uri -> the (size, mtime) its file had when it was last read, for documents that have one."""
        if not source_uris:
            return {}
        async with self._writing() as conn:
            cur = await conn.execute(
                "SELECT source_uri, source_size, source_mtime_ns FROM documents WHERE tenant = %s AND collection = %s"
                " AND source_uri = ANY(%s) AND source_size IS NOT NULL AND source_mtime_ns IS NOT NULL",
                (tenant, collection, list(source_uris)),
            )
            return {row[0]: (int(row[1]), int(row[2])) for row in await cur.fetchall()}

    async def record_file_stats(self, tenant: str, collection: str, stats: Sequence[tuple[str, str, FileStat]]) -> None:
        """Remember the file stat of documents read again and found unchanged: (source_uri, content_hash, stat).
        Only a document that still has that content gets it (a concurrent write of other content wins).
        Nothing the index holds changes, so nothing is logged."""
        if not stats:
            return

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "UPDATE documents SET source_size = %s, source_mtime_ns = %s WHERE tenant = %s"
                    " AND collection = %s AND source_uri = %s AND content_hash = %s",
                    [(st[0], st[1], tenant, collection, uri, digest) for uri, digest, st in sorted(stats)],
                )

        await self._write_transaction(work)

    async def documents_under(self, tenant: str, collection: str, prefix: str) -> list[tuple[str, str]]:
        """(id, source_uri) of every document in the collection whose source starts with ``prefix``."""
        async with self._writing() as conn:
            cur = await conn.execute(
                "SELECT id, source_uri FROM documents WHERE tenant = %s AND collection = %s"
                ' AND source_uri COLLATE "C" LIKE %s ORDER BY source_uri COLLATE "C"',
                (tenant, collection, _like_prefix(prefix)),
            )
            return [(str(row[0]), row[1]) for row in await cur.fetchall()]

    async def delete_documents(self, tenant: str, document_ids: Sequence[str]) -> list[DocumentInfo]:
        """Delete documents in one transaction; ids already gone are skipped. Returns what was deleted."""
        if not document_ids:
            return []
        ids = sorted({_parse_uuid(d) for d in document_ids})

        async def work(conn: psycopg.AsyncConnection[Any]) -> list[DocumentInfo]:
            cur = await conn.execute(
                "DELETE FROM documents WHERE tenant = %s AND id = ANY(%s) RETURNING " + _DOC_COLUMNS, (tenant, ids)
            )
            deleted = [_doc_info(row) for row in await cur.fetchall()]
            if deleted:
                await _log_changes(conn, [(tenant, d.collection, d.id, "delete") for d in deleted])
            return deleted

        return await self._write_transaction(work)

    async def write_documents(self, writes: Sequence[DocumentWrite]) -> list[WriteResult]:
        """Store documents and replace their chunks, all in one transaction, and log each change.

        Rows are locked in one global order, whatever the caller's order: first each collection
        row (``FOR KEY SHARE``, so ``delete_collection`` waits for this transaction and this one
        never meets a half-deleted collection), then the documents sorted by key. Two batches over
        the same documents therefore queue instead of deadlocking. Results are in caller order.
        """
        if not writes:
            return []
        order = sorted(range(len(writes)), key=lambda i: (writes[i].tenant, writes[i].collection, writes[i].source_uri))

        async def work(conn: psycopg.AsyncConnection[Any]) -> list[WriteResult]:
            for key in sorted({(w.tenant, w.collection) for w in writes}):
                await _lock_collection(conn, *key)
            results: dict[int, WriteResult] = {}
            for i in order:
                results[i] = await _write_document(conn, writes[i])
            ordered = [results[i] for i in range(len(writes))]
            await _log_changes(
                conn,
                [(writes[i].tenant, writes[i].collection, results[i].document_id, "upsert") for i in order],
            )
            return ordered

        return await self._write_transaction(work)

    async def delete_document(self, tenant: str, document_id: str) -> DocumentInfo:
        doc_uuid = _parse_uuid(document_id)

        async def work(conn: psycopg.AsyncConnection[Any]) -> DocumentInfo:
            cur = await conn.execute(
                "DELETE FROM documents WHERE tenant = %s AND id = %s RETURNING " + _DOC_COLUMNS,
                (tenant, doc_uuid),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"no document with id {document_id!r}; use list_documents to find ids")
            info = _doc_info(row)
            await _log_changes(conn, [(tenant, info.collection, document_id, "delete")])
            return info

        return await self._write_transaction(work)

    async def delete_collection(self, tenant: str, collection: str) -> int:
        """Delete a collection with its documents; returns how many documents went.

        The collection row is locked first: writers into the collection hold it ``FOR KEY SHARE``
        until they commit, so this waits for them, and the count (taken after the lock) includes
        every document that was committed into the collection before it went.
        """

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                "SELECT 1 FROM collections WHERE tenant = %s AND name = %s FOR UPDATE", (tenant, collection)
            )
            if await cur.fetchone() is None:
                raise NotFoundError(f"no collection named {collection!r}; use list_collections to see them")
            cur = await conn.execute(
                "SELECT count(*) FROM documents WHERE tenant = %s AND collection = %s", (tenant, collection)
            )
            row = await cur.fetchone()
            count = int(row[0]) if row else 0
            await conn.execute("DELETE FROM collections WHERE tenant = %s AND name = %s", (tenant, collection))
            await _log_changes(conn, [(tenant, collection, None, "delete_collection")])
            return count

        return await self._write_transaction(work)

    # --- reads -------------------------------------------------------------------------

    async def get_document(self, tenant: str, document_id: str, *, with_content: bool = True) -> DocumentInfo:
        doc_uuid = _parse_uuid(document_id)
        columns = _DOC_COLUMNS + (", content" if with_content else "")
        async with self._reading() as conn:
            cur = await conn.execute(
                f"SELECT {columns} FROM documents WHERE tenant = %s AND id = %s", (tenant, doc_uuid)
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"no document with id {document_id!r}; use list_documents to find ids")
        return _doc_info(row)

    async def list_documents(
        self,
        tenant: str,
        *,
        collection: str | None = None,
        source_prefix: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> Page:
        after: tuple[str, str] | None = _decode_cursor(cursor) if cursor else None
        sql, params = _list_documents_query(tenant, collection, source_prefix, limit, after)
        async with self._reading() as conn:
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
        docs = [_doc_info(r) for r in rows[:limit]]
        next_cursor = _encode_cursor(docs[-1].source_uri, docs[-1].id) if len(rows) > limit else None
        return Page(docs, next_cursor)

    async def list_collections(self, tenant: str) -> list[CollectionInfo]:
        async with self._reading() as conn:
            cur = await conn.execute(
                """SELECT c.name, count(d.id), coalesce(sum(d.chunk_count), 0), c.created_at
                   FROM collections c LEFT JOIN documents d ON d.tenant = c.tenant AND d.collection = c.name
                   WHERE c.tenant = %s GROUP BY c.name, c.created_at ORDER BY c.name""",
                (tenant,),
            )
            return [CollectionInfo(r[0], int(r[1]), int(r[2]), r[3]) for r in await cur.fetchall()]

    async def stats(self, tenant: str | None = None) -> StoreStats:
        where, params = ("WHERE tenant = %s", (tenant,)) if tenant is not None else ("", ())
        async with self._reading() as conn:
            cur = await conn.execute(
                f"""SELECT (SELECT count(*) FROM collections {where}),
                           (SELECT count(*) FROM documents {where}),
                           (SELECT coalesce(sum(chunk_count), 0) FROM documents {where}),
                           (SELECT coalesce(max(seq), 0) FROM change_log)""",
                params * 3,
            )
            row = await cur.fetchone()
        assert row is not None
        return StoreStats(int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    async def hydrate(self, tenant: str, chunk_ids: Sequence[int]) -> dict[int, ChunkHit]:
        """Chunks with their documents, by id; ids whose document is gone are simply absent."""
        if not chunk_ids:
            return {}
        async with self._reading() as conn:
            cur = await conn.execute(
                """SELECT c.id, d.id, d.collection, d.source_uri, d.title, d.metadata, c.position, c.text,
                          c.start_char, c.end_char, c.heading_path
                   FROM chunks c JOIN documents d ON d.id = c.document_id
                   WHERE c.id = ANY(%s) AND d.tenant = %s""",
                (list(chunk_ids), tenant),
            )
            rows = await cur.fetchall()
        return {
            r[0]: ChunkHit(r[0], str(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], tuple(r[10])) for r in rows
        }

    async def document_chunks(
        self, tenant: str, document_id: str, first: int = 0, last: int = 2**31 - 1
    ) -> list[ChunkHit]:
        """The document's chunks at positions ``first`` to ``last`` (all by default), in order."""
        doc_uuid = _parse_uuid(document_id)
        async with self._reading() as conn:
            cur = await conn.execute(
                """SELECT c.id, d.id, d.collection, d.source_uri, d.title, d.metadata, c.position, c.text,
                          c.start_char, c.end_char, c.heading_path
                   FROM chunks c JOIN documents d ON d.id = c.document_id
                   WHERE d.id = %s AND d.tenant = %s AND c.position BETWEEN %s AND %s ORDER BY c.position""",
                (doc_uuid, tenant, first, last),
            )
            rows = await cur.fetchall()
        return [ChunkHit(r[0], str(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], tuple(r[10])) for r in rows]

    # --- change log and index feed (read side: works on a replica) ----------------------

    @asynccontextmanager
    async def sync_lock(self) -> AsyncIterator[None]:
        """Held while one sync pass applies changes to the region's index.

        A session advisory lock on the read database (advisory locks work on a hot standby),
        polled with ``pg_try_advisory_lock`` for at most ``SYNC_LOCK_WAIT`` seconds: nothing
        changes the session's settings, so a pass cancelled while it waits is just cancelled.
        The lock excludes only the passes that read the same database over session-mode
        connections; the index cursor's compare-and-set (``sync.py``) detects any other overlap.
        """
        async with self._reading() as conn:
            deadline = time.monotonic() + SYNC_LOCK_WAIT
            while True:
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (SYNC_LOCK_KEY,))
                row = await cur.fetchone()
                if row is not None and row[0]:
                    break
                if time.monotonic() >= deadline:
                    raise UnavailableError("another index sync pass has held the sync lock too long; retrying")
                await anyio.sleep(SYNC_LOCK_POLL)
            try:
                yield
            finally:
                # Shielded: a cancelled pass must still release the lock, or the pooled session keeps it.
                # A connection that fails here is closed: the pool discards it and the lock goes with
                # the session (never an error in place of the pass's own outcome).
                with anyio.CancelScope(shield=True):
                    try:
                        with anyio.fail_after(self._timeout):
                            await conn.execute("SELECT pg_advisory_unlock(%s)", (SYNC_LOCK_KEY,))
                    except (psycopg.Error, TimeoutError, OSError):
                        await conn.close()

    async def changes_after(self, seq: int, limit: int) -> list[Change]:
        return await self._changes("seq > %s", seq, limit)

    async def changes_from(self, seq: int, limit: int) -> tuple[str | None, list[Change]]:
        """The stamp of entry ``seq`` (see ``log_stamp``; "" for 0) and up to ``limit`` entries after
        it, read in one query: what a sync pass checks and applies first."""
        changes = await self._changes("seq >= %s", seq, limit + 1)
        if changes and changes[0].seq == seq:
            return changes[0].stamp, changes[1:]
        return ("" if seq == 0 else None), changes[:limit]

    async def _changes(self, where: str, seq: int, limit: int) -> list[Change]:
        async with self._reading() as conn:
            cur = await conn.execute(
                f"SELECT seq, tenant, collection, document_id, op, {_STAMP_SQL} FROM change_log"
                f" WHERE {where} ORDER BY seq LIMIT %s",
                (seq, limit),
            )
            return [
                Change(r[0], r[1], r[2], None if r[3] is None else str(r[3]), r[4], _stamp(r[0], r[5]))
                for r in await cur.fetchall()
            ]

    async def log_stamp(self, seq: int) -> str | None:
        """The stamp of change-log entry ``seq`` (None when the log has no such entry).

        A stamp names one entry of one history of the log: its seq and the commit-time clock of
        the transaction that wrote it. After a failover that lost writes, a point-in-time
        restore, or with an index pointed at another database, the entry at a given seq is
        missing or has another stamp. On a failover without loss it is the same entry.
        """
        async with self._reading() as conn:
            cur = await conn.execute(f"SELECT {_STAMP_SQL} FROM change_log WHERE seq = %s", (seq,))
            row = await cur.fetchone()
        return None if row is None else _stamp(seq, row[0])

    async def log_state(self) -> tuple[int, bool]:
        """(last seq in the change log, whether the read database is a replica still in recovery)."""
        async with self._reading() as conn:
            cur = await conn.execute("SELECT coalesce(max(seq), 0), pg_is_in_recovery() FROM change_log")
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), bool(row[1])

    async def pending_changes(self, seq: int, tenant: str | None = None) -> int:
        """Change-log entries after ``seq``: every tenant's, or only ``tenant``'s."""
        where, params = ("AND tenant = %s", (seq, tenant)) if tenant is not None else ("", (seq,))
        async with self._reading() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM change_log WHERE seq > %s {where}", params)
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def last_change_seq(self) -> int:
        async with self._reading() as conn:
            cur = await conn.execute("SELECT coalesce(max(seq), 0) FROM change_log")
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def indexable_chunks(self, document_ids: Sequence[str]) -> list[IndexableChunk]:
        if not document_ids:
            return []
        async with self._reading() as conn:
            cur = await conn.execute(
                _INDEXABLE_SQL + " WHERE d.id = ANY(%s)", ([_parse_uuid(d) for d in document_ids],)
            )
            return [_indexable(r) for r in await cur.fetchall()]

    async def collection_indexable_chunks(self, tenant: str, collection: str) -> list[IndexableChunk]:
        async with self._reading() as conn:
            cur = await conn.execute(
                _INDEXABLE_SQL + " WHERE d.tenant = %s AND d.collection = %s", (tenant, collection)
            )
            return [_indexable(r) for r in await cur.fetchall()]

    async def iter_indexable_chunks(self, batch: int = 512) -> AsyncIterator[list[IndexableChunk]]:
        """Every chunk, in id order, a batch at a time (for a full rebuild of the index)."""
        last = 0
        while True:
            async with self._reading() as conn:
                cur = await conn.execute(_INDEXABLE_SQL + " WHERE c.id > %s ORDER BY c.id LIMIT %s", (last, batch))
                rows = [_indexable(r) for r in await cur.fetchall()]
            if not rows:
                return
            yield rows
            last = rows[-1].chunk_id

    async def all_chunk_ids(self, tenant: str | None = None) -> set[int]:
        where, params = ("WHERE d.tenant = %s", (tenant,)) if tenant else ("", ())
        async with self._reading() as conn:
            cur = await conn.execute(
                f"SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id {where}", params
            )
            return {r[0] for r in await cur.fetchall()}


_STAMP_SQL = "floor(extract(epoch FROM created_at) * 1000000)::bigint"


def _stamp(seq: int, micros: int) -> str:
    return f"{seq}@{micros}"


_DOC_COLUMNS = "id, tenant, collection, source_uri, title, metadata, content_hash, chunk_count, created_at, updated_at"

_INDEXABLE_SQL = """SELECT c.id, d.id, d.tenant, d.collection, d.source_uri, d.metadata, c.dense, c.sparse_indices,
                           c.sparse_values
                    FROM chunks c JOIN documents d ON d.id = c.document_id"""


def _list_documents_query(
    tenant: str, collection: str | None, source_prefix: str | None, limit: int, after: tuple[str, str] | None
) -> tuple[str, list[Any]]:
    """One page of documents in (source_uri in byte order, id) order, after the keyset ``after``:
    an index range scan on ``documents_listing_idx`` (or its per-collection twin, migration 3)."""
    clauses = ["tenant = %s"]
    params: list[Any] = [tenant]
    if collection is not None:
        clauses.append("collection = %s")
        params.append(collection)
    if source_prefix:
        clauses.append('source_uri COLLATE "C" LIKE %s')
        params.append(_like_prefix(source_prefix))
    if after is not None:
        clauses.append('(source_uri COLLATE "C", id) > (%s, %s)')
        params.extend([after[0], _parse_uuid(after[1])])
    params.append(limit + 1)
    sql = f'SELECT {_DOC_COLUMNS} FROM documents WHERE {" AND ".join(clauses)} ORDER BY source_uri COLLATE "C", id LIMIT %s'
    return sql, params


def _indexable(r: Any) -> IndexableChunk:
    return IndexableChunk(
        chunk_id=r[0],
        document_id=str(r[1]),
        tenant=r[2],
        collection=r[3],
        source_uri=r[4],
        metadata=r[5],
        dense=np.frombuffer(r[6], dtype="<f4"),
        sparse=SparseVector(indices=r[7], values=r[8]),
    )


def _doc_info(row: Any) -> DocumentInfo:
    return DocumentInfo(
        id=str(row[0]),
        tenant=row[1],
        collection=row[2],
        source_uri=row[3],
        title=row[4],
        metadata=row[5],
        content_hash=row[6],
        chunk_count=row[7],
        created_at=row[8],
        updated_at=row[9],
        content=row[10] if len(row) > 10 else None,
    )


async def _lock_collection(conn: psycopg.AsyncConnection[Any], tenant: str, collection: str) -> None:
    """Create the collection if needed and hold its row ``FOR KEY SHARE`` until commit.

    If a ``delete_collection`` commits between the insert and the lock, the row is gone and the
    collection is created again (a write after a delete starts a new collection)."""
    for _ in range(10):
        await conn.execute(
            "INSERT INTO collections (tenant, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", (tenant, collection)
        )
        cur = await conn.execute(
            "SELECT 1 FROM collections WHERE tenant = %s AND name = %s FOR KEY SHARE", (tenant, collection)
        )
        if await cur.fetchone() is not None:
            return
    raise ConflictError(f"collection {collection!r} kept being deleted while this write ran; retry it")


async def _write_document(conn: psycopg.AsyncConnection[Any], w: DocumentWrite) -> WriteResult:
    cur = await conn.execute(
        """INSERT INTO documents (id, tenant, collection, source_uri, title, metadata, content,
                                  content_hash, chunk_count, source_size, source_mtime_ns)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (tenant, collection, source_uri) DO UPDATE SET
               title = excluded.title, metadata = excluded.metadata, content = excluded.content,
               content_hash = excluded.content_hash, chunk_count = excluded.chunk_count,
               source_size = excluded.source_size, source_mtime_ns = excluded.source_mtime_ns,
               updated_at = now()
           RETURNING id, (xmax = 0) AS inserted""",
        (
            uuid.uuid4(),
            w.tenant,
            w.collection,
            w.source_uri,
            w.title,
            json.dumps(w.metadata),
            w.content,
            w.content_hash,
            len(w.chunks),
            w.file_stat[0] if w.file_stat else None,
            w.file_stat[1] if w.file_stat else None,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    doc_id, inserted = row
    if not inserted:
        await conn.execute("DELETE FROM chunks WHERE document_id = %s", (doc_id,))
    async with conn.cursor().copy(
        "COPY chunks (document_id, position, text, start_char, end_char, heading_path, dense,"
        " sparse_indices, sparse_values) FROM STDIN"
    ) as copy:
        for c in w.chunks:
            await copy.write_row(
                (
                    doc_id,
                    c.position,
                    c.text,
                    c.start_char,
                    c.end_char,
                    list(c.heading_path),
                    c.dense.astype("<f4").tobytes(),
                    list(c.sparse.indices),
                    list(c.sparse.values),
                )
            )
    return WriteResult(str(doc_id), "added" if inserted else "updated", len(w.chunks))


async def _log_changes(conn: psycopg.AsyncConnection[Any], changes: Sequence[tuple[str, str, str | None, str]]) -> None:
    # Last statements of the transaction: the lock is held only until commit.
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGE_LOG_LOCK_KEY,))
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO change_log (tenant, collection, document_id, op) VALUES (%s, %s, %s, %s)", changes
        )


def _parse_uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise NotFoundError(f"no document with id {value!r}: ids look like 3f2b...-... (a UUID)") from None


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _encode_cursor(source_uri: str, doc_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([source_uri, doc_id]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        source_uri, doc_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        uuid.UUID(doc_id)
        if not isinstance(source_uri, str) or "\x00" in source_uri:  # never in a cursor this store made
            raise ValueError("not a stored source URI")
        source_uri.encode("utf-8")  # lone surrogates cannot be sent to Postgres
        return source_uri, str(doc_id)
    except Exception:
        raise InvalidInputError(
            "invalid cursor: pass the next_cursor value of a previous list_documents call"
        ) from None


class _ProbeIfIdle:
    """The pools' checkout check: probe a connection (one empty round trip) only when it has
    been idle for ``idle_seconds``; one that just served a request is taken as alive.

    Probing every checkout doubled the round trips of a search and cost ~10% of the event
    loop under concurrent load. A connection that breaks within the window fails its query,
    which surfaces as ``UnavailableError`` and the pool discards it.
    """

    def __init__(self, idle_seconds: float = 1.0) -> None:
        self._idle_seconds = idle_seconds
        self._last_ok: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

    def mark_ok(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._last_ok[conn] = time.monotonic()

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if time.monotonic() - self._last_ok.get(conn, -math.inf) >= self._idle_seconds:
            await AsyncConnectionPool.check_connection(conn)


class _guarded:
    """``async with`` a pool connection, turning connection failures into UnavailableError."""

    def __init__(
        self, pool: AsyncConnectionPool[Any], timeout: float, probe: _ProbeIfIdle, *, retrying: bool = False
    ) -> None:
        self._retrying = retrying  # the caller runs the transaction again after a rollback by conflict
        self._pool = pool
        self._timeout = timeout
        self._probe = probe
        self._cm: Any = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self._cm = self._pool.connection(timeout=self._timeout)
        try:
            conn: psycopg.AsyncConnection[Any] = await self._cm.__aenter__()
        except (PoolTimeout, psycopg.OperationalError, OSError) as exc:
            raise _translate(exc) from exc
        self._conn = conn
        return conn

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if exc is None and self._conn is not None and not self._conn.broken:
            self._probe.mark_ok(self._conn)
        try:
            result: bool | None = await self._cm.__aexit__(exc_type, exc, tb)
        except (psycopg.OperationalError, OSError) as err:
            if exc is not None and not isinstance(exc, Exception):
                return None  # a cancellation stays a cancellation (the pool discards the connection)
            raise _translate(err) from err
        if self._retrying and isinstance(exc, psycopg.errors.TransactionRollback):
            return result  # a deadlock victim: ``_write_transaction`` runs it again
        if isinstance(exc, psycopg.OperationalError | PoolTimeout):
            raise _translate(exc) from exc
        if isinstance(exc, psycopg.Error):
            raise _translate_refusal(exc) from exc
        return result
