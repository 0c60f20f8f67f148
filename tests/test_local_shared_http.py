"""An HTTP server on a data directory another process holds: its MCP sessions run in the holder.

Real processes and real MCP clients: a stdio server holds the data directory, an HTTP server started
later on the same ``MCP_RAG_DATA_DIR`` serves streamable HTTP and SSE through it, with its API keys'
tenants and scopes applied in the holder; killing the holder makes the HTTP server take over.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client

from tests.mcp_calls import call, call_error
from tests.reliability_support import base_env, http_client, server_process, wait_until
from tests.test_local_shared import holder_pid, long_text, search_sources, stdio_server

pytestmark = pytest.mark.integration

ACME = "acme-token-0123456789abcdef"
GLOBEX = "globex-token-0123456789abcdef"
READER = "acme-reader-0123456789abcdef"
SCRAPER = "ops-metrics-0123456789abcdef"
KEYS = [
    {"token": ACME, "tenant": "acme"},
    {"token": GLOBEX, "tenant": "globex"},
    {"token": READER, "tenant": "acme", "scopes": ["read"]},
    {"token": SCRAPER, "tenant": "ops", "scopes": ["metrics"]},
]


@asynccontextmanager
async def sse_session(base: str, token: str) -> AsyncIterator[Client]:
    transport = sse_client(base + "/sse", headers={"Authorization": f"Bearer {token}"}, timeout=120)
    async with Client(transport, read_timeout_seconds=120) as client:
        yield client


def model_loaded(log: str) -> bool:
    return "embedding model loaded" in log


async def test_an_http_server_relays_to_the_stdio_holder_with_its_keys_tenants_and_scopes(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url, api_keys=KEYS)
    async with AsyncExitStack() as stack:
        local = await stack.enter_async_context(stdio_server(env, tmp_path, "stdio"))
        holder = holder_pid(data)
        with server_process(env, tmp_path / "http.stderr") as http:
            assert holder_pid(data) == holder  # the HTTP server did not take the data directory
            ready = http.ready()
            assert ready.status_code == 200, ready.text
            acme = await stack.enter_async_context(http_client(http.url, ACME))
            globex = await stack.enter_async_context(http_client(http.url, GLOBEX))
            reader = await stack.enter_async_context(http_client(http.url, READER))
            # Ingest through HTTP is visible to the stdio client, and the other way round.
            await call(acme, "ingest_text", text="Over HTTP for acme: the pangolin.", source_uri="note://acme/http")
            await call(local, "ingest_text", text="Over stdio: the pangolin at home.", source_uri="note://local")
            await call(globex, "ingest_text", text="Globex keeps its own pangolin.", source_uri="note://globex")
            # The stdio session is the local user (the default tenant); each key sees its own tenant only.
            found = search_sources(await call(local, "search", query="pangolin", mode="lexical", top_k=10))
            assert found == {"note://local"}
            assert search_sources(await call(acme, "search", query="pangolin", mode="lexical", top_k=10)) == {
                "note://acme/http"
            }
            assert search_sources(await call(globex, "search", query="pangolin", mode="lexical", top_k=10)) == {
                "note://globex"
            }
            # The read-only key of acme reads acme's documents (hybrid: the holder's model) but cannot write.
            assert "note://acme/http" in search_sources(await call(reader, "search", query="pangolin", top_k=3))
            refused = await call_error(reader, "ingest_text", text="Not allowed.", source_uri="note://nope")
            assert "lacks the 'write' scope" in refused
            stats = await call(acme, "stats")
            assert stats["documents"] == 1
            # SSE sessions are relayed the same way.
            async with sse_session(http.base, GLOBEX) as over_sse:
                sse_found = await call(over_sse, "search", query="pangolin", mode="lexical", top_k=10)
                assert search_sources(sse_found) == {"note://globex"}
            # The probes and routes of a relaying server: /ready asks the holder.
            assert httpx.get(http.base + "/health", timeout=10).status_code == 200
            os.kill(holder, signal.SIGSTOP)
            try:
                stalled = http.ready()
                assert httpx.get(http.base + "/health", timeout=10).status_code == 200
            finally:
                os.kill(holder, signal.SIGCONT)
            assert stalled.status_code == 503
            assert stalled.json()["reasons"] == [f"the process holding {data} does not answer"]
            assert http.ready().status_code == 200
            metrics = httpx.get(http.base + "/metrics", headers={"Authorization": f"Bearer {SCRAPER}"}, timeout=30)
            assert metrics.status_code == 200, metrics.text
            assert 'mcp_rag_tool_calls_total{outcome="ok",tool="ingest_text"}' in metrics.text  # the holder's
            mobile = httpx.get(
                http.base + "/api/mobile/search", params={"q": "pangolin"}, headers={"Authorization": f"Bearer {ACME}"}
            )
            assert mobile.status_code == 503 and "relays to the process holding" in mobile.json()["message"]
            # The HTTP server never loaded the model or opened the index.
            log = http.stderr_text()
            assert not model_loaded(log), log[-3000:]
            maps = Path(f"/proc/{http.pid}/maps").read_text()
            for engine in ("onnxruntime", "qdrant_edge", "tokenizers"):
                assert engine not in maps, f"the relaying HTTP server loaded {engine}"
            assert "relaying to the process holding the data directory" in log
        assert "Traceback" not in http.stderr_text()
        # An SSE-only server (``--transport sse``) relays the same way.
        with server_process(env, tmp_path / "sse.stderr", transport="sse") as sse_only:
            async with sse_session(sse_only.base, ACME) as over_sse:
                found = await call(over_sse, "search", query="pangolin", mode="lexical", top_k=10)
                assert search_sources(found) == {"note://acme/http"}
            assert holder_pid(data) == holder
        assert "Traceback" not in sse_only.stderr_text()


@pytest.mark.slow
async def test_kill_9_of_the_holder_makes_the_http_server_take_over(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url, api_keys=KEYS)
    async with AsyncExitStack() as stack:
        local = await stack.enter_async_context(stdio_server(env, tmp_path, "stdio"))
        holder = holder_pid(data)
        with server_process(env, tmp_path / "http.stderr") as http:
            acme = await stack.enter_async_context(http_client(http.url, ACME))
            await call(acme, "ingest_text", text="Before the kill: the quokka.", source_uri="note://before")
            await call(local, "ingest_text", text="Stdio before the kill: the quokka.", source_uri="note://stdio")
            assert not model_loaded(http.stderr_text())
            # A long ingest through the HTTP server is running in the holder when the holder is killed.
            outcome: dict[str, Any] = {}

            async def long_ingest() -> None:
                outcome["result"] = await call(
                    acme, "ingest_text", text=long_text(6000, "the quokka"), source_uri="note://interrupted"
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(long_ingest)
                await anyio.sleep(1.0)
                assert "result" not in outcome, "the ingest ended before the holder was killed: make it longer"
                os.kill(holder, 9)
                killed = time.monotonic()
            # The interrupted call was sent again to the new holder, this HTTP server, and answered.
            took = time.monotonic() - killed
            assert [d["status"] for d in outcome["result"]["documents"]] in (["added"], ["unchanged"])
            assert holder_pid(data) == http.pid
            # The same HTTP session keeps answering.
            found = await call(acme, "search", query="quokka", mode="lexical", top_k=10)
            assert search_sources(found) == {"note://before", "note://interrupted"}
            await call(acme, "ingest_text", text="After the kill: the quokka again.", source_uri="note://after")
            found = await call(acme, "search", query="quokka", top_k=10)
            assert search_sources(found) == {"note://before", "note://interrupted", "note://after"}
            wait_until(lambda: http.ready().status_code == 200, "the HTTP server is ready as the holder")
            # Holding now, the HTTP server serves the mobile API too.
            mobile = httpx.get(
                http.base + "/api/mobile/search",
                params={"q": "quokka"},
                headers={"Authorization": f"Bearer {ACME}"},
                timeout=30,
            )
            assert mobile.status_code == 200, mobile.text
            assert "note://before" in {r["source"] for r in mobile.json()["results"]}
            # A new client of a new tenant key works against the new holder too.
            async with http_client(http.url, GLOBEX) as globex:
                assert search_sources(await call(globex, "search", query="quokka", mode="lexical")) == set()
            log = http.stderr_text()
            assert "taking over the data directory" in log and "handing over" in log
            assert model_loaded(log)  # now it holds: the model is loaded here
            assert "Traceback" not in log
            print(f"hand-over to the HTTP server: {took:.2f}s")
        # The stdio client's server is gone with the killed holder; closing it must not hang.
        await stack.aclose()


async def test_a_stateless_http_server_relays_each_request(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url, api_keys=KEYS, stateless_http="true")
    async with AsyncExitStack() as stack:
        local = await stack.enter_async_context(stdio_server(env, tmp_path, "stdio"))
        await call(local, "ingest_text", text="The ibis wades in the river.", source_uri="note://local")
        with server_process(env, tmp_path / "http.stderr") as http:
            acme = await stack.enter_async_context(http_client(http.url, ACME))
            await call(acme, "ingest_text", text="Acme's ibis, stateless.", source_uri="note://acme")
            found = await call(acme, "search", query="ibis", mode="lexical", top_k=10)
            assert search_sources(found) == {"note://acme"}
            reader = await stack.enter_async_context(http_client(http.url, READER))
            refused = await call_error(reader, "ingest_text", text="Not allowed.", source_uri="note://nope")
            assert "lacks the 'write' scope" in refused
            assert holder_pid(data) != http.pid
        assert "Traceback" not in http.stderr_text()


@pytest.mark.slow
async def test_sigterm_of_a_relaying_http_server_lets_its_running_call_finish(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    # Stateless HTTP: no standing stream for the client to re-open while the server drains and exits
    # (the drain of the call is what this test is about). A grace period far beyond the call's few seconds:
    # on a busy machine the call has outlasted the default 20 s, and the server then stops it.
    env = base_env(model_dir, data, database_url, api_keys=KEYS, stateless_http="true", shutdown_grace_seconds="300")
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(stdio_server(env, tmp_path, "stdio"))
        with server_process(env, tmp_path / "http.stderr") as http:
            client_stack = AsyncExitStack()
            # Closed below once the server exited; on a failure before that, closed here before the stdio
            # client: a client left open keeps its task group's cancel scope on this task, and anyio's error
            # on leaving the stdio client's scope ("isn't the current task's current cancel scope") hides
            # the failure.
            stack.push_async_callback(client_stack.aclose)
            acme = await client_stack.enter_async_context(http_client(http.url, ACME))
            # The client checks a result against the tool's output schema and lists the tools to learn it if it
            # has not yet: list them now, since the server is gone once the drained call returns.
            await acme.list_tools()
            outcome: dict[str, Any] = {}

            async def long_ingest() -> None:
                outcome["result"] = await call(
                    acme, "ingest_text", text=long_text(20000, "the heron"), source_uri="note://drained"
                )

            during: list[int] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_ingest)
                await anyio.sleep(1.0)
                assert "result" not in outcome, "the ingest ended before the signal: make it longer"
                http.popen.send_signal(signal.SIGTERM)
                while "result" not in outcome:
                    try:
                        during.append((await anyio.to_thread.run_sync(http.ready)).status_code)
                    except httpx.TransportError:
                        break  # the call finished and the listener closed meanwhile
                    await anyio.sleep(0.1)
            assert during and set(during) == {503}, during  # draining: not ready, still listening
            assert [d["status"] for d in outcome["result"]["documents"]] == ["added"]
            assert await anyio.to_thread.run_sync(http.wait) == 0
            await close_after_the_server_exited(client_stack)
        assert "Traceback" not in http.stderr_text()


async def close_after_the_server_exited(client: AsyncExitStack) -> None:
    """Close a client whose server has exited: the client's standing stream may have tried to
    reconnect meanwhile and failed to connect, which is all that may go wrong here."""
    try:
        await client.aclose()
    except BaseExceptionGroup as group:
        _, rest = group.split(lambda exc: isinstance(exc, (httpx2.TransportError, httpx.TransportError)))
        if rest is not None:
            raise rest from None
