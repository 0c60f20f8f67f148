"""Versioned SQL migrations, applied under an advisory lock so replicas may start together."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from ..logging import get_logger
from .connect import connect_failure

log = get_logger(__name__)

MIGRATION_LOCK_KEY = 0x6D63_7072_6167_0001  # "mcprag" + 1: one lock id for this project's migrations
CONNECT_TIMEOUT = 10
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    folder = resources.files("mcp_rag.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


async def connect(dsn: str) -> psycopg.AsyncConnection[tuple[Any, ...]]:
    """A connection for start-up work; a failure reads as one line naming the database (never its password)."""
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
    except (psycopg.OperationalError, OSError) as exc:
        raise connect_failure(exc, dsn) from exc


async def migrate(dsn: str) -> list[int]:
    """Apply every pending migration; returns the versions applied by this call.

    Concurrent callers serialise on a session advisory lock: the first applies, the rest
    find nothing to do. Each migration runs in its own transaction.
    """
    applied: list[int] = []
    async with await connect(dsn) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for migration in available_migrations():
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                applied.append(migration.version)
                log.info("migration applied", version=migration.version, name=migration.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied


async def current_version(dsn: str) -> int:
    async with await connect(dsn) as conn:
        cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = await cur.fetchone()
        if not row or not row[0]:
            return 0
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        row = await cur.fetchone()
        return int(row[0]) if row else 0
