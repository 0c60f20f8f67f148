"""The HTTP app, end to end against ``mcp-rag serve --transport http`` subprocesses on 127.0.0.1:
probes, metrics, bearer auth and tenants, DNS-rebinding protection, readiness when Postgres goes
away and comes back, draining on SIGTERM, the refusal to serve publicly without keys, and the
structured log lines. Integration tests: each server here is a real process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextResourceContents

from mcp_rag.store.migrate import migrate
from tests.mcp_calls import call, call_error, text_of
from tests.pgcluster import PgServer
from tests.serverproc import MCP_RAG, ServerProcess, base_env, mcp_http, mcp_sse, scratch_database

pytestmark = pytest.mark.integration

TOKEN_A = "acme-rw-" + "a" * 24
TOKEN_A_READ = "acme-ro-" + "r" * 24
TOKEN_B = "globex-rw-" + "b" * 22
TOKEN_LOG = "logtest-rw-" + "l" * 21
WRONG_TOKEN = "not-a-key-" + "x" * 22
METRICS_TOKEN = "prometheus-" + "m" * 21
API_KEYS = [
    {"token": TOKEN_A, "tenant": "acme", "scopes": ["read", "write"]},
    {"token": TOKEN_A_READ, "tenant": "acme", "scopes": ["read"]},
    {"token": TOKEN_B, "tenant": "globex", "scopes": ["read", "write"]},
    {"token": TOKEN_LOG, "tenant": "logtest", "scopes": ["read", "write"]},
]
ALLOWED_HOST = "mcp-rag.example.com"
DRAIN_FILES = 60
# Distinctive texts: the log test checks that none of them ever reaches the server's stderr.
SECRET_TEXTS: list[str] = []


def secret_text(words: str) -> str:
    text = f"{words} (marker {uuid.uuid4().hex})"
    SECRET_TEXTS.append(text)
    return text


@pytest.fixture(scope="module")
def server(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server for the module, with four API keys, an extra allowed host and JSON logs.
    The drain test stops it: tests using it must come before that one."""
    name, dsn = scratch_database(pg_server, template_db)
    work = tmp_path_factory.mktemp("http-server")
    corpus = work / "corpus"  # for the drain test, the last one to use this server
    corpus.mkdir()
    for i in range(DRAIN_FILES):
        sentences = " ".join(f"Sentence {j} of file {i} is about topic {i % 7}." for j in range(12))
        (corpus / f"file-{i:02d}.txt").write_text(sentences)
    env = base_env(
        database_url=dsn,
        model_dir=model_dir,
        data_dir=work / "data",
        api_keys=API_KEYS,
        allowed_hosts=ALLOWED_HOST,
        log_format="json",
        region="test-region",
        tenant_roots={"acme": [str(corpus)]},
        metrics_token=METRICS_TOKEN,
        ingest_batch_chunks=4,
        shutdown_grace_seconds=300,
        ingest_job_after_seconds=600,
    )  # the drain test waits for a whole ingest_file call
    proc = ServerProcess(env, work).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        pg_server.drop_database(name)


def fresh_connections(server: ServerProcess) -> httpx.AsyncClient:
    """A new connection per request: a server that answers (401, 421) without reading the request body
    closes the connection afterwards, and a client reusing it would race that close."""
    return httpx.AsyncClient(base_url=server.base_url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- probes -----------------------------------------------------------------------------------


async def test_probes_answer_without_a_token(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        health = await http.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert (await http.head("/health")).status_code == 200
        # A wrong token does not matter to the probes either.
        assert (await http.get("/health", headers=bearer(WRONG_TOKEN))).status_code == 200
        ready = await http.get("/ready")
        assert ready.status_code == 200
        assert ready.headers["content-type"].startswith("application/json")
        assert ready.json() == {"status": "ready", "region": "test-region"}
        # The probes are not subject to the Host allowlist (the kubelet probes the pod IP).
        assert (await http.get("/health", headers={"Host": "10.1.2.3:8000"})).status_code == 200


# --- authentication -----------------------------------------------------------------------------

PROTECTED = [
    ("POST", "/mcp"),
    ("GET", "/mcp"),
    ("DELETE", "/mcp"),
    ("GET", "/sse"),
    ("POST", "/messages/?session_id=0123456789abcdef0123456789abcdef"),
    ("GET", "/metrics"),
    ("GET", "/api/mobile/search?q=anything"),
    ("GET", "/api/mobile/documents/00000000-0000-0000-0000-000000000000"),
    ("GET", "/api/mobile/openapi.json"),
    ("GET", "/no-such-route"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_route_but_the_probes_needs_a_valid_token(server: ServerProcess, method: str, path: str) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}) if method == "POST" else None
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    async with fresh_connections(server) as http:
        for auth in (
            {},
            bearer(WRONG_TOKEN),
            {"Authorization": f"Basic {TOKEN_A}"},
            {"Authorization": "Bearer"},
            bearer(TOKEN_A + "x"),
        ):
            response = await http.request(method, path, content=body, headers={**headers, **auth})
            assert response.status_code == 401, (method, path, auth, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"] == "unauthorized"
            assert TOKEN_A not in response.text


# --- metrics ------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in the Prometheus text format (labels in any order)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels} in /metrics")


async def test_metrics_after_ingest_and_search(server: ServerProcess) -> None:
    async with mcp_http(server.base_url + "/mcp", TOKEN_A) as client:
        await call(
            client,
            "ingest_text",
            text=secret_text("Metrics are scraped by Prometheus every minute."),
            collection="metrics",
        )
        await call(client, "search", query="prometheus scraping", collection="metrics")
        await call_error(client, "get_document", document_id=str(uuid.uuid4()))
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=bearer(TOKEN_A_READ))).status_code == 403
        response = await http.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "mcp_rag_tool_calls_total", tool="search", outcome="ok") >= 1
    assert metric(text, "mcp_rag_tool_calls_total", tool="ingest_text", outcome="ok") >= 1
    assert metric(text, "mcp_rag_tool_calls_total", tool="get_document", outcome="error") >= 1
    assert metric(text, "mcp_rag_tool_duration_seconds_count", tool="search") >= 1
    assert metric(text, "mcp_rag_tool_duration_seconds_bucket", tool="search", le="+Inf") >= 1
    assert metric(text, "mcp_rag_tool_duration_seconds_sum", tool="search") > 0
    assert metric(text, "mcp_rag_index_lag_entries") == 0
    assert metric(text, "mcp_rag_chunks_ingested_total") >= 1
    assert metric(text, "mcp_rag_documents_ingested_total", status="added") >= 1
    assert metric(text, "mcp_rag_embedding_batch_seconds_count") >= 1
    assert metric(text, "mcp_rag_embedding_batch_seconds_sum") > 0


# --- tenants and scopes ------------------------------------------------------------------------------


async def test_tenants_are_isolated_across_tools_and_resources(server: ServerProcess) -> None:
    url = server.base_url + "/mcp"
    text = secret_text("Acme's confidential roadmap mentions the quantum toaster.")
    async with mcp_http(url, TOKEN_A) as a, mcp_http(url, TOKEN_B) as b:
        out = await call(a, "ingest_text", text=text, title="Roadmap", source_uri="acme://roadmap", collection="plans")
        doc_id = out["documents"][0]["document_id"]
        assert [h["document_id"] for h in (await call(a, "search", query="quantum toaster"))["results"]][:1] == [doc_id]

        assert (await call(b, "stats"))["documents"] == 0
        assert (await call(b, "search", query="quantum toaster roadmap"))["results"] == []
        assert (await call(b, "search", query="quantum toaster", collection="plans"))["results"] == []
        assert (await call(b, "search", query="quantum", document_ids=[doc_id]))["results"] == []
        assert "no document with id" in await call_error(b, "get_document", document_id=doc_id)
        assert (await call(b, "list_documents"))["documents"] == []
        assert (await call(b, "list_collections"))["collections"] == []
        assert "no document with id" in await call_error(b, "delete_document", document_id=doc_id)
        assert "no collection named 'plans'" in await call_error(b, "delete_collection", collection="plans")
        with pytest.raises(MCPError, match="no document with id"):
            await b.read_resource(f"rag://documents/{doc_id}")
        listed = (await b.read_resource("rag://collections")).contents[0]
        assert isinstance(listed, TextResourceContents)
        assert json.loads(listed.text) == {"collections": []}

        # The same source URI in another tenant is another document.
        mine = await call(
            b, "ingest_text", text="Globex's own roadmap.", source_uri="acme://roadmap", collection="plans"
        )
        assert mine["added"] == 1
        assert mine["documents"][0]["document_id"] != doc_id

        # Tenant A still has its document, unchanged.
        got = await call(a, "get_document", document_id=doc_id)
        assert got["text"] == text
        resource = (await a.read_resource(f"rag://documents/{doc_id}")).contents[0]
        assert isinstance(resource, TextResourceContents)
        assert json.loads(resource.text)["text"] == text
        assert (await call(a, "stats"))["documents"] >= 1

    # The mobile API applies the same tenant rule.
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        own = await http.get(f"/api/mobile/documents/{doc_id}", headers=bearer(TOKEN_A))
        assert own.status_code == 200
        assert own.json()["title"] == "Roadmap"
        other = await http.get(f"/api/mobile/documents/{doc_id}", headers=bearer(TOKEN_B))
        assert other.status_code == 404
        found = await http.get("/api/mobile/search", params={"q": "quantum toaster"}, headers=bearer(TOKEN_A))
        assert found.status_code == 200
        assert found.json()["results"][0]["document_id"] == doc_id
        hidden = await http.get("/api/mobile/search", params={"q": "quantum toaster"}, headers=bearer(TOKEN_B))
        assert doc_id not in [r["document_id"] for r in hidden.json()["results"]]


async def test_tenant_isolation_over_sse(server: ServerProcess) -> None:
    async with mcp_http(server.base_url + "/mcp", TOKEN_A) as a:
        out = await call(
            a,
            "ingest_text",
            text=secret_text("The SSE transport carries the caller's key too."),
            collection="sse-tenancy",
        )
        doc_id = out["documents"][0]["document_id"]
    async with mcp_sse(server.base_url + "/sse", TOKEN_B) as b:
        assert "no document with id" in await call_error(b, "get_document", document_id=doc_id)
        assert (await call(b, "search", query="SSE transport key", collection="sse-tenancy"))["results"] == []
    async with mcp_sse(server.base_url + "/sse", TOKEN_A) as a:
        assert (await call(a, "get_document", document_id=doc_id))["collection"] == "sse-tenancy"


async def test_a_read_scoped_key_cannot_write(server: ServerProcess) -> None:
    async with mcp_http(server.base_url + "/mcp", TOKEN_A) as rw:
        out = await call(rw, "ingest_text", text=secret_text("Read-only keys may search this."), collection="scopes")
        doc_id = out["documents"][0]["document_id"]
    async with mcp_http(server.base_url + "/mcp", TOKEN_A_READ) as ro:
        for tool, arguments in [
            ("ingest_text", {"text": "should not be stored", "collection": "scopes"}),
            ("delete_document", {"document_id": doc_id}),
            ("delete_collection", {"collection": "scopes"}),
            ("ingest_url", {"url": "https://example.com/"}),
            ("ingest_file", {"path": "/etc/hostname"}),
        ]:
            message = await call_error(ro, tool, **arguments)
            assert "lacks the 'write' scope" in message, (tool, message)
        # The read tools work, and nothing was changed.
        assert (await call(ro, "get_document", document_id=doc_id))["document_id"] == doc_id
        listed = await call(ro, "list_documents", collection="scopes")
        assert [d["document_id"] for d in listed["documents"]] == [doc_id]


# --- DNS-rebinding protection ------------------------------------------------------------------------

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}


async def test_host_header_is_checked_on_the_mcp_endpoints(server: ServerProcess) -> None:
    headers = {**bearer(TOKEN_A), "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with fresh_connections(server) as http:
        evil = await http.post("/mcp", json=INITIALIZE, headers={**headers, "Host": "evil.example"})
        assert evil.status_code == 421
        evil_sse = await http.get("/sse", headers={**headers, "Host": "evil.example"})
        assert evil_sse.status_code == 421
        origin = await http.post("/mcp", json=INITIALIZE, headers={**headers, "Origin": "http://evil.example"})
        assert origin.status_code == 403

        allowed = await http.post("/mcp", json=INITIALIZE, headers={**headers, "Host": ALLOWED_HOST})
        assert allowed.status_code == 200, allowed.text
        loopback = await http.post("/mcp", json=INITIALIZE, headers={**headers, "Host": f"localhost:{server.port}"})
        assert loopback.status_code == 200, loopback.text


# --- the log --------------------------------------------------------------------------------------------


async def test_one_structured_log_line_per_tool_call_without_secrets(server: ServerProcess) -> None:
    """Checks the lines of its own calls, and every line the tests above made the shared server log."""
    text = secret_text("Logging must never leak the body of a document like this one.")
    async with mcp_http(server.base_url + "/mcp", TOKEN_LOG) as client:
        out = await call(client, "ingest_text", text=text, collection="logs")
        await call(client, "search", query="leak the body")
        await call_error(client, "get_document", document_id="not-an-id")
        await call(client, "delete_document", document_id=out["documents"][0]["document_id"])
        assert "top_k" in await call_error(client, "search", query="x", top_k=0)  # rejected before the tool
    async with mcp_http(server.base_url + "/mcp", TOKEN_A_READ) as client:
        await call_error(client, "ingest_text", text=text, collection="logs")

    raw = server.log()
    entries = server.json_log()  # every stderr line is one JSON object
    calls = [e for e in entries if e.get("event") == "tool call"]
    mine = [(e["tool"], e["outcome"]) for e in calls if e["tenant"] == "logtest"]
    assert mine == [
        ("ingest_text", "ok"),
        ("search", "ok"),
        ("get_document", "error"),
        ("delete_document", "ok"),
        ("search", "invalid"),
    ]
    assert ("ingest_text", "denied", "acme") in [(e["tool"], e["outcome"], e["tenant"]) for e in calls]
    for entry in calls:
        assert {"tool", "outcome", "duration_ms", "request_id", "tenant", "timestamp", "level"} <= set(entry)
        assert isinstance(entry["duration_ms"], int | float)
        assert entry["duration_ms"] >= 0
        assert entry["request_id"] not in (None, "")

    for token in (TOKEN_A, TOKEN_A_READ, TOKEN_B, TOKEN_LOG, WRONG_TOKEN):
        assert token not in raw
    for secret in SECRET_TEXTS:
        assert secret not in raw
        assert secret.rsplit("(marker ", 1)[1].rstrip(")") not in raw


# --- draining on SIGTERM (stops the module's server: keep it the last test that uses it) -----------------


async def test_sigterm_drains_a_running_call_then_exits_0(server: ServerProcess) -> None:
    corpus = Path(json.loads(server.env["MCP_RAG_TENANT_ROOTS"])["acme"][0])
    started = anyio.Event()
    updates: list[float] = []
    outcome: dict[str, CallToolResult] = {}

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append(progress)
        started.set()

    async def long_call() -> None:
        async with mcp_http(server.base_url + "/mcp", TOKEN_A) as client:
            # The client checks a result against the tool's output schema and lists the tools to learn it
            # if it has not yet: list them now, since the server is gone once the drained call returns.
            await client.list_tools()
            outcome["result"] = await client.call_tool(
                "ingest_file", {"path": str(corpus), "collection": "drain"}, progress_callback=on_progress
            )

    during: list[tuple[int, Any]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(long_call)
        with anyio.fail_after(120):
            await started.wait()
        server.signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            while "result" not in outcome:
                try:
                    response = await http.get("/ready")
                except httpx.TransportError:
                    break  # the call finished and the listener closed meanwhile
                during.append((response.status_code, response.json()))
                if len(during) == 1:
                    # A new call during the drain is refused with a retryable error.
                    async with mcp_http(server.base_url + "/mcp", TOKEN_A) as late:
                        message = await call_error(late, "search", query="anything")
                        assert "shutting down" in message
                        assert "retry" in message
                await anyio.sleep(0.1)

    assert server.wait(timeout=120) == 0
    result = outcome["result"]
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    assert result.structured_content["added"] == DRAIN_FILES
    assert updates[-1] == DRAIN_FILES
    assert len(updates) > 1
    assert during, "the call finished before /ready could be asked"
    assert all(status == 503 and body["reasons"] == ["shutting down"] for status, body in during), during
    entries = server.json_log()
    events = [e["event"] for e in entries]
    assert "stop signal received: draining" in events
    assert "grace period over: stopping with tool calls still running" not in events
    assert events[-1] == "server stopped"
    drained = [e for e in entries if e.get("event") == "tool call" and e["tool"] == "ingest_file"]
    assert drained[-1]["outcome"] == "ok"
    # Everything the drained call acknowledged is stored.
    async with await psycopg.AsyncConnection.connect(server.env["MCP_RAG_DATABASE_URL"]) as conn:
        cur = await conn.execute("SELECT count(*) FROM documents WHERE collection = 'drain'")
        assert await cur.fetchone() == (DRAIN_FILES,)


# --- readiness follows Postgres --------------------------------------------------------------------------


async def test_ready_turns_503_while_postgres_is_down_and_recovers(model_dir: Path, tmp_path: Path) -> None:
    """A separate PostgreSQL server, stopped and started again under a running mcp-rag."""
    pg = PgServer().init().start()
    proc: ServerProcess | None = None
    try:
        dsn = pg.create_database("mcp_rag")
        await migrate(dsn)
        env = base_env(
            database_url=dsn, model_dir=model_dir, data_dir=tmp_path / "data", db_timeout=2, sync_interval_seconds=0.2
        )
        proc = ServerProcess(env, tmp_path / "work").start().wait_ready()
        async with httpx.AsyncClient(base_url=proc.base_url, timeout=30) as http:
            assert (await http.get("/ready")).status_code == 200

            pg.stop()
            response = await poll_ready(http, until=503)
            body = response.json()
            assert body["status"] == "not ready"
            assert any(reason.startswith("postgres") for reason in body["reasons"]), body
            assert (await http.get("/health")).status_code == 200  # liveness is unaffected

            pg.start()
            assert (await poll_ready(http, until=200)).json()["status"] == "ready"
        async with mcp_http(proc.base_url + "/mcp") as client:
            out = await call(client, "ingest_text", text="Back after the database restarted.")
            assert out["added"] == 1
            assert (await call(client, "search", query="database restarted"))["results"]
        assert proc.proc is not None
        assert proc.proc.poll() is None
    finally:
        if proc is not None:
            proc.stop()
        pg.destroy()


async def poll_ready(http: httpx.AsyncClient, *, until: int, attempts: int = 300) -> httpx.Response:
    response = None
    for _ in range(attempts):
        response = await http.get("/ready")
        if response.status_code == until:
            return response
        await anyio.sleep(0.1)
    raise AssertionError(f"/ready never answered {until}: last {response and response.text}")


# --- refusing to serve publicly without keys ---------------------------------------------------------------


def test_public_bind_without_api_keys_refuses_to_start(model_dir: Path, tmp_path: Path) -> None:
    # The check comes before anything is opened: the database URL need not point anywhere.
    env = base_env(database_url="postgresql://nobody@127.0.0.1:1/none", model_dir=model_dir, data_dir=tmp_path)
    done = subprocess.run(
        [MCP_RAG, "serve", "--transport", "http", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to serve on 0.0.0.0 without authentication" in done.stderr
    assert "MCP_RAG_API_KEYS" in done.stderr
    assert done.stdout == ""
