"""Multi-region integration tests: real PostgreSQL streaming replication on 127.0.0.1.

The topology in small: a primary (US-EAST) and a hot standby made with ``pg_basebackup -R -X
stream`` (EU-WEST). Region A writes and reads the primary and keeps an embedded index;
region B writes to the primary, reads its local replica and keeps a Qdrant (local-mode)
index that it syncs from the replicated change log. Embeddings are the real offline model.

The tests share one primary/replica pair and one database; each works in its own collection
and asserts only about its own documents (or about whole-index equalities that hold after a
catch-up). The destructive failover test runs on servers of its own. Every wait is a poll
with a deadline; nothing asserts on wall-clock durations. Durations are collected as
observations and printed at the end of the module (run with ``-s`` to see them).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import psycopg
import pytest
from qdrant_client import QdrantClient

from mcp_rag import metrics
from mcp_rag.embedding import Embedder
from mcp_rag.errors import NotFoundError, UnavailableError
from mcp_rag.extract import SourceDocument
from mcp_rag.http import create_app
from mcp_rag.index.base import IndexUnavailableError, SearchFilter, VectorIndex
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.index.qdrant_server import QdrantServerIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.service import RagService, SearchFilters
from mcp_rag.settings import Settings
from mcp_rag.store.migrate import migrate
from mcp_rag.store.postgres import Store
from mcp_rag.sync import IndexSyncer
from tests.pgcluster import PgServer
from tests.test_store import make_write

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TENANT = "default"
DATABASE = "mcp_rag"
DEADLINE = 60.0
"""Upper bound for any wait (replication, catch-up, recovery); the waits end as soon as the condition holds."""

T = TypeVar("T")

OBSERVATIONS: list[tuple[str, float]] = []


def observe(what: str, seconds: float) -> None:
    OBSERVATIONS.append((what, seconds))


@pytest.fixture(scope="module", autouse=True)
def _print_observations() -> Iterator[None]:
    yield
    if OBSERVATIONS:
        print("\n--- multi-region observations (seconds) ---")
        for what, seconds in OBSERVATIONS:
            print(f"{what:<60} {seconds:8.4f}")


# --- helpers ------------------------------------------------------------------------------


async def query_one(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
    return None if row is None else row[0]


async def poll(
    condition: Callable[[], Awaitable[T]], what: str, *, timeout: float = DEADLINE, interval: float = 0.02
) -> tuple[T, float]:
    """Call ``condition`` until it returns something truthy; returns it and the seconds waited."""
    start = time.monotonic()
    while True:
        value = await condition()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        await anyio.sleep(interval)


async def wait_replayed(primary_dsn: str, replica_dsn: str) -> float:
    """Wait until the replica has replayed all WAL the primary has produced so far; returns seconds waited.

    The insert position, not pg_current_wal_lsn() (the *write* position): the test servers run
    with synchronous_commit = off, so a commit can be acknowledged before its WAL is written.
    """
    lsn = await query_one(primary_dsn, "SELECT pg_current_wal_insert_lsn()::text")

    async def replayed() -> bool:
        return bool(await query_one(replica_dsn, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)))

    _, waited = await poll(replayed, f"the replica to replay up to {lsn}")
    observe("replica replayed the primary's WAL", waited)
    return waited


def standby_of(primary: PgServer) -> PgServer:
    """A hot standby of ``primary``. pg_basebackup starts with a *spread* checkpoint, which paces
    the writing of every dirty buffer (CREATE DATABASE leaves plenty) over minutes; an
    immediate CHECKPOINT first leaves it nothing to write."""
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    return primary.standby()


def region_settings(
    tmp: Path,
    model_dir: Path,
    *,
    region: str,
    database_url: str,
    database_read_url: str | None = None,
    **overrides: Any,
) -> Settings:
    values: dict[str, Any] = {
        "region": region,
        "data_dir": tmp,
        "database_url": database_url,
        "database_read_url": database_read_url,
        "embedding_model_dir": model_dir,
        "sync_in_server": False,
        "db_timeout": 2.0,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


def qdrant_memory_index() -> QdrantServerIndex:
    return QdrantServerIndex(QdrantClient(":memory:"))


async def doc_ids_found(runtime: Runtime, query: str, collection: str, top_k: int = 10) -> list[str]:
    results = await runtime.service.search(TENANT, query, top_k=top_k, filters=SearchFilters(collection=collection))
    return [r.document_id for r in results]


async def ingest(runtime: Runtime, collection: str, docs: list[tuple[str, str, str]]) -> dict[str, str]:
    """Ingest (source_uri, title, text) documents; returns source_uri -> document id."""
    report = await runtime.service.ingest(
        TENANT,
        collection,
        [SourceDocument(uri, text, title=title) for uri, title, text in docs],
        raise_on_failure=True,
    )
    return {d.source_uri: d.document_id for d in report.documents if d.document_id is not None}


async def doc_points(index: VectorIndex, document_id: str) -> set[int]:
    return await index.point_ids(SearchFilter(tenant=TENANT, document_ids=[document_id]))


# --- fixtures -----------------------------------------------------------------------------


class Cluster:
    def __init__(self, primary: PgServer, replica: PgServer) -> None:
        self.primary = primary
        self.replica = replica
        self.primary_dsn = primary.dsn(DATABASE)
        self.replica_dsn = replica.dsn(DATABASE)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    primary = PgServer().init(replication=True).start()
    replica: PgServer | None = None
    try:
        anyio.run(migrate, primary.create_database(DATABASE))
        started = time.monotonic()
        replica = standby_of(primary)
        observe("hot standby from pg_basebackup up", time.monotonic() - started)
        yield Cluster(primary, replica)
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()


@pytest.fixture(scope="module")
async def region_a(
    cluster: Cluster, embedder: Embedder, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Runtime]:
    """US-EAST: reads and writes the primary; embedded index."""
    tmp = tmp_path_factory.mktemp("region-a")
    settings = region_settings(tmp, model_dir, region="us-east", database_url=cluster.primary_dsn)
    async with open_runtime(
        settings, index=EdgeIndex(tmp / "index"), embedder=embedder, follow_changes=False
    ) as runtime:
        yield runtime


@pytest.fixture(scope="module")
async def region_b(
    cluster: Cluster, embedder: Embedder, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Runtime]:
    """EU-WEST: writes to the primary, reads its local replica; Qdrant index synced from the replica."""
    tmp = tmp_path_factory.mktemp("region-b")
    settings = region_settings(
        tmp, model_dir, region="eu-west", database_url=cluster.primary_dsn, database_read_url=cluster.replica_dsn
    )
    async with open_runtime(settings, index=qdrant_memory_index(), embedder=embedder, follow_changes=False) as runtime:
        yield runtime


async def sync_b(cluster: Cluster, region_b: Runtime) -> int:
    """What region B's sync worker does after a write on the primary: wait for the replica, catch up."""
    await wait_replayed(cluster.primary_dsn, cluster.replica_dsn)
    started = time.monotonic()
    applied = await region_b.syncer.catch_up()
    observe(f"region B catch-up ({applied} change-log entries)", time.monotonic() - started)
    return applied


# --- region behaviour ---------------------------------------------------------------------


async def test_write_in_region_b_goes_to_the_primary_and_sync_makes_it_searchable(
    cluster: Cluster, region_b: Runtime
) -> None:
    assert region_b.store.write_dsn == cluster.primary_dsn
    assert region_b.store.read_dsn == cluster.replica_dsn
    collection = "mr-write-path"

    outcome = await region_b.service.ingest_text(
        TENANT,
        "Lighthouse keepers trimmed the lamp wicks every evening and logged passing ships.",
        collection=collection,
        title="Lighthouse keeping",
        source_uri="mr://write-path/lighthouse",
    )
    assert outcome.status == "added"
    assert outcome.document_id is not None

    # Acknowledged means committed on the primary (queried directly, not through the store).
    on_primary = await query_one(
        cluster.primary_dsn, "SELECT source_uri FROM documents WHERE id = %s", (outcome.document_id,)
    )
    assert on_primary == "mr://write-path/lighthouse"
    seq_on_primary = await query_one(
        cluster.primary_dsn, "SELECT max(seq) FROM change_log WHERE document_id = %s", (outcome.document_id,)
    )

    await sync_b(cluster, region_b)
    assert await region_b.index.get_cursor() >= seq_on_primary
    found = await doc_ids_found(region_b, "who looked after the lamp in the lighthouse?", collection)
    assert found[:1] == [outcome.document_id]
    document = await region_b.service.get_document(TENANT, outcome.document_id)
    assert document.source_uri == "mr://write-path/lighthouse"

    # Region B reads a replica that is streaming and caught up; its index has applied everything.
    index_lag, replication = await region_b.refresh_lag_metrics()
    assert index_lag == 0
    assert replication.is_replica is True
    assert replication.streaming is True
    assert replication.lag_seconds == 0.0
    assert await region_b.readiness() == []


async def test_update_and_delete_propagate_to_region_b(cluster: Cluster, region_a: Runtime, region_b: Runtime) -> None:
    collection = "mr-update-delete"
    uri = "mr://update-delete/observatory"
    ids = await ingest(
        region_a,
        collection,
        [
            (uri, "Observatory notes", "The observatory counted migrating cranes crossing the valley at dawn."),
            ("mr://update-delete/bakery", "Bakery", "The bakery proofs sourdough overnight in a cool cellar."),
        ],
    )
    doc_id, other_id = ids[uri], ids["mr://update-delete/bakery"]
    await sync_b(cluster, region_b)
    assert (await doc_ids_found(region_b, "cranes migrating over the valley", collection))[:1] == [doc_id]
    old_points = await doc_points(region_b.index, doc_id)
    assert old_points

    # Update on the primary: same document, new text.
    await ingest(
        region_a,
        collection,
        [
            (uri, "Observatory notes", "The observatory drilled glacier ice cores to date ancient volcanic eruptions."),
        ],
    )
    await wait_replayed(cluster.primary_dsn, cluster.replica_dsn)
    # Window: the replica has the new version, region B's index still only the old chunks. They
    # hydrate to nothing, so the document is absent - neither old text nor a mix is shown.
    window = await region_b.service.search(
        TENANT,
        "cranes migrating over the valley",
        top_k=10,
        filters=SearchFilters(collection=collection, document_ids=[doc_id]),
    )
    assert window == []
    assert await region_b.syncer.lag() >= 1

    await region_b.syncer.catch_up()
    new_points = await doc_points(region_b.index, doc_id)
    assert new_points
    assert not new_points & old_points
    assert new_points == {c.chunk_id for c in await region_b.store.document_chunks(TENANT, doc_id)}
    found = await region_b.service.search(
        TENANT, "ice cores from a glacier", top_k=5, filters=SearchFilters(collection=collection)
    )
    assert found[0].document_id == doc_id
    assert "glacier" in found[0].text
    stale = await region_b.service.search(
        TENANT, "cranes migrating over the valley", top_k=10, filters=SearchFilters(collection=collection)
    )
    assert all("cranes" not in r.text for r in stale)

    # Delete on the primary.
    await region_a.service.delete_document(TENANT, doc_id)
    await sync_b(cluster, region_b)
    assert await doc_points(region_b.index, doc_id) == set()
    assert doc_id not in await doc_ids_found(region_b, "ice cores from a glacier", collection)
    assert doc_id not in await doc_ids_found(region_b, "cranes migrating over the valley", collection)
    with pytest.raises(NotFoundError):
        await region_b.service.get_document(TENANT, doc_id)
    assert (await doc_ids_found(region_b, "sourdough bread", collection))[:1] == [other_id]


async def test_region_b_search_never_returns_a_document_its_replica_no_longer_has(
    cluster: Cluster, region_a: Runtime, region_b: Runtime
) -> None:
    collection = "mr-hydration"
    ids = await ingest(
        region_a,
        collection,
        [
            ("mr://hydration/falconry", "Falconry", "Falconers train hawks to return to the glove with a lure."),
            ("mr://hydration/beekeeping", "Beekeeping", "Beekeepers calm the hive with smoke before lifting frames."),
        ],
    )
    doomed, kept = ids["mr://hydration/falconry"], ids["mr://hydration/beekeeping"]
    await sync_b(cluster, region_b)
    assert (await doc_ids_found(region_b, "training hawks with a lure", collection))[:1] == [doomed]

    await region_a.service.delete_document(TENANT, doomed)
    await wait_replayed(cluster.primary_dsn, cluster.replica_dsn)
    # The delete reached the replica but not region B's index: its points are still there...
    assert await doc_points(region_b.index, doomed)
    assert await region_b.syncer.lag() >= 1
    # ...yet no search in region B points at it (hydration drops ids its Postgres does not know).
    for query in ("training hawks with a lure", "falconry", "bees and smoke"):
        found = await doc_ids_found(region_b, query, collection)
        assert doomed not in found
    assert (await doc_ids_found(region_b, "bees and smoke", collection))[:1] == [kept]

    await region_b.syncer.catch_up()
    assert await doc_points(region_b.index, doomed) == set()
    assert await region_b.syncer.lag() == 0


async def test_index_lag_beyond_the_bound_is_a_readiness_reason(
    cluster: Cluster, region_a: Runtime, embedder: Embedder, model_dir: Path, tmp_path: Path
) -> None:
    settings = region_settings(
        tmp_path,
        model_dir,
        region="eu-west",
        database_url=cluster.primary_dsn,
        database_read_url=cluster.replica_dsn,
        max_index_lag_entries=2,
    )
    async with open_runtime(settings, index=qdrant_memory_index(), embedder=embedder, follow_changes=False) as runtime:
        assert await runtime.readiness() == []  # caught up at start
        await ingest(
            region_a,
            "mr-index-lag",
            [
                (f"mr://index-lag/{i}", f"Note {i}", f"Field note number {i} about tide pools and sea anemones.")
                for i in range(4)
            ],
        )
        await wait_replayed(cluster.primary_dsn, cluster.replica_dsn)
        reasons = await runtime.readiness()
        assert any(r.startswith("index lag: 4 change-log entries") for r in reasons), reasons
        assert metrics.REGISTRY.get_sample_value("mcp_rag_index_lag_entries") == 4

        assert await runtime.syncer.catch_up() == 4
        assert await runtime.readiness() == []
        assert metrics.REGISTRY.get_sample_value("mcp_rag_index_lag_entries") == 0


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the /metrics output")


async def test_metrics_and_ready_endpoints_measure_both_lags_on_request(
    cluster: Cluster, region_a: Runtime, region_b: Runtime
) -> None:
    await sync_b(cluster, region_b)
    app = create_app(region_b.settings, runtime=region_b)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        # Stale values from elsewhere must not survive a scrape.
        metrics.INDEX_LAG.set(12345)
        metrics.REPLICATION_LAG.set(999)
        text = (await client.get("/metrics")).text
        assert _gauge(text, "mcp_rag_index_lag_entries") == 0
        assert _gauge(text, "mcp_rag_replication_lag_seconds") == 0

        await ingest(
            region_a,
            "mr-metrics",
            [
                ("mr://metrics/1", "Kites", "Kite makers glue tissue paper over bamboo frames."),
                ("mr://metrics/2", "Kilns", "Potters fire stoneware in wood kilns for three days."),
            ],
        )
        await wait_replayed(cluster.primary_dsn, cluster.replica_dsn)
        text = (await client.get("/metrics")).text
        assert _gauge(text, "mcp_rag_index_lag_entries") == 2
        assert _gauge(text, "mcp_rag_replication_lag_seconds") == 0

        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "region": "eu-west"}

        await region_b.syncer.catch_up()
        text = (await client.get("/metrics")).text
        assert _gauge(text, "mcp_rag_index_lag_entries") == 0


async def test_rebuilt_index_answers_like_the_synced_one(
    cluster: Cluster, region_a: Runtime, region_b: Runtime, embedder: Embedder, tmp_path: Path
) -> None:
    collection = "mr-rebuild"
    await ingest(
        region_a,
        collection,
        [
            ("mr://rebuild/volcano", "Volcanoes", "Basaltic lava flows slowly from shield volcanoes in Hawaii."),
            ("mr://rebuild/orchard", "Orchards", "Apple orchards are pruned in late winter before the buds swell."),
            ("mr://rebuild/chess", "Chess", "The Sicilian defence answers the king's pawn opening with c5."),
            ("mr://rebuild/violin", "Violins", "Luthiers carve violin tops from spruce and backs from maple."),
            ("mr://rebuild/tides", "Tides", "Spring tides occur when the sun and moon align at new and full moon."),
        ],
    )
    # Churn so that the synced index has seen updates and deletes.
    await ingest(
        region_a,
        collection,
        [
            ("mr://rebuild/orchard", "Orchards", "Pear orchards need a pollinator variety planted every few rows."),
        ],
    )
    temp = await ingest(region_a, collection, [("mr://rebuild/temp", "Temp", "A short-lived note about kayaks.")])
    await region_a.service.delete_document(TENANT, temp["mr://rebuild/temp"])
    await sync_b(cluster, region_b)

    queries = [
        "lava from a volcano",
        "pruning fruit trees",
        "chess opening with c5",
        "who makes violins",
        "when are tides highest",
        "pollinating pear trees",
    ]

    async def answers(service: RagService) -> list[tuple[list[int], list[float]]]:
        out = []
        for query in queries:
            results = await service.search(TENANT, query, top_k=5, filters=SearchFilters(collection=collection))
            out.append(([r.chunk_id for r in results], [round(r.score, 6) for r in results]))
        return out

    synced = await answers(region_b.service)

    for rebuilt in (qdrant_memory_index(), EdgeIndex(tmp_path / "rebuilt-edge")):
        await rebuilt.open(embedder.identity)
        try:
            syncer = IndexSyncer(region_b.store, rebuilt)
            started = time.monotonic()
            written = await syncer.reindex()
            observe(
                f"reindex from the replica into {type(rebuilt).__name__} ({written} points)", time.monotonic() - started
            )
            assert await rebuilt.get_cursor() == await region_b.index.get_cursor()
            # Same points as the index kept by sync (and as region A's, kept from the primary).
            assert await rebuilt.point_ids() == await region_b.index.point_ids()
            assert await rebuilt.point_ids() == await region_a.index.point_ids()
            service = RagService(region_b.settings, region_b.store, rebuilt, region_b.embedder, syncer)
            got = await answers(service)
            for (synced_ids, synced_scores), (ids, scores), query in zip(synced, got, queries, strict=True):
                assert ids[:1] == synced_ids[:1], query
                if isinstance(rebuilt, QdrantServerIndex):  # same engine as region B's: same scores too
                    assert scores == synced_scores, query
        finally:
            await rebuilt.close()


async def test_region_b_readiness_names_postgres_while_its_replica_is_down_and_recovers(
    cluster: Cluster, region_b: Runtime
) -> None:
    await sync_b(cluster, region_b)
    assert await region_b.readiness() == []

    cluster.replica.stop()
    try:
        reasons = await region_b.readiness()
        assert any(r.startswith("postgres:") for r in reasons), reasons
        with pytest.raises(UnavailableError):
            await region_b.service.search(TENANT, "lighthouse", top_k=3)
        # The scrape still answers while the read database is down.
        app = create_app(region_b.settings, runtime=region_b)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            assert (await c.get("/metrics")).status_code == 200
            ready = await c.get("/ready")
            assert ready.status_code == 503
            assert any(r.startswith("postgres:") for r in ready.json()["reasons"])
    finally:
        cluster.replica.start()

    # The same runtime (same pools) recovers once the replica is back: no restart.
    async def ready_again() -> bool:
        return await region_b.readiness() == []

    _, waited = await poll(ready_again, "region B to be ready again", interval=0.2)
    observe("region B ready again after the replica restarted", waited)
    found = await region_b.service.search(TENANT, "lamp wicks in the lighthouse", top_k=3)
    assert isinstance(found, list)
    await wait_replayed(cluster.primary_dsn, cluster.replica_dsn)  # streaming again


# --- the sync worker as a real process --------------------------------------------------------


def _cli_env(cluster: Cluster, data_dir: Path, model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")}
    env.update(
        {
            "MCP_RAG_REGION": "eu-west",
            "MCP_RAG_DATABASE_URL": cluster.primary_dsn,
            "MCP_RAG_DATABASE_READ_URL": cluster.replica_dsn,
            "MCP_RAG_DATA_DIR": str(data_dir),
            "MCP_RAG_EMBEDDING_MODEL_DIR": str(model_dir),
            "MCP_RAG_SYNC_INTERVAL_SECONDS": "0.2",
            # The test watches the durable cursor in the index's meta file: flush every write.
            "MCP_RAG_INDEX_FLUSH_SECONDS": "0",
            "MCP_RAG_LOG_FORMAT": "json",
        }
    )
    return env


def _follower_cursor(data_dir: Path) -> int:
    try:
        return int(json.loads((data_dir / "index" / "index_meta.json").read_text())["cursor"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


async def _stop(process: subprocess.Popen[bytes], signum: int) -> int:
    process.send_signal(signum)

    async def exited() -> bool:
        return process.poll() is not None

    _, waited = await poll(exited, f"the follower to exit after {signal.Signals(signum).name}", interval=0.05)
    observe(f"follower exit after {signal.Signals(signum).name}", waited)
    return int(process.returncode)


async def test_sync_follow_process_keeps_an_index_current_from_the_replica(
    cluster: Cluster, region_a: Runtime, model_dir: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "follower"  # its own embedded index: an EdgeIndex directory is one process's
    env = _cli_env(cluster, data_dir, model_dir)
    cmd = [sys.executable, "-m", "mcp_rag.cli"]
    stderr_path = tmp_path / "follower.stderr"

    with stderr_path.open("wb") as stderr:
        follower = subprocess.Popen(
            [*cmd, "sync", "--follow"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:

        async def following() -> bool:
            assert follower.poll() is None, stderr_path.read_text()
            return "following the change log" in stderr_path.read_text()

        await poll(following, "the follower to start", interval=0.1)

        await ingest(
            region_a,
            "mr-follower",
            [
                ("mr://follower/1", "Canals", "Canal locks raise barges between two water levels."),
                ("mr://follower/2", "Looms", "Jacquard looms read punched cards to weave patterns."),
                ("mr://follower/3", "Clocks", "A pendulum clock keeps time with an escapement."),
            ],
        )
        target = await query_one(cluster.primary_dsn, "SELECT max(seq) FROM change_log")

        async def caught_up() -> bool:
            assert follower.poll() is None, stderr_path.read_text()
            return _follower_cursor(data_dir) >= target

        _, waited = await poll(caught_up, f"the follower's index cursor to reach seq {target}", interval=0.05)
        observe("follower (interval 0.2 s): cursor reached, after region A's ingest returned", waited)
        assert await _stop(follower, signal.SIGTERM) == 0, stderr_path.read_text()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert "stopped following the change log" in stderr_path.read_text()

    stats = subprocess.run([*cmd, "stats", "--json"], env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert stats.returncode == 0, stats.stderr.decode()
    data = json.loads(stats.stdout)
    assert data["region"] == "eu-west"
    assert data["pending_changes"] == 0
    assert data["index_cursor"] == data["last_change_seq"] >= target
    assert data["index_points"] == data["chunks"] > 0
    assert data["reads_from_replica"] is True
    assert data["replica_streaming"] is True
    assert data["replication_lag_seconds"] is not None
    assert data["replication_lag_seconds"] < 5

    # A follower that started and is stopped with SIGINT (Ctrl-C) also exits cleanly.
    stderr_path = tmp_path / "follower-2.stderr"
    with stderr_path.open("wb") as stderr:
        follower = subprocess.Popen(
            [*cmd, "sync", "--follow"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        await poll(following, "the second follower to start", interval=0.1)
        assert await _stop(follower, signal.SIGINT) == 0, stderr_path.read_text()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


# --- failover (servers of its own) ----------------------------------------------------------


async def test_failover_region_b_serves_reads_without_the_primary_then_its_promoted_replica_takes_writes(
    embedder: Embedder, model_dir: Path, tmp_path: Path
) -> None:
    primary = PgServer().init(replication=True).start()
    replica: PgServer | None = None
    try:
        primary_dsn = primary.create_database(DATABASE)
        await migrate(primary_dsn)
        replica = standby_of(primary)
        replica_dsn = replica.dsn(DATABASE)
        collection = "mr-failover"
        index_b = qdrant_memory_index()

        settings_a = region_settings(tmp_path / "a", model_dir, region="us-east", database_url=primary_dsn)
        async with open_runtime(
            settings_a, index=EdgeIndex(tmp_path / "a" / "index"), embedder=embedder, follow_changes=False
        ) as region_a:
            ids = await ingest(
                region_a,
                collection,
                [
                    ("mr://failover/sailing", "Sailing", "Sailors reef the mainsail when the wind picks up."),
                    ("mr://failover/weaving", "Weaving", "Basket weavers soak willow rods before bending them."),
                ],
            )

        settings_b = region_settings(
            tmp_path / "b",
            model_dir,
            region="eu-west",
            database_url=primary_dsn,
            database_read_url=replica_dsn,
            max_replication_lag_seconds=1.0,
        )
        async with open_runtime(settings_b, index=index_b, embedder=embedder, follow_changes=False) as region_b:
            await wait_replayed(primary_dsn, replica_dsn)
            await region_b.syncer.catch_up()
            cursor_before = await index_b.get_cursor()
            assert cursor_before == await query_one(primary_dsn, "SELECT max(seq) FROM change_log")
            assert await region_b.readiness() == []

            # The primary goes away. Region B keeps serving reads from its replica...
            primary.stop()
            found = await doc_ids_found(region_b, "reefing a sail in strong wind", collection)
            assert found[:1] == [ids["mr://failover/sailing"]]
            assert (await region_b.store.list_documents(TENANT, collection=collection)).documents
            assert await region_b.syncer.catch_up() == 0
            # ...but writes fail with a readable error,
            with pytest.raises(UnavailableError):
                await region_b.service.ingest_text(TENANT, "A note that cannot be written now.", collection=collection)
            # and the replica, cut off from the primary, is not reported as current: its lag
            # grows until readiness names it (and never names postgres: the replica answers).
            status = await region_b.store.replication_status()
            assert status.is_replica is True
            assert status.streaming is False

            async def lag_reason() -> list[str]:
                reasons = await region_b.readiness()
                return reasons if any(r.startswith("replication lag:") for r in reasons) else []

            reasons, waited = await poll(lag_reason, "readiness to report the replication lag", interval=0.1)
            assert not any(r.startswith("postgres:") for r in reasons), reasons
            observe("replica without primary: lag over a 1 s bound reported", waited)
            later = await region_b.store.replication_status()
            assert later.lag_seconds is not None
            assert later.lag_seconds > 1.0

        # Promote the replica; region B's write DSN now points at it (it is also its read DSN).
        started = time.monotonic()
        replica.promote()

        async def promoted() -> bool:
            return await query_one(replica_dsn, "SELECT NOT pg_is_in_recovery()") is True

        await poll(promoted, "the replica to leave recovery")
        observe("promotion (pg_ctl promote -w) until writable", time.monotonic() - started)

        settings_c = region_settings(tmp_path / "b", model_dir, region="eu-west", database_url=replica_dsn)
        async with open_runtime(settings_c, index=index_b, embedder=embedder, follow_changes=False) as region_c:
            assert await index_b.get_cursor() == cursor_before  # the cursor survived and is still valid
            outcome = await region_c.service.ingest_text(
                TENANT,
                "Glassblowers gather molten glass on a blowpipe and shape it by turning.",
                collection=collection,
                title="Glassblowing",
                source_uri="mr://failover/glass",
            )
            assert outcome.status == "added"

            new_seq = await query_one(
                replica_dsn, "SELECT max(seq) FROM change_log WHERE document_id = %s", (outcome.document_id,)
            )
            assert new_seq > cursor_before  # the change log continues past every seq the index has applied
            assert await query_one(replica_dsn, "SELECT count(*) FROM change_log WHERE seq > %s", (cursor_before,)) == 1
            observe("change-log seq step across promotion (new seq - last seq before)", float(new_seq - cursor_before))

            assert await index_b.get_cursor() == new_seq
            assert await region_c.syncer.lag() == 0
            assert (await doc_ids_found(region_c, "shaping molten glass", collection))[:1] == [outcome.document_id]
            assert (await doc_ids_found(region_c, "reefing a sail in strong wind", collection))[:1] == [
                ids["mr://failover/sailing"]
            ]
            assert await index_b.point_ids() == await region_c.store.all_chunk_ids()
            status = await region_c.store.replication_status()
            assert status.is_replica is False
            assert await region_c.readiness() == []
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()


@pytest.mark.parametrize(
    ("engine", "overtaken"), [("qdrant-edge", False), ("qdrant-server", False), ("qdrant-edge", True)]
)
async def test_failover_that_lost_writes_is_detected_and_the_index_rebuilt(
    engine: str, overtaken: bool, embedder: Embedder, model_dir: Path, tmp_path: Path
) -> None:
    """The index of a region reading the primary has applied writes its replica never received.
    The primary dies, the replica is promoted, and the region points at it with the same index:
    seq and chunk ids resume below the index's cursor. The region must not report ready with that
    index (the cursor's entry is not in the new history): it names the divergence, search refuses,
    and the sync worker rebuilds the index from Postgres, after which it is ready and exact.
    ``overtaken``: the new primary has taken so many writes before the region reconnects that its
    log reaches past the cursor: the entry at the cursor's seq exists, but is another one."""
    primary = PgServer().init(replication=True).start()
    replica: PgServer | None = None
    try:
        primary_dsn = primary.create_database(DATABASE)
        await migrate(primary_dsn)
        replica = standby_of(primary)
        replica_dsn = replica.dsn(DATABASE)
        collection = "mr-lost"
        index = EdgeIndex(tmp_path / "index") if engine == "qdrant-edge" else qdrant_memory_index()

        settings_a = region_settings(tmp_path / "a", model_dir, region="us-east", database_url=primary_dsn)
        async with open_runtime(settings_a, index=index, embedder=embedder, follow_changes=False) as region:
            kept = await ingest(
                region,
                collection,
                [
                    (f"mr://lost/kept-{i}", f"Kept {i}", f"Beekeepers inspect hive frame {i} for brood and honey.")
                    for i in range(3)
                ],
            )
            await wait_replayed(primary_dsn, replica_dsn)
            replica.stop()  # replication stops here: what follows exists on the primary only
            lost = await ingest(
                region,
                collection,
                [
                    (f"mr://lost/lost-{i}", f"Lost {i}", f"Potters trim leather-hard bowl {i} on the wheel.")
                    for i in range(40)  # more than a sequence's WAL-logged cache: ids get reused later
                ],
            )
            cursor_before = await index.get_cursor()
            assert cursor_before == await query_one(primary_dsn, "SELECT max(seq) FROM change_log")
        primary.stop("immediate")
        replica.start()
        replica.promote()

        async def promoted() -> bool:
            return await query_one(replica_dsn, "SELECT NOT pg_is_in_recovery()") is True

        await poll(promoted, "the replica to leave recovery")
        assert await query_one(replica_dsn, "SELECT max(seq) FROM change_log") < cursor_before
        if overtaken:
            writer = Store(replica_dsn)
            await writer.open()
            try:
                for i in range(cursor_before):
                    await writer.write_documents(
                        [
                            make_write(
                                embedder, f"mr://lost/new-{i}", [f"Note {i}."], tenant=TENANT, collection=collection
                            )
                        ]
                    )
            finally:
                await writer.close()
            assert await query_one(replica_dsn, "SELECT max(seq) FROM change_log") > cursor_before

        settings_b = region_settings(
            tmp_path / "a", model_dir, region="us-east", database_url=replica_dsn, sync_interval_seconds=0.1
        )
        async with open_runtime(settings_b, index=index, embedder=embedder, follow_changes=False) as region:
            # New writes on the new timeline: their seq and chunk ids are below the old ones.
            fresh = await region.service.ingest_text(
                TENANT,
                "Glassblowers gather molten glass on a blowpipe and shape it by turning.",
                collection=collection,
                title="Glass",
                source_uri="mr://lost/glass",
            )
            new_seq = await query_one(replica_dsn, "SELECT max(seq) FROM change_log")
            observe("new seq after a lossy promotion minus the index cursor", float(new_seq - cursor_before))

            reasons = await region.readiness()
            assert any("index diverged from the database" in r for r in reasons), reasons
            with pytest.raises(IndexUnavailableError, match="diverged"):
                await region.service.search(
                    TENANT, "shaping molten glass", filters=SearchFilters(collection=collection)
                )

            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(region.syncer.follow, 0.1, stop=stop))

                async def ready() -> bool:
                    return await region.readiness() == []

                _, waited = await poll(ready, "the sync worker to rebuild the index", interval=0.1)
                observe(f"divergence detected to rebuilt and ready ({engine})", waited)
                stop.set()
            assert await index.point_ids() == await region.store.all_chunk_ids()
            assert await index.get_cursor() == await query_one(replica_dsn, "SELECT max(seq) FROM change_log")
            found = await doc_ids_found(region, "shaping molten glass", collection)
            assert found[:1] == [fresh.document_id]
            assert not set(await doc_ids_found(region, "trimming a bowl on the wheel", collection)) & set(lost.values())
            assert (await doc_ids_found(region, "beekeepers inspecting hive frames", collection))[0] in kept.values()
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()
