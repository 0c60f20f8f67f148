"""The MCP surface: tools, resources and a prompt, each a thin call into the service.

Domain errors become ``ToolError``s with the same message (the only kind of error text a
client sees). Every call is logged as one structured line and counted in the metrics.
"""

import dataclasses
import functools
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from . import __version__, metrics
from .auth import Principal, local_principal, principal_from_scope
from .errors import AccessDeniedError, InvalidInputError, NotFoundError, RagError, UnavailableError, printable
from .extract import SourceDocument, extract_bytes, read_file, walk
from .index.base import IndexError_
from .logging import get_logger
from .runtime import Runtime
from .schemas import (
    CollectionList,
    CollectionSummary,
    DeletedCollection,
    DeletedDocument,
    DocumentList,
    DocumentOutput,
    DocumentSummary,
    IngestOutput,
    SearchHit,
    SearchOutput,
    StatsOutput,
)
from .service import MAX_TOP_K, SearchFilters, SourceFailure
from .urlfetch import UrlPolicy, fetch

log = get_logger("mcp_rag.tools")

P = ParamSpec("P")
R = TypeVar("R")

INSTRUCTIONS = """\
This server holds a searchable library of documents (retrieval-augmented generation).
Use `search` first whenever a question may be answered by the stored documents, and cite the
source_uri / title of the chunks you use. Use `list_collections` and `list_documents` to see what
is stored, `get_document` to read one in full, and the ingest_* tools to add documents
(re-ingesting the same source replaces it; identical content is reported unchanged)."""

MetadataValue = str | int | float | bool
MetadataFilter = dict[str, MetadataValue | list[MetadataValue]]

Collection = Annotated[
    str | None,
    Field(
        description="Collection (namespace) to use; omit for 'default'. 1-64 letters, digits, '_', '-', '.'.",
        max_length=64,
    ),
]

READ = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
WRITE_WEB = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=True)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)


_caller: ContextVar[Principal | None] = ContextVar("mcp_rag_caller", default=None)


class CallerMiddleware:
    """Resolves who sent each MCP message, once, for every tool, resource and prompt it reaches.

    HTTP messages carry the principal the bearer-auth middleware left in the ASGI scope;
    messages without an HTTP request (stdio, in-memory) come from the trusted local user.
    """

    def __init__(self, default_tenant: str, tools: set[str] | None = None) -> None:
        self._local = local_principal(default_tenant)
        self._tools = tools if tools is not None else set()

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        request = getattr(ctx, "request", None)
        principal = self._local if request is None else principal_from_scope(getattr(request, "scope", {}))
        token = _caller.set(principal)
        is_call = getattr(ctx, "method", None) == "tools/call"
        name = (getattr(ctx, "params", None) or {}).get("name") if is_call else None
        state = _ToolCallState()
        state_token = _tool_call.set(state)
        started = time.perf_counter()
        try:
            result = await call_next(ctx)
        finally:
            _tool_call.reset(state_token)
            _caller.reset(token)
        if isinstance(name, str) and name in self._tools and not state.reached and _is_error(result):
            # Rejected before the tool ran (invalid arguments): still one log line and one count.
            seconds = time.perf_counter() - started
            metrics.TOOL_CALLS.labels(name, "invalid").inc()
            metrics.TOOL_LATENCY.labels(name).observe(seconds)
            log.info(
                "tool call",
                tool=name,
                outcome="invalid",
                duration_ms=round(seconds * 1000, 2),
                request_id=getattr(ctx, "request_id", None) or "-",
                tenant=principal.tenant if principal is not None else "-",
            )
        return result


class _ToolCallState:
    """Set by the tool wrapper once a call reaches it (after argument validation)."""

    def __init__(self) -> None:
        self.reached = False


_tool_call: ContextVar[_ToolCallState | None] = ContextVar("mcp_rag_tool_call", default=None)


def _is_error(result: Any) -> bool:
    if isinstance(result, dict):
        return bool(result.get("isError") or result.get("is_error"))
    return bool(getattr(result, "is_error", False))


class InFlight:
    """How many tool calls are running now: the HTTP server lets them finish before it stops."""

    def __init__(self) -> None:
        self.count = 0


def current_principal() -> Principal:
    principal = _caller.get()
    if principal is None:
        raise ToolError("not authenticated: send Authorization: Bearer <API key>")
    return principal


def build_server(
    get_runtime: Callable[[], Runtime],
    *,
    read_only: bool = False,
    default_tenant: str = "default",
    lifespan: Any = None,
    in_flight: InFlight | None = None,
) -> MCPServer[Any]:
    """The MCP server. ``get_runtime`` returns the process-wide runtime (started elsewhere);
    ``in_flight`` counts the tool calls running."""
    calls = in_flight if in_flight is not None else InFlight()
    registered: set[str] = set()
    mcp: MCPServer[Any] = MCPServer(
        name="mcp-rag",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        middleware=[CallerMiddleware(default_tenant, registered)],
    )

    def tool(
        annotations: ToolAnnotations, scope: Literal["read", "write"]
    ) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
        """Register a tool with error translation, scope check, metrics and one log line per call."""

        def decorate(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
            name = fn.__name__

            @functools.wraps(fn)
            async def call(*args: Any, **kwargs: Any) -> R:
                ctx: Context[Any, Any] | None = kwargs.get("ctx")
                started = time.perf_counter()
                outcome = "ok"
                request_id = ctx.request_id if ctx is not None else uuid.uuid4().hex
                tenant = "-"
                state = _tool_call.get()
                if state is not None:
                    state.reached = True
                calls.count += 1
                try:
                    principal = current_principal()
                    tenant = principal.tenant
                    principal.require(scope)
                    runtime = get_runtime()
                    if runtime.draining:
                        raise UnavailableError("the server is shutting down; retry (another replica will answer)")
                    return await fn(*args, **kwargs)
                except ToolError:
                    outcome = "error"
                    raise
                except AccessDeniedError as exc:
                    outcome = "denied"
                    raise ToolError(printable(str(exc))) from exc
                except RagError as exc:
                    outcome = "error"
                    raise ToolError(printable(str(exc))) from exc
                except IndexError_ as exc:
                    outcome = "unavailable"
                    raise ToolError(f"the search index is unavailable ({exc}); retry shortly") from exc
                except anyio.get_cancelled_exc_class():
                    outcome = "cancelled"
                    raise
                except Exception:
                    outcome = "crash"
                    log.exception("tool crashed", tool=name, request_id=request_id, tenant=tenant)
                    raise
                finally:
                    calls.count -= 1
                    seconds = time.perf_counter() - started
                    metrics.TOOL_CALLS.labels(name, outcome).inc()
                    metrics.TOOL_LATENCY.labels(name).observe(seconds)
                    log.info(
                        "tool call",
                        tool=name,
                        outcome=outcome,
                        duration_ms=round(seconds * 1000, 2),
                        request_id=request_id,
                        tenant=tenant,
                    )

            call.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
            mcp.tool(name=name, description=inspect.cleandoc(fn.__doc__ or ""), annotations=annotations)(call)
            registered.add(name)
            return call

        return decorate

    def caller(ctx: Context[Any, Any] | None = None) -> tuple[Runtime, str]:
        return get_runtime(), current_principal().tenant

    # --- read tools ----------------------------------------------------------------------

    @tool(READ, "read")
    async def search(
        query: Annotated[
            str, Field(description="What to look for: a question or keywords.", min_length=1, max_length=4000)
        ],
        ctx: Context[Any, Any],
        collection: Collection = None,
        mode: Annotated[
            Literal["hybrid", "dense", "lexical"],
            Field(
                description="hybrid (default) fuses meaning and keywords; dense = meaning only; lexical = exact words "
                "(BM25), best for names, codes and rare terms."
            ),
        ] = "hybrid",
        top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K, description="How many chunks to return (1-50).")] = 5,
        document_ids: Annotated[
            list[str] | None, Field(max_length=1000, description="Only search these documents.")
        ] = None,
        source_prefix: Annotated[
            str | None,
            Field(
                max_length=4096,
                description=(
                    "Only documents whose source URI starts with this, e.g. 'file:///docs/' or 'https://example.com/'."
                ),
            ),
        ] = None,
        metadata: Annotated[
            MetadataFilter | None,
            Field(
                description=(
                    "Only documents whose metadata matches every key: a value for equality, a list for any-of."
                )
            ),
        ] = None,
    ) -> SearchOutput:
        """Search the stored documents and return the most relevant chunks with their sources.

        Use this before answering any question the stored documents may cover; cite source_uri/title.
        Each result is a passage (chunk) of a document with its position and character offsets."""
        runtime, tenant = caller(ctx)
        results = await runtime.service.search(
            tenant,
            query,
            mode=mode,
            top_k=top_k,
            filters=SearchFilters(
                collection=collection, document_ids=document_ids, source_prefix=source_prefix, metadata=metadata or {}
            ),
        )
        return SearchOutput(query=query, mode=mode, results=[SearchHit.of(r) for r in results])

    @tool(READ, "read")
    async def get_document(
        document_id: Annotated[
            str, Field(description="The document's id (from search or list_documents).", max_length=64)
        ],
        ctx: Context[Any, Any],
        include_text: Annotated[bool, Field(description="Return the full text as well as the metadata.")] = True,
        max_chars: Annotated[
            int, Field(ge=1, le=1_000_000, description="Cut the text after this many characters.")
        ] = 100_000,
    ) -> DocumentOutput:
        """Read one stored document: its title, source, metadata and (by default) its full text."""
        runtime, tenant = caller(ctx)
        info = await runtime.service.get_document(tenant, document_id)
        text = info.content if include_text else None
        truncated = text is not None and len(text) > max_chars
        return DocumentOutput(
            **DocumentSummary.of(info).model_dump(), text=text[:max_chars] if text else text, truncated=truncated
        )

    @tool(READ, "read")
    async def list_documents(
        ctx: Context[Any, Any],
        collection: Collection = None,
        source_prefix: Annotated[
            str | None, Field(max_length=4096, description="Only documents whose source URI starts with this.")
        ] = None,
        limit: Annotated[int, Field(ge=1, le=100, description="Page size (1-100).")] = 20,
        cursor: Annotated[str | None, Field(max_length=8192, description="next_cursor from the previous page.")] = None,
    ) -> DocumentList:
        """List stored documents (metadata only), ordered by source URI, a page at a time."""
        runtime, tenant = caller(ctx)
        page = await runtime.service.list_documents(
            tenant, collection=collection, source_prefix=source_prefix, limit=limit, cursor=cursor
        )
        return DocumentList(documents=[DocumentSummary.of(d) for d in page.documents], next_cursor=page.next_cursor)

    @tool(READ, "read")
    async def list_collections(ctx: Context[Any, Any]) -> CollectionList:
        """List the collections (namespaces of documents) with their document and chunk counts."""
        runtime, tenant = caller(ctx)
        return CollectionList(
            collections=[CollectionSummary.of(c) for c in await runtime.service.list_collections(tenant)]
        )

    @tool(READ, "read")
    async def stats(ctx: Context[Any, Any]) -> StatsOutput:
        """Counts of collections, documents, chunks and index points, and the index's pending changes."""
        runtime, tenant = caller(ctx)
        store_stats, points, pending = await runtime.service.stats(tenant)
        return StatsOutput(
            collections=store_stats.collections,
            documents=store_stats.documents,
            chunks=store_stats.chunks,
            index_points=points,
            pending_changes=pending,
            region=runtime.settings.region,
        )

    if not read_only:
        register_write_tools(mcp, tool, caller)

    # --- resources and prompt --------------------------------------------------------------

    @mcp.resource(
        "rag://collections",
        name="collections",
        mime_type="application/json",
        description="The caller's collections with document and chunk counts.",
    )
    async def collections_resource() -> str:
        runtime, tenant = caller()
        try:
            current_principal().require("read")  # resources are reads: same scope as the read tools
            listed = await runtime.service.list_collections(tenant)
        except RagError as exc:  # e.g. the database is down: say so (anything else reads "Error reading resource")
            raise ResourceError(str(exc)) from exc
        return CollectionList(collections=[CollectionSummary.of(c) for c in listed]).model_dump_json(indent=2)

    @mcp.resource(
        "rag://documents/{document_id}",
        name="document",
        mime_type="application/json",
        description="One document: metadata and full text.",
    )
    async def document_resource(document_id: str, ctx: Context[Any, Any]) -> str:
        runtime, tenant = caller(ctx)
        try:
            current_principal().require("read")
            info = await runtime.service.get_document(tenant, document_id)
        except NotFoundError as exc:
            raise ResourceNotFoundError(str(exc)) from exc
        except RagError as exc:
            raise ResourceError(str(exc)) from exc
        return DocumentOutput(
            **DocumentSummary.of(info).model_dump(), text=info.content, truncated=False
        ).model_dump_json(indent=2)

    @mcp.prompt(name="answer_with_citations", description="Answer a question from the stored documents, citing them.")
    def answer_with_citations(
        question: Annotated[str, Field(description="The question to answer.")],
        collection: Annotated[str | None, Field(description="Restrict the search to this collection.")] = None,
    ) -> str:
        where = f" in the collection {collection!r}" if collection else ""
        return (
            f"Answer the question below using only the documents stored in the mcp-rag server{where}.\n\n"
            f"1. Call the `search` tool{' with collection=' + repr(collection) if collection else ''} with the "
            'question (try `mode="lexical"` too for names, codes or rare terms; rephrase and search again if the '
            "first results miss).\n"
            "2. Read the returned chunks; call `get_document` when you need more context around a chunk.\n"
            "3. Answer concisely. After every claim, cite its source as [title](source_uri), adding the heading path "
            "when there is one. Quote exact wording for key facts.\n"
            "4. If the documents do not contain the answer, say so plainly instead of guessing.\n\n"
            f"Question: {question}"
        )

    return mcp


ToolDecorator = Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]


def register_write_tools(
    mcp: MCPServer[Any],
    tool: Callable[[ToolAnnotations, Literal["read", "write"]], ToolDecorator],
    caller: Callable[..., tuple[Runtime, str]],
) -> None:
    Metadata = Annotated[
        dict[str, MetadataValue | list[MetadataValue]] | None,
        Field(description="Flat key -> value (or list of values) metadata to filter on later."),
    ]

    async def progress_reporter(ctx: Context[Any, Any]) -> Callable[[int, int | None, str], Awaitable[None]]:
        async def report(done: int, total: int | None, message: str) -> None:
            await ctx.report_progress(done, total, message=message)

        return report

    @tool(WRITE, "write")
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
        runtime, tenant = caller(ctx)
        outcome = await runtime.service.ingest_text(
            tenant, text, collection=collection, title=title, source_uri=source_uri, metadata=metadata or {}
        )
        from .service import IngestReport

        report = IngestReport(documents=[outcome], chunks=outcome.chunks, **{outcome.status: 1})  # type: ignore[arg-type]
        return IngestOutput.of(report)

    @tool(WRITE, "write")
    async def ingest_file(
        path: Annotated[
            str,
            Field(
                description="A file or directory on the server, under an allowed root.", min_length=1, max_length=4096
            ),
        ],
        ctx: Context[Any, Any],
        collection: Collection = None,
        include: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=50, description="For directories: only files matching one of these globs, e.g. ['*.md']."),
        ] = None,
        exclude: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=50, description="For directories: skip files matching these globs."),
        ] = None,
    ) -> IngestOutput:
        """Ingest a server-side file (.txt, .md, .html, .pdf, .jsonl corpus) or a whole directory.

        Only paths under the server's configured allowed roots are accepted. Sends progress
        notifications per batch; unchanged files are skipped cheaply."""
        runtime, tenant = caller(ctx)
        target = resolve_allowed_path(path, runtime.settings.allowed_roots)
        max_bytes = runtime.settings.max_document_bytes
        files = await anyio.to_thread.run_sync(lambda: list(walk([target], include or (), exclude or ())))
        if not files:
            raise InvalidInputError(f"{path}: no ingestible files found (check include/exclude)")
        for file in files:
            resolve_allowed_path(str(file), runtime.settings.allowed_roots)

        def sources() -> Any:
            for file in files:
                try:
                    yield from read_file(file, max_bytes)
                except RagError as exc:
                    if target.is_file():
                        raise
                    yield SourceFailure(printable(str(file)), printable(str(exc)))

        if target.is_file():
            docs: list[SourceDocument | SourceFailure] = list(await anyio.to_thread.run_sync(lambda: list(sources())))
            report = await runtime.service.ingest(
                tenant, collection, docs, total=len(docs), progress=await progress_reporter(ctx), raise_on_failure=True
            )
        else:
            report = await runtime.service.ingest(
                tenant, collection, sources(), total=len(files), progress=await progress_reporter(ctx)
            )
        return IngestOutput.of(report)

    @tool(WRITE_WEB, "write")
    async def ingest_url(
        url: Annotated[
            str,
            Field(
                description="An http(s) URL of an HTML page, text, markdown or PDF file.", min_length=1, max_length=4096
            ),
        ],
        ctx: Context[Any, Any],
        collection: Collection = None,
        title: Annotated[str | None, Field(max_length=1000, description="Override the page's own title.")] = None,
        metadata: Metadata = None,
    ) -> IngestOutput:
        """Fetch a web page or file and ingest it; the URL is its identity (ingest again to refresh).

        Private, loopback and link-local addresses are refused; size, time and content types are limited."""
        runtime, tenant = caller(ctx)
        settings = runtime.settings
        fetched = await fetch(
            url, UrlPolicy(settings.url_allowlist), max_bytes=settings.url_max_bytes, timeout=settings.url_fetch_timeout
        )
        doc = await anyio.to_thread.run_sync(
            lambda: extract_bytes(fetched.data, kind=fetched.kind, source_uri=url, max_bytes=settings.url_max_bytes)
        )
        doc = dataclasses.replace(doc, title=title or doc.title, metadata={**doc.metadata, **(metadata or {})})
        report = await runtime.service.ingest(tenant, collection, [doc], raise_on_failure=True)
        return IngestOutput.of(report)

    @tool(DESTRUCTIVE, "write")
    async def delete_document(
        document_id: Annotated[str, Field(description="The id of the document to delete.", max_length=64)],
        ctx: Context[Any, Any],
    ) -> DeletedDocument:
        """Delete one document with all its chunks; it disappears from search at once."""
        runtime, tenant = caller(ctx)
        info = await runtime.service.delete_document(tenant, document_id)
        return DeletedDocument(deleted=info.id, source_uri=info.source_uri, collection=info.collection)

    @tool(DESTRUCTIVE, "write")
    async def delete_collection(
        collection: Annotated[
            str, Field(description="The collection to delete, with every document in it.", min_length=1, max_length=64)
        ],
        ctx: Context[Any, Any],
    ) -> DeletedCollection:
        """Delete a whole collection and every document in it. This cannot be undone."""
        runtime, tenant = caller(ctx)
        count = await runtime.service.delete_collection(tenant, collection)
        return DeletedCollection(deleted=collection, documents=count)


def resolve_allowed_path(path: str, roots: list[Path]) -> Path:
    """The real path of ``path`` if it lies under an allowed root (after resolving symlinks and ``..``)."""
    if not roots:
        raise AccessDeniedError("ingest_file is disabled: the server has no allowed roots (MCP_RAG_ALLOWED_ROOTS)")
    if "\x00" in path:
        raise InvalidInputError("the path contains a NUL character")
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFoundError(f"{path}: no such file or directory") from None
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise AccessDeniedError(
            f"{path}: outside the allowed roots ({', '.join(str(r) for r in roots)}); "
            "symlinks and '..' are resolved first"
        )
    return resolved
