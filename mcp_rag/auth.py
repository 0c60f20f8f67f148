"""Who is calling: a ``Principal`` (tenant + scopes), from a bearer API key or an OAuth access token
(``mcp_rag.oauth``; both give the same kind of principal).

stdio sessions trust their parent process and act as the default tenant with every scope.
HTTP requests carry ``Authorization: Bearer <token>``; the HTTP app resolves the token once
per request and leaves the principal in the ASGI scope, where tools and routes read it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import AccessDeniedError
from .settings import ApiKey

SCOPE_STATE_KEY = "mcp_rag_principal"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    key_id: str
    """A non-secret name for the key (prefix of its hash) for logs."""

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise AccessDeniedError(f"this token lacks the {scope!r} scope needed for this operation")


def local_principal(tenant: str) -> Principal:
    return Principal(tenant=tenant, scopes=frozenset({"read", "write", "metrics"}), key_id="local")


class ApiKeys:
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._by_digest = {_digest(k.token): k for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization`` header value, or None if it is missing or wrong."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = _digest(token.strip())
        for known, key in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return Principal(tenant=key.tenant, scopes=frozenset(key.scopes), key_id=digest[:12])
        return None


def principal_from_scope(scope: Mapping[str, Any]) -> Principal | None:
    state = scope.get("state")
    if isinstance(state, Mapping):
        principal = state.get(SCOPE_STATE_KEY)
        if isinstance(principal, Principal):
            return principal
    return None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
