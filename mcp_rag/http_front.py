"""The front door of the HTTP app: who may send requests (API keys, or loopback without keys) and
the DNS-rebinding protection of the MCP transports. Light to import: the HTTP server that relays its
sessions to the holder of its data directory uses it too (``local.web``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.transport_security import TransportSecuritySettings
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import SCOPE_STATE_KEY, ApiKeys, local_principal, principal_from_scope
from .errors import ConfigurationError
from .settings import Settings

OPEN_PATHS = frozenset({"/health", "/ready"})
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _allowed(value: str, allowed: list[str]) -> bool:
    """The MCP SDK's matching: exact, or ``name:*`` for any port."""
    return value in allowed or any(a.endswith(":*") and value.startswith(a[:-1]) for a in allowed)


class BearerAuth:
    """401 for every request without a valid API key, except the probes. Without configured
    keys (local use only) every request acts as the default tenant.

    Without keys a request is trusted for where it comes from (loopback), which a web page can
    borrow through DNS rebinding: then every route (not only the MCP ones, which the SDK checks)
    needs an allowed Host and, when sent, Origin (421 / 403 as the SDK answers)."""

    def __init__(
        self, app: ASGIApp, keys: ApiKeys, default_tenant: str, security: TransportSecuritySettings | None = None
    ) -> None:
        self.app = app
        self.keys = keys
        self.default_tenant = default_tenant
        self.security = security

    def _rebinding_rejection(self, scope: Scope) -> Response | None:
        if self.security is None:
            return None
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not _allowed(host, self.security.allowed_hosts or []):
            return Response("Invalid Host header", status_code=421)
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and not _allowed(origin, self.security.allowed_origins or []):
            return Response("Invalid Origin header", status_code=403)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        principal = principal_from_scope(scope)  # resolved by the OAuth gate in front (resource_server.py)
        if principal is not None:
            pass
        elif self.keys.enabled:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            principal = self.keys.authenticate(header)
            if principal is None:
                response = JSONResponse(
                    {"error": "unauthorized", "message": "send Authorization: Bearer <API key>"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="mcp-rag"'},
                )
                await response(scope, receive, send)
                return
            # The SDK's transports remember the user who opened an SSE or streamable-HTTP session
            # and refuse messages for it from anyone else; without this every key could post into
            # any session whose id it learnt (and read answers meant for another tenant).
            scope["user"] = AuthenticatedUser(
                AccessToken(
                    token=principal.key_id,
                    client_id=principal.key_id,
                    scopes=sorted(principal.scopes),
                    subject=principal.tenant,
                )
            )
        else:
            rejection = self._rebinding_rejection(scope)
            if rejection is not None:
                await rejection(scope, receive, send)
                return
            principal = local_principal(self.default_tenant)
        scope.setdefault("state", {})[SCOPE_STATE_KEY] = principal
        await self.app(scope, receive, send)


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection stays on: loopback names plus the configured hosts and origins."""
    hosts = ["127.0.0.1", "127.0.0.1:*", "localhost", "localhost:*", "[::1]", "[::1]:*", *settings.allowed_hosts]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*", *settings.allowed_origins]
    if settings.public_url:  # the public name clients use is always allowed
        public = urlsplit(settings.public_url)
        hosts.append(public.netloc)
        origins.append(f"{public.scheme}://{public.netloc}")
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def require_authentication(settings: Settings) -> None:
    """Serving beyond loopback needs API keys or OAuth."""
    if not settings.api_keys and not settings.oauth_enabled and settings.host not in LOOPBACK_HOSTS:
        raise ConfigurationError(
            f"refusing to serve on {settings.host} without authentication: set MCP_RAG_API_KEYS "
            "or MCP_RAG_OAUTH_ISSUER + MCP_RAG_PUBLIC_URL (or bind to 127.0.0.1 for local use)"
        )
