"""Adding documents: inline text, server-side files and directories, and URLs."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import Context
from pydantic import Field

from ..errors import NotFoundError
from ..jobs import Job
from ..schemas import IngestJobOutput, IngestOutput
from ..service import IngestReport, ProgressCallback
from ..types import MetadataFilter
from .base import READ, REPLACE, REPLACE_WEB, Collection, current, tool

Metadata = Annotated[
    MetadataFilter | None, Field(description="Flat key -> value (or list of values) metadata to filter on later.")
]
Globs = Annotated[list[Annotated[str, Field(max_length=256)]] | None, Field(max_length=50)]


def progress_of(ctx: Context[Any, Any]) -> ProgressCallback:
    """Progress notifications to the client (dropped by the SDK when it has no progress token)."""

    async def report(done: int, total: int | None, message: str) -> None:
        await ctx.report_progress(done, total, message=message)

    return report


@tool("write", REPLACE, "Add a document from text")
async def ingest_text(
    text: Annotated[str, Field(description="The document's content (plain text or markdown).", min_length=1)],
    ctx: Context[Any, Any],
    title: Annotated[str, Field(max_length=1000, description="A title shown in search results.")] = "",
    collection: Collection = None,
    source_uri: Annotated[
        str | None,
        Field(
            max_length=4096,
            description=(
                "A stable identity for the document (e.g. a URL or path). Ingesting again with the same source_uri "
                "replaces the document. Omit to identify the document by its content."
            ),
        ),
    ] = None,
    metadata: Metadata = None,
) -> IngestOutput:
    """Add (or replace) one document from text you provide. Markdown headings are kept for citations."""
    call = current()
    outcome = await call.service.ingest_text(
        call.tenant, text, collection=collection, title=title, source_uri=source_uri, metadata=metadata or {}
    )
    return IngestOutput.of(IngestReport.of_one(outcome))


@tool("write", REPLACE, "Add files or a folder")
async def ingest_file(
    path: Annotated[
        str,
        Field(description="A file or directory on the server, under an allowed root.", min_length=1, max_length=4096),
    ],
    ctx: Context[Any, Any],
    collection: Collection = None,
    include: Annotated[
        Globs, Field(description="For directories: only files matching one of these globs, e.g. ['*.md'].")
    ] = None,
    exclude: Annotated[Globs, Field(description="For directories: skip files matching these globs.")] = None,
    prune: Annotated[
        bool,
        Field(
            description=(
                "For directories: also delete this collection's documents read from files under the directory "
                "that no longer exist (keeps the collection in step with the folder)."
            )
        ),
    ] = False,
) -> IngestOutput:
    """Ingest a server-side file (.txt, .md, .html, .pdf, .docx, .pptx, .xlsx, .odt, .epub, .rtf, .eml,
    .jsonl corpus) or a whole directory.

    Only paths under the server's configured allowed roots are accepted. Sends progress
    notifications per batch; files whose size and modification time are unchanged are not read again.
    A long ingest returns status "running" with a job_id and goes on in the background: follow it with
    ingest_status."""
    call = current()
    jobs = call.runtime.jobs
    if jobs is None:
        report: IngestReport | Job = await call.service.ingest_path(
            call.tenant,
            path,
            collection=collection,
            include=include or (),
            exclude=exclude or (),
            prune=prune,
            progress=progress_of(ctx),
        )
    else:
        report = await jobs.ingest_path(
            call.tenant,
            path,
            collection=collection,
            include=include or (),
            exclude=exclude or (),
            prune=prune,
            progress=progress_of(ctx),
        )
    if isinstance(report, Job):
        return IngestOutput.running(report.id)
    return IngestOutput.of(report)


@tool("read", READ, "Follow a background ingest")
async def ingest_status(
    job_id: Annotated[str, Field(description="The job_id an ingest_file call returned.", min_length=1, max_length=100)],
) -> IngestJobOutput:
    """The status of a background ingest job: running (with progress), interrupted (its server stopped; the
    next start resumes it), done (with its report) or failed (with the reason)."""
    call = current()
    if call.runtime.jobs is None:
        raise NotFoundError(f"no ingest job with id {job_id!r}: this server runs no background ingests")
    job = await call.runtime.jobs.get(call.tenant, job_id)
    return IngestJobOutput(
        job_id=job.id,
        status=job.status,  # type: ignore[arg-type]
        path=job.path,
        collection=job.collection,
        done=job.done,
        total=job.total,
        message=job.message,
        attempts=job.attempts,
        report=IngestOutput.model_validate(job.report) if job.report else None,
        error=job.error,
    )


@tool("write", REPLACE_WEB, "Add a web page")
async def ingest_url(
    url: Annotated[
        str,
        Field(description="An http(s) URL of an HTML page, text, markdown or PDF file.", min_length=1, max_length=4096),
    ],
    ctx: Context[Any, Any],
    collection: Collection = None,
    title: Annotated[str | None, Field(max_length=1000, description="Override the page's own title.")] = None,
    metadata: Metadata = None,
) -> IngestOutput:
    """Fetch a web page or file and ingest it; the URL is its identity (ingest again to refresh).

    Private, loopback and link-local addresses are refused; size, time and content types are limited."""
    call = current()
    report = await call.service.ingest_url(call.tenant, url, collection=collection, title=title, metadata=metadata)
    return IngestOutput.of(report)
