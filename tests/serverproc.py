"""``mcp-rag serve`` as a real subprocess for the integration tests: start it on a free 127.0.0.1 port,
wait for ``/ready``, talk to it, stop it with a signal, read what it logged on stderr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import httpx2
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.pgcluster import PgServer, free_port

MCP_RAG = str(Path(sys.executable).parent / "mcp-rag")


def base_env(*, database_url: str, model_dir: Path, data_dir: Path, **settings: Any) -> dict[str, str]:
    """A clean environment: the caller's minus every MCP_RAG_* variable, plus the given settings
    (keyword ``foo_bar=...`` becomes ``MCP_RAG_FOO_BAR``; lists and dicts are passed as JSON)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")}
    values: dict[str, Any] = {
        "database_url": database_url,
        "embedding_model_dir": model_dir,
        "data_dir": data_dir,
        **settings,
    }
    for key, value in values.items():
        if isinstance(value, list | dict):
            value = json.dumps(value, default=str)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env["MCP_RAG_" + key.upper()] = str(value)
    return env


def scratch_database(pg: PgServer, template: str) -> tuple[str, str]:
    """A fresh migrated database (name, dsn) copied from the session's template."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    return name, pg.create_database(name, template=template)


class ServerProcess:
    """``mcp-rag serve --transport http|sse`` on 127.0.0.1:<free port>, stderr captured in a file."""

    def __init__(
        self,
        env: Mapping[str, str],
        workdir: Path,
        *,
        transport: str = "http",
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.env = {**env, "MCP_RAG_PORT": str(self.port)}
        self.env.setdefault("MCP_RAG_HOST", "127.0.0.1")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / f"server-{self.port}.stderr"
        self.args = [MCP_RAG, "serve", "--transport", transport, *extra_args]
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self._stderr = self.stderr_path.open("wb")
        # cwd is a scratch folder so that no .env file of the developer's is read.
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        return self

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"mcp-rag exited with {self.proc.returncode} before it was ready:\n{self.log()}")
            try:
                response = httpx.get(self.base_url + "/ready", timeout=5)
                if response.status_code == 200:
                    return self
                last = f"{response.status_code} {response.text}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(f"mcp-rag not ready after {timeout}s ({last}):\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return self.proc.returncode

    def log(self) -> str:
        if self._stderr is not None:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def json_log(self) -> list[dict[str, Any]]:
        """The JSON log lines (MCP_RAG_LOG_FORMAT=json); anything else on stderr fails the parse."""
        return [json.loads(line) for line in self.log().splitlines() if line.strip()]


@contextmanager
def running(env: Mapping[str, str], workdir: Path, **options: Any) -> Iterator[ServerProcess]:
    server = ServerProcess(env, workdir, **options).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def mcp_http(url: str, token: str | None = None, **client_options: Any) -> AsyncIterator[Client]:
    """An MCP client over streamable HTTP, sending ``Authorization: Bearer <token>`` when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http,
        Client(streamable_http_client(url, http_client=http), **client_options) as client,
    ):
        yield client


@asynccontextmanager
async def mcp_sse(url: str, token: str | None = None, **client_options: Any) -> AsyncIterator[Client]:
    """An MCP client over the SSE transport (the header goes on the stream and on every message POST)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with Client(sse_client(url, headers=headers), **client_options) as client:
        yield client
