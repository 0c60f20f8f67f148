"""The ``mcp-rag`` console script, run for real in subprocesses against the test database.

Results go to stdout and nothing else does; logs and errors go to stderr; a configuration problem exits 2,
a failed operation 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mcp_rag.embedding import Embedder
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.runtime import open_runtime
from mcp_rag.settings import Settings
from mcp_rag.store.migrate import available_migrations
from mcp_rag.store.postgres import Store
from tests.pgcluster import PgServer

pytestmark = pytest.mark.integration

MCP_RAG = Path(sys.executable).parent / "mcp-rag"
TENANT = "default"


class Cli:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd

    def __call__(self, *args: str, expect: int = 0, **extra_env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(MCP_RAG), *args],
            env={**self.env, **extra_env},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == expect, (
            f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        return result


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def cli(database_url: str, model_dir: Path, data_dir: Path, tmp_path: Path) -> Cli:
    env = base_env() | {
        "MCP_RAG_DATABASE_URL": database_url,
        "MCP_RAG_EMBEDDING_MODEL_DIR": str(model_dir),
        "MCP_RAG_DATA_DIR": str(data_dir),
    }
    return Cli(env, tmp_path)  # no .env in the working directory


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "guide").mkdir(parents=True)
    (root / "guide" / "compost.md").write_text(
        "# Composting\n\nA compost heap turns kitchen scraps and leaves into humus within a year.\n"
    )
    (root / "guide" / "pruning.md").write_text(
        "# Pruning roses\n\nCut rose stems just above an outward-facing bud in late winter.\n"
    )
    (root / "mulch.md").write_text("# Mulch\n\nA layer of bark mulch keeps the soil moist and smothers weeds.\n")
    (root / "shopping.txt").write_text("Buy more compost bags.\n")  # not *.md: left out
    return root


def summary(stdout: str) -> tuple[int, int, int, int]:
    match = re.fullmatch(
        r"added (\d+), updated (\d+), unchanged (\d+), removed \d+, failed (\d+) \((\d+) chunks written\)\n", stdout
    )
    assert match, stdout
    added, updated, unchanged, failed, _ = (int(g) for g in match.groups())
    return added, updated, unchanged, failed


async def seed_with_metadata(settings: Settings, embedder: Embedder) -> None:
    """Documents with metadata (the CLI has no flag for it), written through the service in this process."""
    async with open_runtime(settings, embedder=embedder) as rt:
        await rt.service.ingest_text(
            TENANT,
            "Rainwater butts collect water from the roof for dry summers.",
            collection="docs",
            title="Water butts",
            source_uri="notes://water-en",
            metadata={"lang": "en"},
        )
        await rt.service.ingest_text(
            TENANT,
            "Rainwater tonnen sammeln water vom Dach.",
            collection="docs",
            title="Regentonnen",
            source_uri="notes://water-de",
            metadata={"lang": "de"},
        )


async def index_matches_store(settings: Settings, embedder: Embedder, database_url: str) -> int:
    """Open the embedded index the CLI left behind and compare it with Postgres."""
    store = Store(database_url)
    await store.open()
    index = EdgeIndex(settings.embedded_index_dir)
    await index.open(embedder.identity)
    try:
        in_store = await store.all_chunk_ids()
        assert await index.point_ids() == in_store
        assert await index.get_cursor() == await store.last_change_seq()
        return len(in_store)
    finally:
        await index.close()
        await store.close()


# --- commands ----------------------------------------------------------------------------------------


def test_migrate(cli: Cli, pg_server: PgServer) -> None:
    dsn = pg_server.create_database("cli_migrate_fresh")
    try:
        first = cli("migrate", MCP_RAG_DATABASE_URL=dsn)
        latest = available_migrations()[-1].version
        assert first.stdout == f"applied {len(available_migrations())} migration(s); schema version {latest}\n"
        again = cli("migrate", MCP_RAG_DATABASE_URL=dsn)
        assert again.stdout == f"applied 0 migration(s); schema version {latest}\n"
    finally:
        pg_server.drop_database("cli_migrate_fresh")


async def test_ingest_search_stats_delete(
    cli: Cli, docs: Path, make_settings: Callable[..., Settings], data_dir: Path, embedder: Embedder, database_url: str
) -> None:
    first = cli("ingest", str(docs), "--include", "*.md", "--collection", "docs")
    assert summary(first.stdout) == (3, 0, 0, 0)
    again = cli("ingest", str(docs), "--include", "*.md", "--collection", "docs")
    assert summary(again.stdout) == (0, 0, 3, 0)

    await seed_with_metadata(make_settings(data_dir=data_dir), embedder)

    found = cli("search", "rainwater roof", "--mode", "lexical", "--top-k", "3", "--filter", "lang=en", "--json")
    results = json.loads(found.stdout)  # stdout is the JSON document and nothing else
    assert [r["source_uri"] for r in results] == ["notes://water-en"]
    assert results[0]["metadata"] == {"lang": "en"}
    assert results[0]["collection"] == "docs"

    text = cli("search", "how do I prune roses", "--top-k", "1").stdout
    lines = text.splitlines()
    assert re.fullmatch(r"1\. \[\d+\.\d{4}\] Pruning roses", lines[0]), text  # heading == title: once
    assert "pruning.md" in lines[1]
    assert "outward-facing bud" in lines[2]
    assert len(lines) == 3

    stats = json.loads(cli("stats", "--json").stdout)
    assert stats["documents"] == 5
    assert stats["collections"] == 1
    assert stats["index_points"] == stats["chunks"] >= 5
    assert stats["pending_changes"] == 0
    assert stats["reads_from_replica"] is False
    assert stats["index_cursor"] == stats["last_change_seq"]

    doc_id = results[0]["document_id"]
    deleted = cli("delete", doc_id)
    assert deleted.stdout == f"deleted document {doc_id} (notes://water-en)\n"
    gone = cli("delete", "--collection", "docs")
    assert gone.stdout == "deleted collection docs (4 documents)\n"

    settings = make_settings(data_dir=data_dir)
    assert await index_matches_store(settings, embedder, database_url) == 0


async def test_sync_and_reindex(
    cli: Cli, docs: Path, database_url: str, make_settings: Callable[..., Settings], data_dir: Path, embedder: Embedder
) -> None:
    assert summary(cli("ingest", str(docs / "guide"), "--collection", "guide").stdout) == (2, 0, 0, 0)
    settings = make_settings(data_dir=data_dir)

    # Postgres changes the index never saw (another writer; a crash before the index write).
    store = Store(database_url)
    await store.open()
    try:
        page = await store.list_documents(TENANT)
        await store.delete_document(TENANT, page.documents[0].id)
        last = await store.last_change_seq()
    finally:
        await store.close()

    synced = cli("sync")
    assert re.fullmatch(rf"applied \d+ change-log entries; index cursor at {last}\n", synced.stdout), synced.stdout
    chunks = await index_matches_store(settings, embedder, database_url)
    assert chunks >= 1

    rebuilt = cli("reindex")
    assert rebuilt.stdout == f"rebuilt the index: {chunks} points\n"
    assert await index_matches_store(settings, embedder, database_url) == chunks


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MCP_RAG_INDEX_BACKEND", "foo", "MCP_RAG_INDEX_BACKEND: Input should be 'embedded' or 'qdrant'"),
        ("MCP_RAG_BOGUS", "1", "MCP_RAG_BOGUS: unknown setting"),
        ("MCP_RAG_DATABASE_URL", "nonsense", "MCP_RAG_DATABASE_URL: not a valid PostgreSQL DSN"),
    ],
)
def test_settings_errors_exit_2(cli: Cli, variable: str, value: str, message: str) -> None:
    result = cli("stats", expect=2, **{variable: value})
    assert result.stdout == ""
    assert result.stderr.startswith("mcp-rag: invalid configuration:")
    assert message in result.stderr


def test_usage_errors_exit_2(cli: Cli, tmp_path: Path) -> None:
    no_command = cli(expect=2)
    assert no_command.stdout == ""
    assert "usage: mcp-rag" in no_command.stderr

    no_target = cli("delete", expect=2)
    assert no_target.stdout == ""
    assert "give document ids or --collection NAME" in no_target.stderr

    bad_filter = cli("search", "x", "--filter", "novalue", expect=2)
    assert "--filter 'novalue': expected KEY=VALUE" in bad_filter.stderr

    (tmp_path / "empty").mkdir()
    nothing = cli("ingest", str(tmp_path / "empty"), expect=2)
    assert "no ingestible files found" in nothing.stderr


def test_failed_operations_exit_1(cli: Cli) -> None:
    result = cli("search", "anything", "--top-k", "0", expect=1)
    assert result.stdout == ""
    assert "mcp-rag: top_k must be an integer from 1 to 50, got 0" in result.stderr

    missing = cli("delete", "3f2b0c1e-0000-4000-8000-000000000000", expect=1)
    assert missing.stdout == ""
    assert "no document with id" in missing.stderr


def test_ingest_reports_unreadable_files(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nReadable text about lanterns.\n")
    (folder / "bad.md").write_bytes(b"\xff\xfe not utf-8")
    result = cli("ingest", str(folder))
    lines = result.stdout.splitlines()
    assert summary(lines[0] + "\n") == (1, 0, 0, 1)
    assert re.fullmatch(r"  failed: .*bad\.md: .*not valid UTF-8.*", lines[1])

    only_bad = cli("ingest", str(folder / "bad.md"), expect=1)  # nothing could be ingested
    assert summary(only_bad.stdout.splitlines()[0] + "\n") == (0, 0, 0, 1)


def test_ingest_prune_removes_documents_of_deleted_files(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "synced"
    folder.mkdir()
    (folder / "one.md").write_text("# One\n\nThe first note, about lanterns.\n")
    (folder / "two.md").write_text("# Two\n\nThe second note, about kettles.\n")
    assert summary(cli("ingest", str(folder), "--prune").stdout) == (2, 0, 0, 0)
    (folder / "two.md").unlink()
    kept = cli("ingest", str(folder))  # without --prune the document stays
    assert "removed 0," in kept.stdout
    pruned = cli("ingest", str(folder), "--prune")
    assert summary(pruned.stdout) == (0, 0, 1, 0)
    assert "removed 1," in pruned.stdout
    (folder / "one.md").unlink()  # an emptied folder empties the store's copy of it
    assert "removed 1," in cli("ingest", str(folder), "--prune").stdout
    listed = cli("search", "lanterns", "--json")
    assert "one.md" not in listed.stdout


def test_ingest_and_reindex_leave_a_compacted_index(cli: Cli, tmp_path: Path, data_dir: Path) -> None:
    """A bulk ingest ends with the compaction that is due (here every 5 points), and so does reindex."""
    folder = tmp_path / "notes"
    folder.mkdir()
    for i, topic in enumerate(["lanterns", "kettles", "ferns", "compasses", "quilts", "anvils", "kites", "sextants"]):
        (folder / f"{i}.md").write_text(f"# {topic.title()}\n\nA short note about {topic} and their care.\n")
    compact = {"MCP_RAG_INDEX_COMPACT_POINTS": "5"}
    cli("ingest", str(folder), **compact)
    meta = json.loads((data_dir / "index" / "index_meta.json").read_text())
    assert meta["compacted"] == 8  # one point a note
    assert meta["churn"] < 5
    assert "kettles" in cli("search", "kettle care", "--json").stdout
    cli("reindex", **compact)
    meta = json.loads((data_dir / "index" / "index_meta.json").read_text())
    assert (meta["compacted"], meta["churn"]) == (8, 0)
