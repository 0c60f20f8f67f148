"""Access control, deeper than test_http.py: against one real ``mcp-rag serve --transport http``
with three API keys (tenant acme read+write, acme read-only, tenant globex read+write).

* every HTTP route of the app except ``/health`` and ``/ready`` — enumerated from
  ``create_app(...).routes``, so a new route is covered without editing this file — answers
  401 to a missing, wrong or malformed token, for every method;
* a tenant cannot read, search, list or delete another tenant's data through any tool, resource
  or the mobile API, even knowing the other tenant's document ids, collection names and source
  URIs, or crafting ``list_documents`` cursors from them;
* an SSE or streamable-HTTP session belongs to the key that opened it;
* a read-scope key cannot write through any write tool (enumerated from ``tools/list``);
* bad Host / Origin headers are refused, on every route when the server runs without keys;
* tokens and document text never reach the server's log.
"""

from __future__ import annotations

import base64
import json
import queue
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.shared.exceptions import MCPError
from starlette.routing import Mount, Route

from mcp_rag.http import RuntimeHolder, create_app
from mcp_rag.settings import Settings
from tests.pgcluster import PgServer
from tests.reliability_support import ServerProc, base_env, http_client, tool_text

pytestmark = pytest.mark.integration

TOKEN_A = "acme-writer-" + uuid.uuid4().hex
TOKEN_A_RO = "acme-reader-" + uuid.uuid4().hex
TOKEN_B = "globex-writer-" + uuid.uuid4().hex
TOKEN_A_WO = "acme-pipeline-" + uuid.uuid4().hex
KEYS = [
    {"token": TOKEN_A, "tenant": "acme", "scopes": ["read", "write"]},
    {"token": TOKEN_A_RO, "tenant": "acme", "scopes": ["read"]},
    {"token": TOKEN_A_WO, "tenant": "acme", "scopes": ["write"]},  # an ingestion pipeline's key
    {"token": TOKEN_B, "tenant": "globex", "scopes": ["read", "write"]},
]
MARKER = "QUOKKA" + uuid.uuid4().hex[:10].upper()
"""Appears in acme's documents (and in failing arguments): must never be logged or leak to globex."""
ACME_TEXT = f"Acme board memo {MARKER}: the merger with Initech closes on Friday; keep it quiet."
ACME_COLLECTION = "acme-board"
ACME_SOURCE = "https://intranet.acme.example/board/memo-17"
OPEN_PATHS = {"/health", "/ready"}
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@pytest.fixture(scope="module")
def server(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    name = f"ac_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name, template=template_db)
    work = tmp_path_factory.mktemp("access-control")
    root = work / "files"
    root.mkdir()
    (root / "memo.md").write_text(f"# Memo\n\n{ACME_TEXT}\n")
    env = base_env(
        model_dir,
        work / "data",
        dsn,
        api_keys=json.dumps(KEYS),
        tenant_roots=json.dumps({"acme": [str(root)]}),
        log_format="json",
        log_level="DEBUG",
    )
    proc = ServerProc(env, work / "server.log")
    try:
        yield proc.wait_healthy()
    finally:
        proc.close()
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def acme_doc(server: ServerProc) -> dict[str, Any]:
    """acme's document (and one of globex's), ingested once."""

    async def seed() -> dict[str, Any]:
        async with http_client(server.url, TOKEN_A) as client:
            result = await client.call_tool(
                "ingest_text",
                {
                    "text": ACME_TEXT,
                    "title": "Board memo",
                    "collection": ACME_COLLECTION,
                    "source_uri": ACME_SOURCE,
                    "metadata": {"classification": "secret"},
                },
            )
            assert not result.is_error, tool_text(result)
        async with http_client(server.url, TOKEN_B) as client:
            result = await client.call_tool(
                "ingest_text",
                {
                    "text": "Globex picnic schedule: volcano tour at noon.",
                    "title": "Picnic",
                    "source_uri": "https://intranet.globex.example/picnic",
                },
            )
            assert not result.is_error, tool_text(result)
        doc = result.structured_content["documents"][0]
        return {"acme": (await _only_doc(server, TOKEN_A)), "globex_id": doc["document_id"]}

    return anyio.run(seed)


async def _only_doc(server: ServerProc, token: str) -> dict[str, Any]:
    async with http_client(server.url, token) as client:
        listed = (await client.call_tool("list_documents", {"collection": ACME_COLLECTION})).structured_content
    assert listed is not None and len(listed["documents"]) == 1
    return dict(listed["documents"][0])


# --- 1. every route needs a token ---------------------------------------------------------------


def app_routes(model_dir: Path, tmp_path: Path) -> list[tuple[str, list[str]]]:
    """(path, methods) of every route of the app as built for production (with keys)."""
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql://nobody@127.0.0.1:1/none",
        embedding_model_dir=model_dir,
        api_keys=KEYS,
        _env_file=None,
    )
    app = create_app(settings, holder=RuntimeHolder())
    found: list[tuple[str, list[str]]] = []
    for route in app.routes:
        if isinstance(route, Route):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            found.append((path, sorted(route.methods or ALL_METHODS)))
        elif isinstance(route, Mount):
            found.append((route.path.rstrip("/") + "/", ALL_METHODS))
        else:  # any other kind of route is checked with every method
            found.append((str(getattr(route, "path", "/")), ALL_METHODS))
    return found


def test_every_route_except_the_probes_requires_a_valid_token(
    server: ServerProc, model_dir: Path, tmp_path: Path
) -> None:
    routes = app_routes(model_dir, tmp_path)
    paths = {path for path, _ in routes}
    assert {
        "/health",
        "/ready",
        "/metrics",
        "/mcp",
        "/sse",
        "/messages/",
        "/api/mobile/search",
        "/api/mobile/documents/x",
        "/api/mobile/openapi.json",
    } <= paths, paths
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer " + "wrong-" + uuid.uuid4().hex},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN_A} {TOKEN_A}"},  # two tokens
        {"Authorization": f"Token {TOKEN_A}"},  # another scheme
        {"Authorization": "Basic " + base64.b64encode(f"acme:{TOKEN_A}".encode()).decode()},
        {"Authorization": TOKEN_A},  # no scheme
        {"Authorization": f"Bearer {TOKEN_A}x"},  # one character more
        {"Authorization": f"Bearer {TOKEN_A[:-1]}"},  # one character less
        {"Authorization": f"Bearer {TOKEN_A.upper()}"},
        {"X-API-Key": TOKEN_A},  # not where the key goes
    ]
    checked = 0
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for path, methods in [*routes, ("/no/such/route", ALL_METHODS), ("/mcp/", ALL_METHODS)]:
            for method in methods:
                for headers in bad_headers:
                    response = http.request(method, path, headers=headers)
                    if path in OPEN_PATHS:
                        assert response.status_code in (200, 503), (method, path, response.status_code)
                    else:
                        assert response.status_code == 401, (method, path, headers, response.status_code)
                        assert response.headers.get("www-authenticate", "").startswith("Bearer")
                    checked += 1
        # A valid token gets past the gate on every route (whatever the route then answers).
        for path, methods in routes:  # streamed: /sse (and GET /mcp) answer with an endless event stream
            with http.stream(methods[0], path, headers={"Authorization": f"Bearer {TOKEN_A_RO}"}) as response:
                assert response.status_code != 401, (path, response.status_code)
    assert checked > 200


# --- 2. tenants cannot reach each other ---------------------------------------------------------------


def _cursor(source_uri: str, document_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([source_uri, document_id]).encode()).decode()


async def _globex_sees_nothing_of_acme(client: Client, acme: dict[str, Any]) -> None:
    acme_id = acme["document_id"]
    random_id = str(uuid.uuid4())

    # Reading by id: the same answer as for an id that does not exist (no existence oracle).
    for tool, argument, extra in (
        ("get_document", "document_id", {}),
        ("delete_document", "document_id", {}),
        ("fetch", "id", {}),
        ("get_chunks", "document_id", {"around": 0}),
    ):
        theirs = await client.call_tool(tool, {argument: acme_id, **extra})
        nobody = await client.call_tool(tool, {argument: random_id, **extra})
        assert theirs.is_error and nobody.is_error
        assert tool_text(theirs).replace(acme_id, "ID") == tool_text(nobody).replace(random_id, "ID")

    # Searching with every filter that names acme's things.
    for args in [
        {"query": f"merger Initech {MARKER}"},
        {"query": f"merger Initech {MARKER}", "mode": "lexical"},
        {"query": "board memo", "document_ids": [acme_id]},
        {"query": "board memo", "source_prefix": "https://intranet.acme.example/"},
        {"query": "board memo", "source_prefix": ACME_SOURCE},
        {"query": "board memo", "collection": ACME_COLLECTION},
        {"query": "board memo", "metadata": {"classification": "secret"}},
        {"query": "board memo", "top_k": 50, "mode": "dense"},
    ]:
        result = await client.call_tool("search", args)
        assert not result.is_error, tool_text(result)
        assert all(
            r["document_id"] != acme_id and MARKER not in r["text"] for r in result.structured_content["results"]
        ), args

    # Listing, including with cursors made from acme's own ids and URIs.
    for args in [
        {},
        {"collection": ACME_COLLECTION},
        {"source_prefix": "https://intranet.acme"},
        {"cursor": _cursor("", acme_id)},
        {"cursor": _cursor(ACME_SOURCE, acme_id)},
        {"cursor": _cursor("\x00", acme_id)},
        {"cursor": _cursor("https://intranet.acme.example/", acme_id)},
        {"limit": 100},
    ]:
        result = await client.call_tool("list_documents", args)
        if result.is_error:
            assert "invalid cursor" in tool_text(result), tool_text(result)
            continue
        assert all(d["document_id"] != acme_id for d in result.structured_content["documents"]), args
    collections = (await client.call_tool("list_collections", {})).structured_content["collections"]
    assert ACME_COLLECTION not in [c["name"] for c in collections]
    deleted = await client.call_tool("delete_collection", {"collection": ACME_COLLECTION})
    assert deleted.is_error and "no collection" in tool_text(deleted)
    stats = (await client.call_tool("stats", {})).structured_content
    assert stats["documents"] == stats["index_points"] or stats["documents"] >= 1

    # Resources.
    with pytest.raises(MCPError) as missing:
        await client.read_resource(f"rag://documents/{acme_id}")
    assert acme_id in str(missing.value) and MARKER not in str(missing.value)
    listing = await client.read_resource("rag://collections")
    assert ACME_COLLECTION not in listing.contents[0].text  # type: ignore[union-attr]


async def test_a_tenant_cannot_reach_another_tenants_data(server: ServerProc, acme_doc: dict[str, Any]) -> None:
    acme = acme_doc["acme"]
    async with http_client(server.url, TOKEN_B) as client:  # streamable HTTP
        await _globex_sees_nothing_of_acme(client, acme)
    async with Client(sse_client(server.base + "/sse", headers={"Authorization": f"Bearer {TOKEN_B}"})) as client:
        await _globex_sees_nothing_of_acme(client, acme)
    async with http_client(server.url, TOKEN_B) as client:
        # Writing under acme's collection name and source URI makes globex's own document, and
        # deleting "that" collection deletes globex's only.
        mine = await client.call_tool(
            "ingest_text", {"text": "Globex's own memo.", "collection": ACME_COLLECTION, "source_uri": ACME_SOURCE}
        )
        assert not mine.is_error and mine.structured_content["added"] == 1
        assert mine.structured_content["documents"][0]["document_id"] != acme["document_id"]
        gone = await client.call_tool("delete_collection", {"collection": ACME_COLLECTION})
        assert not gone.is_error and gone.structured_content["documents"] == 1

    # The mobile API.
    async with httpx.AsyncClient(
        base_url=server.base, headers={"Authorization": f"Bearer {TOKEN_B}"}, timeout=30
    ) as http:
        document = await http.get(f"/api/mobile/documents/{acme['document_id']}")
        assert document.status_code == 404 and MARKER not in document.text
        for params in [
            {"q": f"merger {MARKER}"},
            {"q": "board memo", "collection": ACME_COLLECTION},
            {"q": "board memo", "limit": "10"},
        ]:
            found = await http.get("/api/mobile/search", params=params)
            assert found.status_code == 200, found.text
            assert all(r["document_id"] != acme["document_id"] for r in found.json()["results"])
            assert MARKER not in json.dumps(found.json()["results"])  # (the query itself is echoed back)

    # acme still has everything, untouched.
    async with http_client(server.url, TOKEN_A) as client:
        got = await client.call_tool("get_document", {"document_id": acme["document_id"]})
        assert not got.is_error and got.structured_content["text"] == ACME_TEXT
        found = await client.call_tool("search", {"query": f"merger Initech {MARKER}", "mode": "lexical"})
        assert [r["document_id"] for r in found.structured_content["results"]][:1] == [acme["document_id"]]


# --- 3. sessions belong to the key that opened them ------------------------------------------------------


INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_documents", "arguments": {}}}


def _headers(token: str, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        **extra,
    }


def test_sessions_belong_to_the_key_that_opened_them(server: ServerProc, acme_doc: dict[str, Any]) -> None:
    """Regression: globex, knowing acme's session id, could post into acme's SSE session (its
    answers then went to acme's stream) or use acme's streamable-HTTP session."""
    events: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    def read_stream() -> None:
        try:
            with httpx.stream(
                "GET",
                server.base + "/sse",
                headers={"Authorization": f"Bearer {TOKEN_A}"},
                timeout=httpx.Timeout(30, read=60),
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events.put(line[5:].strip())
                    if stop.is_set():
                        return
        except httpx.HTTPError:
            pass  # the server may close the stream when the test is done with it

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    endpoint = events.get(timeout=60)
    assert endpoint.startswith("/messages/?session_id=")
    with httpx.Client(base_url=server.base, timeout=30) as http:
        assert http.post(endpoint, headers=_headers(TOKEN_A), json=INIT).status_code == 202
        assert "result" in json.loads(events.get(timeout=60))
        http.post(endpoint, headers=_headers(TOKEN_A), json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        for intruder in (TOKEN_B, TOKEN_A_RO):  # another tenant, or the same tenant's other key
            refused = http.post(endpoint, headers=_headers(intruder), json=LIST)
            assert refused.status_code == 404, refused.text
        # The owner's own session still works.
        assert http.post(endpoint, headers=_headers(TOKEN_A), json=LIST).status_code == 202
        answer = json.loads(events.get(timeout=60))
        assert answer["id"] == 2 and "Board memo" in json.dumps(answer)
        stop.set()

        opened = http.post("/mcp", headers=_headers(TOKEN_A), json=INIT)
        session = opened.headers["mcp-session-id"]
        reused = http.post(
            "/mcp",
            headers=_headers(TOKEN_B, **{"mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}),
            json=LIST,
        )
        assert reused.status_code == 404, reused.text
        assert MARKER not in reused.text


# --- 4. read scope cannot write ------------------------------------------------------------------


async def test_read_scope_cannot_use_any_write_tool(
    server: ServerProc, acme_doc: dict[str, Any], tmp_path: Path
) -> None:
    acme = acme_doc["acme"]
    plausible: dict[str, dict[str, Any]] = {
        "ingest_text": {"text": "An intruder's text.", "collection": ACME_COLLECTION, "source_uri": ACME_SOURCE},
        "ingest_file": {"path": "memo.md"},
        "ingest_url": {"url": "https://example.com/"},
        "delete_document": {"document_id": acme["document_id"]},
        "delete_collection": {"collection": ACME_COLLECTION},
    }
    async with http_client(server.url, TOKEN_A_RO) as client:
        tools = (await client.list_tools()).tools
        writers = [t.name for t in tools if not (t.annotations and t.annotations.read_only_hint)]
        readers = [t.name for t in tools if t.annotations and t.annotations.read_only_hint]
        assert set(writers) == set(plausible), "a new write tool: give it plausible arguments here"
        for name in writers:
            result = await client.call_tool(name, plausible[name])
            assert result.is_error and "lacks the 'write' scope" in tool_text(result), (name, tool_text(result))
        for name in readers:  # the read tools do work with this key
            if name == "ingest_status":  # answers (there is no such job) rather than refusing the key
                result = await client.call_tool(name, {"job_id": str(uuid.uuid4())})
                assert "no ingest job" in tool_text(result), tool_text(result)
                continue
            args = {
                "search": {"query": "memo"},
                "get_document": {"document_id": acme["document_id"]},
                "fetch": {"id": acme["document_id"]},
                "get_chunks": {"document_id": acme["document_id"], "around": 0},
            }.get(name, {})
            assert not (await client.call_tool(name, args)).is_error, name
    async with http_client(server.url, TOKEN_A) as client:
        got = await client.call_tool("get_document", {"document_id": acme["document_id"]})
        assert not got.is_error and got.structured_content["text"] == ACME_TEXT
        assert got.structured_content["updated_at"] == acme["updated_at"]


async def test_a_key_without_read_scope_cannot_read(server: ServerProc, acme_doc: dict[str, Any]) -> None:
    """Regression: the resources did not check the read scope, so a write-only key (an ingestion
    pipeline's) could read every document of its tenant through rag://documents/{id}."""
    acme_id = acme_doc["acme"]["document_id"]
    async with http_client(server.url, TOKEN_A_WO) as client:
        tools = (await client.list_tools()).tools
        for name in [t.name for t in tools if t.annotations and t.annotations.read_only_hint]:
            args = {
                "search": {"query": "memo"},
                "get_document": {"document_id": acme_id},
                "fetch": {"id": acme_id},
                "get_chunks": {"document_id": acme_id, "around": 0},
                "ingest_status": {"job_id": str(uuid.uuid4())},
            }.get(name, {})
            result = await client.call_tool(name, args)
            assert result.is_error and "lacks the 'read' scope" in tool_text(result), (name, tool_text(result))
        for uri in (f"rag://documents/{acme_id}", "rag://collections"):
            with pytest.raises(MCPError, match="lacks the 'read' scope") as denied:
                await client.read_resource(uri)
            assert MARKER not in str(denied.value)
        written = await client.call_tool("ingest_text", {"text": "Pipeline output.", "collection": "pipeline"})
        assert not written.is_error, tool_text(written)
        assert not (await client.call_tool("delete_collection", {"collection": "pipeline"})).is_error
    async with httpx.AsyncClient(
        base_url=server.base, headers={"Authorization": f"Bearer {TOKEN_A_WO}"}, timeout=30
    ) as http:
        assert (await http.get(f"/api/mobile/documents/{acme_id}")).status_code == 403
        assert (await http.get("/api/mobile/search", params={"q": "memo"})).status_code == 403


# --- 5. Host and Origin ----------------------------------------------------------------------------


BAD_HOSTS = [
    "evil.example",
    "evil.example:8000",
    "127.0.0.1.evil.example",
    "localhost.evil.example:80",
    "127.0.0.2:8000",
    "0.0.0.0:8000",
    "[::2]:8000",
    "",
]
BAD_ORIGINS = [
    "http://evil.example",
    "https://evil.example:8000",
    "null",
    "http://127.0.0.1.evil.example",
    "http://localhost.evil.example:8000",
    "file://",
]


def test_bad_host_and_origin_are_refused_on_the_mcp_routes(server: ServerProc) -> None:
    auth = {
        "Authorization": f"Bearer {TOKEN_A}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    # A fresh connection per request: a refusal sent before the request body was read closes
    # the connection, which a reused keep-alive connection would see as a reset.
    with httpx.Client(base_url=server.base, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        for host in BAD_HOSTS:
            for method, path in [("POST", "/mcp"), ("GET", "/sse"), ("POST", "/messages/?session_id=0")]:
                response = http.request(method, path, headers={**auth, "Host": host}, json=INIT)
                assert response.status_code in (400, 421), (host, path, response.status_code)
        for origin in BAD_ORIGINS:
            for method, path in [("POST", "/mcp"), ("GET", "/sse")]:
                response = http.request(method, path, headers={**auth, "Origin": origin}, json=INIT)
                assert response.status_code == 403, (origin, path, response.status_code)


async def test_without_keys_every_route_checks_host_and_origin(model_dir: Path, tmp_path: Path) -> None:
    """Regression: a local server (no keys, loopback) answered the mobile API and /metrics to a
    DNS-rebinding page (Host: evil.example), handing a web page the local library."""
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql://nobody@127.0.0.1:1/none",
        embedding_model_dir=model_dir,
        _env_file=None,
    )
    app = create_app(settings, holder=RuntimeHolder())  # the runtime is never needed to refuse
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        for path in [
            "/api/mobile/search?q=secret",
            "/api/mobile/documents/x",
            "/api/mobile/openapi.json",
            "/metrics",
            "/mcp",
            "/sse",
        ]:
            for host in BAD_HOSTS:
                response = await http.get(path, headers={"Host": host})
                assert response.status_code in (400, 421), (path, host, response.status_code)
            for origin in BAD_ORIGINS:
                response = await http.get(path, headers={"Origin": origin})
                assert response.status_code == 403, (path, origin, response.status_code)
        assert (await http.get("/api/mobile/openapi.json")).status_code == 200
        local = {"Host": "localhost:8000", "Origin": "http://localhost:8000"}
        assert (await http.get("/api/mobile/openapi.json", headers=local)).status_code == 200
        assert (await http.get("/health", headers={"Host": "10.1.2.3:8000"})).status_code == 200  # kubelet probes


# --- 6. log hygiene (last: it reads the log of everything above) -------------------------------------


async def test_tokens_and_document_text_never_reach_the_log(server: ServerProc, acme_doc: dict[str, Any]) -> None:
    async with http_client(server.url, TOKEN_A) as client:
        # Successful and failing calls that carry the marker text in their arguments.
        await client.call_tool("search", {"query": f"what about {MARKER}?"})
        await client.call_tool("ingest_text", {"text": f"{MARKER} in a document", "collection": "bad name!"})
        await client.call_tool("ingest_text", {"text": f"{MARKER} again " * 3, "metadata": {"k": {"nested": 1}}})
        await client.call_tool("ingest_text", {"text": f"{MARKER} with a long title", "title": "x" * 2000})
        await client.call_tool("get_document", {"document_id": acme_doc["acme"]["document_id"]})
        # Argument errors quote dict keys in full (pydantic): a 300 KB key, logged by the SDK
        # with the error, must not make a 1.5 MB log line.
        huge = await client.call_tool("ingest_text", {"text": "x", "metadata": {"k" * 300_000: None}})
        assert huge.is_error
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
        await http.get("/api/mobile/search", params={"q": MARKER}, headers={"Authorization": f"Bearer {TOKEN_B}"})
        await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN_A}"})
        metrics = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN_A}"})
        await http.get("/mcp", headers={"Authorization": f"Bearer {TOKEN_A}x"})
    assert MARKER not in metrics.text and TOKEN_A not in metrics.text
    log = server.stderr_text()
    assert "tool call" in log and len(log) > 1000  # the log was really written (JSON lines, DEBUG)
    for secret in (TOKEN_A, TOKEN_A_RO, TOKEN_B, TOKEN_A_WO, TOKEN_A[-16:], TOKEN_B[-16:]):
        assert secret not in log, "an API key was logged"
    assert MARKER not in log, (
        "document or query text was logged:\n" + "\n".join(line for line in log.splitlines() if MARKER in line)[:2000]
    )
    assert "merger with Initech" not in log
    longest = max(len(line) for line in log.splitlines())
    assert longest < 10_000, f"a log line of {longest} characters"
