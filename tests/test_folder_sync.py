"""Folder sync: a directory ingest that prunes documents whose files are gone, and skips unchanged
files on their size and modification time, against a real folder, Postgres, index and model."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_rag.embedding import Embedder
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.server import build_server
from mcp_rag.service import SearchFilters
from mcp_rag.settings import Settings
from mcp_rag.sources import directory_prefix, file_uri
from tests.mcp_calls import call, text_of

TENANT = "default"
OLD = 1_600_000_000_000_000_000  # a modification time well in the past (ns)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    write(root / "alpha.md", "# Alpha\n\nAlpha pages talk about zirconium lanterns.")
    write(root / "beta.txt", "Beta is a note on obsidian kettles.")
    write(root / "sub" / "gamma.md", "# Gamma\n\nGamma covers tungsten bicycles.")
    return root


def write(path: Path, text: str, mtime_ns: int = OLD) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def open_rt(make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path) -> Callable[..., Any]:
    @asynccontextmanager
    async def opener(**overrides: Any) -> AsyncIterator[Runtime]:
        settings = make_settings(**overrides)
        index = EdgeIndex(tmp_path / f"index-{uuid.uuid4().hex[:8]}")
        async with open_runtime(settings, index=index, embedder=embedder) as rt:
            yield rt

    return opener


async def stored(rt: Runtime, prefix: str) -> dict[str, str]:
    """source URI -> content of the stored documents under ``prefix``."""
    page = await rt.service.list_documents(TENANT, source_prefix=prefix, limit=100)
    return {d.source_uri: (await rt.store.get_document(TENANT, d.id)).content or "" for d in page.documents}


async def found(rt: Runtime, word: str) -> set[str]:
    results = await rt.service.search(TENANT, word, mode="lexical", top_k=10, filters=SearchFilters())
    return {r.source_uri for r in results}


async def test_prune_follows_create_modify_rename_delete(open_rt: Callable[..., Any], folder: Path) -> None:
    async with open_rt(allowed_roots=[folder.parent]) as rt:
        first = await rt.service.ingest_path(TENANT, str(folder), prune=True)
        assert (first.added, first.updated, first.unchanged, first.removed) == (3, 0, 0, 0)

        write(folder / "alpha.md", "# Alpha\n\nAlpha pages now talk about basalt lanterns instead.")
        (folder / "beta.txt").unlink()
        (folder / "sub" / "gamma.md").rename(folder / "sub" / "delta.md")
        write(folder / "epsilon.txt", "Epsilon is about copper zeppelins.")

        report = await rt.service.ingest_path(TENANT, str(folder), prune=True)
        assert (report.added, report.updated, report.unchanged, report.removed) == (2, 1, 0, 2)
        removed = {d.source_uri for d in report.documents if d.status == "removed"}
        assert removed == {file_uri(folder / "beta.txt"), file_uri(folder / "sub" / "gamma.md")}
        assert all(d.document_id for d in report.documents if d.status == "removed")

        docs = await stored(rt, directory_prefix(folder))
        assert set(docs) == {file_uri(folder / n) for n in ("alpha.md", "sub/delta.md", "epsilon.txt")}
        # The index follows: the removed documents are no longer found, the new ones are.
        assert await found(rt, "obsidian") == set()
        assert await found(rt, "tungsten") == {file_uri(folder / "sub" / "delta.md")}
        assert await found(rt, "zeppelins") == {file_uri(folder / "epsilon.txt")}

        again = await rt.service.ingest_path(TENANT, str(folder), prune=True)
        assert (again.added, again.updated, again.unchanged, again.removed) == (0, 0, 3, 0)


async def test_without_prune_nothing_is_removed(open_rt: Callable[..., Any], folder: Path) -> None:
    async with open_rt(allowed_roots=[folder.parent]) as rt:
        await rt.service.ingest_path(TENANT, str(folder))
        (folder / "beta.txt").unlink()
        report = await rt.service.ingest_path(TENANT, str(folder))
        assert (report.unchanged, report.removed) == (2, 0)
        assert file_uri(folder / "beta.txt") in await stored(rt, directory_prefix(folder))


async def test_prune_stays_inside_the_directory_and_collection(open_rt: Callable[..., Any], folder: Path) -> None:
    sibling = folder.parent / "docs-old"  # shares the directory's name as a string prefix
    sibling.mkdir()
    write(sibling / "kept.txt", "Kept is about granite owls.")
    async with open_rt(allowed_roots=[folder.parent]) as rt:
        await rt.service.ingest_path(TENANT, str(sibling))
        await rt.service.ingest_path(TENANT, str(folder), collection="other")
        await rt.service.ingest_path(TENANT, str(folder))
        (sibling / "kept.txt").unlink()  # gone, but not under the directory being pruned
        (folder / "beta.txt").unlink()

        report = await rt.service.ingest_path(TENANT, str(folder / "sub"), prune=True)
        assert report.removed == 0
        report = await rt.service.ingest_path(TENANT, str(folder), prune=True)
        assert report.removed == 1
        assert file_uri(sibling / "kept.txt") in await stored(rt, directory_prefix(sibling))
        other = await rt.service.list_documents(TENANT, collection="other", limit=100)
        assert file_uri(folder / "beta.txt") in {d.source_uri for d in other.documents}


async def test_prune_keeps_files_that_fail_and_empties_an_empty_folder(
    open_rt: Callable[..., Any], folder: Path
) -> None:
    async with open_rt(allowed_roots=[folder.parent]) as rt:
        await rt.service.ingest_path(TENANT, str(folder), prune=True)
        (folder / "beta.txt").write_bytes(b"\xff\xfe not utf-8 \xff")
        report = await rt.service.ingest_path(TENANT, str(folder), prune=True)
        assert (len(report.failed), report.removed) == (1, 0)
        assert file_uri(folder / "beta.txt") in await stored(rt, directory_prefix(folder))

        for file in [*folder.rglob("*.*")]:
            file.unlink()
        report = await rt.service.ingest_path(TENANT, str(folder), prune=True)
        assert report.removed == 3
        assert await stored(rt, directory_prefix(folder)) == {}


async def test_unchanged_files_cost_a_stat_not_a_read(open_rt: Callable[..., Any], folder: Path) -> None:
    alpha = folder / "alpha.md"
    async with open_rt(allowed_roots=[folder.parent]) as rt:
        await rt.service.ingest_path(TENANT, str(folder))
        original = alpha.read_text()

        # Same size, same mtime, other bytes: not read, so the stored text is still the original.
        write(alpha, original.replace("zirconium", "ytterbium"))
        report = await rt.service.ingest_path(TENANT, str(folder))
        assert (report.added, report.updated, report.unchanged) == (0, 0, 3)
        assert (await stored(rt, file_uri(alpha)))[file_uri(alpha)] == original

        # The mtime moves: read, hashed, changed.
        write(alpha, original.replace("zirconium", "ytterbium"), mtime_ns=OLD + 10**9)
        report = await rt.service.ingest_path(TENANT, str(folder))
        assert report.updated == 1
        assert "ytterbium" in (await stored(rt, file_uri(alpha)))[file_uri(alpha)]

        # Touched only: read and hashed once (unchanged), then its new stat is remembered.
        os.utime(folder / "beta.txt", ns=(OLD + 5 * 10**9, OLD + 5 * 10**9))
        report = await rt.service.ingest_path(TENANT, str(folder))
        assert report.unchanged == 3
        stats = await rt.store.file_stats(TENANT, "default", [file_uri(folder / "beta.txt")])
        assert stats[file_uri(folder / "beta.txt")][1] == OLD + 5 * 10**9


async def test_a_file_modified_just_now_is_read_again(open_rt: Callable[..., Any], folder: Path) -> None:
    """Within the timestamp resolution a file can change without its stat changing: such a stat is not trusted."""
    fresh = folder / "fresh.txt"
    write(fresh, "Fresh text about silver foxes.", mtime_ns=time.time_ns())
    async with open_rt(allowed_roots=[folder.parent]) as rt:
        await rt.service.ingest_path(TENANT, str(folder))
        assert file_uri(fresh) not in await rt.store.file_stats(TENANT, "default", [file_uri(fresh)])
        st = fresh.stat()
        fresh.write_text("Fresh text about silver wolf.")  # same size
        os.utime(fresh, ns=(st.st_atime_ns, st.st_mtime_ns))
        report = await rt.service.ingest_path(TENANT, str(folder))
        assert report.updated == 1


async def test_ingest_file_tool_prunes(open_rt: Callable[..., Any], folder: Path) -> None:
    async with open_rt(allowed_roots=[folder.parent]) as rt, Client(build_server(lambda: rt)) as client:
        await call(client, "ingest_file", path=str(folder), prune=True)
        (folder / "beta.txt").unlink()
        out = await call(client, "ingest_file", path=str(folder), prune=True)
        assert (out["removed"], out["unchanged"]) == (1, 2)
        result = await client.call_tool("ingest_file", {"path": str(folder), "prune": True})
        assert "removed 0" in text_of(result)
        (folder / "alpha.md").unlink()
        result = await client.call_tool("ingest_file", {"path": str(folder), "prune": True})
        assert f"removed: {file_uri(folder / 'alpha.md')}" in text_of(result)
