"""OAuth 2.1 resource-server mode against a real OpenID provider: npm ``oidc-provider`` (tests/oidc),
run with node on 127.0.0.1, in front of a real ``mcp-rag serve --transport http``.

The provider issues RS256 JWT access tokens (client credentials grant, audience = the resource of
RFC 8707, ``rag:read`` / ``rag:write`` scopes, a ``tenant`` claim) and, for clients registered with
``token_format: opaque``, opaque tokens that only its introspection endpoint can explain. Its keys
are generated here, so the hostile cases that no honest provider issues (expired, wrong issuer,
``alg: none``, HS256 keyed with the public key...) are signed with its real private key.

Needs Node.js >= 20 and npm (``npm ci`` runs in tests/oidc when node_modules is missing).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from mcp import Client
from mcp.client.auth import TokenStorage
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp.shared.exceptions import MCPError

from mcp_rag.oauth import claim, metadata_urls, token_scopes
from tests.mcp_calls import call, call_error
from tests.pgcluster import PgServer, free_port
from tests.serverproc import ServerProcess, base_env, mcp_http, mcp_sse, scratch_database
from tests.test_transports_integration import inspector, run_inspector  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
RS_CLIENT = ("mcp-rag-resource-server", "rs-secret-" + "s" * 32)
API_KEY = "oauth-test-api-key-" + "k" * 16
CLIENTS = {
    # client_id: (tenant, scope, token_format, token_ttl)
    "acme-rw": ("acme", "rag:read rag:write", "jwt", 3600),
    "acme-ro": ("acme", "rag:read", "jwt", 3600),
    "acme-wo": ("acme", "rag:write", "jwt", 3600),
    "globex-rw": ("globex", "rag:read rag:write", "jwt", 3600),
    "acme-opaque": ("acme", "rag:read rag:write", "opaque", 3600),
    "acme-opaque-brief": ("acme", "rag:read", "opaque", 3),
    "no-tenant": (None, "rag:read", "jwt", 3600),
}


def secret_of(client_id: str) -> str:
    return f"{client_id}-secret-" + "x" * 24


def rsa_jwk(kid: str) -> tuple[dict[str, Any], rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key))
    jwk.update(kid=kid, alg="RS256", use="sig")
    return jwk, key


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    done = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    match = re.match(r"v(\d+)", done.stdout.strip())
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def oidc_node_modules() -> Path:
    """tests/oidc/node_modules, installed with ``npm ci`` from package-lock.json when missing."""
    major = _node_major()
    if major is None or major < 20 or shutil.which("npm") is None:
        pytest.fail("Node.js >= 20 and npm are needed for the OAuth tests (apt-get install nodejs npm)")
    modules = OIDC_DIR / "node_modules"
    if not (modules / "oidc-provider" / "package.json").exists():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=OIDC_DIR,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return modules


class OidcProvider:
    """``node tests/oidc/provider.mjs`` on a free port; restartable with another key set."""

    def __init__(self, workdir: Path, resources: list[str]) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.resources = resources
        self.keys: list[tuple[dict[str, Any], rsa.RSAPrivateKey]] = [rsa_jwk("key-1")]
        self.proc: subprocess.Popen[bytes] | None = None
        clients = [
            {
                "client_id": RS_CLIENT[0],
                "client_secret": RS_CLIENT[1],
                "grant_types": [],
                "response_types": [],
                "redirect_uris": [],
            }
        ]
        for client_id, (tenant, scope, token_format, ttl) in CLIENTS.items():
            entry: dict[str, Any] = {
                "client_id": client_id,
                "client_secret": secret_of(client_id),
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "scope": scope,
                "token_format": token_format,
                "token_ttl": ttl,
            }
            if tenant is not None:
                entry["tenant"] = tenant
            clients.append(entry)
        (workdir / "clients.json").write_text(json.dumps(clients))

    @property
    def signing(self) -> tuple[dict[str, Any], rsa.RSAPrivateKey]:
        return self.keys[0]

    def start(self) -> OidcProvider:
        (self.workdir / "jwks.json").write_text(json.dumps({"keys": [jwk for jwk, _ in self.keys]}))
        env = {
            **os.environ,
            "OIDC_PORT": str(self.port),
            "OIDC_RESOURCES": ",".join(self.resources),
            "OIDC_JWKS_FILE": str(self.workdir / "jwks.json"),
            "OIDC_CLIENTS_FILE": str(self.workdir / "clients.json"),
        }
        log = (self.workdir / "oidc.log").open("ab")
        self.proc = subprocess.Popen(
            ["node", str(OIDC_DIR / "provider.mjs")], env=env, cwd=self.workdir, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "oidc.log").read_text()
            try:
                if httpx.get(self.issuer + "/.well-known/openid-configuration", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("oidc-provider did not start:\n" + (self.workdir / "oidc.log").read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def rotate(self) -> None:
        """A new signing key first; the old one stays published (tokens it signed stay valid)."""
        self.stop()
        self.keys.insert(0, rsa_jwk(f"key-{len(self.keys) + 1}"))
        self.start()

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = httpx.get(self.issuer + "/test/counts", timeout=5).json()
        return result

    def token(self, client_id: str, resource: str | None = None, scope: str | None = None) -> str:
        data = {
            "grant_type": "client_credentials",
            "resource": resource or self.resources[0],
            "scope": scope or CLIENTS[client_id][1],
        }
        response = httpx.post(self.issuer + "/token", data=data, auth=(client_id, secret_of(client_id)), timeout=10)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def mint(self, claims: dict[str, Any], *, key: rsa.RSAPrivateKey | None = None, kid: str | None = None) -> str:
        """A token signed with the provider's own private key (for what an honest provider never issues)."""
        jwk, private = self.signing
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": self.resources[0],
            "sub": "minted",
            "client_id": "minted",
            "iat": now,
            "exp": now + 600,
            "scope": "rag:read rag:write",
            "tenant": "acme",
            **claims,
        }
        return jwt.encode(
            payload, key or private, algorithm="RS256", headers={"kid": kid or jwk["kid"], "typ": "at+jwt"}
        )


@dataclass
class Deployment:
    provider: OidcProvider
    server: ServerProcess
    public_url: str

    @property
    def mcp_url(self) -> str:
        return self.public_url + "/mcp"

    @property
    def sse_url(self) -> str:
        return self.public_url + "/sse"


def start_deployment(
    pg_server: PgServer, template_db: str, model_dir: Path, work: Path, **settings: Any
) -> tuple[Deployment, str]:
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    provider = OidcProvider(work, [public_url + "/mcp", public_url + "/sse", public_url + "/elsewhere"]).start()
    name, dsn = scratch_database(pg_server, template_db)
    env = base_env(
        database_url=dsn,
        model_dir=model_dir,
        data_dir=work / "data",
        public_url=public_url,
        oauth_issuer=provider.issuer,
        oauth_introspection_client_id=RS_CLIENT[0],
        oauth_introspection_client_secret=RS_CLIENT[1],
        oauth_clock_skew_seconds=5,
        oauth_jwks_min_refresh_seconds=2,
        api_keys=[{"token": API_KEY, "tenant": "acme", "scopes": ["read", "write"]}],
        **settings,
    )
    server = ServerProcess(env, work, port=port).start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        provider.stop()
        raise
    return Deployment(provider, server, public_url), name


@pytest.fixture(scope="module")
def deployment(
    oidc_node_modules: Path,
    pg_server: PgServer,
    template_db: str,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("oauth")
    dep, name = start_deployment(pg_server, template_db, model_dir, work)
    try:
        yield dep
    finally:
        dep.server.stop()
        dep.provider.stop()
        pg_server.drop_database(name)


def challenge(response: httpx.Response) -> dict[str, str]:
    header = response.headers.get("www-authenticate", "")
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def tools_call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


# --- metadata and challenges ---------------------------------------------------------------------


def test_protected_resource_metadata_is_public(deployment: Deployment) -> None:
    for path, resource in [
        ("/.well-known/oauth-protected-resource", deployment.mcp_url),
        ("/.well-known/oauth-protected-resource/mcp", deployment.mcp_url),
        ("/.well-known/oauth-protected-resource/sse", deployment.sse_url),
    ]:
        response = httpx.get(deployment.public_url + path, timeout=10)
        assert response.status_code == 200, (path, response.text)
        metadata = response.json()
        assert metadata["resource"] == resource
        assert metadata["authorization_servers"] == [deployment.provider.issuer]
        assert metadata["scopes_supported"] == ["rag:read", "rag:write"]
        assert metadata["bearer_methods_supported"] == ["header"]
    assert httpx.get(deployment.public_url + "/.well-known/other", timeout=10).status_code == 401


def test_every_401_points_to_the_metadata(deployment: Deployment) -> None:
    base = deployment.public_url
    prm_mcp = base + "/.well-known/oauth-protected-resource/mcp"
    prm_sse = base + "/.well-known/oauth-protected-resource/sse"
    requests = [
        ("POST", "/mcp", prm_mcp),
        ("GET", "/mcp", prm_mcp),
        ("GET", "/sse", prm_sse),
        ("POST", "/messages/?session_id=x", prm_sse),
        ("GET", "/api/mobile/search?q=x", prm_mcp),
        ("GET", "/metrics", prm_mcp),
    ]
    with httpx.Client(base_url=base, timeout=10) as http:
        for method, path, prm in requests:
            for headers, error in [
                ({}, None),
                ({"Authorization": "Bearer not-a-token"}, "invalid_token"),
                ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
            ]:
                response = http.request(method, path, headers=headers, json=tools_call("search", query="x"))
                assert response.status_code == 401, (method, path, headers, response.text)
                params = challenge(response)
                assert params["resource_metadata"] == prm
                assert params["scope"] == "rag:read rag:write"
                assert params.get("error") == error, (method, path, params)


# --- the whole discovery flow, as a client does it ------------------------------------------------


async def test_discovery_registration_and_calls_over_http_and_sse(deployment: Deployment) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        # 1. An unauthenticated request: the 401 names the resource metadata.
        first = await http.post(
            deployment.mcp_url,
            headers=MCP_HEADERS,
            json={
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"},
                },
            },
        )
        assert first.status_code == 401
        prm_url = challenge(first)["resource_metadata"]
        # 2. Protected resource metadata -> the authorization server.
        prm = (await http.get(prm_url)).json()
        issuer = prm["authorization_servers"][0]
        # 3. Authorization server metadata (RFC 8414 well-known URL).
        as_metadata = (await http.get(issuer + "/.well-known/oauth-authorization-server")).json()
        assert as_metadata["issuer"] == issuer
        # 4. Dynamic client registration (RFC 7591).
        registered = await http.post(
            as_metadata["registration_endpoint"],
            json={
                "client_name": "oauth-test",
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "token_endpoint_auth_method": "client_secret_basic",
                "scope": " ".join(prm["scopes_supported"]),
                "tenant": "acme",
            },
        )
        assert registered.status_code == 201, registered.text
        client = registered.json()
        # 5. A token for the resource (RFC 8707).
        issued = await http.post(
            as_metadata["token_endpoint"],
            auth=(client["client_id"], client["client_secret"]),
            data={"grant_type": "client_credentials", "resource": prm["resource"], "scope": "rag:read rag:write"},
        )
        assert issued.status_code == 200, issued.text
        token = issued.json()["access_token"]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"

    # 6. MCP calls over streamable HTTP and over SSE.
    marker = uuid.uuid4().hex
    async with mcp_http(deployment.mcp_url, token) as mcp:
        added = await call(
            mcp,
            "ingest_text",
            text=f"Puffins nest in burrows on sea cliffs. {marker}",
            title="Puffins",
            collection="birds",
        )
        doc_id = added["documents"][0]["document_id"]
        found = await call(mcp, "search", query="where do puffins nest", collection="birds")
        assert found["results"][0]["id"] == doc_id
        fetched = await call(mcp, "fetch", id=doc_id)
        assert fetched["text"].endswith(marker)
        assert fetched["title"] == "Puffins"
    async with mcp_sse(deployment.sse_url, token) as mcp:
        found = await call(mcp, "search", query="puffins burrows", collection="birds")
        assert [h["document_id"] for h in found["results"]] == [doc_id]
        assert (await call(mcp, "fetch", id=doc_id))["id"] == doc_id
    # The same tenant through an API key (service-to-service callers keep working beside OAuth).
    async with mcp_http(deployment.mcp_url, API_KEY) as mcp:
        assert (await call(mcp, "fetch", id=doc_id))["url"] == fetched["url"]


class MemoryTokens(TokenStorage):
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


async def test_the_sdk_client_discovers_everything_from_the_401(deployment: Deployment) -> None:
    """The MCP SDK's own OAuth client (client credentials) starts from nothing but the server URL."""
    for url, transport in [(deployment.mcp_url, "http"), (deployment.sse_url, "sse")]:
        # It asks for the scopes the 401 names (rag:read rag:write), so the client must be allowed both.
        auth = ClientCredentialsOAuthProvider(
            url, MemoryTokens(), "acme-rw", secret_of("acme-rw"), scope="rag:read", issuer=deployment.provider.issuer
        )
        if transport == "http":
            async with (
                httpx2.AsyncClient(auth=auth, timeout=30) as http,
                Client(streamable_http_client(url, http_client=http)) as mcp,
            ):
                stats = await call(mcp, "stats")
        else:
            async with Client(sse_client(url, auth=auth)) as mcp:
                stats = await call(mcp, "stats")
        assert stats["documents"] >= 0


# --- hostile tokens ---------------------------------------------------------------------------------


def hostile_tokens(provider: OidcProvider) -> dict[str, str]:
    jwk, private = provider.signing
    now = int(time.time())
    real = provider.token("acme-rw")
    header, payload, signature = real.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["tenant"] = "globex"
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hmac as hmac_module

    hs_header = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": jwk["kid"]}).encode())
    hs_body = b64(json.dumps({**claims, "tenant": "acme"}).encode())
    hs_signature = b64(hmac_module.new(public_pem, f"{hs_header}.{hs_body}".encode(), "sha256").digest())
    none_header = b64(json.dumps({"alg": "none", "typ": "at+jwt", "kid": jwk["kid"]}).encode())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "expired": provider.mint({"iat": now - 7200, "exp": now - 3600}),
        "expired just beyond the leeway": provider.mint({"iat": now - 600, "exp": now - 30}),
        "not yet valid": provider.mint({"nbf": now + 3600}),
        "wrong audience": provider.token("acme-rw", resource=provider.resources[2]),
        "wrong issuer": provider.mint({"iss": "http://127.0.0.1:1/evil"}),
        "no expiry": provider.mint({"exp": None}),
        "tampered payload": f"{header}.{b64(json.dumps(claims).encode())}.{signature}",
        "tampered signature": f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}",
        "alg none": f"{none_header}.{b64(json.dumps(claims).encode())}.",
        "HS256 keyed with the public key": f"{hs_header}.{hs_body}.{hs_signature}",
        "signed by an unknown key": provider.mint({}, key=stranger, kid="not-published"),
        "signed by a stranger under the real kid": provider.mint({}, key=stranger),
        "no tenant claim": provider.token("no-tenant"),
        "opaque garbage": "opaque-" + uuid.uuid4().hex,
    }


async def test_hostile_tokens_are_refused_and_nothing_runs(deployment: Deployment) -> None:
    marker = "HOSTILE" + uuid.uuid4().hex
    tokens = hostile_tokens(deployment.provider)
    with httpx.Client(base_url=deployment.public_url, timeout=10) as http:
        for label, token in tokens.items():
            for path in ("/mcp", "/messages/?session_id=" + uuid.uuid4().hex):
                response = http.post(
                    path,
                    headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
                    json=tools_call("ingest_text", text=f"{label} {marker}"),
                )
                assert response.status_code == 401, (label, path, response.status_code, response.text)
                assert challenge(response)["error"] == "invalid_token", label
            mobile = http.get(
                "/api/mobile/search", params={"q": "puffins"}, headers={"Authorization": f"Bearer {token}"}
            )
            assert mobile.status_code == 401, label
        # A well-formed token minted the same way is accepted: the refusals above are about what differs.
        good = deployment.provider.mint({})
        assert (
            http.get(
                "/api/mobile/search", params={"q": marker}, headers={"Authorization": f"Bearer {good}"}
            ).status_code
            == 200
        )
    async with mcp_http(deployment.mcp_url, API_KEY) as mcp:
        assert (await call(mcp, "search", query=marker, mode="lexical"))["results"] == []
    log = deployment.server.log()
    for token in tokens.values():
        assert token not in log


# --- scopes ------------------------------------------------------------------------------------------


async def test_a_missing_scope_is_403_insufficient_scope(deployment: Deployment) -> None:
    read_only = deployment.provider.token("acme-ro")
    write_only = deployment.provider.token("acme-wo")
    with httpx.Client(base_url=deployment.public_url, timeout=10) as http:
        for path in ("/mcp", "/messages/?session_id=" + uuid.uuid4().hex):
            for tool in ("ingest_text", "delete_collection", "delete_document"):
                response = http.post(
                    path,
                    headers={**MCP_HEADERS, "Authorization": f"Bearer {read_only}"},
                    json=tools_call(tool, text="x", collection="x", document_id="x"),
                )
                assert response.status_code == 403, (path, tool, response.text)
                params = challenge(response)
                assert params["error"] == "insufficient_scope"
                assert params["scope"] == "rag:read rag:write"
                assert "rag:write" in params["error_description"]
            batch = [tools_call("search", query="x"), tools_call("ingest_text", text="x")]
            response = http.post(path, headers={**MCP_HEADERS, "Authorization": f"Bearer {read_only}"}, json=batch)
            assert response.status_code == 403, "a batch needs every scope its calls need"
            for request in (
                tools_call("search", query="x"),
                {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "rag://collections"}},
            ):
                response = http.post(
                    path, headers={**MCP_HEADERS, "Authorization": f"Bearer {write_only}"}, json=request
                )
                assert response.status_code == 403
                assert challenge(response)["scope"] == "rag:read rag:write"
        mobile = http.get("/api/mobile/search", params={"q": "x"}, headers={"Authorization": f"Bearer {write_only}"})
        assert mobile.status_code == 403
        assert challenge(mobile) | {"error_description": ""} == {
            "error": "insufficient_scope",
            "error_description": "",
            "resource_metadata": deployment.public_url + "/.well-known/oauth-protected-resource/mcp",
            "scope": "rag:read rag:write",
        }
        assert (
            http.get(
                "/api/mobile/search", params={"q": "x"}, headers={"Authorization": f"Bearer {read_only}"}
            ).status_code
            == 200
        )

    # Through a real client session: reads work, a write call is refused by HTTP 403 and writes nothing.
    marker = uuid.uuid4().hex
    async with mcp_http(deployment.mcp_url, read_only) as mcp:
        assert "fetch" in {t.name for t in (await mcp.list_tools()).tools}
        await call(mcp, "list_collections")
        with pytest.raises(MCPError, match="error response"):  # the SDK client's report of an HTTP error
            await mcp.call_tool("ingest_text", {"text": f"should not be stored {marker}"})
    async with mcp_http(deployment.mcp_url, API_KEY) as mcp:
        assert (await call(mcp, "search", query=marker, mode="lexical"))["results"] == []


# --- tenants --------------------------------------------------------------------------------------------


async def test_a_tenant_cannot_reach_another_tenants_document(deployment: Deployment) -> None:
    acme = deployment.provider.token("acme-rw")
    globex = deployment.provider.token("globex-rw")
    async with mcp_http(deployment.mcp_url, acme) as mcp:
        added = await call(mcp, "ingest_text", text="Acme's secret recipe: saffron and cardamom.", title="Recipe")
        doc_id = added["documents"][0]["document_id"]
    async with mcp_http(deployment.mcp_url, globex) as mcp:
        for tool, args in [
            ("fetch", {"id": doc_id}),
            ("get_document", {"document_id": doc_id}),
            ("delete_document", {"document_id": doc_id}),
        ]:
            assert f"no document with id {doc_id!r}" in await call_error(mcp, tool, **args)
        assert (await call(mcp, "search", query="saffron cardamom recipe"))["results"] == []
    response = httpx.get(
        f"{deployment.public_url}/api/mobile/documents/{doc_id}",
        headers={"Authorization": f"Bearer {globex}"},
        timeout=10,
    )
    assert response.status_code == 404
    async with mcp_http(deployment.mcp_url, acme) as mcp:
        assert (await call(mcp, "fetch", id=doc_id))["title"] == "Recipe"


def test_an_sse_session_belongs_to_the_client_that_opened_it(deployment: Deployment) -> None:
    """Another tenant's token, or another client of the same tenant, cannot post into the session; a
    fresh token of the same client (a refresh) can."""
    provider = deployment.provider
    owner = provider.token("acme-rw")
    events: queue.Queue[str] = queue.Queue()

    def read_stream() -> None:
        try:
            with httpx.stream(
                "GET",
                deployment.sse_url,
                headers={"Authorization": f"Bearer {owner}"},
                timeout=httpx.Timeout(30, read=60),
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events.put(line[5:].strip())
        except httpx.HTTPError:
            pass  # the server closes the stream when it stops

    threading.Thread(target=read_stream, daemon=True).start()
    endpoint = events.get(timeout=60)
    assert endpoint.startswith("/messages/?session_id=")
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    with httpx.Client(
        base_url=deployment.public_url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
    ) as http:

        def post(token: str, message: dict[str, Any]) -> httpx.Response:
            return http.post(endpoint, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}, json=message)

        assert (
            post(
                owner,
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "clientInfo": {"name": "t", "version": "0"},
                    },
                },
            ).status_code
            == 202
        )
        assert "result" in json.loads(events.get(timeout=60))
        post(owner, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        for intruder in ("globex-rw", "acme-ro"):
            refused = post(provider.token(intruder), listing)
            assert refused.status_code == 404, (intruder, refused.status_code, refused.text)
        assert post(provider.token("acme-rw"), listing).status_code == 202
        assert "fetch" in json.dumps(json.loads(events.get(timeout=60)))


# --- keys and introspection ---------------------------------------------------------------------------


def test_rotated_keys_are_fetched_once_for_an_unknown_kid(deployment: Deployment) -> None:
    provider = deployment.provider
    headers = lambda token: {"Authorization": f"Bearer {token}"}  # noqa: E731
    url = deployment.public_url + "/api/mobile/search?q=rotation"
    old = provider.token("acme-ro")
    assert httpx.get(url, headers=headers(old), timeout=10).status_code == 200
    provider.rotate()
    time.sleep(2.1)  # the minimum interval between two key fetches (MCP_RAG_OAUTH_JWKS_MIN_REFRESH_SECONDS)
    new = provider.token("acme-ro")
    assert jwt.get_unverified_header(new)["kid"] == "key-2"
    assert httpx.get(url, headers=headers(new), timeout=10).status_code == 200
    assert httpx.get(url, headers=headers(old), timeout=10).status_code == 200
    assert provider.counts()["jwks"] == 1, "one fetch for the new kid"
    # Tokens with kids the provider never published do not make the server hammer it.
    for _ in range(20):
        stray = provider.mint({}, kid="never-" + uuid.uuid4().hex[:6])
        assert httpx.get(url, headers=headers(stray), timeout=10).status_code == 401
    assert provider.counts()["jwks"] <= 2


def test_opaque_tokens_are_introspected_and_cached_no_longer_than_they_live(deployment: Deployment) -> None:
    provider = deployment.provider
    url = deployment.public_url + "/api/mobile/search?q=introspection"
    opaque = provider.token("acme-opaque")
    assert opaque.count(".") != 2
    before = provider.counts()["introspection"]
    for _ in range(3):
        assert httpx.get(url, headers={"Authorization": f"Bearer {opaque}"}, timeout=10).status_code == 200
    assert provider.counts()["introspection"] == before + 1
    brief = provider.token("acme-opaque-brief")  # lives 3 s
    assert httpx.get(url, headers={"Authorization": f"Bearer {brief}"}, timeout=10).status_code == 200
    time.sleep(3.5)
    expired = httpx.get(url, headers={"Authorization": f"Bearer {brief}"}, timeout=10)
    assert expired.status_code == 401
    assert challenge(expired)["error"] == "invalid_token"
    # An opaque read-only token gets the same 403 as a JWT one.
    response = httpx.post(
        deployment.mcp_url,
        headers={**MCP_HEADERS, "Authorization": f"Bearer {brief}"},
        json=tools_call("ingest_text", text="x"),
        timeout=10,
    )
    assert response.status_code == 401  # expired first


def test_inspector_cli_connects_with_a_token(
    inspector: list[str],  # noqa: F811  (the fixture imported above)
    deployment: Deployment,
    tmp_path: Path,
) -> None:
    token = deployment.provider.token("acme-ro")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_RAG_")}
    auth = ["--header", f"Authorization: Bearer {token}"]
    listed = run_inspector(
        [*inspector, deployment.mcp_url, "--transport", "http", *auth, "--method", "tools/list"], env, tmp_path
    )
    assert {"search", "fetch"} <= {t["name"] for t in listed["tools"]}
    called = run_inspector(
        [
            *inspector,
            deployment.mcp_url,
            "--transport",
            "http",
            *auth,
            "--method",
            "tools/call",
            "--tool-name",
            "stats",
        ],
        env,
        tmp_path,
    )
    assert called.get("isError", False) is False, called


# --- the authorization server goes away -----------------------------------------------------------------


async def test_authorization_server_down_means_503_and_not_ready(
    oidc_node_modules: Path, pg_server: PgServer, template_db: str, model_dir: Path, tmp_path: Path
) -> None:
    dep, name = start_deployment(pg_server, template_db, model_dir, tmp_path, oauth_jwks_max_age_seconds=2)
    try:
        url = dep.public_url + "/api/mobile/search?q=down"
        jwt_token = dep.provider.token("acme-ro")
        opaque = dep.provider.token("acme-opaque")
        assert httpx.get(url, headers={"Authorization": f"Bearer {jwt_token}"}, timeout=10).status_code == 200
        dep.provider.stop()
        await anyio.sleep(2.5)  # the cached keys are now too old to trust
        for token in (jwt_token, opaque, dep.provider.mint({}, kid="unknown")):
            response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert response.status_code == 503, response.text
            assert "authorization server" in response.json()["message"]
            response = httpx.post(
                dep.mcp_url,
                headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
                json=tools_call("ingest_text", text="while the AS is down"),
                timeout=10,
            )
            assert response.status_code == 503
        ready = httpx.get(dep.public_url + "/ready", timeout=10)
        assert ready.status_code == 503
        assert any("authorization server" in reason for reason in ready.json()["reasons"]), ready.json()
        # API keys do not depend on the authorization server.
        assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).status_code == 200

        dep.provider.start()
        deadline = time.monotonic() + 30
        while httpx.get(dep.public_url + "/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "not ready again after the authorization server came back"
            await anyio.sleep(0.5)
        assert httpx.get(url, headers={"Authorization": f"Bearer {jwt_token}"}, timeout=10).status_code == 200
        async with mcp_http(dep.mcp_url, API_KEY) as mcp:
            assert (await call(mcp, "search", query="while the AS is down", mode="lexical"))["results"] == []
    finally:
        dep.server.stop()
        dep.provider.stop()
        pg_server.drop_database(name)


# --- the pieces, without servers ------------------------------------------------------------------------


def test_metadata_urls_follow_rfc_8414_then_openid_connect() -> None:
    assert metadata_urls("https://login.example.com") == [
        "https://login.example.com/.well-known/oauth-authorization-server",
        "https://login.example.com/.well-known/openid-configuration",
    ]
    assert metadata_urls("https://login.example.com/realms/acme") == [
        "https://login.example.com/.well-known/oauth-authorization-server/realms/acme",
        "https://login.example.com/realms/acme/.well-known/openid-configuration",
        "https://login.example.com/realms/acme/.well-known/oauth-authorization-server",
    ]


def test_scopes_come_from_scope_or_scp_and_only_rag_scopes_count() -> None:
    assert token_scopes({"scope": "openid rag:read profile"}) == {"read"}
    assert token_scopes({"scp": ["rag:write", "rag:read"]}) == {"read", "write"}
    assert token_scopes({"scp": "rag:write"}) == {"write"}
    assert token_scopes({"scope": "read write rag:admin RAG:READ"}) == set()
    assert token_scopes({}) == set()


def test_the_tenant_claim_may_be_nested() -> None:
    assert claim({"tenant": "acme"}, "tenant") == "acme"
    assert claim({"org": {"tenant": "acme"}}, "org.tenant") == "acme"
    assert claim({"org.tenant": "flat"}, "org.tenant") == "flat"
    assert claim({"org": "acme"}, "org.tenant") is None
