"""Keeping the index derived from Postgres: apply the change log, or rebuild from scratch.

Each change names a document (or a whole collection). Applying it *reconciles* the
index with what Postgres says now: the document's current chunks are upserted and every
other point of that document is deleted; a document that no longer exists loses all its
points. Reconciling is idempotent, so replaying entries (after a crash, or by two
workers) is harmless; still, the workers of one region that share a Qdrant server (every
replica of the server, and ``mcp-rag sync --follow``) take turns through an advisory lock on
the read database, so two passes never interleave their reads and writes. An index only its
own process can open (``VectorIndex.exclusive``: the embedded engine) needs no such lock. The
cursor (last applied seq) lives with the index, which is the one thing a region can always write.

When a write is applied: a server process (``run_passes``, started with the sync worker) whose
index is its own (the embedded engine) answers the writer once Postgres has committed, and applies
the change log in a background pass right after; writes that arrive during a pass share the next
one, and a search in the process first waits until a pass has covered every write acknowledged
before it (``wait_applied``). With a shared Qdrant server, and in one-shot commands, the pass runs
before the write returns (``after_commit``).

Two guards do not rely on that lock:

* **Which history.** The cursor also records the *stamp* of the entry it names
  (``Store.log_stamp``). Every pass (and every lag check) first looks that entry up: when it
  is missing from a primary, or has another stamp, the database is not the history the
  index was built from (a failover that lost writes, a point-in-time restore, another
  database). The index is then *diverged*: search refuses it, readiness names it, and the
  follow worker rebuilds it from Postgres (``reindex``); one-shot passes raise
  ``IndexDivergedError`` naming ``mcp-rag reindex``.
* **Who else writes.** Each pass advances the cursor by compare-and-set from the value it
  started at. A conflict means another pass wrote to the index meanwhile (the lock did not
  exclude it: pods reading different databases, a transaction-mode pooler): it is logged
  and counted (``mcp_rag_sync_overlaps``), and the documents and collections of the batch
  are reconciled again from Postgres, after the other pass's writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence

import anyio

from . import metrics
from .errors import (
    CursorConflictError,
    EmbeddingUnavailableError,
    IndexDivergedError,
    IndexError_,
    IndexUnavailableError,
    RagError,
    UnavailableError,
)
from .index.base import Cursor, IndexPoint, PointPayload, SearchFilter, VectorIndex
from .logging import get_logger
from .store.postgres import Change, IndexableChunk, Store
from .types import ModelIdentity

log = get_logger(__name__)


def to_point(chunk: IndexableChunk) -> IndexPoint:
    return IndexPoint(
        id=chunk.chunk_id,
        dense=chunk.dense.tolist(),
        sparse=chunk.sparse,
        payload=PointPayload(
            tenant=chunk.tenant,
            collection=chunk.collection,
            document_id=chunk.document_id,
            source_uri=chunk.source_uri,
            metadata=chunk.metadata,
        ),
    )


class IndexSyncer:
    def __init__(self, store: Store, index: VectorIndex, batch_size: int = 256) -> None:
        self.store = store
        self.index = index
        self.batch_size = batch_size
        self._lock = anyio.Lock()
        self._pending_open: ModelIdentity | Callable[[], Awaitable[ModelIdentity]] | None = None
        self.open_error = ""
        self.diverged = ""
        """Why the index does not belong to the database's change-log history ("" when it does)."""
        self.rebuilding = False
        self._written = 0
        """Committed writes handed to the background passes (``after_commit``)."""
        self._applied = 0
        """How many of those a finished pass has covered."""
        self._wake = anyio.Event()
        self._passed = anyio.Event()
        self._background = False

    # --- applying committed writes off the request path ---

    async def after_commit(self) -> None:
        """Apply what was just committed to the index: in the background when ``run_passes`` runs
        and the index is this process's own (the writer answers at once; ``wait_applied`` keeps
        read-your-writes), else right here. A shared Qdrant server is written before the writer
        answers, so a search on another replica finds what this one acknowledged.

        The write is durable in Postgres with its change-log entry, so an index that does not
        answer fails nothing: the sync worker (or the next pass) applies it later."""
        if self._background and self.index.exclusive:
            self._written += 1
            self._wake.set()
        else:
            await self._logged_pass()

    async def run_passes(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Apply committed writes as they come, one pass at a time: a pass covers every write
        committed before it began, so writes that arrive during a pass share the next one."""
        self._background = True
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                target = self._written
                try:
                    await self._logged_pass()
                except Exception:  # a bug: the server keeps serving, the sync worker and the next pass retry
                    log.exception("index pass after a committed write failed")
                self._applied = target
                self._passed.set()
                self._passed = anyio.Event()
        finally:
            self._background = False
            self._passed.set()  # nobody waits for a pass that will not run

    async def finish_passes(self) -> None:
        """Apply the writes the background passes have not (at shutdown, after ``run_passes`` ended)."""
        if self._applied < self._written:
            try:
                await self._logged_pass()
            except Exception:  # a bug; the change log still holds the writes for the next start
                log.exception("index pass at shutdown failed")
            self._applied = self._written

    async def wait_applied(self, seconds: float | None = None) -> bool:
        """Wait until a pass has covered every write committed so far (at most ``seconds``);
        False when it timed out."""
        target = self._written
        with anyio.move_on_after(seconds):
            while self._applied < target and self._background:
                await self._passed.wait()
        return self._applied >= target or not self._background

    async def _logged_pass(self) -> None:
        try:
            await self.catch_up()
        except (IndexError_, UnavailableError) as exc:  # the index, or a read replica that does not answer
            log.warning(
                "index not updated after a committed write; it will catch up from the change log", error=str(exc)[:300]
            )

    # --- an index that could not be opened at start (a Qdrant server that does not answer) ---

    def defer_open(self, model: ModelIdentity | Callable[[], Awaitable[ModelIdentity]], error: str) -> None:
        """The index could not be opened yet: every catch_up (so the sync worker) tries again.

        ``model`` may be a coroutine function that finds the model identity first (an embedding
        provider that did not answer at start): it is called until it returns one."""
        self._pending_open = model
        self.open_error = error

    @property
    def index_open(self) -> bool:
        return self._pending_open is None

    def require_model(self) -> None:
        """Raise EmbeddingUnavailableError while the model identity is not yet known and accepted."""
        if callable(self._pending_open):
            raise EmbeddingUnavailableError(f"the embedding model is not loaded yet ({self.open_error}); retry shortly")

    def require_open(self) -> None:
        """Raise IndexUnavailableError while the index has not been opened, or cannot be trusted."""
        if self._pending_open is not None:
            raise IndexUnavailableError(f"not opened yet: {self.open_error}")
        if self.diverged:
            raise IndexUnavailableError(self.diverged)

    async def check_history(self, cursor: Cursor) -> None:
        """Raise IndexDivergedError unless ``cursor`` names an entry of the database's change log
        (UnavailableError while a replica has not replayed that entry yet)."""
        await self._check_stamp(cursor, await self.store.log_stamp(cursor.seq) if cursor.seq else "")

    async def _check_stamp(self, cursor: Cursor, stamp: str | None) -> None:
        """``check_history`` with the stamp the log has at the cursor's seq (None: no such entry)."""
        if cursor.seq == 0 or (stamp is not None and (stamp == cursor.origin or not cursor.origin)):
            # The same entry (an index from before stamps were kept adopts the one it finds), or an
            # empty index. A rebuild in progress stays diverged until it has finished.
            if not self.rebuilding:
                self.diverged = ""  # (also after a reindex by another process)
            return
        if stamp is None:
            last, in_recovery = await self.store.log_state()
            if in_recovery:
                raise UnavailableError(
                    f"the index has applied change-log entry {cursor.seq} but the read replica has entries only up "
                    f"to {last}: waiting for it to replay (if it never does, the index came from another "
                    "history: run `mcp-rag reindex`)"
                )
            found = f"the index cursor ({cursor.seq}) is ahead of the change log (last entry {last})"
        else:
            found = (
                f"change-log entry {cursor.seq} is not the one the index applied ({stamp}, index has {cursor.origin})"
            )
        self.diverged = (
            f"index diverged from the database: {found}; the database is not the history the index was built "
            "from (a failover that lost writes, a restore, or another database). The sync worker rebuilds it; "
            "without one, run `mcp-rag reindex`"
        )
        metrics.INDEX_LAG.set(0)
        raise IndexDivergedError(self.diverged)

    async def _ensure_open(self) -> None:
        # Called with self._lock held.
        model = self._pending_open
        if model is None:
            return
        if callable(model):
            try:
                model = await model()
            except RagError as exc:
                self.open_error = str(exc)
                raise
            self._pending_open = model
        try:
            await self.index.open(model)
        except IndexError_ as exc:
            self.open_error = str(exc)
            raise
        self._pending_open = None
        self.open_error = ""
        log.info("index opened; catching up from the change log")

    async def catch_up(self) -> int:
        """Apply every change not yet in the index; returns how many entries were applied."""
        applied = 0
        async with self._lock, self._region_lock():
            await self._ensure_open()
            start = await self.index.read_cursor()
            cursor = start.seq
            stamp, changes = await self.store.changes_from(cursor, self.batch_size)
            await self._check_stamp(start, stamp)
            while changes:
                await self._apply(changes)
                last = changes[-1]
                applied += len(changes)
                metrics.CHANGES_APPLIED.inc(len(changes))
                try:
                    await self.index.set_cursor(last.seq, last.stamp, expected=cursor)
                except CursorConflictError as exc:
                    cursor = await self._overlapped(changes, exc)
                else:
                    cursor = last.seq
                    if len(changes) < self.batch_size:
                        break  # the log's end when it was read: later entries are the next pass's
                changes = await self.store.changes_after(cursor, self.batch_size)
        if applied:
            log.debug("index caught up", applied=applied, cursor=cursor)
        metrics.INDEX_LAG.set(0)
        return applied

    def _region_lock(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The database lock that makes the region's passes take turns; none for an index only
        this process writes (its passes already take turns through ``self._lock``)."""
        return contextlib.nullcontext() if self.index.exclusive else self.store.sync_lock()

    async def _overlapped(self, changes: Sequence[Change], exc: CursorConflictError) -> int:
        """Another pass moved the cursor while this one applied ``changes``: its writes and ours
        may have interleaved. Reconcile what this batch touched again (reading Postgres now, after
        both passes' writes) and go on from the stored cursor."""
        metrics.SYNC_OVERLAPS.inc()
        log.warning(
            "two index sync passes overlapped: the sync lock did not exclude them (do the region's workers read "
            "different databases, or go through a transaction-mode pooler?); reconciling the batch again",
            error=str(exc),
        )
        await self._reconcile([c for c in changes if c.document_id is not None])
        for tenant, collection in sorted({(c.tenant, c.collection) for c in changes if c.op == "delete_collection"}):
            await self._reconcile_collection(tenant, collection)
        return (await self.index.read_cursor()).seq

    async def _reconcile_collection(self, tenant: str, collection: str) -> None:
        chunks = await self.store.collection_indexable_chunks(tenant, collection)
        if chunks:
            await self.index.upsert([to_point(c) for c in chunks])
        indexed = await self.index.point_ids(SearchFilter(tenant=tenant, collections=[collection]))
        stale = indexed - {c.chunk_id for c in chunks}
        if stale:
            await self.index.delete_points(sorted(stale))

    async def lag(self, tenant: str | None = None) -> int:
        """Change-log entries not yet applied to the index (``tenant``'s only, when given)."""
        self.require_open()
        cursor = await self.index.read_cursor()
        await self.check_history(cursor)
        pending = await self.store.pending_changes(cursor.seq, tenant)
        if tenant is None:
            metrics.INDEX_LAG.set(pending)
        return pending

    async def follow(self, interval: float, *, stop: anyio.Event | None = None) -> None:
        """Keep applying new entries until cancelled (or ``stop`` is set); errors are logged and retried."""
        failures = 0
        while stop is None or not stop.is_set():
            try:
                try:
                    await self.catch_up()
                except IndexDivergedError as exc:
                    log.error("rebuilding the index from Postgres", reason=str(exc))
                    metrics.INDEX_REBUILDS.inc()
                    written = await self.reindex(only_if_diverged=True)
                    log.info("index rebuilt after the change log's history changed", points=written)
                failures = 0
            except Exception as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("index sync failed; retrying", error=str(exc)[:300], failures=failures)
            with anyio.move_on_after(interval):
                if stop is not None:
                    await stop.wait()
                else:
                    await anyio.sleep(interval)

    async def reindex(self, *, only_if_diverged: bool = False) -> int:
        """Rebuild the index from Postgres alone; returns the number of points written.

        ``only_if_diverged``: first check again, under the sync lock, that the index still does
        not match the change log (another worker of the region may have rebuilt it meanwhile)."""
        async with self._lock, self._region_lock():
            await self._ensure_open()
            if only_if_diverged:
                try:
                    await self.check_history(await self.index.read_cursor())
                    return 0
                except IndexDivergedError:
                    pass
            self.rebuilding = True
            try:
                upto = await self.store.last_change_seq()
                stamp = await self.store.log_stamp(upto) if upto else ""
                await self.index.clear()  # resets the cursor durably first: an interrupted rebuild restarts from 0
                written = 0
                async for batch in self.store.iter_indexable_chunks(self.batch_size):
                    await self.index.upsert([to_point(c) for c in batch])
                    written += len(batch)
                await self.index.set_cursor(upto, stamp or "", expected=0)
                self.diverged = ""
            finally:
                self.rebuilding = False
        await self.catch_up()  # whatever was committed while we rebuilt
        return written

    async def _apply(self, changes: Sequence[Change]) -> None:
        # A document needs reconciling once, at its last appearance; collection deletes
        # keep their place in the order.
        last_seen: dict[str, int] = {}
        for i, change in enumerate(changes):
            if change.document_id is not None:
                last_seen[change.document_id] = i
        pending_docs: list[Change] = []
        for i, change in enumerate(changes):
            if change.op == "delete_collection":
                await self._reconcile(pending_docs)
                pending_docs = []
                await self.index.delete_collection(change.tenant, change.collection)
            elif change.document_id is not None and last_seen[change.document_id] == i:
                pending_docs.append(change)
        await self._reconcile(pending_docs)

    async def _reconcile(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        doc_ids = [c.document_id for c in changes if c.document_id is not None]
        chunks = await self.store.indexable_chunks(doc_ids)
        if chunks:
            await self.index.upsert([to_point(c) for c in chunks])
        by_tenant: dict[str, list[str]] = {}
        for change in changes:
            assert change.document_id is not None
            by_tenant.setdefault(change.tenant, []).append(change.document_id)
        keep = [c.chunk_id for c in chunks]
        for tenant, ids in by_tenant.items():
            await self.index.delete_documents(tenant, ids, keep_ids=keep)
