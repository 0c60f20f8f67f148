"""Directory ingests that outlive their tool call: jobs, kept in Postgres (``ingest_jobs``).

``ingest_file`` runs the ingest as a job in the server's background task group and waits for it;
when it runs past ``MCP_RAG_INGEST_JOB_AFTER_SECONDS`` the call returns the job's id (the client keeps
its progress notifications until then) and the ingest goes on. ``ingest_status`` reads the job: its
progress while it runs, its report when done, its error when failed.

Durability: a running job's row is refreshed at least every ``HEARTBEAT_SECONDS``. A server that stops
cleanly marks its unfinished jobs ``interrupted``; a server that starts (and every ``HEARTBEAT_SECONDS``
after) takes over interrupted jobs and running ones whose heartbeat is older than ``STALE_SECONDS``
(their process died), with a compare-and-set on the row so one server resumes each, and runs them
again. Running a directory ingest again is idempotent and cheap for what was already done: unchanged
files cost a stat, written ones are unchanged by hash. The MCP SDK in use (mcp 2.3) has no server
support for the tasks extension, so these are plain tools.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .errors import NotFoundError, RagError, describe
from .logging import get_logger
from .service import IngestReport, ProgressCallback, RagService
from .store.postgres import Store

log = get_logger(__name__)

HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 30.0
KEEP_FINISHED_DAYS = 7
"""Finished jobs (and their reports) are kept this long for ingest_status."""
MAX_ATTEMPTS = 5
"""A job resumed this many times (its ingest keeps killing the server?) is failed instead."""


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    tenant: str
    collection: str | None
    path: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    prune: bool
    status: str
    attempts: int
    done: int
    total: int | None
    message: str
    report: dict[str, Any] | None
    error: str | None


_COLUMNS = (
    "id, tenant, collection, path, include, exclude, prune, status, attempts, done, total, message, report, error"
)


def _job(row: Any) -> Job:
    return Job(
        str(row[0]),
        row[1],
        row[2],
        row[3],
        tuple(row[4]),
        tuple(row[5]),
        bool(row[6]),
        row[7],
        int(row[8]),
        int(row[9]),
        row[10],
        row[11],
        row[12],
        row[13],
    )


def report_json(report: IngestReport) -> dict[str, Any]:
    data = asdict(report)
    return json.loads(json.dumps(data, ensure_ascii=False))  # type: ignore[no-any-return]


class IngestJobs:
    """The jobs of one server process: started here, resumed here if another process left them."""

    def __init__(self, store: Store, service: RagService, after_seconds: float) -> None:
        self.store = store
        self.service = service
        self.after_seconds = after_seconds
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tg: TaskGroup | None = None
        self._mine: set[str] = set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[IngestJobs]:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._keep_alive)
            try:
                yield self
            finally:
                self._tg = None
                tg.cancel_scope.cancel()  # each job marks itself interrupted (shielded) as it stops

    async def ingest_path(
        self,
        tenant: str,
        path: str,
        *,
        collection: str | None,
        include: Sequence[str],
        exclude: Sequence[str],
        prune: bool,
        progress: ProgressCallback | None,
    ) -> IngestReport | Job:
        """Run the ingest as a job; its report if it finishes within ``after_seconds``, else the job."""
        if self._tg is None:  # no background (a one-shot process): just run it
            return await self.service.ingest_path(
                tenant, path, collection=collection, include=include, exclude=exclude, prune=prune, progress=progress
            )
        job_id = str(uuid.uuid4())
        async with self.store._writing() as conn:
            await conn.execute(
                "INSERT INTO ingest_jobs (id, tenant, collection, path, include, exclude, prune, status, owner)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, 'running', %s)",
                (job_id, tenant, collection, path, list(include), list(exclude), prune, self.owner),
            )
        finished = anyio.Event()
        outcome: dict[str, Any] = {}
        waiting = [progress]  # the caller's progress stream, until it stops waiting

        async def relay(done: int, total: int | None, message: str) -> None:
            if waiting[0] is not None:
                try:
                    await waiting[0](done, total, message)
                except Exception:  # the client went away: the job goes on
                    waiting[0] = None

        self._tg.start_soon(self._run, job_id, relay, finished, outcome)
        with anyio.move_on_after(self.after_seconds):
            await finished.wait()
        if finished.is_set():
            if "error" in outcome:
                raise outcome["error"]
            report: IngestReport = outcome["report"]
            return report
        waiting[0] = None
        log.info("ingest continues as a job", job=job_id, path=path)
        return await self.get(tenant, job_id)

    async def get(self, tenant: str, job_id: str) -> Job:
        try:
            key = uuid.UUID(job_id)
        except (ValueError, AttributeError, TypeError):
            raise NotFoundError(f"no ingest job with id {job_id!r}: ids look like 3f2b...-... (a UUID)") from None
        async with self.store._writing() as conn:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM ingest_jobs WHERE id = %s AND tenant = %s", (key, tenant))
            row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"no ingest job with id {job_id!r}")
        return _job(row)

    async def _run(
        self, job_id: str, progress: ProgressCallback | None, finished: anyio.Event | None, outcome: dict[str, Any]
    ) -> None:
        try:
            job = await self.get_any(job_id)
        except RagError as exc:
            log.warning("ingest job could not be read; not run", job=job_id, error=str(exc)[:300])
            if finished is not None:
                outcome["error"] = exc
                finished.set()
            return
        self._mine.add(job_id)

        async def record(done: int, total: int | None, message: str) -> None:
            await self._update(job_id, "done = %s, total = %s, message = %s", (done, total, message[:500]))
            if progress is not None:
                await progress(done, total, message)

        try:
            report = await self.service.ingest_path(
                job.tenant,
                job.path,
                collection=job.collection,
                include=job.include,
                exclude=job.exclude,
                prune=job.prune,
                progress=record,
            )
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                try:
                    await self._update(job_id, "status = 'interrupted', owner = NULL", ())
                    log.info("ingest job interrupted; the next server start resumes it", job=job_id)
                except RagError as exc:  # its heartbeat stops: a server resumes it once it is stale
                    log.warning("could not mark an ingest job interrupted", job=job_id, error=str(exc)[:300])
            raise
        except RagError as exc:
            outcome["error"] = exc
            await self._fail(job_id, describe(exc).message)
            log.info("ingest job failed", job=job_id, error=str(exc)[:300])
        except Exception as exc:  # a bug must not stop the other jobs or the heartbeat
            log.exception("ingest job crashed", job=job_id)
            outcome["error"] = RagError(f"the ingest failed unexpectedly ({type(exc).__name__}); see the server log")
            await self._fail(job_id, str(outcome["error"]))
        else:
            outcome["report"] = report
            try:
                await self._update(
                    job_id,
                    "status = 'done', report = %s, done = %s, message = 'done'",
                    (json.dumps(report_json(report)), report.processed),
                )
            except RagError as exc:  # the ingest itself is committed; running it again finds it unchanged
                log.warning("could not record an ingest job's report", job=job_id, error=str(exc)[:300])
            log.info("ingest job done", job=job_id, added=report.added, updated=report.updated, removed=report.removed)
        finally:
            self._mine.discard(job_id)
            if finished is not None:
                finished.set()

    async def _fail(self, job_id: str, reason: str) -> None:
        try:
            await self._update(job_id, "status = 'failed', error = %s", (reason[:2000],))
        except RagError as exc:  # the heartbeat stops for it: another server resumes it later
            log.warning("could not record an ingest job's failure", job=job_id, error=str(exc)[:300])

    async def get_any(self, job_id: str) -> Job:
        async with self.store._writing() as conn:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM ingest_jobs WHERE id = %s", (uuid.UUID(job_id),))
            row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"no ingest job with id {job_id!r}")
        return _job(row)

    async def _update(self, job_id: str, assignments: str, params: tuple[Any, ...]) -> None:
        async with self.store._writing() as conn:
            await conn.execute(
                f"UPDATE ingest_jobs SET {assignments}, updated_at = now() WHERE id = %s",
                (*params, uuid.UUID(job_id)),
            )

    async def _keep_alive(self) -> None:
        """Heartbeat this process's jobs, and take over jobs other processes left, until cancelled."""
        while True:
            try:
                if self._mine:
                    async with self.store._writing() as conn:
                        await conn.execute(
                            "UPDATE ingest_jobs SET updated_at = now() WHERE id = ANY(%s) AND status = 'running'",
                            ([uuid.UUID(j) for j in self._mine],),
                        )
                await self._resume_orphans()
            except RagError as exc:
                log.warning("ingest jobs: heartbeat or resume failed; retrying", error=str(exc)[:300])
            await anyio.sleep(HEARTBEAT_SECONDS)

    async def _resume_orphans(self) -> None:
        async with self.store._writing() as conn:
            await conn.execute(
                "DELETE FROM ingest_jobs WHERE status IN ('done', 'failed')"
                " AND updated_at < now() - make_interval(days => %s)",
                (KEEP_FINISHED_DAYS,),
            )
            cur = await conn.execute(
                "UPDATE ingest_jobs SET status = 'running', owner = %s, attempts = attempts + 1, updated_at = now()"
                " WHERE id IN (SELECT id FROM ingest_jobs WHERE status = 'interrupted'"
                "   OR (status = 'running' AND updated_at < now() - make_interval(secs => %s))"
                "   FOR UPDATE SKIP LOCKED)"
                " RETURNING id, attempts",
                (self.owner, STALE_SECONDS),
            )
            claimed = [(str(row[0]), int(row[1])) for row in await cur.fetchall()]
        for job_id, attempts in claimed:
            if attempts > MAX_ATTEMPTS:
                await self._update(job_id, "status = 'failed', error = %s", (f"gave up after {MAX_ATTEMPTS} attempts",))
                continue
            log.info("resuming an ingest job left by a stopped server", job=job_id, attempt=attempts)
            if self._tg is not None:
                self._tg.start_soon(self._run, job_id, None, None, {})
