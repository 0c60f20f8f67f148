"""The index sync against a real PostgreSQL and both engines: overlapping passes that the sync
lock cannot exclude, and a bounded stress run of concurrent writers with a sync worker."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import psycopg
import pytest
from qdrant_client import QdrantClient

from mcp_rag import metrics
from mcp_rag import service as service_module
from mcp_rag.embedding import Embedder
from mcp_rag.errors import NotFoundError, RagError
from mcp_rag.extract import SourceDocument
from mcp_rag.index.base import (
    Cursor,
    Hit,
    IndexDivergedError,
    IndexPoint,
    IndexQuery,
    IndexUnavailableError,
    ModelIdentity,
    SearchFilter,
    VectorIndex,
)
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.index.qdrant_server import QdrantServerIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.service import SearchResult
from mcp_rag.settings import Settings
from mcp_rag.store.postgres import Store
from mcp_rag.sync import IndexSyncer
from tests.pgcluster import PgServer
from tests.test_multi_region import standby_of, wait_replayed
from tests.test_store import T, make_write


class GatedIndex(VectorIndex):
    """A real index with two pause points: before the first upsert of a pass, and before the
    cursor is stored. Each is an (arrived, release) pair of events; None means no pause."""

    def __init__(self, inner: VectorIndex) -> None:
        self.inner = inner
        self.upsert_gate: tuple[anyio.Event, anyio.Event] | None = None
        self.cursor_gate: tuple[anyio.Event, anyio.Event] | None = None

    @staticmethod
    async def _pass(gate: tuple[anyio.Event, anyio.Event] | None) -> None:
        if gate is not None:
            gate[0].set()
            await gate[1].wait()

    async def upsert(self, points: Sequence[IndexPoint]) -> None:
        gate, self.upsert_gate = self.upsert_gate, None
        await self._pass(gate)
        await self.inner.upsert(points)

    async def set_cursor(self, seq: int, origin: str = "", *, expected: int | None = None) -> None:
        gate, self.cursor_gate = self.cursor_gate, None
        await self._pass(gate)
        await self.inner.set_cursor(seq, origin, expected=expected)

    async def read_cursor(self) -> Cursor:
        return await self.inner.read_cursor()

    async def open(self, model: ModelIdentity) -> None:
        await self.inner.open(model)

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self.inner.ping()

    async def delete_points(self, ids: Sequence[int]) -> None:
        await self.inner.delete_points(ids)

    async def delete_documents(self, tenant: str, document_ids: Sequence[str], keep_ids: Sequence[int] = ()) -> None:
        await self.inner.delete_documents(tenant, document_ids, keep_ids)

    async def delete_collection(self, tenant: str, collection: str) -> None:
        await self.inner.delete_collection(tenant, collection)

    async def query(self, query: IndexQuery) -> list[Hit]:
        return await self.inner.query(query)

    async def count(self, filter: SearchFilter | None = None) -> int:
        return await self.inner.count(filter)

    async def point_ids(self, filter: SearchFilter | None = None) -> set[int]:
        return await self.inner.point_ids(filter)

    async def clear(self) -> None:
        await self.inner.clear()


def gate() -> tuple[anyio.Event, anyio.Event]:
    return anyio.Event(), anyio.Event()


def overlaps_counted() -> float:
    counter = getattr(metrics, "SYNC_OVERLAPS", None)
    return float(counter._value.get()) if counter is not None else -1.0


# --- 8: passes the sync lock does not exclude ---------------------------------------------------


@pytest.mark.slow  # makes two streaming replicas
async def test_overlapping_passes_from_different_read_databases_keep_the_current_points(
    runtime: Runtime, embedder: Embedder, pg_server: PgServer, database_url: str
) -> None:
    """Two workers of one region read different databases (a replica and the primary), so their
    advisory locks do not meet. Pass A reads version 2 of a document from its replica, which then
    stops replaying; pass B reads version 3 from the primary and writes it; A then writes version 2
    over it, stores its cursor and finds nothing more on its replica; B stores a later cursor.
    Before the fix the index ended with B's cursor over version 2's points: version 3 was lost for
    good. Now B's compare-and-set fails, B says so and reconciles its batch again."""
    store, index = runtime.store, runtime.index
    replica = standby_of(pg_server)
    replica_dsn = replica.dsn(database_url.rsplit("/", 1)[1])
    replica_store = Store(database_url, replica_dsn)
    await replica_store.open()
    try:
        [v1] = await store.write_documents([make_write(embedder, "file:///d.md", ["Version one."])])
        await runtime.syncer.catch_up()
        await store.write_documents([make_write(embedder, "file:///d.md", ["Version two.", "Two, again."])])
        await wait_replayed(database_url, replica_dsn)
        async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
            await conn.execute("SELECT pg_wal_replay_pause()")

        gated_a, gated_b = GatedIndex(index), GatedIndex(index)
        pass_a, pass_b = IndexSyncer(replica_store, gated_a), IndexSyncer(store, gated_b)
        gated_a.upsert_gate = a_at_upsert = gate()
        gated_b.cursor_gate = b_at_cursor = gate()
        a_done = anyio.Event()

        async def run_a() -> None:
            await pass_a.catch_up()
            a_done.set()

        overlaps = overlaps_counted()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_a)
            await a_at_upsert[0].wait()  # A holds version 2's chunks
            await store.write_documents([make_write(embedder, "file:///d.md", ["Version three."])])
            tg.start_soon(pass_b.catch_up)
            await b_at_cursor[0].wait()  # B wrote version 3's points
            a_at_upsert[1].set()  # A writes version 2 and stores its cursor
            await a_done.wait()
            b_at_cursor[1].set()
        assert await index.point_ids() == await store.all_chunk_ids()
        doc_points = await index.point_ids(SearchFilter(tenant=T, document_ids=[v1.document_id]))
        assert len(doc_points) == 1  # version three has one chunk
        assert await index.get_cursor() == await store.last_change_seq()
        assert overlaps_counted() == overlaps + 1
    finally:
        await replica_store.close()
        replica.destroy()


# --- the bounded stress run ---------------------------------------------------------------------


WRITERS = 4
OPERATIONS = 14
COLLECTIONS = ("alpha", "beta")


@pytest.mark.slow  # eight writers and a sync worker racing
async def test_concurrent_writers_and_a_sync_worker_end_with_index_equal_to_postgres(
    runtime: Runtime, database_url: str
) -> None:
    """Several writers doing random ingests (new and changed documents), shrinks (fewer chunks),
    document deletes and collection deletes through the service, a sync worker following the log,
    both engines: afterwards the index equals Postgres, and every error was a domain error."""
    service, tenant = runtime.service, "stress"
    rng = random.Random(18)
    errors: list[BaseException] = []
    sentences = [
        "Tidal pools hold anemones and small crabs.",
        "Glaciers carve valleys over thousands of years.",
        "Bakers proof dough overnight in a cool room.",
        "Cartographers draw contour lines for elevation.",
    ]

    def document(i: int, parts: int) -> SourceDocument:
        text = "\n\n".join(f"{sentences[(i + p) % len(sentences)]} Part {p} of item {i}." for p in range(parts))
        return SourceDocument(f"stress://doc/{i}", text, title=f"Item {i}")

    async def writer(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(OPERATIONS):
            op = local.choices(["ingest", "shrink", "delete", "delete_collection"], [6, 3, 2, 1])[0]
            collection = local.choice(COLLECTIONS)
            try:
                if op in ("ingest", "shrink"):
                    ids = local.sample(range(10), 3)
                    parts = 1 if op == "shrink" else local.randint(2, 6)
                    await service.ingest(tenant, collection, [document(i, parts) for i in ids])
                elif op == "delete":
                    page = await service.list_documents(tenant, collection=collection, limit=5)
                    if page.documents:
                        await service.delete_document(tenant, local.choice(page.documents).id)
                else:
                    await service.delete_collection(tenant, collection)
            except NotFoundError:
                pass  # deleted by another writer meanwhile: the domain's answer
            except RagError as exc:
                if "database is unavailable" in str(exc):
                    errors.append(exc)  # a conflict shown as an outage
            except Exception as exc:  # an untranslated error (a raw psycopg class, ...)
                errors.append(exc)

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: runtime.syncer.follow(0.05, stop=stop))
        async with anyio.create_task_group() as writers:
            for w in range(WRITERS):
                writers.start_soon(writer, rng.randrange(1 << 30) + w)
        stop.set()
    assert errors == [], [f"{type(e).__name__}: {e}" for e in errors]
    await runtime.syncer.catch_up()
    assert await runtime.index.point_ids() == await runtime.store.all_chunk_ids()
    assert await runtime.index.get_cursor() == await runtime.store.last_change_seq()
    for collection in COLLECTIONS:  # payloads agree too: per collection, the same chunks
        indexed = await runtime.index.point_ids(SearchFilter(tenant=tenant, collections=[collection]))
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute(
                "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id"
                " WHERE d.tenant = %s AND d.collection = %s",
                (tenant, collection),
            )
            stored = {row[0] for row in await cur.fetchall()}
        assert indexed == stored


# --- the syncer's ordinary behaviour --------------------------------------------------------------


async def doc_point_ids(index: VectorIndex, document_id: str) -> set[int]:
    return await index.point_ids(SearchFilter(tenant=T, document_ids=[document_id]))


async def test_one_batch_applies_changes_in_log_order(runtime: Runtime, embedder: Embedder) -> None:
    """Within one batch a document is reconciled once, at its last appearance, and a collection
    delete keeps its place: documents written into the collection after it survive."""
    store, index = runtime.store, runtime.index
    [gone] = await store.write_documents([make_write(embedder, "file:///gone.md", ["Soon deleted."])])
    [old] = await store.write_documents([make_write(embedder, "file:///old.md", ["Before the delete."])])
    await store.delete_document(T, gone.document_id)
    await store.delete_collection(T, "docs")
    [new] = await store.write_documents([make_write(embedder, "file:///new.md", ["After the delete."])])
    syncer = IndexSyncer(store, index, batch_size=100)
    assert await syncer.catch_up() == 5
    assert await doc_point_ids(index, gone.document_id) == set()
    assert await doc_point_ids(index, old.document_id) == set()
    assert len(await doc_point_ids(index, new.document_id)) == 1
    assert await index.point_ids() == await store.all_chunk_ids()


async def test_small_batches_advance_the_cursor_batch_by_batch(runtime: Runtime, embedder: Embedder) -> None:
    store, index = runtime.store, runtime.index
    for i in range(5):
        await store.write_documents([make_write(embedder, f"file:///{i}.md", [f"Document {i}."])])
    seqs = []

    class Recording(GatedIndex):
        async def set_cursor(self, seq: int, origin: str = "", *, expected: int | None = None) -> None:
            seqs.append(seq)
            await super().set_cursor(seq, origin, expected=expected)

    syncer = IndexSyncer(store, Recording(index), batch_size=2)
    assert await syncer.catch_up() == 5
    assert seqs == [2, 4, 5]
    assert await index.point_ids() == await store.all_chunk_ids()


async def test_a_shrunk_document_keeps_only_its_current_chunks(runtime: Runtime, embedder: Embedder) -> None:
    store, index = runtime.store, runtime.index
    [doc] = await store.write_documents([make_write(embedder, "file:///s.md", ["One.", "Two.", "Three.", "Four."])])
    await runtime.syncer.catch_up()
    assert len(await doc_point_ids(index, doc.document_id)) == 4
    await store.write_documents([make_write(embedder, "file:///s.md", ["Only one now."])])
    await runtime.syncer.catch_up()
    assert await doc_point_ids(index, doc.document_id) == await store.all_chunk_ids(T)
    assert len(await doc_point_ids(index, doc.document_id)) == 1


async def test_the_cursor_records_the_entry_it_names(runtime: Runtime, embedder: Embedder) -> None:
    store, index = runtime.store, runtime.index
    await store.write_documents([make_write(embedder, "file:///c.md", ["Cursor."])])
    await runtime.syncer.catch_up()
    cursor = await index.read_cursor()
    assert cursor.seq == await store.last_change_seq()
    assert cursor.origin == await store.log_stamp(cursor.seq)
    assert await runtime.syncer.catch_up() == 0  # nothing new: the same cursor, accepted
    assert await runtime.readiness() == []


async def test_follow_applies_new_writes_and_stops_when_asked(runtime: Runtime, embedder: Embedder) -> None:
    store, index = runtime.store, runtime.index
    stop = anyio.Event()
    with anyio.fail_after(30):  # the task group's exit waits for follow: it must return once stop is set
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: runtime.syncer.follow(0.05, stop=stop))
            await store.write_documents([make_write(embedder, "file:///f.md", ["Followed."])])
            while await index.get_cursor() < await store.last_change_seq():
                await anyio.sleep(0.02)
            stop.set()
    assert await index.point_ids() == await store.all_chunk_ids()


async def test_an_index_of_another_history_is_refused_then_rebuilt_once(runtime: Runtime, embedder: Embedder) -> None:
    """A cursor naming an entry of another history (what a restore, or an index pointed at another
    database, looks like): readiness and search refuse it; of two workers, one rebuilds it and the
    other, finding it rebuilt under the lock, does not rebuild it again."""
    store, index = runtime.store, runtime.index
    await store.write_documents([make_write(embedder, "file:///h.md", ["History."])])
    await runtime.syncer.catch_up()
    seq = await index.get_cursor()
    await index.set_cursor(seq, f"{seq}@1")  # same seq, another entry
    with pytest.raises(IndexDivergedError, match=rf"change-log entry {seq} is not the one the index applied"):
        await runtime.syncer.catch_up()
    [reason] = await runtime.readiness()
    assert reason.startswith("index: index diverged from the database") and "mcp-rag reindex" in reason
    with pytest.raises(IndexUnavailableError, match="diverged"):
        await runtime.service.search(T, "history")
    other_worker = IndexSyncer(store, index)
    assert await other_worker.reindex(only_if_diverged=True) == 1
    assert await runtime.syncer.reindex(only_if_diverged=True) == 0  # already rebuilt: nothing to do
    assert await runtime.readiness() == []
    assert await index.read_cursor() == Cursor(seq, await store.log_stamp(seq) or "")
    assert await index.point_ids() == await store.all_chunk_ids()


# --- committed writes applied after the writer has answered -------------------------------------

BASALT = "Columnar basalt forms hexagonal prisms as a thick lava flow cools and contracts."


def serving(
    make_settings: Callable[..., Settings], embedder: Embedder, index: VectorIndex
) -> contextlib.AbstractAsyncContextManager[Runtime]:
    """A server's runtime (the sync worker and its background passes); the worker's own periodic
    pass is kept out of the way."""
    return open_runtime(make_settings(sync_interval_seconds=3600), index=index, embedder=embedder, follow_changes=True)


def own_index(tmp_path: Path) -> GatedIndex:
    """The embedded engine behind a gate: an index only this process writes, like the default."""
    index = GatedIndex(EdgeIndex(tmp_path / "index"))
    index.exclusive = True
    return index


async def test_a_server_answers_a_write_before_its_own_index_applies_it_and_a_search_waits_for_it(
    make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path
) -> None:
    index = own_index(tmp_path)
    with anyio.fail_after(60):
        async with serving(make_settings, embedder, index) as runtime:
            arrived, release = index.upsert_gate = gate()
            added = await runtime.service.ingest_text(T, BASALT, title="Basalt")
            await arrived.wait()  # the ingest has answered; its pass is about to write the point
            assert await index.inner.count() == 0

            found: list[SearchResult] = []

            async def search() -> None:
                found.extend(await runtime.service.search(T, "hexagonal basalt prisms"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(search)
                await anyio.sleep(0.3)  # the search is waiting for the pass, not reading the empty index
                assert not found
                release.set()
            assert [r.document_id for r in found] == [added.document_id]
            assert await index.inner.count() == added.chunks


async def test_a_search_waits_for_the_index_only_so_long(
    make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index that does not apply a write delays searches by a bounded time; they then read it as it is."""
    monkeypatch.setattr(service_module, "INDEX_WAIT_SECONDS", 0.2)
    index = own_index(tmp_path)
    with anyio.fail_after(60):
        async with serving(make_settings, embedder, index) as runtime:
            arrived, release = index.upsert_gate = gate()
            added = await runtime.service.ingest_text(T, BASALT, title="Basalt")
            await arrived.wait()
            assert await runtime.service.search(T, "hexagonal basalt prisms") == []
            release.set()
            found = await runtime.service.search(T, "hexagonal basalt prisms")
            assert [r.document_id for r in found] == [added.document_id]


async def test_writes_committed_during_a_pass_share_the_next_one(
    make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path
) -> None:
    index = own_index(tmp_path)
    with anyio.fail_after(60):
        async with serving(make_settings, embedder, index) as runtime:
            arrived, release = index.cursor_gate = gate()
            await runtime.service.ingest_text(T, BASALT, title="Basalt")
            first = await runtime.store.last_change_seq()
            await arrived.wait()  # the first pass holds; three more writes arrive meanwhile
            for i in range(3):
                await runtime.service.ingest_text(T, f"Pillow lava number {i} forms under water.", title=f"Pillow {i}")
            cursors: list[int] = []
            real_set_cursor = index.inner.set_cursor

            async def recording(seq: int, origin: str = "", *, expected: int | None = None) -> None:
                cursors.append(seq)
                await real_set_cursor(seq, origin, expected=expected)

            index.inner.set_cursor = recording  # type: ignore[method-assign]
            release.set()
            assert len(await runtime.service.search(T, "pillow lava under water")) == 4  # every write
            assert cursors == [first, first + 3]  # the held pass, then one pass for the three writes
            assert (await runtime.service.stats(T))[1:] == (4, 0)


async def test_a_shared_qdrant_server_is_written_before_the_write_returns(
    make_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    """Another replica's search must find what this one acknowledged."""
    index = QdrantServerIndex(QdrantClient(":memory:"))
    with anyio.fail_after(60):
        async with serving(make_settings, embedder, index) as runtime:
            added = await runtime.service.ingest_text(T, BASALT, title="Basalt")
            assert await index.count() == added.chunks


async def test_writes_not_yet_applied_at_shutdown_reach_the_index(
    make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path
) -> None:
    index = own_index(tmp_path)
    with anyio.fail_after(60):
        async with serving(make_settings, embedder, index) as runtime:
            arrived, _never = index.upsert_gate = gate()
            added = await runtime.service.ingest_text(T, BASALT, title="Basalt")
            await arrived.wait()  # the pass is stuck; the process stops
            last = await runtime.store.last_change_seq()
    reopened = EdgeIndex(tmp_path / "index")
    await reopened.open(embedder.identity)
    try:
        assert (await reopened.read_cursor()).seq == last
        assert await reopened.count() == added.chunks
    finally:
        await reopened.close()
