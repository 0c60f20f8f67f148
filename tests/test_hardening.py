"""The low findings of an adversarial probe of the HTTP server, each held in place over the real
transport: one ``mcp-rag serve --transport http`` with two tenants, per-tenant roots, a metrics
token, a small per-key session limit, a short idle timeout and DEBUG JSON logs.

1. SSRF through IPv6 forms that embed an IPv4 address (NAT64, IPv4-compatible, 6to4), also
   after a redirect;
2. control characters in a URL or a redirect's ``Location`` give a readable error, not a crash;
3. ``ingest_file`` answers alike for every path outside the roots, existing or not, and never
   names the roots;
4. one key cannot hold more than its share of sessions; idle sessions close;
5. each tenant ingests only from its own roots; shared roots need an explicit setting;
6. ``/metrics`` needs the ``metrics`` scope or the metrics token;
7. session ids do not reach the log;
8. duplicated ``Authorization`` / ``Host`` / ``Origin`` headers are refused.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import ValidationError

from mcp_rag.settings import Settings
from tests.pgcluster import PgServer
from tests.reliability_support import ServerProc, base_env, http_client, tool_text

pytestmark = pytest.mark.integration

TOKEN_A = "acme-writer-" + uuid.uuid4().hex
TOKEN_B = "globex-writer-" + uuid.uuid4().hex
TOKEN_S = "acme-sessions-" + uuid.uuid4().hex
"""Used only by the session-limit test, so no other test's sessions count against it."""
TOKEN_M = "acme-monitor-" + uuid.uuid4().hex
METRICS_TOKEN = "prometheus-" + uuid.uuid4().hex
KEYS = [
    {"token": TOKEN_A, "tenant": "acme", "scopes": ["read", "write"]},
    {"token": TOKEN_B, "tenant": "globex", "scopes": ["read", "write"]},
    {"token": TOKEN_S, "tenant": "acme", "scopes": ["read"]},
    {"token": TOKEN_M, "tenant": "acme", "scopes": ["metrics"]},
]
SESSIONS_PER_KEY = 3
IDLE_SECONDS = 4.0


class Pages(BaseHTTPRequestHandler):
    """A loopback web server (allowlisted in the server) that redirects where it is told."""

    port = 0
    redirects: dict[str, bytes] = {}

    def do_GET(self) -> None:
        target = self.redirects.get(self.path)
        if target is not None:
            self.send_response(302)
            self.send_header("Location", target.decode("latin-1"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"A page on loopback about the tides of the Bay of Fundy."
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pages() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    port = httpd.server_address[1]
    Pages.redirects = {
        "/to-nat64-loopback": f"http://[64:ff9b::7f00:1]:{port}/page".encode(),
        "/to-nat64-metadata": b"http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "/to-compatible": f"http://[::127.0.0.1]:{port}/page".encode(),
        "/to-6to4": f"http://[2002:7f00:1::]:{port}/page".encode(),
        "/to-local-nat64": b"http://[64:ff9b:1::a9fe:a9fe]/",
        "/to-ctl-01": b"/page\x01x",
        "/to-ctl-7f": b"/page\x7fx",
    }
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("hardening-files")
    acme, globex, outside = work / "acme-files", work / "globex-files", work / "outside"
    for folder in (acme, globex, outside):
        folder.mkdir()
    (acme / "memo.md").write_text("# Memo\n\nAcme's memo about barnacles on the pier.\n")
    (globex / "plan.md").write_text("# Plan\n\nGlobex's plan for a volcano-side picnic.\n")
    (outside / "secret.txt").write_text("nobody may ingest this")
    (acme / "escape.txt").symlink_to(outside / "secret.txt")
    (acme / "escape-missing.txt").symlink_to(outside / "no-such-file.txt")
    return {"acme": acme, "globex": globex, "outside": outside}


@pytest.fixture(scope="module")
def server(
    pg_server: PgServer,
    template_db: str,
    model_dir: Path,
    roots: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProc]:
    name = f"hard_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name, template=template_db)
    work = tmp_path_factory.mktemp("hardening")
    env = base_env(
        model_dir,
        work / "data",
        dsn,
        api_keys=json.dumps(KEYS),
        log_format="json",
        log_level="DEBUG",
        url_allowlist="127.0.0.1",
        url_fetch_timeout="5",
        tenant_roots=json.dumps({"acme": [str(roots["acme"])], "globex": [str(roots["globex"])]}),
        metrics_token=METRICS_TOKEN,
        max_sessions_per_principal=str(SESSIONS_PER_KEY),
        session_idle_seconds=str(IDLE_SECONDS),
    )
    proc = ServerProc(env, work / "server.log")
    try:
        yield proc.wait_healthy()
    finally:
        proc.close()
        pg_server.drop_database(name)


async def _errors(server: ServerProc, token: str, tool: str, values: list[Any], key: str) -> dict[Any, str]:
    """The error text of ``tool`` for each value of argument ``key`` (each call must fail)."""
    found: dict[Any, str] = {}
    async with http_client(server.url, token) as client:
        for value in values:
            result = await client.call_tool(tool, {key: value})
            assert result.is_error, (value, tool_text(result))
            found[value] = tool_text(result)
    return found


# --- 1. SSRF through IPv6 forms embedding IPv4 ------------------------------------------------------


async def test_ipv6_forms_embedding_private_ipv4_are_refused(server: ServerProc, pages: str) -> None:
    """Regression: ``is_global`` is true for these, so a connection was attempted (on a network with
    NAT64 or 6to4 it reaches loopback, private or metadata IPv4 addresses)."""
    direct = [
        "http://[64:ff9b::7f00:1]/",
        "http://[::127.0.0.1]/",
        "http://[2002:7f00:1::]/",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "http://[64:ff9b::a00:1]/",
        "http://[64:ff9b:1::a9fe:a9fe]/",
        "http://[::8.8.8.8]/",
        "http://[2002:808:808::]/",
    ]
    redirected = [
        pages + path
        for path in ("/to-nat64-loopback", "/to-nat64-metadata", "/to-compatible", "/to-6to4", "/to-local-nat64")
    ]
    errors = await _errors(server, TOKEN_A, "ingest_url", direct + redirected, "url")
    for url, message in errors.items():
        assert "refusing to fetch" in message and "non-public address" in message, (url, message)
    assert "a NAT64 address of 127.0.0.1" in errors["http://[64:ff9b::7f00:1]/"]
    assert "a NAT64 address of 169.254.169.254" in errors[pages + "/to-nat64-metadata"]
    assert "deprecated" in errors["http://[::8.8.8.8]/"]  # refused even when the IPv4 address is public
    # The allowlisted loopback page itself is still fetched.
    async with http_client(server.url, TOKEN_A) as client:
        result = await client.call_tool("ingest_url", {"url": pages + "/page"})
        assert not result.is_error, tool_text(result)


# --- 2. control characters in URLs ------------------------------------------------------------------


async def test_control_characters_in_a_url_or_redirect_give_a_readable_error(server: ServerProc, pages: str) -> None:
    """Regression: the HTTP client's InvalidURL escaped the fetcher: "Error executing tool" and a
    "tool crashed" traceback in the log, for anyone controlling a page a tenant ingests."""
    urls = [
        pages + "/a\x01b",
        pages + "/a\x7fb",
        pages + "/a\x00b",
        pages + "/a\nb",
        pages + "/to-ctl-01",
        pages + "/to-ctl-7f",
    ]
    errors = await _errors(server, TOKEN_A, "ingest_url", urls, "url")
    for url, message in errors.items():
        assert "control character" in message, (url, message)  # a reason, not the bare "Error executing tool"
    log = server.stderr_text()
    assert "tool crashed" not in log and "Traceback" not in log


# --- 3 and 5. ingest_file: no existence oracle, roots per tenant ---------------------------------------


async def test_paths_outside_the_roots_all_get_one_answer(server: ServerProc, roots: dict[str, Path]) -> None:
    """Regression: /etc/shadow answered "outside the allowed roots (<the roots>)" and /etc/no-such-file
    "no such file": existence anywhere on the server could be probed, and the roots were named."""
    outside = roots["outside"]
    paths = [
        "/etc/shadow",
        "/etc/no-such-file",
        "/etc",
        "/no/such/dir/file.txt",
        "/proc/self/environ",
        str(outside / "secret.txt"),
        str(outside / "missing.txt"),
        f"{roots['acme']}/../outside/secret.txt",
        f"{roots['acme']}/../outside/missing.txt",
        "../outside/secret.txt",
        "../outside/missing.txt",
        str(roots["acme"] / "escape.txt"),
        str(roots["acme"] / "escape-missing.txt"),
        str(roots["globex"] / "plan.md"),
        str(roots["globex"] / "missing.md"),
    ]
    errors = await _errors(server, TOKEN_A, "ingest_file", paths, "path")
    answers = {message.replace(path, "<path>") for path, message in errors.items()}
    assert len(answers) == 1, answers
    answer = answers.pop()
    assert "outside the allowed roots" in answer
    for folder in roots.values():
        assert str(folder) not in answer
    assert "acme-files" not in answer and "globex-files" not in answer
    # Inside its own root a caller still learns what is missing.
    missing = await _errors(server, TOKEN_A, "ingest_file", [str(roots["acme"] / "missing.md")], "path")
    assert "no such file" in next(iter(missing.values()))


async def test_each_tenant_ingests_only_from_its_own_roots(server: ServerProc, roots: dict[str, Path]) -> None:
    """Regression: the allowed roots were shared: any tenant's write key could ingest any file under any root."""
    for token, own, other in [
        (TOKEN_A, roots["acme"] / "memo.md", roots["globex"] / "plan.md"),
        (TOKEN_B, roots["globex"] / "plan.md", roots["acme"] / "memo.md"),
    ]:
        async with http_client(server.url, token) as client:
            refused = await client.call_tool("ingest_file", {"path": str(other)})
            assert refused.is_error and "outside the allowed roots" in tool_text(refused), tool_text(refused)
            done = await client.call_tool("ingest_file", {"path": str(own)})
            assert not done.is_error, tool_text(done)
            listed = (await client.call_tool("list_documents", {})).structured_content
            assert listed is not None
            assert [d["source_uri"] for d in listed["documents"] if d["source_uri"].endswith(".md")] == [own.as_uri()]


def test_several_tenants_cannot_share_roots_unless_allowed(tmp_path: Path) -> None:
    keys = [{"token": "a" * 20, "tenant": "acme"}, {"token": "b" * 20, "tenant": "globex"}]
    base: dict[str, Any] = {"data_dir": tmp_path, "_env_file": None, "api_keys": keys}
    with pytest.raises(ValidationError, match="MCP_RAG_TENANT_ROOTS"):
        Settings(**base, allowed_roots=[tmp_path])
    assert Settings(**base, allowed_roots=[tmp_path], shared_roots=True).allowed_roots == [tmp_path.resolve()]
    # One tenant with its own roots leaves a single tenant on the shared ones.
    assert Settings(**base, allowed_roots=[tmp_path], tenant_roots={"acme": [tmp_path]}).tenant_roots
    assert Settings(data_dir=tmp_path, _env_file=None, api_keys=keys[:1], allowed_roots=[tmp_path]).allowed_roots


# --- 4. sessions per key, idle timeout ------------------------------------------------------------------

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


def _headers(token: str, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        **extra,
    }


def test_one_key_cannot_take_every_session(server: ServerProc) -> None:
    """Regression: one read-only key could open sessions up to the process-wide cap (10,000, kept
    30 minutes) and lock every other tenant out with 503."""
    with httpx.Client(base_url=server.base, timeout=30) as http:
        opened = []
        for _ in range(SESSIONS_PER_KEY):
            response = http.post("/mcp", headers=_headers(TOKEN_S), json=INIT)
            assert response.status_code == 200, response.text
            opened.append(response.headers["mcp-session-id"])
        refused = http.post("/mcp", headers=_headers(TOKEN_S), json=INIT)
        assert refused.status_code == 429, refused.text
        assert "limit per key" in refused.json()["error"]["message"]
        assert http.get("/sse", headers=_headers(TOKEN_S)).status_code == 429  # SSE streams count too
        # Other keys (of another tenant, or the same one) are not affected.
        for other in (TOKEN_B, TOKEN_A):
            response = http.post("/mcp", headers=_headers(other), json=INIT)
            assert response.status_code == 200, response.text
            http.delete(
                "/mcp",
                headers=_headers(
                    other,
                    **{"mcp-session-id": response.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"},
                ),
            )
        # Ending a session frees its place.
        ended = http.delete(
            "/mcp", headers=_headers(TOKEN_S, **{"mcp-session-id": opened.pop(), "mcp-protocol-version": "2025-06-18"})
        )
        assert ended.status_code == 200, ended.text
        again = http.post("/mcp", headers=_headers(TOKEN_S), json=INIT)
        assert again.status_code == 200, again.text
        opened.append(again.headers["mcp-session-id"])
        # Idle sessions close after MCP_RAG_SESSION_IDLE_SECONDS, and their places are free again.
        time.sleep(IDLE_SECONDS + 2)
        for session in opened:
            gone = http.post(
                "/mcp",
                headers=_headers(TOKEN_S, **{"mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}),
                json=INIT,
            )
            assert gone.status_code == 404, gone.text
        for _ in range(SESSIONS_PER_KEY):
            assert http.post("/mcp", headers=_headers(TOKEN_S), json=INIT).status_code == 200


# --- 6. /metrics ------------------------------------------------------------------------------------------


def test_metrics_need_the_metrics_scope_or_token(server: ServerProc) -> None:
    """Regression: every key, of every tenant, could read the process-wide counters."""
    with httpx.Client(base_url=server.base, timeout=30) as http:
        assert http.get("/metrics").status_code == 401
        for token in (TOKEN_A, TOKEN_B, TOKEN_S):
            refused = http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 403, refused.text
            assert "mcp_rag_" not in refused.text
        for token in (METRICS_TOKEN, TOKEN_M):
            scraped = http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert scraped.status_code == 200 and "mcp_rag_tool_calls_total" in scraped.text
        # The metrics token is good for /metrics only; a metrics-scoped key reads no documents.
        for path in ("/mcp", "/api/mobile/search?q=memo", "/sse"):
            response = http.get(path, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            assert response.status_code == 401, (path, response.status_code)
        assert http.get("/api/mobile/search?q=memo", headers={"Authorization": f"Bearer {TOKEN_M}"}).status_code == 403


# --- 8. duplicated security headers -------------------------------------------------------------------------


def _raw_request(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> int:
    """The status of one HTTP/1.1 request sent exactly as given (HTTP clients refuse to repeat Host)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        *(f"{k}: {v}" for k, v in headers),
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)
        answer = b""
        while b"\r\n" not in answer:
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
    return int(answer.split(b" ", 2)[1])


def test_duplicated_security_headers_are_refused(server: ServerProc) -> None:
    """Regression: with two Authorization headers our key check used the last and the SDK the first."""
    host = ("Host", f"127.0.0.1:{server.port}")
    good, bad = ("Authorization", f"Bearer {TOKEN_A}"), ("Authorization", f"Bearer {TOKEN_B}")
    origin = ("Origin", f"http://127.0.0.1:{server.port}")
    cases = {
        "Authorization": [host, bad, good],
        "Authorization (same value)": [host, good, good],
        "Origin": [host, good, origin, ("Origin", "http://evil.example")],
        "Origin (same value)": [host, good, origin, origin],
        "Host": [host, ("Host", "evil.example"), good],
    }
    mcp = [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")]
    body = json.dumps(INIT).encode()
    for name, headers in cases.items():
        for method, path in [("POST", "/mcp"), ("GET", "/metrics"), ("GET", "/api/mobile/search?q=memo")]:
            status = _raw_request(server.port, method, path, [*headers, *mcp], body if method == "POST" else b"")
            assert status == 400, (name, path, status)
    # One of each is fine.
    assert _raw_request(server.port, "POST", "/mcp", [host, good, origin, *mcp], body) == 200


# --- 7. session ids in the log (last: it reads the log of everything above) ------------------------------------


def test_session_ids_do_not_reach_the_log(server: ServerProc) -> None:
    """Regression: the SDK logs "Created new transport with session ID: <id>" at INFO and, at DEBUG,
    SSE session ids through the root logger; an id plus its owner's key is the session."""
    ids: list[str] = []
    events: queue.Queue[str] = queue.Queue()

    def read_stream() -> None:
        with httpx.stream(
            "GET",
            server.base + "/sse",
            headers={"Authorization": f"Bearer {TOKEN_A}"},
            timeout=httpx.Timeout(30, read=60),
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.put(line[5:].strip())
                    return  # closing the stream makes the SDK log the disconnect (at DEBUG)

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    endpoint = events.get(timeout=60)
    reader.join(timeout=30)
    ids.append(endpoint.rsplit("=", 1)[1])
    with httpx.Client(base_url=server.base, timeout=30) as http:
        opened = http.post("/mcp", headers=_headers(TOKEN_A), json=INIT)
        session = opened.headers["mcp-session-id"]
        ids.append(session)
        headers = _headers(TOKEN_A, **{"mcp-session-id": session, "mcp-protocol-version": "2025-06-18"})
        http.post("/mcp", headers=_headers(TOKEN_B, **{"mcp-session-id": session}), json=INIT)  # another key's
        http.delete("/mcp", headers=headers)
        http.post(f"/messages/?session_id={ids[0]}", headers=_headers(TOKEN_A), json=INIT)  # a closed SSE session

    async def mcp_client_session() -> None:
        async with http_client(server.url, TOKEN_A) as client:
            await client.list_tools()

    anyio.run(mcp_client_session)
    deadline = time.monotonic() + 10
    while "disconnected" not in server.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.stderr_text()
    assert "Created new transport with session ID" in log  # the SDK's lines are still there, redacted
    assert "<id sha256:" in log
    for session_id in ids:
        for spelling in (session_id, session_id.replace("-", ""), str(uuid.UUID(session_id))):
            assert spelling not in log, f"a session id reached the log: {spelling}"
