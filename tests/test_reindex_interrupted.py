"""``kill -9`` of a process at each step of a reindex, on both engines, against a real PostgreSQL.

A reindex clears the index and writes every chunk again from Postgres. The process is killed
at one step of that (the step is made deterministic by wrapping, in the child process only,
the call that step makes, and killing the process when it is reached). Afterwards the index
must never claim more than it holds: the next catch-up (what a restarted server does) ends
with the index's point ids equal to Postgres's chunk ids. Before the fix, a kill between the
Qdrant server's recreate and its cursor reset, or in the middle of the embedded shard's
removal, left an empty or partial index under the old cursor, and catch-up applied nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from qdrant_client import QdrantClient

from mcp_rag.embedding import Embedder
from mcp_rag.extract import SourceDocument
from mcp_rag.index.base import VectorIndex
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.index.qdrant_server import QdrantServerIndex
from mcp_rag.runtime import open_runtime
from mcp_rag.settings import Settings
from mcp_rag.store.postgres import Store
from mcp_rag.sync import IndexSyncer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
TENANT = "default"

# Each step: the engine, then Python run in the child before the reindex, wrapping the call
# where the kill happens (``die()`` is SIGKILL of the child itself).
STEPS: dict[str, tuple[str, str]] = {
    "edge: before the shard is removed": (
        "qdrant-edge",
        "edge.shutil.rmtree = lambda path, *a, **k: die()",
    ),
    "edge: part of the shard removed": (
        "qdrant-edge",
        "edge.shutil.rmtree = lambda path, *a, **k: (real_rmtree(Path(path) / 'segments'), die())",
    ),
    "edge: shard removed, not yet recreated": (
        "qdrant-edge",
        "edge.shutil.rmtree = lambda path, *a, **k: (real_rmtree(path), die())",
    ),
    "edge: shard recreated, rebuild under way": (
        "qdrant-edge",
        "wrap(edge.EdgeIndex, 'upsert', after=2)",
    ),
    "server: collection dropped, not yet recreated": (
        "qdrant-server",
        "wrap(QdrantClient, 'delete_collection', after=1, sync=True)",
    ),
    "server: collection recreated": (
        "qdrant-server",
        "wrap(server.QdrantServerIndex, '_create_chunks', after=1, sync=True)",
    ),
    "server: rebuild under way": (
        "qdrant-server",
        "wrap(server.QdrantServerIndex, 'upsert', after=2)",
    ),
}

CHILD = textwrap.dedent(
    """
    import asyncio, functools, os, shutil, signal, sys
    from pathlib import Path
    from qdrant_client import QdrantClient
    from mcp_rag.index import qdrant_edge as edge, qdrant_server as server
    from mcp_rag.index.base import ModelIdentity
    from mcp_rag.store.postgres import Store
    from mcp_rag.sync import IndexSyncer

    kind, dsn, where, model_name, dim = sys.argv[1:6]
    real_rmtree = shutil.rmtree

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(cls, name, *, after, sync=False):
        real, calls = getattr(cls, name), [0]
        def count():
            calls[0] += 1
            if calls[0] >= after:
                die()
        if sync:
            def wrapper(*a, **k):
                result = real(*a, **k)
                count()
                return result
        else:
            async def wrapper(*a, **k):
                result = await real(*a, **k)
                count()
                return result
        setattr(cls, name, functools.wraps(real)(wrapper))

    {step}

    async def main():
        store = Store(dsn)
        await store.open()
        if kind == "qdrant-edge":
            index = edge.EdgeIndex(Path(where))
        else:
            index = server.QdrantServerIndex(QdrantClient(path=where, force_disable_check_same_thread=True))
        await index.open(ModelIdentity(model_name, int(dim)))
        await IndexSyncer(store, index, batch_size=3).reindex()
        print("reindex finished without being killed", flush=True)

    asyncio.run(main())
    """
)


def open_index(kind: str, where: Path) -> tuple[VectorIndex, Callable[[], None]]:
    if kind == "qdrant-edge":
        return EdgeIndex(where), lambda: None
    client = QdrantClient(path=str(where), force_disable_check_same_thread=True)
    return QdrantServerIndex(client), client.close


@pytest.mark.parametrize("step", list(STEPS))
async def test_reindex_killed_at_each_step_leaves_an_index_catch_up_repairs(
    step: str, make_settings: Callable[..., Settings], embedder: Embedder, database_url: str, tmp_path: Path
) -> None:
    kind, code = STEPS[step]
    where = tmp_path / "index"
    # A synced index over a dozen documents (cursor at the end of the log).
    index, close_client = open_index(kind, where)
    async with open_runtime(make_settings(), index=index, embedder=embedder, follow_changes=False) as rt:
        docs = [
            SourceDocument(f"kill://doc/{i}", f"Paragraph {i} about lighthouses and tides.\n\nMore on {i}.")
            for i in range(12)
        ]
        await rt.service.ingest(TENANT, "kill", docs, raise_on_failure=True)
        assert await index.point_ids() == await rt.store.all_chunk_ids()
        cursor_before = await index.get_cursor()
        assert cursor_before == await rt.store.last_change_seq() > 0
        model = embedder.identity
    close_client()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = CHILD.replace("{step}", code)
    child = subprocess.run(
        [sys.executable, "-c", script, kind, database_url, str(where), model.name, str(model.dimension)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr[-2000:]

    # What a restarted server does: open the index, catch up from the change log.
    index, close_client = open_index(kind, where)
    store = Store(database_url)
    await store.open()
    try:
        await index.open(model)
        cursor = await index.get_cursor()
        assert cursor in (0, cursor_before), cursor
        if cursor == cursor_before:
            assert await index.point_ids() == await store.all_chunk_ids()  # killed before anything went
        await IndexSyncer(store, index).catch_up()
        assert await index.point_ids() == await store.all_chunk_ids()
        assert await index.get_cursor() == await store.last_change_seq()
    finally:
        await index.close()
        close_client()
        await store.close()
