"""The ``search`` tool."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from pydantic import Field

from ..schemas import SearchHit, SearchOutput
from ..service import MAX_PASSAGES_PER_DOCUMENT, SearchFilters
from ..types import MAX_QUERY_CHARS, MAX_TOP_K, MetadataFilter
from .base import READ, Collection, current, tool


@tool("read", READ, "Search documents")
async def search(
    query: Annotated[
        str, Field(description="What to look for: a question or keywords.", min_length=1, max_length=MAX_QUERY_CHARS)
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
    top_k: Annotated[
        int, Field(ge=1, le=MAX_TOP_K, description="How many documents (or chunks) to return (1-50).")
    ] = 5,
    document_ids: Annotated[
        list[str] | None, Field(max_length=1000, description="Only search these documents.")
    ] = None,
    source_prefix: Annotated[
        str | None,
        Field(
            max_length=4096,
            description="Only documents whose source URI starts with this, e.g. 'file:///docs/' or 'https://example.com/'.",
        ),
    ] = None,
    metadata: Annotated[
        MetadataFilter | None,
        Field(description="Only documents whose metadata matches every key: a value for equality, a list for any-of."),
    ] = None,
    passages_per_document: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_PASSAGES_PER_DOCUMENT,
            description="Matching chunks to show per document (1-5): the best one, then the next best as passages.",
        ),
    ] = 1,
    raw_chunks: Annotated[
        bool, Field(description="Return the top_k best chunks as they rank, several from one document if so.")
    ] = False,
) -> SearchOutput:
    """Search the stored documents: the top_k most relevant documents, each with its best matching passage.

    Use this before answering any question the stored documents may cover, and cite title and source.
    Each result names its document (read more with get_chunks around its chunk, or get_document)."""
    call = current()
    answer = await call.service.search_answer(
        call.tenant,
        query,
        mode=mode,
        top_k=top_k,
        filters=SearchFilters(
            collection=collection, document_ids=document_ids, source_prefix=source_prefix, metadata=metadata or {}
        ),
        per_document=None if raw_chunks else passages_per_document,
    )
    return SearchOutput(
        query=query,
        mode=mode,
        results=[SearchHit.of(r) for r in answer.results],
        reranked=answer.reranked,
        notice=answer.notice,
    )
