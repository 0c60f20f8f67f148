"""The structured outputs of the MCP tools (their JSON schemas are what clients see)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from .service import IngestReport, SearchResult
from .store.postgres import CollectionInfo, DocumentInfo


class SearchHit(BaseModel):
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

    @classmethod
    def of(cls, r: SearchResult) -> SearchHit:
        return cls.model_validate(r, from_attributes=True)


class SearchOutput(BaseModel):
    query: str
    mode: str
    results: list[SearchHit]
    reranked: bool | None = Field(
        default=None,
        description="True: ordered and scored by the reranker; false: the reranker failed and the results are in "
        "fused order (see notice); null: no reranker is configured.",
    )
    notice: str | None = Field(default=None, description="Why the results are not reranked, when the reranker failed.")


class IngestedDocument(BaseModel):
    source_uri: str
    status: Literal["added", "updated", "unchanged"]
    document_id: str | None = Field(description="Null when unchanged (the document already had this content).")
    chunks: int


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
        return cls.model_validate(r, from_attributes=True)


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
