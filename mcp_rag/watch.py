"""Keeping the store in step with folders as they change, from file-system events (watchfiles).

A watched folder is first synced in full (added, updated, unchanged, removed). Then each debounced
batch of events makes the folders it touched sync again: new and changed files are read, files that
went are pruned. Unchanged files cost a stat (their size and modification time are remembered), so
a sync after an event is cheap however large the folder. Syncing the folder rather than replaying
single events is what makes editors' save-by-rename (write a temporary file, rename it over the
original) and renamed directories come out right: whatever the events, the store ends up matching
what is on disk when the batch is handled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
from watchfiles import awatch

from .errors import RagError
from .logging import get_logger
from .service import RagService
from .settings import Settings
from .sources import collect_files

log = get_logger(__name__)

WAKE_MS = 500
"""How often the watcher wakes without events (to start, and to notice a stop request)."""


async def sync_folder(
    service: RagService,
    tenant: str,
    folder: Path,
    *,
    collection: str | None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> None:
    """One full, pruning sync of ``folder``; a failure is logged, never raised (the watch goes on).
    A folder that is not there (deleted, unmounted) is left alone rather than emptied in the store."""
    if not await anyio.to_thread.run_sync(folder.is_dir):
        log.warning("watched folder is missing; its documents are kept until it is back", folder=str(folder))
        return
    try:
        files = await anyio.to_thread.run_sync(collect_files, [folder], include, exclude)
        report = await service.ingest_files(tenant, files, collection=collection, prune=[folder])
    except RagError as exc:
        log.warning("folder sync failed; retried at the next change", folder=str(folder), error=str(exc)[:300])
        return
    log.info(
        "folder synced",
        folder=str(folder),
        added=report.added,
        updated=report.updated,
        unchanged=report.unchanged,
        removed=report.removed,
        failed=len(report.failed),
    )
    for failure in report.failed[:20]:
        log.warning("file not ingested", source=failure.source, reason=failure.reason[:300])


async def watch_folders(
    service: RagService,
    tenant: str,
    folders: Sequence[Path],
    *,
    collection: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    debounce_ms: int = 1000,
    stop: anyio.Event | None = None,
) -> None:
    """Sync ``folders`` now and after every debounced batch of changes, until ``stop`` is set (or cancelled)."""
    roots = [folder.resolve() for folder in folders]
    for root in roots:
        if not root.is_dir():
            raise RagError(f"{root}: not a directory; watch needs folders")
    stop = stop or anyio.Event()
    started = False
    # The watcher exists before the first batch (an empty one after WAKE_MS without events): the
    # initial sync runs then, so a change made while it runs is a later batch, never lost.
    batches = awatch(
        *roots, debounce=debounce_ms, stop_event=stop, recursive=True, rust_timeout=WAKE_MS, yield_on_timeout=True
    )
    async for changes in batches:
        if not started:
            started = True
            log.info("watching folders", folders=[str(r) for r in roots], debounce_ms=debounce_ms)
            touched = set(roots)
        else:
            touched = {root for root in roots for _, path in changes if Path(path).is_relative_to(root)}
        if changes:
            log.debug("file-system changes", events=len(changes), folders=len(touched))
        for root in sorted(touched):
            await sync_folder(service, tenant, root, collection=collection, include=include, exclude=exclude)
    log.info("stopped watching folders")


async def watch_configured(service: RagService, settings: Settings) -> None:
    """The server's watch of ``MCP_RAG_WATCH_DIRS`` (runs until the server stops)."""
    await watch_folders(
        service,
        settings.default_tenant,
        settings.watch_dirs,
        collection=settings.watch_collection,
        debounce_ms=settings.watch_debounce_ms,
    )
