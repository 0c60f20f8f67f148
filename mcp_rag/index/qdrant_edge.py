"""VectorIndex over Qdrant Edge: the Qdrant engine in-process, one shard in a directory.

Layout of ``directory``:

* ``shard/``          the EdgeShard (its segments; a shard made before 2026-12-01 also has a WAL)
* ``index_meta.json`` model identity, change-log cursor (seq + origin) and a ``clearing``
  flag, replaced atomically (write, fsync, rename, fsync the directory)
* ``owner.pid``       flock-ed by the process that has the index open, holds its pid
* ``shard.next/``     a compaction's copy of the shard, while a child process optimises it
* ``shard.old/``      the shard a compaction replaced, until it is deleted

Durability: the change log in Postgres is the index's log. Flushing the segments (fsyncs of
many files) is grouped: one flush for all the writes of up to ``flush_seconds`` (a timer after
the first unflushed write; ``close`` flushes too), instead of one per write. The cursor in the
meta file is written with that flush, not with each write: it names what the flushed segments
hold, so an index whose owner stopped without flushing reopens at the last flush and the change
log applies the rest again (re-applying a change reconciles a document with Postgres, whatever
part of the unflushed writes reached the disk). The cursor never claims more than the flushed
segments hold. So a shard keeps no write-ahead log of its own: the engine's would repeat the
change log, cost a write per update and keep about 40 MiB of log segments mapped in memory.
(Shards made before 2026-12-01 keep theirs until ``mcp-rag reindex`` makes a new one; meta files
of earlier versions may carry the cursor of the last flush as ``flushed`` beside a later cursor;
an open rewinds to it.)

Compaction. The engine searches its plain, appendable segments exhaustively, and keeps deleted
points in them; ``EdgeShard.optimize`` builds the HNSW graph and drops deleted points, but it
holds the GIL (and the shard) while it works: 40 s for 100k points here. So once the points
written since the last compaction reach ``compact_points`` (or half the index, whichever is
more), the index compacts on the side: under the write lock it flushes and copies the shard to
``shard.next``; a child process (``index/edge_optimize.py``) optimises the copy while this
process goes on serving and records every write it makes; then, under the write lock and with
no query in flight, the copy takes the shard's place and the recorded writes are applied to it.
The meta file's cursor is rewound to the copy's before the swap and moved forward only once the
recorded writes are flushed in the new shard, so a crash at any step reopens an index that holds
at least what its cursor says (an open also finishes or undoes an interrupted swap).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio.to_thread
import numpy as np
from qdrant_edge import (
    CountRequest,
    Distance,
    EdgeConfig,
    EdgeShard,
    EdgeSparseVectorParams,
    EdgeVectorParams,
    FieldCondition,
    Filter,
    Fusion,
    HasIdCondition,
    KeywordIndexParams,
    MatchAny,
    MatchPrefix,
    MatchValue,
    Modifier,
    Point,
    Prefetch,
    Query,
    QueryRequest,
    RangeFloat,
    ScrollRequest,
    SparseVector,
    UpdateOperation,
)

from mcp_rag import metrics
from mcp_rag.errors import IndexInUseError, IndexUnavailableError, ModelMismatchError
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
from mcp_rag.logging import get_logger
from mcp_rag.types import MetadataValue, ModelIdentity

if TYPE_CHECKING:  # aliases that exist in the type stubs only
    from qdrant_edge import ConditionType, NamedVector, PointId

T = TypeVar("T")
log = get_logger(__name__)

_SCROLL_PAGE = 1000


class EdgeIndex(VectorIndex):
    exclusive = True  # owner.pid is flock-ed by the process that opened it
    optimizer: Sequence[str] = (sys.executable, "-m", "mcp_rag.index.edge_optimize")
    """The compaction's child process; it is given the copy's directory and this process's pid."""

    def __init__(self, directory: Path, *, flush_seconds: float = 5.0, compact_points: int = 10_000) -> None:
        self._dir = Path(directory)
        self._flush_seconds = flush_seconds
        self._compact_points = compact_points
        self._churn = 0  # points written (upserted or deleted) since the last compaction
        self._compacted = 0  # points in the shard after the last compaction
        self._compaction: threading.Thread | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._replay: list[UpdateOperation] | None = None  # writes made while a compaction runs
        self._generation = 0  # bumped by clear() and close(): a compaction started before is void
        self._readers = _Readers()
        self._flushed = Cursor()  # the cursor when the segments were last flushed
        self._dirty = False  # writes since that flush
        self._timer: threading.Timer | None = None
        self._shard_path = self._dir / "shard"
        self._next_path = self._dir / "shard.next"
        self._old_path = self._dir / "shard.old"
        self._meta_path = self._dir / "index_meta.json"
        self._shard: EdgeShard | None = None
        self._owner_fd: int | None = None
        self._model: ModelIdentity | None = None
        self._cursor = Cursor()
        # Queries run concurrently (they release the GIL); writes, flushes and meta
        # updates are serialised.
        self._write_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------

    async def open(self, model: ModelIdentity) -> None:
        await anyio.to_thread.run_sync(self._open, model)

    def _open(self, model: ModelIdentity) -> None:
        if self._shard is not None:
            raise IndexUnavailableError(f"edge index {self._dir} is already open")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._owner_fd = self._lock_owner()
        try:
            meta = self._read_meta()
            if meta is not None and not meta.model.matches(model):
                raise ModelMismatchError(mismatch_message(str(self._dir), meta.model, model))
            self._finish_interrupted_compaction()
            has_shard = self._shard_path.is_dir() and any(self._shard_path.iterdir())
            self._churn = self._compacted = 0
            if meta is None or not has_shard or meta.clearing:
                # New index, one half of it missing, or a clear() that was interrupted: the
                # index is derived data, so start afresh (meta first: a shard never exists
                # without its identity, and never with a cursor it does not hold).
                self._write_meta(model, Cursor(), clearing=True)
                shutil.rmtree(self._shard_path, ignore_errors=True)
                self._shard = _create_shard(self._shard_path, model)
                self._write_meta(model, Cursor())
                self._cursor = Cursor()
            else:
                self._shard = self._load_shard()
                self._cursor = meta.cursor
                # An index of an earlier version was never compacted: all its points count.
                self._churn = meta.churn if meta.churn is not None else self._shard.info().points_count
                self._compacted = meta.compacted
                if meta.behind is not None and meta.behind != meta.cursor:
                    # Stopped with unflushed writes: re-apply them from the change log.
                    self._cursor = meta.behind
                    self._write_meta(model, self._cursor)
            self._flushed = self._cursor
            self._dirty = False
            self._model = model
        except BaseException:
            self._release_owner()
            raise

    def _finish_interrupted_compaction(self) -> None:
        """After a crash during a compaction: a copy that was never swapped in is dropped; a swap
        that stopped between its two renames is undone; a replaced shard left behind is deleted.
        The cursor was rewound before the swap, so either shard holds what the meta file says."""
        if not self._shard_path.exists() and self._old_path.is_dir():
            os.rename(self._old_path, self._shard_path)
            _fsync_dir(self._dir)
        _remove(self._next_path)
        _remove(self._old_path)

    def _lock_owner(self) -> int:
        path = self._dir / "owner.pid"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise IndexInUseError(self._in_use(int(owner) if owner.isdigit() else None)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _in_use(self, pid: int | None) -> str:
        if pid == os.getpid():
            return f"edge index directory {self._dir} is already open in this process"
        who = f"another mcp-rag process (pid {pid})" if pid else "another process"
        return f"edge index directory {self._dir} is in use by {who}; stop it or use another directory"

    def _load_shard(self) -> EdgeShard:
        try:
            return EdgeShard.load(str(self._shard_path))
        except Exception as e:
            if "WouldBlock" in str(e):  # the engine's own WAL lock (a shard that has a WAL)
                raise IndexInUseError(self._in_use(None)) from e
            raise IndexUnavailableError(f"cannot open edge index {self._shard_path}: {e}") from e

    def _release_owner(self) -> None:
        if self._owner_fd is not None:
            # Not unlinked: another process may be waiting on this very file.
            os.ftruncate(self._owner_fd, 0)
            os.close(self._owner_fd)  # releases the flock
            self._owner_fd = None

    async def close(self) -> None:
        def close() -> None:
            with self._write_lock:
                self._void_compaction_locked()
                compaction = self._compaction
            if compaction is not None:
                compaction.join()  # quick: its child is killed, and it will not swap
            with self._write_lock, self._readers.exclusive():
                self._cancel_timer()
                if self._shard is not None:
                    self._flush_locked()
                    self._shard.close()
                    self._shard = None
                self._release_owner()

        await anyio.to_thread.run_sync(close)

    async def ping(self) -> None:
        await self._read(lambda shard: shard.info())

    def _require(self) -> EdgeShard:
        if self._shard is None:
            raise IndexUnavailableError(f"edge index {self._dir} is not open")
        return self._shard

    async def _read(self, fn: Callable[[EdgeShard], T]) -> T:
        def read() -> T:
            with self._readers.reading():
                return fn(self._require())

        return await anyio.to_thread.run_sync(read)

    async def _write(self, *ops: UpdateOperation, points: int) -> None:
        """Apply ``ops``, which write or delete about ``points`` points (for the compaction's count)."""

        def write() -> None:
            with self._write_lock:
                shard = self._require()
                for op in ops:
                    shard.update(op)
                    if self._replay is not None:
                        self._replay.append(op)
                self._churn += points
                self._written_locked()
                if self._compaction is None and self._compaction_due(self._compacted // 2):
                    self._start_compaction_locked()

        await anyio.to_thread.run_sync(write)

    # -- grouped flushes -------------------------------------------------------------

    def _written_locked(self) -> None:
        """After a write (lock held): flush now, or within ``flush_seconds`` with whatever else comes."""
        self._dirty = True
        if self._flush_seconds <= 0:
            self._flush_locked()
        elif self._timer is None:
            self._timer = threading.Timer(self._flush_seconds, self._flush_later)
            self._timer.daemon = True
            self._timer.start()

    def _flush_later(self) -> None:
        with self._write_lock:
            self._timer = None
            if self._shard is not None:
                try:
                    self._flush_locked()
                except Exception as exc:  # retried by the next write or close
                    log.warning("edge index flush failed", error=str(exc)[:300])

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush_locked(self) -> None:
        """Flush the segments, then record that the cursor is flushed (lock held)."""
        if not self._dirty or self._shard is None or self._model is None:
            return
        self._shard.flush()
        self._dirty = False
        if self._flushed != self._cursor:
            self._flushed = self._cursor
            self._write_meta(self._model, self._cursor)

    async def flush(self) -> None:
        """Flush pending writes now (tests and shutdown paths; writes flush by themselves)."""

        def flush() -> None:
            with self._write_lock:
                self._cancel_timer()
                self._flush_locked()

        await anyio.to_thread.run_sync(flush)

    # -- compaction (see the module docstring) ----------------------------------------

    def _compaction_due(self, at_least: int = 0) -> bool:
        return self._compact_points > 0 and self._churn >= max(self._compact_points, at_least)

    def _start_compaction_locked(self) -> threading.Thread:
        thread = threading.Thread(
            target=self._compact, args=(self._generation,), name="mcp-rag-edge-compaction", daemon=True
        )
        self._compaction = thread
        thread.start()
        return thread

    def _void_compaction_locked(self) -> None:
        """A running compaction will not swap its copy in (clear or close; lock held)."""
        self._generation += 1
        if self._child is not None:
            self._child.kill()

    def _compact(self, generation: int) -> None:
        """The compaction thread: copy, optimise the copy in a child process, swap it in."""
        started = time.monotonic()
        try:
            with self._write_lock:
                if generation != self._generation or self._shard is None:
                    return
                self._cancel_timer()
                self._flush_locked()
                start, churn = self._cursor, self._churn
                _remove(self._next_path)
                shutil.copytree(self._shard_path, self._next_path)
                self._replay = []
                child = subprocess.Popen(
                    [*self.optimizer, str(self._next_path), str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                self._child = child
            log.info("compacting the edge index in a child process", directory=str(self._dir), written=churn)
            _, err = child.communicate()
            with self._write_lock:
                self._child = None
                if generation != self._generation or self._shard is None:
                    return
                if child.returncode != 0:
                    metrics.INDEX_COMPACTIONS.labels("failed").inc()
                    log.warning(
                        "edge index compaction failed; the index keeps its segments",
                        exit_code=child.returncode,
                        error=err.decode(errors="replace").strip()[-300:],
                    )
                    return
                with self._readers.exclusive():
                    self._swap_locked(start, churn)
            metrics.INDEX_COMPACTIONS.labels("done").inc()
            log.info(
                "edge index compacted",
                points=self._compacted,
                seconds=round(time.monotonic() - started, 1),
            )
        except Exception as exc:  # the index keeps serving from its current shard
            metrics.INDEX_COMPACTIONS.labels("failed").inc()
            log.warning("edge index compaction failed; the index keeps its segments", error=str(exc)[:300])
        finally:
            with self._write_lock:
                if self._child is not None:
                    self._child.kill()
                    self._child = None
                self._replay = None
                _remove(self._next_path)
                self._compaction = None

    def _swap_locked(self, start: Cursor, churn: int) -> None:
        """Put the optimised copy in the shard's place and apply the writes made meanwhile (write
        lock held, no query in flight). ``start`` is the cursor the copy was taken at."""
        model, replay = self._model, self._replay or []
        assert model is not None
        assert self._shard is not None
        self._write_meta(model, start)  # until the new shard holds everything, reopen at the copy's cursor
        self._flushed = start
        self._shard.close()
        self._shard = None
        os.rename(self._shard_path, self._old_path)
        os.rename(self._next_path, self._shard_path)
        _fsync_dir(self._dir)
        shard: EdgeShard | None = None
        try:
            shard = self._load_shard()
            for op in replay:
                shard.update(op)
            shard.flush()
        except BaseException:
            if shard is not None:
                shard.close()
            shutil.rmtree(self._shard_path, ignore_errors=True)
            os.rename(self._old_path, self._shard_path)
            _fsync_dir(self._dir)
            self._shard = self._load_shard()
            self._dirty = True  # the next flush writes the cursor again
            raise
        self._shard = shard
        self._churn -= churn
        self._compacted = shard.info().points_count
        self._dirty = False
        self._flushed = self._cursor
        self._write_meta(model, self._cursor)
        _remove(self._old_path)

    async def settle(self) -> None:
        """Wait for the running compaction, then run one if a compaction's worth of points was
        written since (the end of a bulk ingest: the index it leaves is optimised)."""
        await anyio.to_thread.run_sync(self._compact_and_wait, False)

    async def compact(self) -> None:
        """Compact now, however little was written since the last compaction, and wait for it."""
        await anyio.to_thread.run_sync(self._compact_and_wait, True)

    def _compact_and_wait(self, always: bool) -> None:
        """Wait for the running compaction; then start one if ``always`` or if one is due, and wait."""
        for may_start in (False, True):
            with self._write_lock:
                thread = self._compaction
                if thread is None and may_start and self._shard is not None and (always or self._compaction_due()):
                    thread = self._start_compaction_locked()
            if thread is not None:
                thread.join()

    @property
    def compacting(self) -> bool:
        return self._compaction is not None

    # -- meta: model identity and cursor --------------------------------------------

    def _read_meta(self) -> _Meta | None:
        """The meta file, or None when there is none."""
        try:
            data = json.loads(self._meta_path.read_text())
        except FileNotFoundError:
            return None
        flushed = data.get("flushed")
        churn = data.get("churn")
        return _Meta(
            model=identity_from_meta(data),
            cursor=Cursor(int(data["cursor"]), str(data.get("origin", ""))),
            clearing=bool(data.get("clearing", False)),
            behind=Cursor(int(flushed["cursor"]), str(flushed.get("origin", ""))) if flushed else None,
            churn=int(churn) if churn is not None else None,
            compacted=int(data.get("compacted", 0)),
        )

    def _write_meta(self, model: ModelIdentity, cursor: Cursor, *, clearing: bool = False) -> None:
        data: dict[str, Any] = {**identity_meta(model), "cursor": cursor.seq, "origin": cursor.origin}
        data.update(churn=self._churn, compacted=self._compacted)
        if clearing:
            data["clearing"] = True
        tmp = self._meta_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._meta_path)
        _fsync_dir(self._dir)  # make the rename itself durable

    async def read_cursor(self) -> Cursor:
        return self._cursor

    async def set_cursor(self, seq: int, origin: str = "", *, expected: int | None = None) -> None:
        def set_cursor() -> None:
            with self._write_lock:
                if self._model is None:
                    raise IndexUnavailableError(f"edge index {self._dir} is not open")
                if expected is not None and self._cursor.seq != expected:
                    raise CursorConflictError(
                        f"edge index {self._dir}: cursor is {self._cursor.seq}, expected {expected}"
                    )
                self._cursor = Cursor(seq, origin)
                if not self._dirty:
                    # Everything is flushed: the cursor is durable now. Otherwise the pending
                    # flush writes it with the segments it names.
                    self._flushed = self._cursor
                    self._write_meta(self._model, self._cursor)

        await anyio.to_thread.run_sync(set_cursor)

    # -- writes --------------------------------------------------------------------

    async def upsert(self, points: Sequence[IndexPoint]) -> None:
        if points:
            await self._write(UpdateOperation.upsert_points([_point(p) for p in points]), points=len(points))

    async def delete_points(self, ids: Sequence[int]) -> None:
        point_ids: list[PointId] = list(ids)
        if point_ids:
            await self._write(UpdateOperation.delete_points(point_ids), points=len(point_ids))

    async def delete_documents(self, tenant: str, document_ids: Sequence[str], keep_ids: Sequence[int] = ()) -> None:
        if not document_ids:
            return
        keep_set: set[PointId] = set(keep_ids)
        keep: list[ConditionType] = [HasIdCondition(keep_set)] if keep_set else []
        flt = Filter(must=[_equals("tenant", tenant), _any_of("document_id", document_ids)], must_not=keep)
        await self._write(UpdateOperation.delete_points_by_filter(flt), points=len(document_ids))

    async def delete_collection(self, tenant: str, collection: str) -> None:
        flt = Filter(must=[_equals("tenant", tenant), _equals("collection", collection)])
        await self._write(UpdateOperation.delete_points_by_filter(flt), points=1)

    async def clear(self) -> None:
        def clear() -> None:
            with self._write_lock:
                shard, model = self._require(), self._model
                assert model is not None
                # A fresh shard rather than deleting every point: the engine keeps counting
                # deleted points in its IDF statistics until segments are optimised. The
                # owner lock stays held, so no other process can slip in meanwhile.
                # The reset cursor (and the flag that an open must finish the clear) is
                # durable before anything is destroyed: a kill at any later step reopens
                # as an empty index at cursor 0, never as a partial one at the old cursor.
                self._cancel_timer()
                self._void_compaction_locked()
                self._churn = self._compacted = 0
                self._write_meta(model, Cursor(), clearing=True)
                self._cursor = self._flushed = Cursor()
                self._dirty = False
                with self._readers.exclusive():
                    shard.close()
                    self._shard = None
                    shutil.rmtree(self._shard_path)
                    self._shard = _create_shard(self._shard_path, model)
                self._write_meta(model, Cursor())

        await anyio.to_thread.run_sync(clear)

    # -- reads ---------------------------------------------------------------------

    async def query(self, query: IndexQuery) -> list[Hit]:
        flt = _filter(query.filter)
        dense = Query.Nearest(list(query.dense), using=DENSE_VECTOR) if query.dense is not None else None
        sparse = (
            Query.Nearest(SparseVector(list(query.sparse.indices), list(query.sparse.values)), using=SPARSE_VECTOR)
            if query.sparse is not None and query.sparse.indices
            else None
        )
        if query.dense is None and query.sparse is None:
            raise ValueError("an IndexQuery needs a dense or a sparse vector")
        if dense is not None and sparse is not None:
            f = query.fusion
            weights = list(f.weights) if f.weights else None
            # cast: at runtime Fusion.Rrf/Dbsf subclass Fusion; the 0.9 stubs do not say so.
            fusion = cast(Fusion, Fusion.Dbsf() if f.method == "dbsf" else Fusion.Rrf(f.rrf_k, weights))
            request = QueryRequest(
                limit=query.limit,
                query=fusion,
                prefetches=[
                    Prefetch(limit=f.prefetch_limit, query=dense, filter=flt),
                    Prefetch(limit=f.prefetch_limit, query=sparse, filter=flt),
                ],
                filter=flt,
                with_payload=HIT_PAYLOAD,
                with_vector=False,
            )
        elif dense is not None or sparse is not None:
            request = QueryRequest(
                limit=query.limit, query=dense or sparse, filter=flt, with_payload=HIT_PAYLOAD, with_vector=False
            )
        else:
            return []  # an empty sparse query (e.g. only stop words) matches nothing
        points = await self._read(lambda shard: shard.query(request))
        return [hit_of(p.id, p.score, p.payload) for p in points]

    async def count(self, filter: SearchFilter | None = None) -> int:
        request = CountRequest(exact=True, filter=_filter(filter) if filter is not None else None)
        return await self._read(lambda shard: shard.count(request))

    async def point_ids(self, filter: SearchFilter | None = None) -> set[int]:
        flt = _filter(filter) if filter is not None else None

        def scroll_all(shard: EdgeShard) -> set[int]:
            ids: set[int] = set()
            offset: PointId | None = None
            while True:
                request = ScrollRequest(
                    offset=offset, limit=_SCROLL_PAGE, filter=flt, with_payload=False, with_vector=False
                )
                records, offset = shard.scroll(request)
                ids.update(int_id(r.id) for r in records)
                if offset is None:
                    return ids

        return await self._read(scroll_all)


@dataclass(frozen=True, slots=True)
class _Meta:
    model: ModelIdentity
    cursor: Cursor
    clearing: bool
    behind: Cursor | None  # the cursor of the last flush, when behind (meta files of earlier versions)
    churn: int | None  # points written since the last compaction (None: an earlier version's index)
    compacted: int  # points after the last compaction


class _Readers:
    """Queries run side by side; replacing or closing the shard waits for those in flight and
    holds new ones back until it is done."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._held = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._held:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._held = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


def _remove(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_shard(path: Path, model: ModelIdentity) -> EdgeShard:
    config = EdgeConfig(
        vectors={DENSE_VECTOR: EdgeVectorParams(size=model.dimension, distance=Distance.Cosine)},
        sparse_vectors={SPARSE_VECTOR: EdgeSparseVectorParams(modifier=Modifier.Idf)},
        wal_enabled=False,  # the change log is the index's log (see the module docstring)
    )
    shard = EdgeShard.create(str(path), config)
    for name in ("tenant", "collection", "document_id", "source_uri"):
        params = KeywordIndexParams(is_tenant=name == "tenant" or None, prefix=name == "source_uri" or None)
        shard.update(UpdateOperation.create_field_index(name, params))
    shard.flush()
    return shard


def _point(p: IndexPoint) -> Point:
    vectors: dict[str, NamedVector] = {
        DENSE_VECTOR: list(p.dense),
        SPARSE_VECTOR: SparseVector(list(p.sparse.indices), list(p.sparse.values)),
    }
    return Point(p.id, vectors, payload_of(p.payload))


class _EdgeConditions:
    """qdrant-edge's condition constructors, for ``payload.conditions_of``."""

    def match(self, key: str, value: str | int | bool) -> ConditionType:
        if isinstance(value, bool):
            # qdrant-edge 0.9 turns a Python bool into the integer 1/0 (bool is an int
            # subclass), which never matches a boolean payload; numpy.bool_ is converted
            # as a real boolean.
            return FieldCondition(key, match=MatchValue(cast(bool, np.bool_(value))))
        return FieldCondition(key, match=MatchValue(value))

    def match_float(self, key: str, value: float) -> ConditionType:
        return FieldCondition(key, range=RangeFloat(gte=value, lte=value))

    def match_any(self, key: str, values: list[str] | list[int]) -> ConditionType:
        return FieldCondition(key, match=MatchAny(values))

    def prefix(self, key: str, prefix: str) -> ConditionType:
        return FieldCondition(key, match=MatchPrefix(prefix))

    def any_of(self, conditions: list[ConditionType]) -> ConditionType:
        return Filter(should=conditions)


_CONDITIONS = _EdgeConditions()


def _equals(key: str, value: MetadataValue) -> ConditionType:
    return equals(_CONDITIONS, key, value)


def _any_of(key: str, values: Sequence[MetadataValue]) -> ConditionType:
    return one_of(_CONDITIONS, key, values)


def _filter(f: SearchFilter) -> Filter:
    return Filter(must=conditions_of(_CONDITIONS, f))
