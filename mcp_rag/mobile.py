"""The mobile API: compact JSON for small screens, behind the same bearer auth as MCP.

``GET /api/mobile/search?q=...&collection=...&limit=...`` and
``GET /api/mobile/documents/{id}``; ``GET /api/mobile/openapi.json`` describes both.
The ``mobile-preprocessor`` edge worker normalises requests before they reach these routes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .auth import principal_from_scope
from .errors import InvalidInputError, Kind, RagError, describe
from .runtime import Runtime
from .service import SearchFilters

MAX_RESULTS = 10
MAX_QUERY_CHARS = 256
"""Shorter than the service's bound: a phone's search box, and the edge worker checks the same."""
ERROR_CODES: dict[Kind, str] = {
    "invalid_input": "bad_request",
    "not_found": "not_found",
    "forbidden": "forbidden",
    "unavailable": "unavailable",
    "configuration": "unavailable",
    "conflict": "unavailable",
}
SNIPPET_CHARS = 160
EXCERPT_CHARS = 600


def snippet(text: str, query: str, width: int = SNIPPET_CHARS) -> str:
    """A window of ``text`` around the first query word it contains (or its start), on word bounds."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    lower = flat.lower()
    hits = [lower.find(w) for w in re.findall(r"\w{3,}", query.lower())]
    at = min((h for h in hits if h >= 0), default=0)
    start = max(0, at - width // 3)
    if start > 0:
        space = flat.rfind(" ", 0, start)
        start = space + 1 if space >= 0 else start
    end = min(len(flat), start + width)
    if end < len(flat):
        space = flat.rfind(" ", start, end)
        end = space if space > start else end
    return ("…" if start > 0 else "") + flat[start:end] + ("…" if end < len(flat) else "")


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)


def mobile_routes(get_runtime: Callable[[], Runtime]) -> list[BaseRoute]:
    async def guarded(request: Request, body: Callable[[Runtime, str], Any]) -> Response:
        principal = principal_from_scope(request.scope)
        if principal is None:
            return _error(401, "unauthorized", "send Authorization: Bearer <API key>")
        try:
            principal.require("read")
            return JSONResponse(
                await body(get_runtime(), principal.tenant), headers={"Cache-Control": "private, max-age=30"}
            )
        except RagError as exc:
            failure = describe(exc)
            return _error(failure.http_status, ERROR_CODES[failure.kind], failure.message)

    async def search(request: Request) -> Response:
        params = request.query_params
        query = " ".join(params.get("q", "").split())
        collection = params.get("collection") or None
        limit_text = params.get("limit", "5")

        async def body(runtime: Runtime, tenant: str) -> dict[str, Any]:
            if not query:
                raise InvalidInputError("q is required: the words to search for")
            if len(query) > MAX_QUERY_CHARS:
                raise InvalidInputError(f"q is limited to {MAX_QUERY_CHARS} characters")
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_RESULTS:
                raise InvalidInputError(f"limit must be an integer from 1 to {MAX_RESULTS}")
            results = await runtime.service.search(
                tenant, query, top_k=int(limit_text), filters=SearchFilters(collection=collection)
            )
            return {
                "query": query,
                "results": [
                    {
                        "document_id": r.document_id,
                        "title": r.title or r.source_uri,
                        "snippet": snippet(r.text, query),
                        "score": round(r.score, 4),
                        "source": r.source_uri,
                    }
                    for r in results
                ],
            }

        return await guarded(request, body)

    async def document(request: Request) -> Response:
        document_id = request.path_params["document_id"]

        async def body(runtime: Runtime, tenant: str) -> dict[str, Any]:
            info = await runtime.service.get_document(tenant, document_id)
            text = " ".join((info.content or "").split())
            excerpt = text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS].rsplit(" ", 1)[0] + "…"
            return {
                "document_id": info.id,
                "title": info.title or info.source_uri,
                "source": info.source_uri,
                "collection": info.collection,
                "excerpt": excerpt,
            }

        return await guarded(request, body)

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    return [
        Route("/api/mobile/search", search, methods=["GET"]),
        Route("/api/mobile/documents/{document_id}", document, methods=["GET"]),
        Route("/api/mobile/openapi.json", openapi, methods=["GET"]),
    ]


_ERROR = {"$ref": "#/components/schemas/Error"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "mcp-rag mobile API",
        "version": "1.0.0",
        "description": "Compact search and document excerpts for small screens.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/mobile/search": {
            "get": {
                "operationId": "mobileSearch",
                "summary": "Search the caller's documents",
                "parameters": [
                    {
                        "name": "q",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
                    },
                    {"name": "collection", "in": "query", "required": False, "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_RESULTS, "default": 5},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "Results",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SearchResponse"}}},
                    },
                    "400": {"description": "Invalid query", "content": {"application/json": {"schema": _ERROR}}},
                    "401": {
                        "description": "Missing or wrong API key",
                        "content": {"application/json": {"schema": _ERROR}},
                    },
                },
            }
        },
        "/api/mobile/documents/{document_id}": {
            "get": {
                "operationId": "mobileDocument",
                "summary": "A document's title, source and a summary-length excerpt",
                "parameters": [
                    {
                        "name": "document_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "format": "uuid"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The document",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Document"}}},
                    },
                    "401": {
                        "description": "Missing or wrong API key",
                        "content": {"application/json": {"schema": _ERROR}},
                    },
                    "404": {
                        "description": "No such document for this caller",
                        "content": {"application/json": {"schema": _ERROR}},
                    },
                },
            }
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
            "SearchResponse": {
                "type": "object",
                "required": ["query", "results"],
                "properties": {
                    "query": {"type": "string"},
                    "results": {
                        "type": "array",
                        "maxItems": MAX_RESULTS,
                        "items": {
                            "type": "object",
                            "required": ["document_id", "title", "snippet", "score", "source"],
                            "properties": {
                                "document_id": {"type": "string"},
                                "title": {"type": "string"},
                                "snippet": {"type": "string", "maxLength": SNIPPET_CHARS + 2},
                                "score": {"type": "number"},
                                "source": {"type": "string"},
                            },
                        },
                    },
                },
            },
            "Document": {
                "type": "object",
                "required": ["document_id", "title", "source", "excerpt"],
                "properties": {
                    "document_id": {"type": "string"},
                    "title": {"type": "string"},
                    "source": {"type": "string"},
                    "collection": {"type": "string"},
                    "excerpt": {"type": "string", "maxLength": EXCERPT_CHARS + 1},
                },
            },
        },
    },
}
