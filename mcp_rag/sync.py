"""Keeping the index derived from Postgres: apply the change log, or rebuild from scratch.

Each change names a document (or a whole collection). Applying it *reconciles* the
index with what Postgres says now: the document's current chunks are upserted and every
other point of that document is deleted; a document that no longer exists loses all its
points. Reconciling is idempotent, so replaying entries (after a crash, or by two
workers) is harmless; still, the workers of one region (every replica of the server, and
``mcp-rag sync --follow``) take turns through an advisory lock on the read database, so
two passes never interleave their reads and writes. The cursor (last applied seq) lives with the index, which is the
one thing a region can always write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio

from . import metrics
from .errors import EmbeddingUnavailableError, IndexError_, IndexUnavailableError, RagError
from .index.base import IndexPoint, PointPayload, VectorIndex
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
        """Raise IndexUnavailableError while the index has not been opened."""
        if self._pending_open is not None:
            raise IndexUnavailableError(f"not opened yet: {self.open_error}")

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
        async with self._lock, self.store.sync_lock():
            await self._ensure_open()
            cursor = await self.index.get_cursor()
            while True:
                changes = await self.store.changes_after(cursor, self.batch_size)
                if not changes:
                    break
                await self._apply(changes)
                cursor = changes[-1].seq
                await self.index.set_cursor(cursor)
                applied += len(changes)
                metrics.CHANGES_APPLIED.inc(len(changes))
        if applied:
            log.debug("index caught up", applied=applied, cursor=cursor)
        metrics.INDEX_LAG.set(0)
        return applied

    async def lag(self) -> int:
        """Change-log entries not yet applied to the index."""
        self.require_open()
        pending = await self.store.pending_changes(await self.index.get_cursor())
        metrics.INDEX_LAG.set(pending)
        return pending

    async def follow(self, interval: float, *, stop: anyio.Event | None = None) -> None:
        """Keep applying new entries until cancelled (or ``stop`` is set); errors are logged and retried."""
        failures = 0
        while stop is None or not stop.is_set():
            try:
                await self.catch_up()
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

    async def reindex(self) -> int:
        """Rebuild the index from Postgres alone; returns the number of points written."""
        async with self._lock, self.store.sync_lock():
            await self._ensure_open()
            upto = await self.store.last_change_seq()
            await self.index.clear()
            written = 0
            async for batch in self.store.iter_indexable_chunks(self.batch_size):
                await self.index.upsert([to_point(c) for c in batch])
                written += len(batch)
            await self.index.set_cursor(upto)
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
