"""Integration, short soak (``bench/soak.py`` is the long form): 32 concurrent streamable-HTTP
clients mixing search and ingest_text for a bounded time against a real server subprocess.

Asserted: no call fails; after warm-up the server's open file descriptors stay within
``FD_SLACK`` of the warm-up value and its resident memory within ``RSS_GROWTH`` of it.
Resource bounds only — nothing here measures how fast anything is.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from bench.common import http_server, server_env
from bench.soak import FD_SLACK, RSS_GROWTH, soak
from tests.pgcluster import PgServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SECONDS = 24.0
WARMUP = 8.0
CLIENTS = 32


async def test_soak_32_clients_no_errors_flat_resources(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path: Path
) -> None:
    name = f"soak_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name, template=template_db)
    try:
        env = server_env(tmp_path / "data", model_dir, dsn)
        with http_server(env, tmp_path / "server.log") as server:
            result = await soak(server.url, server.pid, seconds=SECONDS, clients=CLIENTS, warmup=WARMUP, interval=1.0)
        verdict = result.verdict()
        report = json.dumps(
            {
                "calls": result.calls,
                "searches": result.searches,
                "ingests": result.ingests,
                "errors": result.errors,
                **verdict,
            }
        )
        print(report)  # the numbers for docs/reliability.md (pytest -s)
        assert result.errors == 0, result.error_messages
        assert result.calls >= CLIENTS and result.ingests >= 1 and result.searches >= CLIENTS, report
        assert result.warm is not None and len(result.after_warmup) >= 3, report
        assert verdict["fds_max_after_warmup"] <= verdict["fds_warm"] + FD_SLACK, report
        assert verdict["rss_kb_max_after_warmup"] <= verdict["rss_kb_warm"] * (1 + RSS_GROWTH), report
    finally:
        pg_server.drop_database(name)


async def test_soak_while_compactions_swap_the_index(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path: Path
) -> None:
    """The same load with the embedded index compacting every ~100 written points: optimised copies
    replace the shard while searches and ingests run, and no call fails."""
    name = f"soak_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name, template=template_db)
    log = tmp_path / "server.log"
    try:
        env = server_env(tmp_path / "data", model_dir, dsn, index_compact_points=100)
        with http_server(env, log) as server:
            result = await soak(server.url, server.pid, seconds=SECONDS, clients=CLIENTS, warmup=WARMUP, interval=1.0)
        events = [json.loads(line).get("event") for line in log.read_text().splitlines() if line.startswith("{")]
        report = json.dumps({"calls": result.calls, "ingests": result.ingests, "errors": result.errors})
        assert result.errors == 0, result.error_messages
        assert result.ingests >= 100, report
        assert events.count("edge index compacted") >= 2, report
        assert "edge index compaction failed; the index keeps its segments" not in events
        verdict = result.verdict()
        assert verdict["fds_max_after_warmup"] <= verdict["fds_warm"] + FD_SLACK, report
    finally:
        pg_server.drop_database(name)
