"""Resources: the caller's collections, and one document by id. Reads, so they need the read scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError

from ..errors import RagError, describe
from ..runtime import Runtime
from ..schemas import CollectionList, CollectionSummary, DocumentOutput, DocumentSummary
from .base import Call, current_principal


async def collections(call: Call) -> str:
    listed = await call.service.list_collections(call.tenant)
    return CollectionList(collections=[CollectionSummary.of(c) for c in listed]).model_dump_json(indent=2)


async def document(call: Call, document_id: str) -> str:
    info = await call.service.get_document(call.tenant, document_id)
    return DocumentOutput(**DocumentSummary.of(info).model_dump(), text=info.content, truncated=False).model_dump_json(
        indent=2
    )


async def _read(get_runtime: Callable[[], Runtime], body: Callable[[Call], Awaitable[str]]) -> str:
    """A resource read: read scope, then the body; errors through the one translation."""
    try:
        principal = current_principal()
        principal.require("read")
        return await body(Call(get_runtime(), principal))
    except RagError as exc:
        failure = describe(exc)
        if failure.kind == "not_found":
            raise ResourceNotFoundError(failure.message) from exc
        raise ResourceError(failure.message) from exc


def register(mcp: MCPServer[Any], get_runtime: Callable[[], Runtime]) -> None:
    @mcp.resource(
        "rag://collections",
        name="collections",
        mime_type="application/json",
        description="The caller's collections with document and chunk counts.",
    )
    async def collections_resource() -> str:
        return await _read(get_runtime, collections)

    @mcp.resource(
        "rag://documents/{document_id}",
        name="document",
        mime_type="application/json",
        description="One document: metadata and full text.",
    )
    async def document_resource(document_id: str) -> str:
        return await _read(get_runtime, lambda call: document(call, document_id))
