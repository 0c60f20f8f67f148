"""OAuth 2.1 resource server: what an access token from the authorization server says about its caller.

JWT access tokens (RFC 9068) are verified here, against the authorization server's keys: issuer,
audience (this server's resource URLs, RFC 8707), ``exp``/``nbf`` with a small leeway, and a
signature by an asymmetric algorithm of the configured allow-list (never ``none``, never HMAC).
The keys come from the ``jwks_uri`` of the server's RFC 8414 / OpenID Connect metadata; they are
cached, fetched again when they are older than ``oauth_jwks_max_age_seconds``, and on a token
signed with an unknown key id (the server rotated its keys), at most once per
``oauth_jwks_min_refresh_seconds``. Opaque tokens go to RFC 7662 introspection when introspection
credentials are configured; answers are reused for at most ``oauth_introspection_cache_seconds``
and never beyond the token's expiry.

When the authorization server cannot be reached and a token cannot be verified without it,
verification raises ``AuthServerUnavailableError`` (the HTTP layer answers 503): a token is never
accepted unverified.

A verified token becomes the same ``Principal`` an API key gives: the tenant from a configurable
claim, the scopes from ``scope`` / ``scp`` (``rag:read`` and ``rag:write`` are the ``read`` and
``write`` scopes).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx2
import jwt
from jwt.exceptions import PyJWKError, PyJWKSetError

from .auth import Principal
from .logging import get_logger
from .settings import Settings

log = get_logger(__name__)

SCOPE_PREFIX = "rag:"
INTERNAL_SCOPES = ("read", "write")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
INTROSPECTION_CACHE_ENTRIES = 10_000
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
"""The JWK key type each algorithm family needs (``alg[:2]``)."""


def oauth_scope(scope: str) -> str:
    """The OAuth scope name of an internal scope: ``read`` -> ``rag:read``."""
    return SCOPE_PREFIX + scope


class InvalidTokenError(Exception):
    """The token is not acceptable (expired, wrong audience, bad signature...): 401 invalid_token."""


class AuthServerUnavailableError(Exception):
    """The authorization server is needed to verify this token and does not answer: 503."""


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    principal: Principal
    client_id: str
    subject: str | None
    issuer: str
    expires_at: int | None


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    issuer: str
    jwks_uri: str
    introspection_endpoint: str | None


def metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be, in the order tried: RFC 8414 (well-known inserted before the
    issuer's path), OpenID Connect Discovery (appended), and RFC 8414 appended (as Keycloak serves it)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    inserted = urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", ""))
    urls = [inserted, issuer + "/.well-known/openid-configuration"]
    if path:
        urls.append(issuer + "/.well-known/oauth-authorization-server")
    return urls


class AuthorizationServer:
    """The authorization server as this resource server sees it: its metadata, its signing keys
    (cached) and its introspection endpoint. Every fetch is bounded by ``oauth_timeout``."""

    def __init__(self, settings: Settings, http: httpx2.AsyncClient | None = None) -> None:
        assert settings.oauth_issuer is not None
        self.issuer = settings.oauth_issuer
        self._settings = settings
        self._http = http or httpx2.AsyncClient(timeout=settings.oauth_timeout, follow_redirects=False)
        self._metadata: ServerMetadata | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._anonymous_keys: list[jwt.PyJWK] = []
        self._keys_fetched_at: float | None = None
        self._last_attempt = -float("inf")
        self._last_error: str | None = None
        self._lock = anyio.Lock()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def last_error(self) -> str | None:
        return self._last_error

    # --- fetching -------------------------------------------------------------------------

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx2.HTTPError as exc:
            raise AuthServerUnavailableError(f"{what} at {url} cannot be fetched: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise AuthServerUnavailableError(f"{what} at {url} answered HTTP {response.status_code}")
        try:
            document = response.json()
        except ValueError:
            raise AuthServerUnavailableError(f"{what} at {url} is not JSON") from None
        if not isinstance(document, dict):
            raise AuthServerUnavailableError(f"{what} at {url} is not a JSON object")
        return document

    async def _discover(self) -> ServerMetadata:
        failures = []
        for url in metadata_urls(self.issuer):
            try:
                document = await self._get_json(url, "authorization server metadata")
            except AuthServerUnavailableError as exc:
                failures.append(str(exc))
                continue
            if str(document.get("issuer", "")).rstrip("/") != self.issuer:
                # RFC 8414 section 3.3: metadata for another issuer must not be used.
                raise AuthServerUnavailableError(
                    f"the metadata at {url} names the issuer {document.get('issuer')!r}, not {self.issuer!r}"
                )
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri:
                raise AuthServerUnavailableError(f"the metadata at {url} has no jwks_uri")
            introspection = document.get("introspection_endpoint")
            return ServerMetadata(
                issuer=self.issuer,
                jwks_uri=jwks_uri,
                introspection_endpoint=introspection if isinstance(introspection, str) and introspection else None,
            )
        raise AuthServerUnavailableError("; ".join(failures))

    async def _refresh(self) -> None:
        """Fetch the metadata (once) and the keys; records the outcome for readiness."""
        self._last_attempt = time.monotonic()
        try:
            if self._metadata is None:
                self._metadata = await self._discover()
            document = await self._get_json(self._metadata.jwks_uri, "the key set (JWKS)")
            self._install_keys(document)
        except AuthServerUnavailableError as exc:
            if self._last_error != str(exc):
                log.warning("authorization server unavailable", issuer=self.issuer, reason=str(exc))
            self._last_error = str(exc)
            raise
        if self._last_error is not None:
            log.info("authorization server reachable again", issuer=self.issuer)
        self._last_error = None
        self._keys_fetched_at = time.monotonic()

    def _install_keys(self, document: Mapping[str, Any]) -> None:
        keys: dict[str, jwt.PyJWK] = {}
        anonymous: list[jwt.PyJWK] = []
        for entry in document.get("keys") or []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK.from_dict(entry)
            except (PyJWKError, PyJWKSetError, ValueError, TypeError):
                continue  # a key type or curve this library cannot use: skip it, keep the others
            if key.key_type == "oct":
                continue  # symmetric keys are never accepted
            if isinstance(entry.get("kid"), str):
                keys[entry["kid"]] = key
            else:
                anonymous.append(key)
        if not keys and not anonymous:
            raise AuthServerUnavailableError("the key set (JWKS) holds no usable signing key")
        self._keys, self._anonymous_keys = keys, anonymous

    async def metadata(self) -> ServerMetadata:
        if self._metadata is None:
            await self._refresh_guarded(force=True)
        assert self._metadata is not None
        return self._metadata

    async def _refresh_guarded(self, *, force: bool) -> None:
        """One fetch at a time; a failed attempt is not repeated within the minimum interval
        (a dead server is not hammered by every request)."""
        async with self._lock:
            now = time.monotonic()
            recent = now - self._last_attempt < max(self._settings.oauth_jwks_min_refresh_seconds, 1.0)
            if self._last_error is not None and recent:
                raise AuthServerUnavailableError(self._last_error)
            if not force and self._keys_fresh():
                return
            if force and recent and self._keys_fetched_at is not None and self._last_error is None:
                return  # fetched a moment ago (perhaps by another request): rate limit
            await self._refresh()

    def _keys_fresh(self) -> bool:
        return (
            self._keys_fetched_at is not None
            and time.monotonic() - self._keys_fetched_at < self._settings.oauth_jwks_max_age_seconds
        )

    def _find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        candidates = [k for k in (*self._keys.values(), *self._anonymous_keys) if _fits(k, alg)]
        return candidates[0] if len(candidates) == 1 else None

    async def signing_key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        if not self._keys_fresh():
            await self._refresh_guarded(force=False)
        key = self._find(kid, alg)
        if key is None:
            # Perhaps the server rotated its keys: fetch them again (rate-limited).
            await self._refresh_guarded(force=True)
            key = self._find(kid, alg)
        if key is None:
            raise InvalidTokenError(
                f"the token is signed with a key the authorization server does not publish (kid {_short(kid)})"
            )
        return key

    async def introspect(self, token: str, client_id: str, client_secret: str) -> dict[str, Any]:
        metadata = await self.metadata()
        if metadata.introspection_endpoint is None:
            raise AuthServerUnavailableError("the authorization server's metadata has no introspection_endpoint")
        try:
            response = await self._http.post(
                metadata.introspection_endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                auth=(client_id, client_secret),
                headers={"Accept": "application/json"},
            )
        except httpx2.HTTPError as exc:
            self._last_error = f"introspection at {metadata.introspection_endpoint} failed: {type(exc).__name__}"
            raise AuthServerUnavailableError(self._last_error) from None
        if response.status_code != 200:
            raise AuthServerUnavailableError(
                f"introspection at {metadata.introspection_endpoint} answered HTTP {response.status_code}"
            )
        try:
            answer = response.json()
        except ValueError:
            raise AuthServerUnavailableError("the introspection answer is not JSON") from None
        if not isinstance(answer, dict):
            raise AuthServerUnavailableError("the introspection answer is not a JSON object")
        return answer

    async def readiness(self) -> list[str]:
        """Why tokens cannot be verified now (empty when they can). Fetches the metadata and keys when
        they are missing, stale, or the last attempt failed."""
        if self._keys_fresh() and self._last_error is None:
            return []
        try:
            await self._refresh_guarded(force=self._last_error is not None or self._keys_fetched_at is None)
        except AuthServerUnavailableError as exc:
            return [f"the OAuth authorization server {self.issuer} is unreachable: {exc}"]
        return []


def _short(value: object) -> str:
    """A value from a token, for a message: repr, at most 64 characters."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _fits(key: jwt.PyJWK, alg: str) -> bool:
    """Whether ``key`` may verify a signature made with ``alg`` (key type, and the key's own ``alg``)."""
    if KEY_TYPES.get(alg[:2]) != key.key_type:
        return False
    declared = key.algorithm_name
    return declared == alg if declared and alg != "EdDSA" else True


class TokenVerifier:
    """Turns a bearer token into a ``VerifiedToken`` or refuses it."""

    def __init__(self, settings: Settings, server: AuthorizationServer, resources: list[str]) -> None:
        assert settings.oauth_issuer is not None
        self._settings = settings
        self.server = server
        self.resources = resources
        self._cache: OrderedDict[str, tuple[float, VerifiedToken]] = OrderedDict()

    async def verify(self, token: str) -> VerifiedToken:
        if token.count(".") == 2:
            return await self._verify_jwt(token)
        if self._settings.oauth_introspection_client_id is None:
            raise InvalidTokenError("not a JWT access token (and this server does not introspect opaque tokens)")
        return await self._verify_opaque(token)

    # --- JWT -------------------------------------------------------------------------------

    async def _verify_jwt(self, token: str) -> VerifiedToken:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidTokenError("malformed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._settings.oauth_algorithms:
            raise InvalidTokenError(f"the JWS algorithm {_short(alg)} is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidTokenError("malformed key id")
        key = await self.server.signing_key(kid, alg)
        if not _fits(key, alg):
            raise InvalidTokenError(f"the key {_short(kid)} cannot verify {alg} signatures")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.resources,
                issuer=self._settings.oauth_issuer,
                leeway=self._settings.oauth_clock_skew_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidTokenError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidTokenError("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise InvalidTokenError(f"the token was not issued for this resource ({self.resources[0]})") from None
        except jwt.InvalidIssuerError:
            raise InvalidTokenError("the token was not issued by the configured authorization server") from None
        except jwt.InvalidSignatureError:
            raise InvalidTokenError("the token's signature does not verify") from None
        except jwt.InvalidTokenError as exc:
            raise InvalidTokenError(f"invalid token: {exc}") from None
        return self._verified(claims)

    # --- opaque (RFC 7662) -----------------------------------------------------------------

    async def _verify_opaque(self, token: str) -> VerifiedToken:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        now = time.time()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[digest]
        client_id = self._settings.oauth_introspection_client_id
        client_secret = self._settings.oauth_introspection_client_secret
        assert client_id is not None
        assert client_secret is not None
        answer = await self.server.introspect(token, client_id, client_secret)
        if answer.get("active") is not True:
            raise InvalidTokenError("the token is not active (expired, revoked or unknown)")
        token_type = answer.get("token_type")
        if token_type is not None and str(token_type).lower() not in ("bearer", "access_token"):
            raise InvalidTokenError(f"not an access token (token_type {_short(token_type)})")
        issuer = answer.get("iss", self._settings.oauth_issuer)
        if str(issuer).rstrip("/") != self._settings.oauth_issuer:
            raise InvalidTokenError("the token was not issued by the configured authorization server")
        audiences = answer.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences
        if not isinstance(audiences, list) or not set(self.resources) & {str(a) for a in audiences}:
            raise InvalidTokenError(f"the token was not issued for this resource ({self.resources[0]})")
        skew = self._settings.oauth_clock_skew_seconds
        exp = answer.get("exp")
        if isinstance(exp, int | float) and exp + skew < now:
            raise InvalidTokenError("the token has expired")
        nbf = answer.get("nbf")
        if isinstance(nbf, int | float) and nbf - skew > now:
            raise InvalidTokenError("the token is not valid yet")
        verified = self._verified({**answer, "iss": self._settings.oauth_issuer})
        until = now + self._settings.oauth_introspection_cache_seconds
        if isinstance(exp, int | float):
            until = min(until, float(exp))
        if until > now:
            self._cache[digest] = (until, verified)
            while len(self._cache) > INTROSPECTION_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return verified

    # --- claims -> principal -----------------------------------------------------------------

    def _verified(self, claims: Mapping[str, Any]) -> VerifiedToken:
        tenant = claim(claims, self._settings.oauth_tenant_claim)
        if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
            raise InvalidTokenError(
                f"the token has no usable {self._settings.oauth_tenant_claim!r} claim "
                "(1-64 letters, digits, '_', '-', '.'): the authorization server must name the caller's tenant"
            )
        scopes = token_scopes(claims)
        subject = claims.get("sub")
        client_id = claims.get("client_id") or claims.get("azp") or subject or "-"
        issuer = str(claims.get("iss"))
        who = hashlib.sha256(f"{issuer}|{subject or client_id}".encode()).hexdigest()[:12]
        exp = claims.get("exp")
        return VerifiedToken(
            principal=Principal(tenant=tenant, scopes=scopes, key_id=f"oauth:{who}"),
            client_id=str(client_id),
            subject=str(subject) if subject is not None else None,
            issuer=issuer,
            expires_at=int(exp) if isinstance(exp, int | float) else None,
        )


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects when no claim has the full name."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """The internal scopes a token grants: ``rag:read`` / ``rag:write`` from ``scope`` (a space-separated
    string, RFC 9068) or ``scp`` (a list or string, as some providers send it). Other scopes are ignored."""
    granted: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        items = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
        granted.update(str(item) for item in items)
    return frozenset(s for s in INTERNAL_SCOPES if oauth_scope(s) in granted)
