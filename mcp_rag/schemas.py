"""What the MCP tools return: structured outputs (their JSON schemas are what programs see) and, for
each, the compact text a model reads (``as_text``): numbered, citable, with little beyond the passages.

``structuredContent`` carries the full model; the text block is written for an agent's context window.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from .service import IngestReport, SearchResult
from .store.postgres import CollectionInfo, DocumentInfo


def document_uri(document_id: str) -> str:
    """The resource that reads a document in full."""
    return f"rag://documents/{document_id}"


def _heading(title: str, heading_path: list[str]) -> str:
    return " > ".join([title, *(h for h in heading_path if h != title)] if title else heading_path)


class Passage(BaseModel):
    """Another chunk of the same document that matched."""

    text: str
    score: float
    position: int
    start_char: int
    end_char: int
    heading_path: list[str]

    @classmethod
    def of(cls, r: SearchResult) -> Passage:
        return cls(
            text=r.text,
            score=r.score,
            position=r.position,
            start_char=r.start_char,
            end_char=r.end_char,
            heading_path=list(r.heading_path),
        )


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
    passages: list[Passage] = Field(
        default_factory=list, description="More matching chunks of this document (passages_per_document > 1)."
    )

    @classmethod
    def of(cls, r: SearchResult) -> SearchHit:
        """Field by field: ``dataclasses.asdict`` deep-copies every result and its passages first, and
        took five times as long for a page of results."""
        return cls(
            id=r.document_id,
            document_id=r.document_id,
            title=r.title,
            source_uri=r.source_uri,
            collection=r.collection,
            text=r.text,
            score=r.score,
            position=r.position,
            start_char=r.start_char,
            end_char=r.end_char,
            heading_path=list(r.heading_path),
            metadata=dict(r.metadata),
            url=r.source_uri,
            passages=[Passage.of(p) for p in r.passages],
        )

    def as_text(self, rank: int) -> str:
        lines = [
            f"[{rank}] {_heading(self.title or self.source_uri, self.heading_path)}",
            f"{self.source_uri} · document {self.document_id} · chunk {self.position}",
            self.text,
        ]
        for p in self.passages:
            lines += [f"  … chunk {p.position}:", p.text]
        return "\n".join(lines)


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

    def as_text(self) -> str:
        return f"{self.title} ({self.url}) · document {self.id}\n\n{self.text}"


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

    def links(self) -> list[tuple[str, str]]:
        """(resource URI, name) of each document in the results, in rank order."""
        seen: dict[str, str] = {}
        for hit in self.results:
            seen.setdefault(document_uri(hit.document_id), hit.title or hit.source_uri)
        return list(seen.items())

    def as_text(self) -> str:
        note = f"Note: {self.notice}\n\n" if self.notice else ""
        if not self.results:
            return f"{note}No results for {self.query!r}."
        return note + "\n\n".join(hit.as_text(rank) for rank, hit in enumerate(self.results, start=1))


class IngestedDocument(BaseModel):
    source_uri: str
    status: Literal["added", "updated", "unchanged", "removed"]
    document_id: str | None = Field(
        description="Null when unchanged (the document already had this content); for removed, the id it had."
    )
    chunks: int


class FailedSource(BaseModel):
    source: str
    reason: str


class IngestOutput(BaseModel):
    added: int
    updated: int
    unchanged: int
    removed: int = Field(0, description="Documents deleted because their files are gone (ingest_file with prune).")
    failed: list[FailedSource]
    chunks: int
    documents: list[IngestedDocument]

    job_id: str | None = Field(
        None, description="Set when the ingest outlived the call: it goes on in the background; see ingest_status."
    )
    status: Literal["done", "running"] = "done"

    @classmethod
    def of(cls, r: IngestReport) -> IngestOutput:
        return cls.model_validate(r, from_attributes=True)

    @classmethod
    def running(cls, job_id: str) -> IngestOutput:
        return cls(
            added=0,
            updated=0,
            unchanged=0,
            removed=0,
            failed=[],
            chunks=0,
            documents=[],
            job_id=job_id,
            status="running",
        )

    def as_text(self) -> str:
        if self.status == "running":
            return (
                f"still running in the background as job {self.job_id}; call ingest_status with this job_id"
                " for its progress and, once done, its report"
            )
        lines = [
            f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, removed {self.removed},"
            f" failed {len(self.failed)}"
            f" ({self.chunks} chunks written)"
        ]
        lines += [
            f"{d.status}: {d.source_uri}"
            + (f" · document {d.document_id} · {d.chunks} chunks" if d.document_id and d.status != "removed" else "")
            + (f" · was document {d.document_id}" if d.status == "removed" else "")
            for d in self.documents[:MAX_LISTED]
        ]
        if len(self.documents) > MAX_LISTED:
            lines.append(f"… and {len(self.documents) - MAX_LISTED} more documents (structured content lists all)")
        lines += [f"failed: {f.source}: {f.reason}" for f in self.failed]
        return "\n".join(lines)


MAX_LISTED = 50
"""Documents an ingest report names in its text (the structured content has them all)."""


class IngestJobOutput(BaseModel):
    job_id: str
    status: Literal["running", "interrupted", "done", "failed"] = Field(
        description="interrupted: its server stopped; the next server start resumes it."
    )
    path: str
    collection: str | None
    done: int = Field(description="Sources processed so far (of the attempt in progress).")
    total: int | None
    message: str
    attempts: int
    report: IngestOutput | None = Field(None, description="When done: the ingest's report.")
    error: str | None = None

    def as_text(self) -> str:
        head = f"job {self.job_id} ({self.path}): {self.status}"
        if self.status in ("running", "interrupted"):
            return head + f", {self.done}/{self.total if self.total is not None else '?'} processed · {self.message}"
        if self.status == "failed":
            return head + f": {self.error}"
        return head + ("\n" + self.report.as_text() if self.report else "")


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

    def as_text(self) -> str:
        return (
            f"{self.title or self.source_uri} ({self.source_uri}) · document {self.document_id} · "
            f"collection {self.collection} · {self.chunks} chunks · updated {self.updated_at:%Y-%m-%d}"
        )


class DocumentOutput(DocumentSummary):
    text: str | None = Field(description="The document's text (null when include_text is false).")
    truncated: bool = Field(description="True when text was cut at max_chars.")

    def as_text(self) -> str:
        head = super().as_text()
        if self.text is None:
            return head
        return f"{head}\n\n{self.text}" + ("\n[… cut at max_chars]" if self.truncated else "")


class DocumentList(BaseModel):
    documents: list[DocumentSummary]
    next_cursor: str | None = Field(description="Pass as cursor to get the next page; null on the last page.")

    def as_text(self) -> str:
        if not self.documents:
            return "No documents."
        lines = [f"- {d.as_text()}" for d in self.documents]
        if self.next_cursor:
            lines.append(f"next_cursor: {self.next_cursor}")
        return "\n".join(lines)


class ChunkOutput(BaseModel):
    position: int
    text: str
    start_char: int
    end_char: int
    heading_path: list[str]


class ChunksOutput(BaseModel):
    document_id: str
    title: str
    source_uri: str
    chunks: int = Field(description="How many chunks the document has in all.")
    returned: list[ChunkOutput]

    def as_text(self) -> str:
        lines = [f"{self.title or self.source_uri} ({self.source_uri}) · document {self.document_id}"]
        for c in self.returned:
            lines += ["", f"chunk {c.position} of {self.chunks} · {_heading('', c.heading_path)}".rstrip(" ·"), c.text]
        return "\n".join(lines)


class DeletedDocument(BaseModel):
    deleted: str
    source_uri: str
    collection: str

    def as_text(self) -> str:
        return f"deleted document {self.deleted} ({self.source_uri}) from {self.collection}"


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

    def as_text(self) -> str:
        if not self.collections:
            return "No collections."
        return "\n".join(f"- {c.name}: {c.documents} documents, {c.chunks} chunks" for c in self.collections)


class DeletedCollection(BaseModel):
    deleted: str
    documents: int

    def as_text(self) -> str:
        return f"deleted collection {self.deleted} ({self.documents} documents)"


class StatsOutput(BaseModel):
    collections: int
    documents: int
    chunks: int
    index_points: int
    pending_changes: int = Field(description="Change-log entries (all tenants) not yet applied to the index.")
    region: str

    def as_text(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.model_dump().items())
