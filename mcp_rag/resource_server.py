"""The HTTP side of OAuth resource-server mode: RFC 9728 metadata, challenges, and scope checks.

``OAuthGate`` sits in front of the app when ``MCP_RAG_OAUTH_ISSUER`` and ``MCP_RAG_PUBLIC_URL`` are
set. For every route but the probes and the metadata it:

* answers ``/.well-known/oauth-protected-resource[/mcp|/sse]`` without authentication (RFC 9728);
* takes ``Authorization: Bearer <token>``: an API key gives its principal as before; any other
  token is verified as an OAuth access token (``mcp_rag.oauth``);
* answers 401 with ``WWW-Authenticate: Bearer resource_metadata="...", scope="..."`` without a
  token, plus ``error="invalid_token"`` for a token it refuses; 503 when the authorization
  server is needed and does not answer;
* works out the scope the request needs (a ``tools/call`` of a write tool needs ``write``; the
  JSON-RPC body is read, up to the request size limit, and handed on unchanged) and answers 403
  ``error="insufficient_scope"`` naming it, so OAuth clients can ask for more (step-up);
* leaves the principal in the ASGI scope, where ``BearerAuth`` and the tools find it.

API keys keep their behaviour: a key without a scope gets the tool's error message, since its
client cannot step up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from mcp.server import MCPServer
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import SCOPE_STATE_KEY, ApiKeys, Principal
from .logging import get_logger
from .oauth import (
    INTERNAL_SCOPES,
    AuthorizationServer,
    AuthServerUnavailableError,
    InvalidTokenError,
    TokenVerifier,
    VerifiedToken,
    oauth_scope,
)
from .settings import Settings

log = get_logger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
PRM_PATH = "/.well-known/oauth-protected-resource"
MCP_MESSAGE_PATHS = ("/mcp", "/messages/")
SSE_PATHS = ("/sse", "/messages/")
MOBILE_READ = re.compile(r"^/api/mobile/(search|documents/[^/]+)$")

ToolScopes = Callable[[], Awaitable[dict[str, str]]]
"""The scope each tool needs, by tool name."""


class ResourceServer:
    """The configuration of OAuth mode: resources, metadata and the token verifier."""

    def __init__(self, settings: Settings, server: AuthorizationServer | None = None) -> None:
        assert settings.public_url is not None
        assert settings.oauth_issuer is not None
        self.settings = settings
        base = settings.public_url
        # The streamable-HTTP endpoint is the resource; the legacy SSE endpoint has its own resource
        # URL, because clients check that the metadata's resource is (a parent of) the URL they use.
        self.resources = {"mcp": base + "/mcp", "sse": base + "/sse"}
        self.scopes = [oauth_scope(s) for s in INTERNAL_SCOPES if s != "write" or not settings.read_only]
        self.authorization_server = server or AuthorizationServer(settings)
        self.verifier = TokenVerifier(settings, self.authorization_server, list(self.resources.values()))

    def metadata_url(self, kind: str) -> str:
        assert self.settings.public_url is not None
        return f"{self.settings.public_url}{PRM_PATH}/{kind}"

    def metadata(self, kind: str) -> dict[str, Any]:
        """RFC 9728 protected resource metadata of one resource."""
        return {
            "resource": self.resources[kind],
            "authorization_servers": [self.settings.oauth_issuer],
            "scopes_supported": self.scopes,
            "bearer_methods_supported": ["header"],
            "resource_name": "mcp-rag",
        }

    async def readiness(self) -> list[str]:
        return await self.authorization_server.readiness()

    async def aclose(self) -> None:
        await self.authorization_server.aclose()


def _quoted(text: str) -> str:
    """A value for a quoted-string auth-param: no quotes, backslashes or control characters."""
    return re.sub(r'["\\\x00-\x1f\x7f]', "'", text)


class OAuthGate:
    def __init__(
        self, app: ASGIApp, *, resource_server: ResourceServer, keys: ApiKeys, tool_scopes: ToolScopes
    ) -> None:
        self.app = app
        self.rs = resource_server
        self.keys = keys
        self.tool_scopes = tool_scopes
        self.max_body = resource_server.settings.max_request_bytes

    # --- responses -----------------------------------------------------------------------------

    def _challenge(
        self, kind: str, status: int, *, error: str | None = None, description: str | None = None, scope: str
    ) -> Response:
        params = []
        if error is not None:
            params.append(f'error="{error}"')
        if description is not None:
            params.append(f'error_description="{_quoted(description)}"')
        params.append(f'resource_metadata="{self.rs.metadata_url(kind)}"')
        params.append(f'scope="{scope}"')
        body = {
            "error": error or "unauthorized",
            "message": description
            or "send Authorization: Bearer <token>: an OAuth access token for "
            f"{self.rs.resources[kind]} (see {self.rs.metadata_url(kind)}) or an API key",
        }
        return JSONResponse(body, status_code=status, headers={"WWW-Authenticate": "Bearer " + ", ".join(params)})

    def _metadata_response(self, path: str, method: str) -> Response | None:
        kind = {PRM_PATH: "mcp", PRM_PATH + "/mcp": "mcp", PRM_PATH + "/sse": "sse"}.get(path.rstrip("/") or "/")
        if kind is None:
            return None
        if method not in ("GET", "HEAD"):
            return JSONResponse({"error": "method_not_allowed"}, status_code=405, headers={"Allow": "GET, HEAD"})
        # Public metadata: browser-based clients (the MCP Inspector's web UI) may read it cross-origin.
        return JSONResponse(
            self.rs.metadata(kind),
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "public, max-age=3600"},
        )

    # --- the scope a request needs -------------------------------------------------------------

    async def _needed_scopes(self, path: str, method: str, body: bytes | None) -> set[str]:
        if MOBILE_READ.match(path):
            return {"read"}
        if body is None:
            return set()
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return set()  # the transport answers the parse error
        messages: Iterable[Any] = document if isinstance(document, list) else [document]
        needed: set[str] = set()
        tools: dict[str, str] | None = None
        for message in messages:
            if not isinstance(message, dict):
                continue
            method_name = message.get("method")
            params = message.get("params")
            if method_name == "resources/read":
                needed.add("read")
            elif method_name == "tools/call" and isinstance(params, dict) and isinstance(params.get("name"), str):
                tools = tools if tools is not None else await self.tool_scopes()
                scope = tools.get(params["name"])
                if scope is not None:
                    needed.add(scope)
        return needed

    # --- the middleware ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        metadata = self._metadata_response(path, method) if path.startswith(PRM_PATH) else None
        if metadata is not None:
            await metadata(scope, receive, send)
            return
        kind = "sse" if path.startswith(SSE_PATHS) else "mcp"
        all_scopes = " ".join(self.rs.scopes)
        authorizations = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        if len(authorizations) > 1:
            response: Response = self._challenge(
                kind, 400, error="invalid_request", description="send one Authorization header", scope=all_scopes
            )
            await response(scope, receive, send)
            return
        header = authorizations[0].decode("latin-1") if authorizations else ""
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            await self._challenge(kind, 401, scope=all_scopes)(scope, receive, send)
            return

        principal = self.keys.authenticate(header)
        verified: VerifiedToken | None = None
        if principal is None:
            try:
                verified = await self.rs.verifier.verify(token)
            except InvalidTokenError as exc:
                log.info("access token refused", reason=str(exc), path=path)
                response = self._challenge(kind, 401, error="invalid_token", description=str(exc), scope=all_scopes)
                await response(scope, receive, send)
                return
            except AuthServerUnavailableError as exc:
                response = JSONResponse(
                    {
                        "error": "temporarily_unavailable",
                        "message": f"the authorization server is needed to verify this token and does not answer ({exc}); "
                        "retry shortly",
                    },
                    status_code=503,
                    headers={"Retry-After": "5"},
                )
                await response(scope, receive, send)
                return
            principal = verified.principal

        if verified is not None:
            body: bytes | None = None
            if method == "POST" and path in MCP_MESSAGE_PATHS:
                read = await _read_body(receive, self.max_body)
                if read is None:
                    await JSONResponse({"error": "too_large"}, status_code=413)(scope, receive, send)
                    return
                body, receive = read
            missing = sorted((await self._needed_scopes(path, method, body)) - principal.scopes)
            if missing:
                wanted = " ".join(oauth_scope(s) for s in INTERNAL_SCOPES if s in principal.scopes or s in missing)
                description = f"this call needs the {' and '.join(oauth_scope(s) for s in missing)} scope"
                log.info("access token lacks a scope", missing=missing, tenant=principal.tenant, path=path)
                response = self._challenge(kind, 403, error="insufficient_scope", description=description, scope=wanted)
                await response(scope, receive, send)
                return

        scope.setdefault("state", {})[SCOPE_STATE_KEY] = principal
        scope["user"] = _user(principal, verified)
        await self.app(scope, receive, send)


def tool_scopes(mcp: MCPServer[Any]) -> ToolScopes:
    """The scope of each tool of ``mcp``, read from its annotations once: a tool that declares itself
    read-only needs ``read``, every other tool ``write``."""
    cache: dict[str, str] = {}

    async def scopes() -> dict[str, str]:
        if not cache:
            for tool in await mcp.list_tools():
                read_only = tool.annotations is not None and tool.annotations.read_only_hint is True
                cache[tool.name] = "read" if read_only else "write"
        return cache

    return scopes


def _user(principal: Principal, verified: VerifiedToken | None) -> AuthenticatedUser:
    """Who owns the SSE / streamable-HTTP sessions this request opens (the SDK refuses others)."""
    if verified is None:
        return AuthenticatedUser(
            AccessToken(
                token=principal.key_id,
                client_id=principal.key_id,
                scopes=sorted(principal.scopes),
                subject=principal.tenant,
            )
        )
    return AuthenticatedUser(
        AccessToken(
            token=principal.key_id,
            client_id=verified.client_id,
            scopes=sorted(principal.scopes),
            expires_at=verified.expires_at,
            subject=f"{principal.tenant}/{verified.subject or verified.client_id}",
            claims={"iss": verified.issuer},
        )
    )


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, Receive] | None:
    """The whole request body (None beyond ``limit`` bytes) and a ``receive`` that replays it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay
