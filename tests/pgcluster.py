"""Real PostgreSQL servers for the tests: start, stop, replicate, promote.

Uses the Debian PostgreSQL server binaries (``/usr/lib/postgresql/<v>/bin``); as root the
server runs as the ``postgres`` user. Each server listens on 127.0.0.1 on a free port and
lives in its own temporary directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


def _bindir() -> Path:
    override = os.environ.get("MCP_RAG_TEST_PG_BINDIR")
    if override:
        return Path(override)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found (apt-get install postgresql, or set MCP_RAG_TEST_PG_BINDIR)"
        )
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL server process in a temporary directory."""

    def __init__(self, root: Path | None = None, *, port: int | None = None) -> None:
        self.bindir = _bindir()
        self.root = root or Path(tempfile.mkdtemp(prefix="mcp-rag-pg-", dir="/tmp"))
        self.datadir = self.root / "data"
        self.port = port or free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            os.chmod(self.root, 0o755)
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, cwd="/tmp")

    def init(self, *, replication: bool = False) -> PgServer:
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            "unix_socket_directories = ''",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "max_connections = 200",
            "shared_buffers = 64MB",
        ]
        if replication:
            conf += ["wal_level = replica", "max_wal_senders = 5", "hot_standby = on", "wal_keep_size = 128MB"]
        self._append_conf(conf)
        with (self.datadir / "pg_hba.conf").open("a") as handle:
            handle.write("host replication all 127.0.0.1/32 trust\n")
        return self

    def _append_conf(self, lines: list[str]) -> None:
        with (self.datadir / "postgresql.conf").open("a") as handle:
            handle.write("\n".join(lines) + "\n")

    def start(self) -> PgServer:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.root / "log"), "-w", "-t", "30", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "promote")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def standby(self) -> PgServer:
        """A hot standby of this server, streaming from it (pg_basebackup -R)."""
        replica = PgServer()
        replica._run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-D",
            str(replica.datadir),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        replica._append_conf([f"port = {replica.port}"])
        return replica.start()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
            for attempt in range(20):
                try:
                    conn.execute(sql.encode())
                    break
                except psycopg.errors.ObjectInUse:  # the template is briefly busy
                    time.sleep(0.05 * (attempt + 1))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
