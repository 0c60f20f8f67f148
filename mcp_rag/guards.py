"""ASGI guards of the HTTP app that are not authentication itself.

* ``SingleSecurityHeaders`` (outermost): a request with two ``Authorization``, ``Host`` or
  ``Origin`` headers gets 400. Otherwise one layer could judge the first value and another act
  on the last (our key check read the last, the SDK's Host/Origin and auth checks the first).
* ``MetricsToken``: ``/metrics`` with the dedicated metrics token is answered without an API key,
  so Prometheus needs no tenant's key; the endpoint itself requires the ``metrics`` scope.
* ``SessionLimits`` (inside authentication): one principal (one API key) may hold at most
  ``max_sessions_per_principal`` stateful streamable-HTTP sessions and SSE streams, so one key
  cannot fill the process-wide session cap and lock every other tenant out.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import SCOPE_STATE_KEY, Principal
from .logging import get_logger

log = get_logger(__name__)

SINGLE_HEADERS = (b"authorization", b"host", b"origin")
METRICS_PATH = "/metrics"
METRICS_SCOPE = "metrics"
SESSION_HEADER = b"mcp-session-id"


class SingleSecurityHeaders:
    """400 for a request that repeats a header the security checks read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            counts = Counter(name.lower() for name, _ in scope["headers"] if name.lower() in SINGLE_HEADERS)
            repeated = sorted(name.decode("latin-1").title() for name, count in counts.items() if count > 1)
            if repeated:
                response = JSONResponse(
                    {"error": "bad_request", "message": f"send the {', '.join(repeated)} header only once"},
                    status_code=400,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def metrics_principal() -> Principal:
    return Principal(tenant="-", scopes=frozenset({METRICS_SCOPE}), key_id="metrics-token")


class MetricsToken:
    """Serves ``/metrics`` to ``Authorization: Bearer <MCP_RAG_METRICS_TOKEN>`` through ``endpoint``,
    bypassing the API-key check (the token is no API key); anything else goes on to ``app``."""

    def __init__(self, app: ASGIApp, token: str | None, endpoint: ASGIApp) -> None:
        self.app = app
        self.endpoint = endpoint
        self._digest = _digest(token) if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._digest is not None and scope["type"] == "http" and scope["path"] == METRICS_PATH:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._digest):
                scope.setdefault("state", {})[SCOPE_STATE_KEY] = metrics_principal()
                await self.endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)


def metrics_refusal(principal: Principal | None) -> Response | None:
    """403 unless the caller may read the process-wide metrics."""
    if principal is not None and METRICS_SCOPE in principal.scopes:
        return None
    return JSONResponse(
        {
            "error": "forbidden",
            "message": "/metrics needs an API key with the 'metrics' scope or the metrics token (MCP_RAG_METRICS_TOKEN)",
        },
        status_code=403,
    )


def session_owners(manager: StreamableHTTPSessionManager) -> Callable[[], Mapping[str, Any]]:
    """Who opened each live stateful session, as the SDK's session manager records it (session id →
    the owner it checks every request against). The SDK keeps this in a private attribute; if a
    new SDK version moves it, the app refuses to start rather than run without the per-key limit."""
    owners = getattr(manager, "_session_owners", None)
    if not isinstance(owners, dict):
        raise RuntimeError("the MCP SDK's session manager no longer records session owners; update mcp_rag.guards")
    return lambda: owners


class SessionLimits:
    """429 for a request that would open a stateful streamable-HTTP session or an SSE stream beyond
    ``limit`` for its principal. Without API keys there is one principal and only the process-wide
    cap applies."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        owners: Callable[[], Mapping[str, Any]] | None,
        mcp_path: str = "/mcp",
        sse_path: str = "/sse",
    ) -> None:
        self.app = app
        self.limit = limit
        self.owners = owners
        self.mcp_path = mcp_path
        self.sse_path = sse_path
        self._opening: Counter[tuple[Any, ...]] = Counter()
        """Requests now opening a session, not yet answered, per principal. Between the SDK's admission
        and the answer such a session counts twice: concurrent opens of one key are judged strictly."""
        self._streams: Counter[tuple[Any, ...]] = Counter()
        """Open SSE streams per principal."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user") if scope["type"] == "http" else None
        if not isinstance(user, AuthenticatedUser):
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == self.sse_path:
            counter = self._streams
        elif (
            self.owners is not None
            and method == "POST"
            and path == self.mcp_path
            and not any(name.lower() == SESSION_HEADER for name, _ in scope["headers"])
        ):
            counter = self._opening
        else:
            await self.app(scope, receive, send)
            return
        owner = authorization_context(user)
        key = (owner["client_id"], owner["issuer"], owner["subject"])
        # No await between counting and reserving: concurrent requests of one key cannot all pass.
        held = self._opening[key] + self._streams[key]
        if self.owners is not None:
            held += sum(1 for who in self.owners().values() if who == owner)
        if held >= self.limit:
            log.warning("session limit reached for a key", key_id=owner["client_id"], limit=self.limit)
            response = JSONResponse(
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {
                        "code": -32600,
                        "message": f"this API key already holds {self.limit} open sessions (the limit per key): "
                        "end one (DELETE /mcp with its Mcp-Session-Id) or wait until an idle one expires",
                    },
                },
                status_code=429,
            )
            await response(scope, receive, send)
            return
        counter[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

        async def send_and_release(message: Message) -> None:
            # An opening request's reservation ends with its answer: by then the SDK has registered
            # the session (or refused it), and it is counted there. A stream's lasts as long as it.
            if counter is self._opening and message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
