"""Writers in conflict against a real PostgreSQL: deadlocks, a collection deleted under an ingest,
a cancelled sync pass, per-tenant pending changes, and the keyset listing's index.

The interleavings are made deterministic from the outside: the test holds row locks (or the
change-log lock) in its own transactions, waits until the writers queue behind them (seen in
``pg_stat_activity``), then releases them in the order that used to deadlock or fail.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import psycopg
import pytest

from mcp_rag.embedding import Embedder
from mcp_rag.errors import NotFoundError
from mcp_rag.runtime import Runtime
from mcp_rag.store import postgres
from mcp_rag.store.postgres import CHANGE_LOG_LOCK_KEY, SYNC_LOCK_KEY, Store
from tests.test_store import T, make_write


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    s = Store(database_url, min_size=1, max_size=6, timeout=10)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def waiting_on_locks(dsn: str) -> int:
    """Backends of this database waiting for a heavyweight lock (a row, a transaction, an advisory lock)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await anyio.sleep(0.02)


class Outcomes:
    """What each concurrent call returned or raised."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}

    def run(self, tg: anyio.abc.TaskGroup, name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        async def go() -> None:
            try:
                self.results[name] = await fn()
            except Exception as exc:
                self.errors[name] = exc

        tg.start_soon(go)


async def lock_rows(dsn: str, sql: str, params: tuple[Any, ...]) -> psycopg.AsyncConnection[Any]:
    """A connection with an open transaction holding the rows ``sql`` locks."""
    conn = await psycopg.AsyncConnection.connect(dsn)
    cur = await conn.execute(sql, params)
    assert await cur.fetchall(), "the rows to lock exist"
    return conn


# --- 4: deadlocks ---------------------------------------------------------------------------


async def test_batches_over_the_same_documents_in_opposite_orders_do_not_deadlock(
    store: Store, embedder: Embedder, database_url: str
) -> None:
    a, b = make_write(embedder, "file:///a.md", ["Alpha."]), make_write(embedder, "file:///b.md", ["Beta."])
    await store.write_documents([a, b])
    # Two transactions of the test hold A and B. Batch 1 (A, B) queues on A, batch 2 (B, A) on
    # B. Releasing A then B used to hand batch 1 A and batch 2 B, each then waiting for the other.
    hold_a = await lock_rows(database_url, "SELECT 1 FROM documents WHERE source_uri = %s FOR UPDATE", (a.source_uri,))
    hold_b = await lock_rows(database_url, "SELECT 1 FROM documents WHERE source_uri = %s FOR UPDATE", (b.source_uri,))
    out = Outcomes()
    async with anyio.create_task_group() as tg:
        out.run(tg, "ab", lambda: store.write_documents([a, b]))
        await wait_for(lambda: _waiting(database_url, 1), "batch 1 to wait")
        out.run(tg, "ba", lambda: store.write_documents([b, a]))
        await wait_for(lambda: _waiting(database_url, 2), "batch 2 to wait")
        await hold_a.rollback()
        await anyio.sleep(0.3)
        await hold_b.rollback()
    await hold_a.close()
    await hold_b.close()
    assert out.errors == {}
    assert [r.status for r in out.results["ab"]] == ["updated", "updated"]
    assert [r.status for r in out.results["ba"]] == ["updated", "updated"]
    # Results stay in the caller's order whatever order the rows were written in.
    ids = {d.source_uri: d.id for d in (await store.list_documents(T)).documents}
    assert [r.document_id for r in out.results["ba"]] == [ids[b.source_uri], ids[a.source_uri]]


async def _waiting(dsn: str, n: int) -> bool:
    return await waiting_on_locks(dsn) >= n


async def test_delete_collection_racing_an_ingest_neither_deadlocks_nor_misses_documents(
    store: Store, embedder: Embedder, database_url: str
) -> None:
    x = make_write(embedder, "file:///x.md", ["Existing document."])
    await store.write_documents([x])
    y = make_write(embedder, "file:///y.md", ["A new document."])
    # The test holds document X. The ingest (update X, add Y) queues on X; delete_collection
    # then queues too. Releasing X used to let the ingest update X and then wait on the
    # collection row for Y's foreign key, while the delete's cascade waited on X: a deadlock,
    # reported as "the database is unavailable".
    hold_x = await lock_rows(database_url, "SELECT 1 FROM documents WHERE source_uri = %s FOR UPDATE", (x.source_uri,))
    out = Outcomes()
    async with anyio.create_task_group() as tg:
        out.run(tg, "ingest", lambda: store.write_documents([x, y]))
        await wait_for(lambda: _waiting(database_url, 1), "the ingest to wait")
        out.run(tg, "delete", lambda: store.delete_collection(T, "docs"))
        await wait_for(lambda: _waiting(database_url, 2), "the delete to wait")
        await hold_x.rollback()
    await hold_x.close()
    assert out.errors == {}
    assert out.results["delete"] == 2  # X and Y: the ingest committed first, and the count says so
    assert (await store.list_documents(T)).documents == []
    assert await store.all_chunk_ids(T) == set()


# --- 5: a collection deleted under an ingest ----------------------------------------------------


async def test_ingest_into_a_collection_deleted_meanwhile_is_no_foreign_key_violation(
    store: Store, embedder: Embedder, database_url: str
) -> None:
    other = make_write(embedder, "file:///o.md", ["In another collection."], collection="other")
    await store.write_documents([other, make_write(embedder, "file:///old.md", ["Old."], collection="docs")])
    new = make_write(embedder, "file:///new.md", ["New in docs."], collection="docs")
    # The ingest writes into "other" and "docs"; the test holds the document in "other", so the
    # ingest stops there after checking that "docs" exists. A delete of "docs" used to run to its
    # commit meanwhile, and the ingest's insert into "docs" then failed with a raw
    # ForeignKeyViolation ("tool crashed").
    hold = await lock_rows(
        database_url, "SELECT 1 FROM documents WHERE source_uri = %s FOR UPDATE", (other.source_uri,)
    )
    out = Outcomes()
    async with anyio.create_task_group() as tg:
        out.run(tg, "ingest", lambda: store.write_documents([other, new]))
        await wait_for(lambda: _waiting(database_url, 1), "the ingest to wait")
        out.run(tg, "delete", lambda: store.delete_collection(T, "docs"))
        await anyio.sleep(0.5)  # the delete either finishes (the old behaviour) or waits for the ingest
        await hold.rollback()
    await hold.close()
    assert out.errors == {}, {k: f"{type(v).__name__}: {v}" for k, v in out.errors.items()}
    assert out.results["delete"] == 2  # "old" and the new one, committed before the delete
    assert [d.source_uri for d in (await store.list_documents(T)).documents] == [other.source_uri]


async def test_concurrent_ingests_and_collection_deletes_raise_only_domain_errors(
    store: Store, embedder: Embedder
) -> None:
    """Unscripted races: only NotFoundError (the collection was already gone) may come out."""
    writes = [make_write(embedder, f"file:///r{i}.md", [f"Race document {i}."]) for i in range(6)]
    errors: list[BaseException] = []
    for round_ in range(12):
        await store.write_documents(writes[:2])

        async def ingest(ws: list[Any]) -> None:
            try:
                await store.write_documents(ws)
            except Exception as exc:
                errors.append(exc)

        async def delete() -> None:
            try:
                await store.delete_collection(T, "docs")
            except NotFoundError:
                pass
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest, writes if round_ % 2 else list(reversed(writes)))
            tg.start_soon(delete)
            tg.start_soon(ingest, writes[3:] + writes[:3])
    assert errors == []


# --- 10: delete_collection's count ------------------------------------------------------------


async def test_delete_collection_counts_documents_committed_while_it_waited(
    store: Store, embedder: Embedder, database_url: str
) -> None:
    await store.write_documents([make_write(embedder, "file:///first.md", ["First."])])
    # The test holds the change-log lock: an ingest of five documents stops just before its
    # commit (rows written, change not yet logged). delete_collection starts meanwhile.
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as gate:
        await gate.execute("SELECT pg_advisory_lock(%s)", (CHANGE_LOG_LOCK_KEY,))
        out = Outcomes()
        async with anyio.create_task_group() as tg:
            five = [make_write(embedder, f"file:///n{i}.md", [f"Number {i}."]) for i in range(5)]
            out.run(tg, "ingest", lambda: store.write_documents(five))
            await wait_for(lambda: _waiting(database_url, 1), "the ingest to reach its commit")
            out.run(tg, "delete", lambda: store.delete_collection(T, "docs"))
            await wait_for(lambda: _waiting(database_url, 2), "the delete to wait for the ingest")
            await gate.execute("SELECT pg_advisory_unlock(%s)", (CHANGE_LOG_LOCK_KEY,))
    assert out.errors == {}
    assert len(out.results["ingest"]) == 5
    assert out.results["delete"] == 6  # the five went with the collection, and are counted
    assert (await store.list_documents(T)).documents == []


# --- 6: a cancelled sync pass ---------------------------------------------------------------------


@pytest.mark.parametrize("index_kind", ["qdrant-server"])  # the shared index: the one whose passes lock
async def test_sync_pass_cancelled_while_waiting_for_the_lock_stays_cancelled(
    runtime: Runtime, database_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as other:
        await other.execute("SELECT pg_advisory_lock(%s)", (SYNC_LOCK_KEY,))  # another pass holds it
        with anyio.move_on_after(0.5) as scope:
            await runtime.syncer.catch_up()  # waits for the lock...
        assert scope.cancelled_caught  # ...and is cancelled: no error raised instead
        await other.execute("SELECT pg_advisory_unlock(%s)", (SYNC_LOCK_KEY,))

        # And as a task cancelled from outside (what a server shutdown does).
        await other.execute("SELECT pg_advisory_lock(%s)", (SYNC_LOCK_KEY,))
        outcome: list[BaseException] = []

        async def pass_() -> None:
            try:
                await runtime.syncer.catch_up()
            except BaseException as exc:
                outcome.append(exc)
                raise

        async with anyio.create_task_group() as tg:
            tg.start_soon(pass_)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        assert len(outcome) == 1
        assert isinstance(outcome[0], anyio.get_cancelled_exc_class()), repr(outcome[0])
        await other.execute("SELECT pg_advisory_unlock(%s)", (SYNC_LOCK_KEY,))
    # The pool is left healthy, and no session kept the lock: the next pass runs at once.
    with anyio.fail_after(5):
        assert await runtime.syncer.catch_up() == 0


@pytest.mark.parametrize("index_kind", ["qdrant-edge"])
async def test_a_pass_over_an_index_only_its_process_opens_takes_no_database_lock(
    runtime: Runtime, database_url: str, embedder: Embedder
) -> None:
    # Another process's pass, over its own index, holds the region's lock: it is no reason to wait.
    assert runtime.index.exclusive
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as other:
        await other.execute("SELECT pg_advisory_lock(%s)", (SYNC_LOCK_KEY,))
        with anyio.fail_after(5):
            await runtime.service.ingest_text(T, "Herons wade in shallow water.", source_uri="note://heron")
            assert await runtime.syncer.lag() == 0
            assert [r.source_uri for r in await runtime.service.search(T, "heron", top_k=3)] == ["note://heron"]
        await other.execute("SELECT pg_advisory_unlock(%s)", (SYNC_LOCK_KEY,))


# --- 9: pending changes are the caller's own ----------------------------------------------------


async def test_stats_pending_changes_counts_only_the_callers_tenant(runtime: Runtime, embedder: Embedder) -> None:
    # Written to Postgres only (no catch-up): the index has applied none of these.
    await runtime.store.write_documents(
        [make_write(embedder, f"file:///{i}.md", [f"Doc {i}."], tenant="tenant-a") for i in range(3)]
    )
    await runtime.store.write_documents([make_write(embedder, "file:///b.md", ["B."], tenant="tenant-b")])
    _, _, pending_b = await runtime.service.stats("tenant-b")
    _, _, pending_a = await runtime.service.stats("tenant-a")
    _, _, pending_c = await runtime.service.stats("tenant-c")
    _, _, pending_all = await runtime.service.stats(None)  # the operator's view (CLI)
    assert (pending_a, pending_b, pending_c, pending_all) == (3, 1, 0, 4)  # one entry per document


# --- 7: the listing uses its index --------------------------------------------------------------


@pytest.mark.parametrize(
    ("collection", "prefix", "after", "index"),
    [
        (None, None, None, "documents_listing_idx"),
        (None, None, ("file:///corpus/05000.md", "00000000-0000-0000-0000-000000000000"), "documents_listing_idx"),
        ("docs", None, None, "documents_collection_listing_idx"),
        (None, "file:///corpus/07", None, "documents_listing_idx"),
    ],
)
async def test_list_documents_pages_by_an_index_range_scan(
    store: Store,
    database_url: str,
    collection: str | None,
    prefix: str | None,
    after: tuple[str, str] | None,
    index: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await _generate_documents(conn, 20_000)
        sql, params = postgres._list_documents_query(T, collection, prefix, 20, after)
        cur = await conn.execute(f"EXPLAIN (FORMAT JSON) {sql}".encode(), params)
        row = await cur.fetchone()
    assert row is not None
    nodes = list(_plan_nodes(row[0][0]["Plan"]))
    kinds = [n["Node Type"] for n in nodes]
    assert "Sort" not in kinds and "Seq Scan" not in kinds, json.dumps(row[0], indent=1)[:3000]
    assert index in [n.get("Index Name") for n in nodes], kinds


async def _generate_documents(conn: psycopg.AsyncConnection[Any], n: int) -> None:
    await conn.execute("INSERT INTO collections (tenant, name) VALUES (%s, 'docs'), (%s, 'other')", (T, T))
    await conn.execute(
        """INSERT INTO documents (id, tenant, collection, source_uri, content, content_hash, chunk_count)
           SELECT gen_random_uuid(), %s, CASE WHEN i %% 2 = 0 THEN 'docs' ELSE 'other' END,
                  'file:///corpus/' || lpad(i::text, 5, '0') || '.md', 'x', md5(i::text), 0
           FROM generate_series(1, %s) AS i""",
        (T, n),
    )
    await conn.execute("ANALYZE documents")


def _plan_nodes(plan: dict[str, Any]) -> Any:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)
