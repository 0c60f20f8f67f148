"""Process-wide resources: database pools, the index, the embedding model and the service over them.

Created once per process and shared by every transport and connection (the MCP SDK enters
a server lifespan once per SSE connection, so nothing here may live in that lifespan).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from . import metrics
from .embedding import Embedder
from .embedding.factory import keep_recorded_build
from .errors import (
    ConfigurationError,
    ConflictError,
    EmbeddingUnavailableError,
    IndexError_,
    IndexInUseError,
    IndexUnavailableError,
    RagError,
    UnavailableError,
)
from .index.base import VectorIndex, model_mismatch_message
from .logging import get_logger
from .service import RagService
from .settings import Settings
from .store.embedded import EmbeddedPostgres
from .store.migrate import migrate
from .store.postgres import ReplicationStatus, Store
from .sync import IndexSyncer
from .types import ModelIdentity

if TYPE_CHECKING:
    from .jobs import IngestJobs

log = get_logger(__name__)


MIN_FREE_BYTES = 64 * 1024 * 1024
"""Free space the data directory needs at start: the embedded engines map their files into memory,
and a write to a mapped file on a full disk kills the process (SIGBUS) instead of raising."""


def prepare_data_dir(path: Path) -> None:
    """Create the data directory if needed and make sure this process can write in it, with room to spare."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        free = shutil.disk_usage(path).free
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            free = 0
        else:
            reason = exc.strerror or type(exc).__name__
            raise ConfigurationError(
                f"MCP_RAG_DATA_DIR={path} cannot be created or written ({reason}): "
                "set MCP_RAG_DATA_DIR to a folder this user can write"
            ) from exc
    if free < MIN_FREE_BYTES:
        raise UnavailableError(
            f"the disk of MCP_RAG_DATA_DIR={path} is full ({free // (1024 * 1024)} MiB free, "
            f"{MIN_FREE_BYTES // (1024 * 1024)} MiB needed): free some space or move the data directory"
        )


def build_index(settings: Settings) -> VectorIndex:
    if settings.resolved_index_backend == "qdrant":
        from .index.qdrant_server import QdrantServerIndex, cluster_params

        assert settings.qdrant_url is not None
        return QdrantServerIndex.from_url(
            settings.qdrant_url,
            settings.qdrant_api_key,
            settings.qdrant_collection,
            settings.qdrant_timeout,
            cluster=cluster_params(settings),
        )
    from .index.qdrant_edge import EdgeIndex

    return EdgeIndex(
        settings.embedded_index_dir,
        flush_seconds=settings.index_flush_seconds,
        compact_points=settings.index_compact_points,
    )


@dataclass(slots=True)
class Runtime:
    settings: Settings
    store: Store
    index: VectorIndex
    embedder: Embedder
    syncer: IndexSyncer
    service: RagService
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False
    jobs: IngestJobs | None = None
    """Background directory ingests (server processes only; see jobs.py)."""

    async def refresh_lag_metrics(self) -> tuple[int, ReplicationStatus]:
        """Index lag (change-log entries the index has not applied) and the read database's
        replication status, also set on the ``/metrics`` gauges."""
        index_lag = await self.syncer.lag()  # sets mcp_rag_index_lag_entries
        replication = await self.store.replication_status()
        metrics.REPLICATION_LAG.set(replication.lag_seconds or 0.0)
        return index_lag, replication

    async def readiness(self) -> list[str]:
        """Reasons the process should not take traffic; empty when ready.

        Only what reads need is checked: the read database (a local replica, or the primary
        when there is none), the index and how far behind both are. A region with a replica
        stays ready while the primary is away (writes then fail with "database unavailable")
        until the replica's staleness passes ``max_replication_lag_seconds``.
        """
        reasons: list[str] = []
        if self.draining:
            return ["shutting down"]
        if not self.embedder.loaded:
            reasons.append(f"embedding provider: {self.syncer.open_error or 'model not loaded'}")
        try:
            with anyio.fail_after(self.settings.db_timeout + 1):
                await self.store.ping(include_primary=False)
        except RagError as exc:
            reasons.append(f"postgres: {exc}")
        except TimeoutError:
            reasons.append(f"postgres: no answer within {self.settings.db_timeout + 1:.0f}s")
        if not self.syncer.index_open:
            if self.embedder.loaded:
                reasons.append(f"index: {self.syncer.open_error}")
        elif self.syncer.diverged:
            state = "being rebuilt" if self.syncer.rebuilding else "not rebuilt yet"
            reasons.append(f"index: {self.syncer.diverged} ({state})")
            return reasons
        else:
            try:
                with anyio.fail_after(self.settings.qdrant_timeout + 1):
                    await self.index.ping()
            except (IndexError_, TimeoutError) as exc:
                reasons.append(f"index: {exc or 'timed out'}")
        if not reasons:
            try:
                with anyio.fail_after(self.settings.db_timeout + 1):
                    lag, replication = await self.refresh_lag_metrics()
                if lag > self.settings.max_index_lag_entries:
                    reasons.append(
                        f"index lag: {lag} change-log entries not yet applied "
                        f"(bound {self.settings.max_index_lag_entries})"
                    )
                lag_s = replication.lag_seconds or 0.0
                if lag_s > self.settings.max_replication_lag_seconds:
                    reasons.append(
                        f"replication lag: the read replica is {lag_s:.1f}s behind the primary "
                        f"(bound {self.settings.max_replication_lag_seconds:.0f}s)"
                    )
            except IndexError_ as exc:
                reasons.append(f"index: {exc}")
            except RagError as exc:
                reasons.append(f"postgres: {exc}")
            except TimeoutError:
                reasons.append(f"postgres: no answer within {self.settings.db_timeout + 1:.0f}s")
        return reasons


@asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    follow_changes: bool | None = None,
    index: VectorIndex | None = None,
    embedder: Embedder | None = None,
    catch_up: bool = True,
) -> AsyncIterator[Runtime]:
    """Start everything the service needs; stop it all on exit.

    ``follow_changes`` runs the index sync worker in the background (default: the
    ``sync_in_server`` setting), and with it the passes that apply committed writes to an
    embedded index after the writer has answered (``IndexSyncer.run_passes``); without it, a
    write is applied to the index before it returns. ``index`` and ``embedder`` replace the
    ones the settings describe (tests, benchmarks). ``catch_up=False`` leaves the index as it
    is at start (``mcp-rag stats`` must report the lag it finds, not hide it).
    """
    prepare_data_dir(settings.data_dir)
    async with AsyncExitStack() as stack:
        write_dsn = settings.database_url
        if write_dsn is None:
            embedded = EmbeddedPostgres(settings.embedded_postgres_dir)
            write_dsn = await anyio.to_thread.run_sync(embedded.start)
            stack.callback(embedded.stop)
        await migrate(write_dsn)
        store = Store(
            write_dsn,
            settings.database_read_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_timeout,
        )
        await store.open()
        stack.push_async_callback(store.close)

        kept = await keep_recorded_build(settings, store)
        if kept is not settings:
            # The database's vectors belong to the other build of the default model. An embedder loaded
            # in advance from the settings alone (a holder does that while the database starts) is the
            # wrong one: load the database's build instead.
            settings, embedder = kept, None
        if embedder is None:
            embedder = Embedder(settings, on_batch=lambda n, secs: metrics.EMBED_BATCH_SECONDS.observe(secs))
            stack.callback(embedder.provider.close)
        follow = settings.sync_in_server if follow_changes is None else follow_changes

        async def identify() -> ModelIdentity:
            identity = await embedder.load()
            stored_model = await store.claim_model(identity)
            if not stored_model.matches(identity):
                raise ConfigurationError(model_mismatch_message(stored_model, identity))
            return identity

        index = index or build_index(settings)
        unreachable: str | None = None
        provider_down: str | None = None
        try:
            identity = await identify()
        except EmbeddingUnavailableError as exc:
            # A remote embedding provider that does not answer may come back: a server process
            # starts without it and reports not-ready with the reason; the sync worker retries
            # (the model identity, and so the index, wait for its first answer).
            if not follow:
                raise
            provider_down = str(exc)
        try:
            if provider_down is None:
                await index.open(identity)
        except IndexInUseError as exc:
            raise ConflictError(str(exc)) from exc
        except IndexUnavailableError as exc:
            # A Qdrant server that does not answer may come back by itself: a server process
            # (which runs the sync worker) starts without it, reports not-ready, keeps taking
            # writes into Postgres and opens the index once it answers. One-shot commands stop.
            if not (follow and settings.resolved_index_backend == "qdrant"):
                raise UnavailableError(str(exc)) from exc
            unreachable = str(exc)
        except IndexError_ as exc:
            raise ConfigurationError(str(exc)) from exc
        stack.push_async_callback(index.close)

        syncer = IndexSyncer(store, index)
        if provider_down is not None:
            syncer.defer_open(identify, provider_down)
            log.warning("the embedding provider does not answer; starting without it", error=provider_down)
        elif unreachable is not None:
            syncer.defer_open(identity, unreachable)
            log.warning(
                "the index does not answer; starting without it (search fails until it does)", error=unreachable
            )
        service = RagService(settings, store, index, embedder, syncer)
        runtime = Runtime(settings, store, index, embedder, syncer, service)
        if catch_up:
            try:
                applied = await syncer.catch_up()
                if applied:
                    log.info("index caught up from the change log at start", applied=applied)
            except RagError as exc:
                log.warning("could not catch the index up at start; the sync worker will retry", error=str(exc))

        if not follow:
            yield runtime
            return
        from .jobs import IngestJobs

        jobs = IngestJobs(store, service, settings.ingest_job_after_seconds)
        runtime.jobs = await stack.enter_async_context(jobs.running())
        try:
            async with anyio.create_task_group() as tg:
                # A server applies committed writes in the background; its searches wait for them.
                await tg.start(syncer.run_passes)
                tg.start_soon(syncer.follow, settings.sync_interval_seconds)
                if settings.watch_dirs:  # the server process (the one following the change log) watches
                    from .watch import watch_configured

                    tg.start_soon(watch_configured, service, settings)
                try:
                    yield runtime
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await syncer.finish_passes()
