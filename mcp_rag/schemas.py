"""The structured outputs of the MCP tools (their JSON schemas are what clients see)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from .service import DocumentOutcome, IngestReport, SearchResult
from .store.postgres import CollectionInfo, DocumentInfo


class SearchHit(BaseModel):
    id: str = Field(description="The document's id, for `fetch` (the same as document_id).")
    document_id: str
    title: str
    source_uri: str
    collection: str
    text: str = Field(description="The chunk's text, exactly as it appears in the document.")
    score: float = Field(description="Relevance; comparable only within one result list.")
    position: int = Field(description="Chunk number within the document, from 0.")
    start_char: int = Field(description="Offset of the chunk's first character in the document text.")
    end_char: int = Field(description="Offset just past the chunk's last character.")
    heading_path: list[str] = Field(description="Markdown headings enclosing the chunk, outermost first.")
    metadata: dict[str, Any]
    url: str = Field(description="The document's source URI (the same as source_uri).")

    @classmethod
    def of(cls, r: SearchResult) -> SearchHit:
        return cls(
            id=r.document_id,
            url=r.source_uri,
            document_id=r.document_id,
            title=r.title,
            source_uri=r.source_uri,
            collection=r.collection,
            text=r.text,
            score=r.score,
            position=r.position,
            start_char=r.start_char,
            end_char=r.end_char,
            heading_path=r.heading_path,
            metadata=r.metadata,
        )


class FetchOutput(BaseModel):
    """One whole document, in the shape ChatGPT connectors and deep research expect of ``fetch``."""

    id: str
    title: str
    text: str
    url: str = Field(description="The document's source URI (what to cite).")
    metadata: dict[str, Any] = Field(description="The document's metadata plus its collection.")

    @classmethod
    def of(cls, info: DocumentInfo) -> FetchOutput:
        return cls(
            id=info.id,
            title=info.title or info.source_uri,
            text=info.content or "",
            url=info.source_uri,
            metadata={**info.metadata, "collection": info.collection},
        )


class SearchOutput(BaseModel):
    query: str
    mode: str
    results: list[SearchHit]


class IngestedDocument(BaseModel):
    source_uri: str
    status: Literal["added", "updated", "unchanged"]
    document_id: str | None = Field(description="Null when unchanged (the document already had this content).")
    chunks: int

    @classmethod
    def of(cls, d: DocumentOutcome) -> IngestedDocument:
        return cls(source_uri=d.source_uri, status=d.status, document_id=d.document_id, chunks=d.chunks)


class FailedSource(BaseModel):
    source: str
    reason: str


class IngestOutput(BaseModel):
    added: int
    updated: int
    unchanged: int
    failed: list[FailedSource]
    chunks: int
    documents: list[IngestedDocument]

    @classmethod
    def of(cls, r: IngestReport) -> IngestOutput:
        return cls(
            added=r.added,
            updated=r.updated,
            unchanged=r.unchanged,
            chunks=r.chunks,
            failed=[FailedSource(source=f.source, reason=f.reason) for f in r.failed],
            documents=[IngestedDocument.of(d) for d in r.documents],
        )


class DocumentSummary(BaseModel):
    document_id: str
    collection: str
    source_uri: str
    title: str
    metadata: dict[str, Any]
    chunks: int
    content_hash: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, d: DocumentInfo) -> DocumentSummary:
        return cls(
            document_id=d.id,
            collection=d.collection,
            source_uri=d.source_uri,
            title=d.title,
            metadata=d.metadata,
            chunks=d.chunk_count,
            content_hash=d.content_hash,
            created_at=d.created_at,
            updated_at=d.updated_at,
        )


class DocumentOutput(DocumentSummary):
    text: str | None = Field(description="The document's text (null when include_text is false).")
    truncated: bool = Field(description="True when text was cut at max_chars.")


class DocumentList(BaseModel):
    documents: list[DocumentSummary]
    next_cursor: str | None = Field(description="Pass as cursor to get the next page; null on the last page.")


class DeletedDocument(BaseModel):
    deleted: str
    source_uri: str
    collection: str


class CollectionSummary(BaseModel):
    name: str
    documents: int
    chunks: int
    created_at: datetime

    @classmethod
    def of(cls, c: CollectionInfo) -> CollectionSummary:
        return cls(name=c.name, documents=c.documents, chunks=c.chunks, created_at=c.created_at)


class CollectionList(BaseModel):
    collections: list[CollectionSummary]


class DeletedCollection(BaseModel):
    deleted: str
    documents: int


class StatsOutput(BaseModel):
    collections: int
    documents: int
    chunks: int
    index_points: int
    pending_changes: int = Field(description="Change-log entries (all tenants) not yet applied to the index.")
    region: str
