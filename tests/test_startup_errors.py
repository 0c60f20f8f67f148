"""Failures a user or operator causes end the command with one line on stderr that names what failed
(passwords redacted) and what to do, with the exit status of its class: 2 configuration, 3 conflict,
4 a dependency unavailable. Tracebacks are for bugs; MCP_RAG_LOG_LEVEL=DEBUG shows the cause.

Every case runs the real CLI (or the real server) against real PostgreSQL servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

from tests.pgcluster import PgServer, free_port
from tests.serverproc import MCP_RAG

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa55"


def base_env(model_dir: Path, data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")}
    env |= {"MCP_RAG_EMBEDDING_MODEL_DIR": str(model_dir), "MCP_RAG_DATA_DIR": str(data_dir)}
    return env | {f"MCP_RAG_{k.upper()}": v for k, v in settings.items()}


def run(env: dict[str, str], *args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MCP_RAG, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def one_line(done: subprocess.CompletedProcess[str], status: int, pattern: str, *, after_work: bool = False) -> str:
    """The command failed with ``status`` and its whole stderr is one line matching ``pattern`` (or, when
    the failure comes ``after_work`` such as loading the model, that line follows only INFO log lines)."""
    assert done.returncode == status, f"exit {done.returncode}\nstderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    if after_work:
        assert all("[info     ]" in line for line in lines[:-1]), done.stderr
        lines = lines[-1:]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mcp-rag: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert PASSWORD not in done.stderr
    assert done.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def guarded_pg() -> Iterator[PgServer]:
    """A server that checks passwords for one role and refuses unencrypted connections for another."""
    server = PgServer().init()
    hba = server.datadir / "pg_hba.conf"
    hba.write_text(
        "host all secure 127.0.0.1/32 scram-sha-256\nhostnossl all tlsonly 127.0.0.1/32 reject\n" + hba.read_text()
    )
    server.start()
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE secure LOGIN PASSWORD '{PASSWORD}'".encode())
        conn.execute(b"CREATE ROLE tlsonly LOGIN")
        conn.execute(b"CREATE DATABASE guarded OWNER secure")
    try:
        yield server
    finally:
        server.destroy()


# --- PostgreSQL -------------------------------------------------------------------------------------


def test_postgres_that_does_not_answer(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = base_env(model_dir, tmp_path / "data", database_url=f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/rag")
    line = one_line(
        run(env, "stats", cwd=tmp_path),
        4,
        rf"cannot connect to PostgreSQL at app@127\.0\.0\.1:{port}/rag \(MCP_RAG_DATABASE_URL\): "
        r".*[Cc]onnection refused.*; start it or fix MCP_RAG_DATABASE_URL$",
    )
    assert "connection failed" not in line  # psycopg's repetition of the target is cut


def test_wrong_password(guarded_pg: PgServer, model_dir: Path, tmp_path: Path) -> None:
    dsn = f"postgresql://secure:not-the-password@127.0.0.1:{guarded_pg.port}/guarded"
    done = run(base_env(model_dir, tmp_path / "data", database_url=dsn), "stats", cwd=tmp_path)
    one_line(
        done,
        2,
        r"PostgreSQL at secure@127\.0\.0\.1:\d+/guarded \(MCP_RAG_DATABASE_URL\) refused the "
        r"password: fix the credentials in MCP_RAG_DATABASE_URL$",
    )
    assert "not-the-password" not in done.stderr


def test_missing_database(guarded_pg: PgServer, model_dir: Path, tmp_path: Path) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{guarded_pg.port}/no_such_db"
    one_line(
        run(base_env(model_dir, tmp_path / "data", database_url=dsn), "stats", cwd=tmp_path),
        2,
        r"no_such_db .*the database does not exist; create it or fix the name in MCP_RAG_DATABASE_URL$",
    )


def test_server_that_requires_tls(guarded_pg: PgServer, model_dir: Path, tmp_path: Path) -> None:
    dsn = f"postgresql://tlsonly@127.0.0.1:{guarded_pg.port}/guarded?sslmode=disable"
    one_line(
        run(base_env(model_dir, tmp_path / "data", database_url=dsn), "stats", cwd=tmp_path),
        2,
        r"requires TLS .*add \?sslmode=require to MCP_RAG_DATABASE_URL$",
    )


def test_debug_level_shows_the_underlying_error(model_dir: Path, tmp_path: Path) -> None:
    env = base_env(
        model_dir, tmp_path / "data", database_url=f"postgresql://app@127.0.0.1:{free_port()}/rag", log_level="DEBUG"
    )
    done = run(env, "stats", cwd=tmp_path)
    assert done.returncode == 4
    assert "OperationalError" in done.stderr  # the cause, at DEBUG
    assert done.stderr.strip().splitlines()[-1].startswith("mcp-rag: cannot connect to PostgreSQL")


# --- the stdio server -----------------------------------------------------------------------------


def test_stdio_server_answers_initialize_with_the_error(model_dir: Path, tmp_path: Path) -> None:
    """What Claude Desktop shows: the initialize request gets the one-line reason as a JSON-RPC error."""
    env = base_env(model_dir, tmp_path / "data", database_url=f"postgresql://app@127.0.0.1:{free_port()}/rag")
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
    }
    done = run(env, "serve", "--transport", "stdio", cwd=tmp_path, stdin=json.dumps(initialize) + "\n")
    assert done.returncode == 4
    [answer] = [json.loads(line) for line in done.stdout.splitlines()]
    assert answer["id"] == 1
    assert answer["error"]["message"].startswith("cannot connect to PostgreSQL at app@127.0.0.1")
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"mcp-rag: {answer['error']['message']}"]


async def test_the_sdk_client_sees_the_reason(model_dir: Path, tmp_path: Path) -> None:
    env = base_env(model_dir, tmp_path / "data", database_url=f"postgresql://app@127.0.0.1:{free_port()}/rag")
    params = StdioServerParameters(command=MCP_RAG, args=["serve", "--transport", "stdio"], env=env, cwd=tmp_path)
    with pytest.raises(BaseExceptionGroup) as raised:
        async with Client(params):
            pass
    assert raised.group_contains(MCPError, match="^cannot connect to PostgreSQL at app@127.0.0.1")


# --- this machine -----------------------------------------------------------------------------------


def test_data_dir_that_cannot_be_created(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = base_env(model_dir, blocker / "data", database_url=database_url)
    one_line(
        run(env, "stats", cwd=tmp_path),
        2,
        rf"MCP_RAG_DATA_DIR={re.escape(str(blocker))}/data cannot be created or written \(Not a directory\): "
        "set MCP_RAG_DATA_DIR to a folder this user can write$",
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the tests run as root, like CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small disk needs root (as CI runs)")
def test_full_disk(database_url: str, model_dir: Path, small_disk: Path, tmp_path: Path) -> None:
    env = base_env(model_dir, small_disk / "data", database_url=database_url)
    one_line(
        run(env, "stats", cwd=tmp_path),
        4,
        r"the disk of MCP_RAG_DATA_DIR=.*/small/data is full \(\d+ MiB free, 64 MiB needed\): free some space",
    )


def test_port_in_use(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(model_dir, tmp_path / "data", database_url=database_url)
        done = run(env, "serve", "--transport", "http", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path)
    one_line(done, 3, rf"port {port} on 127\.0\.0\.1 is already in use .*set MCP_RAG_PORT")
    assert "http app ready" not in done.stderr  # nothing said it was ready


# --- configuration ------------------------------------------------------------------------------------


def test_bad_env_file_line(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MCP_RAG_LOG_LEVEL=INFO\nMCP_RAG_TOP_K_DEFAULT=7\n")
    env = base_env(model_dir, tmp_path / "data", database_url=database_url)
    one_line(
        run(env, "stats", cwd=tmp_path),
        2,
        r"invalid configuration: MCP_RAG_TOP_K_DEFAULT: unknown setting \(check the spelling against "
        r"\.env\.example\)$",
    )


def test_missing_allowed_root(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    env = base_env(model_dir, tmp_path / "data", database_url=database_url, allowed_roots=str(tmp_path / "gone"))
    one_line(run(env, "stats", cwd=tmp_path), 2, r"MCP_RAG_ALLOWED_ROOTS: allowed root .*gone' does not exist")


def test_missing_model(database_url: str, tmp_path: Path) -> None:
    env = base_env(tmp_path / "no-model", tmp_path / "data", database_url=database_url)
    one_line(run(env, "stats", cwd=tmp_path), 2, r"MCP_RAG_EMBEDDING_MODEL_DIR")


def test_stored_vectors_of_another_model(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            b"INSERT INTO embedding_model (name, dimension, provider) VALUES ('other/model', 768, 'fastembed')"
        )
    env = base_env(model_dir, tmp_path / "data", database_url=database_url)
    one_line(run(env, "stats", cwd=tmp_path), 2, r"other/model.*768.*all-MiniLM-L6-v2.*384", after_work=True)


def test_qdrant_that_does_not_answer(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    qdrant = f"http://127.0.0.1:{free_port()}"
    env = base_env(model_dir, tmp_path / "data", database_url=database_url, qdrant_url=qdrant, qdrant_timeout="2")
    one_line(run(env, "stats", cwd=tmp_path), 4, rf"cannot reach Qdrant at {re.escape(qdrant)}", after_work=True)
