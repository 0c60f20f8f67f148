"""Helpers for the reliability and security tests: real ``mcp-rag`` processes on 127.0.0.1,
MCP clients over streamable HTTP with a bearer token, and consistency checks read straight
from Postgres and the index.

Every wait here is a bounded loop; nothing measures wall-clock durations.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import psycopg
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.pgcluster import free_port

VENV_BIN = Path(sys.executable).parent
MCP_RAG = str(VENV_BIN / "mcp-rag")
START_TIMEOUT = 90.0
"""Upper bound for a server process to answer /health (import + model load take a few seconds)."""


def base_env(model_dir: Path, data_dir: Path, database_url: str | None = None, **settings: Any) -> dict[str, str]:
    """The environment of a child ``mcp-rag`` process: only the settings given here (no inherited MCP_RAG_*)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")}
    env.update(
        {
            "MCP_RAG_DATA_DIR": str(data_dir),
            "MCP_RAG_EMBEDDING_MODEL_DIR": str(model_dir),
            "MCP_RAG_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if database_url is not None:
        env["MCP_RAG_DATABASE_URL"] = database_url
    for key, value in settings.items():
        env["MCP_RAG_" + key.upper()] = value if isinstance(value, str) else json.dumps(value)
    return env


def run_cli(*args: str, env: Mapping[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``mcp-rag ARGS`` to completion (cwd: an empty directory, so no stray .env is read)."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [MCP_RAG, *args], env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )


def stats_json(env: Mapping[str, str]) -> dict[str, Any]:
    done = run_cli("stats", "--json", env=env)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


class Proc:
    """A child process whose stderr goes to a file (read it with ``stderr_text``)."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self._cwd = tempfile.mkdtemp(prefix="mcp-rag-cwd-")
        self.popen = subprocess.Popen(
            args,
            env=dict(env),
            cwd=self._cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def stderr_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL this process only (its own pid; the embedded Postgres it started lives on)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._reaped()

    def _reaped(self) -> None:
        """The process is gone: its scratch working directory can go too (the log stays)."""
        shutil.rmtree(self._cwd, ignore_errors=True)

    def terminate(self, timeout: float = 60) -> int:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def wait(self, timeout: float = 180) -> int:
        code = self.popen.wait(timeout=timeout)
        self._reaped()
        return code

    def close(self) -> None:
        if self.alive():
            self.kill9()
        self._log.close()
        self._reaped()

    def wait_for_log(self, needle: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.stderr_text():
            assert self.alive(), (
                f"process exited ({self.popen.returncode}) before logging {needle!r}:\n" + self.stderr_text()[-3000:]
            )
            assert time.monotonic() < deadline, f"no {needle!r} in the log:\n{self.stderr_text()[-3000:]}"
            time.sleep(0.05)


class ServerProc(Proc):
    """``mcp-rag serve --transport http`` on 127.0.0.1:<free port>."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, port: int | None = None, transport: str = "http"
    ) -> None:
        self.port = port or free_port()
        super().__init__(
            [MCP_RAG, "serve", "--transport", transport, "--host", "127.0.0.1", "--port", str(self.port)], env, log_path
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/mcp"

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> ServerProc:
        """Wait until /health answers (the lifespan, which opens the runtime, has finished)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.alive(), f"server exited ({self.popen.returncode}):\n{self.stderr_text()[-4000:]}"
            try:
                if (
                    httpx.get(self.base + "/health", timeout=2).status_code == 200
                    and "http app ready" in self.stderr_text()
                ):
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server did not start:\n{self.stderr_text()[-4000:]}"
            time.sleep(0.1)

    def ready(self) -> httpx.Response:
        return httpx.get(self.base + "/ready", timeout=30)


@contextmanager
def server_process(env: Mapping[str, str], log_path: Path, **kwargs: Any) -> Iterator[ServerProc]:
    proc = ServerProc(env, log_path, **kwargs)
    try:
        yield proc.wait_healthy()
    finally:
        proc.close()


def http_client(
    url: str, token: str | None = None, *, timeout: float = 120, headers: Mapping[str, str] | None = None
) -> Client:
    """An MCP client over streamable HTTP, optionally with a bearer token.

    ``timeout`` bounds every HTTP read, so a hung server fails the test instead of hanging it.
    """
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    client = httpx2.AsyncClient(headers=all_headers, timeout=httpx2.Timeout(timeout))
    return Client(streamable_http_client(url, http_client=client), read_timeout_seconds=timeout)


def tool_text(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


# --- Postgres-side checks -------------------------------------------------------------


@dataclass(frozen=True)
class DbState:
    documents: int
    chunks: int
    changes: int
    last_seq: int
    chunk_ids: frozenset[int]
    bad_documents: tuple[str, ...]
    """Documents whose stored chunk_count differs from their chunk rows (or that have none)."""


def db_state(dsn: str) -> DbState:
    with psycopg.connect(dsn, autocommit=True) as conn:
        documents = conn.execute("SELECT count(*) FROM documents").fetchone()[0]  # type: ignore[index]
        chunk_ids = frozenset(r[0] for r in conn.execute("SELECT id FROM chunks").fetchall())
        changes, last = conn.execute("SELECT count(*), coalesce(max(seq), 0) FROM change_log").fetchone()  # type: ignore[misc]
        bad = conn.execute(
            """SELECT d.source_uri FROM documents d LEFT JOIN chunks c ON c.document_id = d.id
               GROUP BY d.id, d.source_uri, d.chunk_count
               HAVING count(c.id) <> d.chunk_count OR count(c.id) = 0"""
        ).fetchall()
    return DbState(int(documents), len(chunk_ids), int(changes), int(last), chunk_ids, tuple(str(r[0]) for r in bad))


def wait_until(predicate: Any, what: str, timeout: float = 60, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


# --- a TCP proxy that can stop forwarding, to freeze one connection path deterministically ----


class GateProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port``. ``hold()`` stops forwarding bytes
    from clients to the server (they wait in the proxy), ``release()`` lets them through.

    Used to freeze the index sync worker's reads (``MCP_RAG_DATABASE_READ_URL`` points here)
    while the write path goes straight to Postgres: a batch then commits but cannot reach
    the index, which is exactly the window between "committed" and "indexed".
    """

    def __init__(self, target_port: int) -> None:
        import threading

        self._threading = threading
        self.target_port = target_port
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[Any] = []
        self.upstream_ports: set[int] = set()
        """Local ports of the proxy's connections to the target (``client_port`` in pg_stat_activity)."""
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.upstream_ports.add(int(upstream.getsockname()[1]))
            client.settimeout(None)
            self._sockets += [client, upstream]
            self._threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            self._threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: Any, sink: Any, gated: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if gated:
                    while not self._open.wait(0.2):
                        if self._stop.is_set():
                            return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # Shut down before closing: the pump of the other direction is blocked in recv() on one of
            # these sockets, and a plain close() leaves the connection open until that recv returns.
            # Postgres would then keep a killed client's backend (and its session locks, such as the
            # index sync lock) alive until the proxy closes.
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop.set()
        self._open.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(timeout=5)
