"""One end-to-end flow (ingest_text -> search -> get_document -> list_documents -> delete_document ->
search misses it) over every real transport: a stdio subprocess, streamable HTTP (stateful and
stateless) and SSE against ``mcp-rag serve --transport http`` subprocesses, and the MCP Inspector
CLI from npm over stdio and HTTP. Integration tests: each starts real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp_types import CallToolResult, ResourceLink, TextContent

from mcp_rag.extract import SourceDocument
from mcp_rag.runtime import Runtime
from tests.pgcluster import PgServer
from tests.serverproc import MCP_RAG, ServerProcess, base_env, mcp_http, mcp_sse, scratch_database

pytestmark = pytest.mark.integration

TOKEN = "transport-test-" + "t" * 20
API_KEYS = [{"token": TOKEN, "tenant": "acme", "scopes": ["read", "write"]}]
ALL_TOOLS = {
    "search",
    "fetch",
    "get_chunks",
    "get_document",
    "list_documents",
    "list_collections",
    "stats",
    "ingest_status",
    "ingest_text",
    "ingest_file",
    "ingest_url",
    "delete_document",
    "delete_collection",
}
PROGRESS_FILES = 4
INSPECTOR_VERSION = "1.0.3"
INSPECTOR_PREFIX = Path(os.environ.get("MCP_RAG_TEST_INSPECTOR_DIR", "/tmp/mcp-rag-inspector"))


@pytest.fixture
def index_kind() -> str:
    return "qdrant-edge"


def text_of(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return result.structured_content


async def end_to_end(client: Client, label: str) -> str:
    """The flow every transport must carry; returns the document text it used."""
    tools = {t.name for t in (await client.list_tools()).tools}
    assert tools == ALL_TOOLS
    collection = f"{label}-{uuid.uuid4().hex[:8]}"
    text = (
        f"# Transport {label}\n\nThe {label} transport delivered this note about basalt columns, "
        f"which form when thick lava flows cool and contract. Marker {uuid.uuid4().hex}."
    )
    out = await call(
        client,
        "ingest_text",
        text=text,
        title=f"Basalt via {label}",
        collection=collection,
        source_uri=f"notes://{collection}",
        metadata={"transport": label},
    )
    assert out["added"] == 1
    doc_id = out["documents"][0]["document_id"]

    result = await client.call_tool("search", {"query": "why do basalt columns form", "collection": collection})
    found = result.structured_content
    assert [h["document_id"] for h in found["results"]] == [doc_id]
    assert found["results"][0]["metadata"] == {"transport": label}
    # What the agent's model reads: compact, citable text, and a link to the document that resolves.
    assert text_of(result).startswith(
        f"[1] Basalt via {label} > Transport {label}\nnotes://{collection} · document {doc_id} · chunk 0\n"
    )
    [link] = [c for c in result.content if isinstance(c, ResourceLink)]
    assert str(link.uri) == f"rag://documents/{doc_id}"
    [resource] = (await client.read_resource(str(link.uri))).contents
    assert doc_id in resource.text  # type: ignore[union-attr]
    around = await call(client, "get_chunks", document_id=doc_id, around=0)
    assert [c["text"] for c in around["returned"]] == [found["results"][0]["text"]]

    doc = await call(client, "get_document", document_id=doc_id)
    assert doc["text"] == text
    assert doc["title"] == f"Basalt via {label}"

    listed = await call(client, "list_documents", collection=collection)
    assert [d["document_id"] for d in listed["documents"]] == [doc_id]

    deleted = await call(client, "delete_document", document_id=doc_id)
    assert deleted["deleted"] == doc_id
    assert (await call(client, "search", query="why do basalt columns form", collection=collection))["results"] == []
    assert (await call(client, "list_documents", collection=collection))["documents"] == []
    return text


# --- stdio ------------------------------------------------------------------------------------


def stdio_env(database_url: str, model_dir: Path, data_dir: Path, **settings: Any) -> dict[str, str]:
    return base_env(database_url=database_url, model_dir=model_dir, data_dir=data_dir, **settings)


async def test_stdio_subprocess(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    env = stdio_env(database_url, model_dir, tmp_path / "data")
    params = StdioServerParameters(command=MCP_RAG, args=["serve", "--transport", "stdio"], env=env, cwd=tmp_path)
    stderr_path = tmp_path / "stdio.stderr"
    with stderr_path.open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            assert client.server_info is not None
            assert client.server_info.name == "mcp-rag"
            text = await end_to_end(client, "stdio")
    log = stderr_path.read_text()
    assert "tool call" in log
    for tool in ("ingest_text", "search", "get_document", "list_documents", "delete_document"):
        assert f"tool={tool}" in log
    assert "tenant=default" in log
    assert text not in log


async def test_stdio_stdout_carries_only_mcp_messages(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    """Drives the server by hand: every byte on its stdout must be a JSON-RPC message, even while it
    starts, loads the model, logs, and stops at end of input."""
    env = stdio_env(database_url, model_dir, tmp_path / "data", log_level="DEBUG")
    stderr_path = tmp_path / "raw.stderr"
    messages = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "ingest_text", "arguments": {"text": "Stdout purity matters for stdio servers."}},
        },
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "search", "arguments": {"query": "stdout purity", "top_k": 1}},
        },
        {
            "jsonrpc": "2.0",
            "id": 4,
            "method": "tools/call",
            "params": {"name": "get_document", "arguments": {"document_id": "nope"}},
        },
    ]
    lines: list[bytes] = []
    with stderr_path.open("wb") as errlog:
        async with await anyio.open_process([MCP_RAG, "serve"], env=env, cwd=tmp_path, stderr=errlog) as proc:
            assert proc.stdin is not None
            assert proc.stdout is not None
            stdout = BufferedByteReceiveStream(proc.stdout)
            responses: dict[int, dict[str, Any]] = {}
            with anyio.fail_after(180):
                for message in messages:
                    await proc.stdin.send(json.dumps(message).encode() + b"\n")
                    if "id" not in message:
                        continue
                    while message["id"] not in responses:
                        line = await stdout.receive_until(b"\n", 1 << 24)
                        lines.append(line)
                        parsed = json.loads(line)
                        assert parsed["jsonrpc"] == "2.0"
                        if "id" in parsed:
                            responses[parsed["id"]] = parsed
                await proc.stdin.aclose()
                rest = b""
                try:
                    while True:
                        rest += await stdout.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    pass
                returncode = await proc.wait()
    lines += [line for line in rest.split(b"\n") if line.strip()]
    for line in lines:
        assert json.loads(line)["jsonrpc"] == "2.0", line
    assert returncode == 0, stderr_path.read_text()[-3000:]
    assert responses[1]["result"]["serverInfo"]["name"] == "mcp-rag"
    assert responses[2]["result"]["isError"] is False
    hits = responses[3]["result"]["structuredContent"]["results"]
    assert hits[0]["text"] == "Stdout purity matters for stdio servers."
    assert responses[4]["result"]["isError"] is True
    assert "UUID" in responses[4]["result"]["content"][0]["text"]
    assert "tool call" in stderr_path.read_text()  # the logs went to stderr


# --- HTTP and SSE -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_servers(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    """Two ``serve --transport http`` processes, started side by side: stateful and stateless."""
    names, servers = [], {}
    try:
        for kind, stateless in (("stateful", False), ("stateless", True)):
            name, dsn = scratch_database(pg_server, template_db)
            names.append(name)
            work = tmp_path_factory.mktemp(f"http-{kind}")
            corpus = work / "roots" / "corpus"
            corpus.mkdir(parents=True)
            for i in range(PROGRESS_FILES):
                (corpus / f"part-{i}.txt").write_text(
                    " ".join(f"Part {i}, sentence {j}: the river delta deposits silt and sand." for j in range(14))
                )
            # One file per ingest batch, so that every file is reported as it is done.
            env = base_env(
                database_url=dsn,
                model_dir=model_dir,
                data_dir=work / "data",
                api_keys=API_KEYS,
                stateless_http=stateless,
                allowed_roots=str(work / "roots"),
                ingest_batch_chunks=1,
            )
            servers[kind] = ServerProcess(env, work).start()
        for proc in servers.values():
            proc.wait_ready()
        yield servers
    finally:
        for proc in servers.values():  # stop them side by side too
            if proc.proc is not None and proc.proc.poll() is None:
                proc.signal()
        for proc in servers.values():
            proc.stop()
        for name in names:
            pg_server.drop_database(name)


async def test_streamable_http(http_servers: dict[str, ServerProcess]) -> None:
    server = http_servers["stateful"]
    async with mcp_http(server.base_url + "/mcp", TOKEN) as client:
        await end_to_end(client, "http")


async def test_streamable_http_stateless(http_servers: dict[str, ServerProcess]) -> None:
    server = http_servers["stateless"]
    async with mcp_http(server.base_url + "/mcp", TOKEN) as client:
        await end_to_end(client, "stateless")


async def test_streamable_http_legacy_handshake(http_servers: dict[str, ServerProcess]) -> None:
    """Clients that still use the initialize handshake (pre-2026 protocol), stateful and stateless."""
    for kind in ("stateful", "stateless"):
        async with mcp_http(http_servers[kind].base_url + "/mcp", TOKEN, mode="legacy") as client:
            await end_to_end(client, f"legacy-{kind}")


async def test_sse(http_servers: dict[str, ServerProcess]) -> None:
    server = http_servers["stateful"]
    async with mcp_sse(server.base_url + "/sse", TOKEN) as client:
        await end_to_end(client, "sse")


async def test_progress_over_http_and_sse(http_servers: dict[str, ServerProcess]) -> None:
    """ingest_file's progress notifications reach the client over each network transport."""
    transports = {
        "http": lambda: mcp_http(http_servers["stateful"].base_url + "/mcp", TOKEN),
        "stateless": lambda: mcp_http(http_servers["stateless"].base_url + "/mcp", TOKEN),
        "sse": lambda: mcp_sse(http_servers["stateful"].base_url + "/sse", TOKEN),
    }
    for label, connect in transports.items():
        updates: list[tuple[float, float | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append((progress, total))  # noqa: B023 - consumed within this iteration

        async with connect() as client:
            result = await client.call_tool(
                "ingest_file", {"path": "corpus", "collection": f"progress-{label}"}, progress_callback=on_progress
            )
        assert not result.is_error, text_of(result)
        assert result.structured_content is not None
        assert result.structured_content["added"] == PROGRESS_FILES
        assert len(updates) >= 2, (label, updates)
        assert updates[-1] == (PROGRESS_FILES, PROGRESS_FILES), (label, updates)


# --- the MCP Inspector CLI (npm) ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def inspector() -> list[str]:
    """The Inspector's CLI, installed once into a cache folder (npm registry)."""
    binary = INSPECTOR_PREFIX / "node_modules" / ".bin" / "mcp-inspector"
    package = INSPECTOR_PREFIX / "node_modules" / "@modelcontextprotocol" / "inspector" / "package.json"
    installed = package.exists() and json.loads(package.read_text()).get("version") == INSPECTOR_VERSION
    if not installed:
        npm = shutil.which("npm")
        assert npm, "npm is needed for the MCP Inspector tests (Node 20+)"
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(INSPECTOR_PREFIX),
                "--no-audit",
                "--no-fund",
                f"@modelcontextprotocol/inspector@{INSPECTOR_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return [str(binary), "--cli"]


def run_inspector(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr[-3000:]}"
    start = done.stdout.find("{")
    assert start >= 0, done.stdout
    parsed: dict[str, Any] = json.loads(done.stdout[start:])
    return parsed


async def test_inspector_cli_over_stdio(
    inspector: list[str], runtime: Runtime, database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    # Stored beforehand through the service; the stdio server's own index catches up from the change log.
    await runtime.service.ingest(
        "default",
        None,
        [SourceDocument("notes://inspector", "The MCP Inspector speaks to servers from Node.", title="Inspector note")],
    )
    env = stdio_env(database_url, model_dir, tmp_path / "stdio-data")
    listed = run_inspector([*inspector, MCP_RAG, "serve", "--method", "tools/list"], env, tmp_path)
    assert {t["name"] for t in listed["tools"]} == ALL_TOOLS
    search = next(t for t in listed["tools"] if t["name"] == "search")
    assert search["annotations"]["readOnlyHint"] is True
    assert search["inputSchema"]["required"] == ["query"]

    called = run_inspector(
        [
            *inspector,
            MCP_RAG,
            "serve",
            "--method",
            "tools/call",
            "--tool-name",
            "search",
            "--tool-arg",
            "query=inspector node",
            "--tool-arg",
            "top_k=3",
        ],
        env,
        tmp_path,
    )
    assert called.get("isError", False) is False, called
    hits = called["structuredContent"]["results"]
    assert [h["title"] for h in hits] == ["Inspector note"]


async def test_inspector_cli_over_http(
    inspector: list[str], http_servers: dict[str, ServerProcess], tmp_path: Path
) -> None:
    server = http_servers["stateless"]
    url = server.base_url + "/mcp"
    auth = ["--header", f"Authorization: Bearer {TOKEN}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_RAG_")}
    async with mcp_http(url, TOKEN) as client:
        await call(
            client,
            "ingest_text",
            text="Kelp forests shelter sea otters along the Pacific coast.",
            title="Kelp",
            collection="inspector-http",
        )

    listed = run_inspector([*inspector, url, "--transport", "http", *auth, "--method", "tools/list"], env, tmp_path)
    assert {t["name"] for t in listed["tools"]} == ALL_TOOLS

    called = run_inspector(
        [
            *inspector,
            url,
            "--transport",
            "http",
            *auth,
            "--method",
            "tools/call",
            "--tool-name",
            "search",
            "--tool-arg",
            "query=sea otters kelp",
            "--tool-arg",
            "collection=inspector-http",
        ],
        env,
        tmp_path,
    )
    assert called.get("isError", False) is False, called
    assert called["structuredContent"]["results"][0]["title"] == "Kelp"

    # A tool error still exits 0: it is in the JSON.
    failed = run_inspector(
        [
            *inspector,
            url,
            "--transport",
            "http",
            *auth,
            "--method",
            "tools/call",
            "--tool-name",
            "get_document",
            "--tool-arg",
            "document_id=not-a-uuid",
        ],
        env,
        tmp_path,
    )
    assert failed["isError"] is True
    assert "UUID" in failed["content"][0]["text"]

    # Without the token the Inspector cannot connect at all.
    done = subprocess.run(
        [*inspector, url, "--transport", "http", "--method", "tools/list"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "unauthorized" in done.stdout + done.stderr
