"""Watching folders: a real temporary folder, real file-system events, a real store, index and model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from mcp_rag.embedding import Embedder
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.settings import Settings
from mcp_rag.sources import directory_prefix, file_uri
from mcp_rag.watch import watch_folders

TENANT = "default"
MCP_RAG = Path(sys.executable).parent / "mcp-rag"


async def contents(rt: Runtime, folder: Path) -> dict[str, str]:
    page = await rt.service.list_documents(TENANT, source_prefix=directory_prefix(folder), limit=100)
    return {d.source_uri: (await rt.store.get_document(TENANT, d.id)).content or "" for d in page.documents}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the store did not follow the folder in time"
        await anyio.sleep(0.2)


async def test_watch_follows_create_modify_rename_delete(
    make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path
) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    (folder / "before.md").write_text("# Before\n\nWritten before the watch started.")
    async with open_runtime(make_settings(), index=EdgeIndex(tmp_path / "index"), embedder=embedder) as rt:
        stop, done = anyio.Event(), anyio.Event()

        async def watch() -> None:
            await watch_folders(rt.service, TENANT, [folder], debounce_ms=200, stop=stop)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)

            async def has(expected: dict[str, str | None]) -> bool:
                """Every name with its text present (None: absent), and nothing else."""
                now = await contents(rt, folder)
                wanted = {file_uri(folder / n): t for n, t in expected.items() if t is not None}
                return set(now) == set(wanted) and all(t in now[u] for u, t in wanted.items())

            await eventually(lambda: has({"before.md": "before the watch"}))  # the initial sync

            (folder / "notes.txt").write_text("Notes about granite owls.")  # create
            (folder / "sub").mkdir()
            (folder / "sub" / "deep.md").write_text("# Deep\n\nA file in a new folder.")
            await eventually(
                lambda: has({"before.md": "before", "notes.txt": "granite owls", "sub/deep.md": "new folder"})
            )

            (folder / "notes.txt").write_text("Notes about marble owls, revised.")  # modify in place
            await eventually(
                lambda: has({"before.md": "before", "notes.txt": "marble owls", "sub/deep.md": "new folder"})
            )

            # An editor's save: write a temporary file beside it, then rename it over the original.
            (folder / ".before.md.swp").write_text("# Before\n\nSaved by rename.")
            os.replace(folder / ".before.md.swp", folder / "before.md")
            (folder / "sub" / "deep.md").rename(folder / "sub" / "renamed.md")  # rename
            await eventually(
                lambda: has({"before.md": "Saved by rename", "notes.txt": "marble", "sub/renamed.md": "new folder"})
            )

            (folder / "notes.txt").unlink()  # delete
            await eventually(lambda: has({"before.md": "Saved by rename", "sub/renamed.md": "new folder"}))
            assert {r.source_uri for r in await rt.service.search(TENANT, "marble owls", mode="lexical")} == set()

            stop.set()
            with anyio.fail_after(10):  # the watch returns once stopped
                await done.wait()


async def test_missing_folder_is_not_emptied(
    make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path
) -> None:
    from mcp_rag.watch import sync_folder

    folder = tmp_path / "mounted"
    folder.mkdir()
    (folder / "kept.txt").write_text("Kept while the disk is away.")
    async with open_runtime(make_settings(), index=EdgeIndex(tmp_path / "index"), embedder=embedder) as rt:
        await sync_folder(rt.service, TENANT, folder, collection=None)
        (folder / "kept.txt").rename(tmp_path / "elsewhere.txt")
        folder.rmdir()  # the whole folder is gone (an unmounted disk looks the same)
        await sync_folder(rt.service, TENANT, folder, collection=None)
        assert set(await contents(rt, folder)) == {file_uri(folder / "kept.txt")}


@pytest.mark.integration
def test_watch_command_syncs_and_stops_on_sigterm(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")} | {
        "MCP_RAG_DATABASE_URL": database_url,
        "MCP_RAG_EMBEDDING_MODEL_DIR": str(model_dir),
        "MCP_RAG_DATA_DIR": str(tmp_path / "data"),
        "MCP_RAG_LOG_FORMAT": "console",
    }
    log = tmp_path / "watch.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            [str(MCP_RAG), "watch", str(folder), "--debounce-ms", "200"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while "watching folders" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            (folder / "new.md").write_text("# New\n\nA new note.")
            while "added=1" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            stdout, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    assert process.returncode == 0, text
    assert "stopped watching folders" in text
    assert "Traceback" not in text
    assert stdout == ""  # logs go to stderr only


async def test_server_watches_configured_folders(
    make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path
) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "first.txt").write_text("Synced when the server starts.")
    settings = make_settings(watch_dirs=[folder], watch_collection="inbox", watch_debounce_ms=100)
    index = EdgeIndex(tmp_path / "index")
    async with open_runtime(settings, index=index, embedder=embedder, follow_changes=True) as rt:

        async def listed() -> set[str]:
            page = await rt.service.list_documents(TENANT, collection="inbox", limit=100)
            return {d.source_uri for d in page.documents}

        async def first_only() -> bool:
            return await listed() == {file_uri(folder / "first.txt")}

        await eventually(first_only)
        (folder / "second.txt").write_text("Arrived while the server runs.")

        async def both() -> bool:
            return await listed() == {file_uri(folder / "first.txt"), file_uri(folder / "second.txt")}

        await eventually(both)


def test_watch_dirs_setting_must_name_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="watched folder"):
        Settings(watch_dirs=str(tmp_path / "missing"), _env_file=None)  # type: ignore[arg-type]
    assert Settings(watch_dirs=f"{tmp_path}", _env_file=None).watch_dirs == [tmp_path.resolve()]  # type: ignore[arg-type]
