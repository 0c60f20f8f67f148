"""Reading, listing and deleting documents and collections, and the store's counts."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import Context
from pydantic import Field

from ..schemas import (
    ChunkOutput,
    ChunksOutput,
    CollectionList,
    CollectionSummary,
    DeletedCollection,
    DeletedDocument,
    DocumentList,
    DocumentOutput,
    DocumentSummary,
    FetchOutput,
    StatsOutput,
)
from ..service import MAX_NEIGHBOURS
from .base import DELETE, READ, Collection, current, tool

DocumentId = Annotated[str, Field(description="The document's id (from search or list_documents).", max_length=64)]


@tool("read", READ, "Read a document")
async def get_document(
    document_id: DocumentId,
    ctx: Context[Any, Any],
    include_text: Annotated[bool, Field(description="Return the full text as well as the metadata.")] = True,
    max_chars: Annotated[
        int, Field(ge=1, le=1_000_000, description="Cut the text after this many characters.")
    ] = 100_000,
) -> DocumentOutput:
    """Read one stored document: its title, source, metadata and (by default) its full text."""
    call = current()
    info = await call.service.get_document(call.tenant, document_id)
    text = info.content if include_text else None
    truncated = text is not None and len(text) > max_chars
    return DocumentOutput(
        **DocumentSummary.of(info).model_dump(), text=text[:max_chars] if text else text, truncated=truncated
    )


@tool("read", READ, "Fetch a document")
async def fetch(
    id: Annotated[str, Field(description="A document id: the document_id (or id) of a search result.", max_length=64)],
    ctx: Context[Any, Any],
) -> FetchOutput:
    """Fetch one whole document by id: title, full text, source URL and metadata.

    The `fetch` half of the search/fetch pair ChatGPT connectors and deep research use; `get_document`
    offers the same with more options (metadata only, a length limit)."""
    call = current()
    return FetchOutput.of(await call.service.get_document(call.tenant, id))


@tool("read", READ, "Read chunks around a passage")
async def get_chunks(
    document_id: DocumentId,
    around: Annotated[int, Field(ge=0, description="The chunk position to read around (a search result's chunk).")],
    ctx: Context[Any, Any],
    before: Annotated[int, Field(ge=0, le=MAX_NEIGHBOURS, description="Chunks before it (0-10).")] = 1,
    after: Annotated[int, Field(ge=0, le=MAX_NEIGHBOURS, description="Chunks after it (0-10).")] = 1,
) -> ChunksOutput:
    """Read the chunks around one chunk of a document: the context of a search result, in document order."""
    call = current()
    info, chunks = await call.service.get_chunks(call.tenant, document_id, around=around, before=before, after=after)
    return ChunksOutput(
        document_id=info.id,
        title=info.title,
        source_uri=info.source_uri,
        chunks=info.chunk_count,
        returned=[ChunkOutput.model_validate(c, from_attributes=True) for c in chunks],
    )


@tool("read", READ, "List documents")
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
    call = current()
    page = await call.service.list_documents(
        call.tenant, collection=collection, source_prefix=source_prefix, limit=limit, cursor=cursor
    )
    return DocumentList(documents=[DocumentSummary.of(d) for d in page.documents], next_cursor=page.next_cursor)


@tool("read", READ, "List collections")
async def list_collections(ctx: Context[Any, Any]) -> CollectionList:
    """List the collections (namespaces of documents) with their document and chunk counts."""
    call = current()
    return CollectionList(
        collections=[CollectionSummary.of(c) for c in await call.service.list_collections(call.tenant)]
    )


@tool("read", READ, "Store statistics")
async def stats(ctx: Context[Any, Any]) -> StatsOutput:
    """Counts of collections, documents, chunks and index points, and the index's pending changes."""
    call = current()
    store_stats, points, pending = await call.service.stats(call.tenant)
    return StatsOutput(
        collections=store_stats.collections,
        documents=store_stats.documents,
        chunks=store_stats.chunks,
        index_points=points,
        pending_changes=pending,
        region=call.runtime.settings.region,
    )


@tool("write", DELETE, "Delete a document")
async def delete_document(
    document_id: Annotated[str, Field(description="The id of the document to delete.", max_length=64)],
    ctx: Context[Any, Any],
) -> DeletedDocument:
    """Delete one document with all its chunks; it disappears from search at once."""
    call = current()
    info = await call.service.delete_document(call.tenant, document_id)
    return DeletedDocument(deleted=info.id, source_uri=info.source_uri, collection=info.collection)


@tool("write", DELETE, "Delete a collection")
async def delete_collection(
    collection: Annotated[
        str, Field(description="The collection to delete, with every document in it.", min_length=1, max_length=64)
    ],
    ctx: Context[Any, Any],
) -> DeletedCollection:
    """Delete a whole collection and every document in it. This cannot be undone."""
    call = current()
    count = await call.service.delete_collection(call.tenant, collection)
    return DeletedCollection(deleted=collection, documents=count)
