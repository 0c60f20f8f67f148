"""The ``openai`` embedding provider against a real HTTP server on 127.0.0.1 that serves the offline
model behind the OpenAI embeddings wire format (tests/embedding_server.py): the same vectors as the
local model, ingest and search over MCP, retries (429 with Retry-After, 500s, timeouts), answers
that are not embeddings (wrong dimension, HTML pages, a batch that partly fails), the model
fingerprint, and a provider that does not answer at start."""

from __future__ import annotations

import asyncio
import email.utils
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from mcp import Client
from qdrant_client import QdrantClient

from mcp_rag.embedding import Embedder
from mcp_rag.errors import ConfigurationError, EmbeddingUnavailableError, ModelMismatchError, TooLargeError
from mcp_rag.index.base import VectorIndex
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.index.qdrant_server import QdrantServerIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.server import build_server
from mcp_rag.settings import Settings
from mcp_rag.types import FINGERPRINT_TOLERANCE
from tests.embedding_server import EmbeddingServer, Fault
from tests.mcp_calls import call, call_error
from tests.pgcluster import PgServer
from tests.serverproc import ServerProcess, base_env, mcp_http, scratch_database

pytestmark = pytest.mark.timeout(120)

HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"


@pytest.fixture(scope="module")
def embedding_server(model_dir: Path) -> Iterator[EmbeddingServer]:
    server = EmbeddingServer(model_dir).start()
    yield server
    server.stop()


@pytest.fixture
def served(embedding_server: EmbeddingServer) -> Iterator[EmbeddingServer]:
    embedding_server.reset()
    yield embedding_server
    embedding_server.reset()


@pytest.fixture
def remote_settings(make_settings: Callable[..., Settings], served: EmbeddingServer) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "embedding_provider": "openai",
            "embedding_base_url": served.base_url,
            "embedding_model": "all-minilm",
            "embedding_retries": 2,
            "embedding_timeout": 5.0,
            "embedding_request_inputs": 4,
            "embedding_concurrency": 2,
        }
        values.update(overrides)
        return make_settings(**values)

    return make


def remote_embedder(settings: Settings) -> Embedder:
    embedder = Embedder(settings)
    provider: Any = embedder.provider
    provider._backoff = 0.05  # keep the jittered backoff short; Retry-After is honoured as sent
    return embedder


@asynccontextmanager
async def remote_runtime(settings: Settings, tmp_path: Path) -> AsyncIterator[Runtime]:
    embedder = remote_embedder(settings)
    index = EdgeIndex(tmp_path / f"index-{uuid.uuid4().hex[:8]}")
    try:
        async with open_runtime(settings, index=index, embedder=embedder) as rt:
            yield rt
    finally:
        embedder.provider.close()


PASSAGES = [
    "The feline rested on the woven rug near the fireplace, purring softly all evening.",
    "Part number XQ-4471 is the replacement pressure valve for the Model 9 espresso machine.",
    "Glaciers carve U-shaped valleys as they slowly grind down through the mountains.",
    "A man is eating food.",
    "The stock market fell sharply today.",
]


# --- vectors and identity ---------------------------------------------------------------------


def test_remote_vectors_equal_the_local_model(
    remote_settings: Callable[..., Settings], embedder: Embedder, served: EmbeddingServer
) -> None:
    remote = remote_embedder(remote_settings())
    try:
        identity = remote.load_sync()
        assert (identity.provider, identity.name, identity.dimension) == ("openai", "all-minilm", 384)
        assert identity.fingerprint_distance(embedder.identity) < 1e-5
        got = remote.embed_passages_sync(PASSAGES)
        want = embedder.embed_passages_sync(PASSAGES)
        for g, w in zip(got, want, strict=True):
            assert float(np.dot(g.dense, w.dense)) > 0.9999
            assert list(g.sparse.indices) == list(w.sparse.indices)  # BM25 stays local
        query = remote.embed_query_sync("what does a cat do by the fire?")
        assert query.dense is not None
        assert int(np.argmax([np.dot(query.dense, g.dense) for g in got])) == 0
        # Four inputs per request, the server's order ignored in favour of each item's index.
        sizes = [len(r["input"]) for r in served.requests]
        assert sizes[:2] == [1, 1] and sorted(sizes[2:4]) == [1, 4] and sizes[4] == 1  # probe, fingerprint, 5, query
        assert all(r["model"] == "all-minilm" and r["encoding_format"] == "float" for r in served.requests)
    finally:
        remote.provider.close()


def test_api_key_from_a_mounted_file(
    remote_settings: Callable[..., Settings], served: EmbeddingServer, tmp_path: Path
) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-test-123\n")
    remote = remote_embedder(remote_settings(embedding_api_key_file=secret))
    seen: list[str] = []
    provider: Any = remote.provider
    provider._client.event_hooks["request"].append(lambda r: seen.append(r.headers.get("authorization")))
    try:
        remote.load_sync()
    finally:
        remote.provider.close()
    assert seen and set(seen) == {"Bearer sk-test-123"}


def test_a_configured_dimension_the_server_does_not_give_is_refused_at_load(
    remote_settings: Callable[..., Settings],
) -> None:
    remote = remote_embedder(remote_settings(embedding_dimension=768))
    with pytest.raises(ConfigurationError, match=r"answers 384-d vectors .* MCP_RAG_EMBEDDING_DIMENSION is 768"):
        remote.load_sync()
    remote.provider.close()


# --- retries --------------------------------------------------------------------------------


@pytest.fixture
def loaded(remote_settings: Callable[..., Settings], served: EmbeddingServer) -> Iterator[Callable[..., Embedder]]:
    made: list[Embedder] = []

    def make(**overrides: Any) -> Embedder:
        remote = remote_embedder(remote_settings(**overrides))
        remote.load_sync()
        served.requests.clear()
        made.append(remote)
        return remote

    yield make
    for remote in made:
        remote.provider.close()


def test_429_waits_for_retry_after(loaded: Callable[..., Embedder], served: EmbeddingServer) -> None:
    remote = loaded()
    served.script(Fault(status=429, headers={"Retry-After": "1"}, json={"error": {"message": "rate limited"}}))
    started = time.monotonic()
    vectors = remote.embed_passages_sync(PASSAGES[:2])
    assert time.monotonic() - started >= 1.0
    assert len(vectors) == 2 and len(served.requests) == 2
    # Retry-After as an HTTP date.
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    served.script(Fault(status=503, headers={"Retry-After": when}))
    started = time.monotonic()
    remote.embed_query_sync("a query")
    assert time.monotonic() - started >= 0.9  # the date has one-second resolution


def test_500s_are_retried_then_reported(loaded: Callable[..., Embedder], served: EmbeddingServer) -> None:
    remote = loaded(embedding_retries=2)
    served.script(Fault(status=500), Fault(status=503))
    assert len(remote.embed_passages_sync(PASSAGES[:1])) == 1
    assert len(served.requests) == 3

    served.requests.clear()
    served.script(
        Fault(status=500), Fault(status=502), Fault(status=500, json={"error": {"message": "CUDA out of memory"}})
    )  # the last one is reported
    with pytest.raises(EmbeddingUnavailableError, match=r"answered 500: CUDA out of memory.*3 attempts"):
        remote.embed_passages_sync(PASSAGES[:1])
    assert len(served.requests) == 3


def test_a_timeout_is_retried_then_reported(loaded: Callable[..., Embedder], served: EmbeddingServer) -> None:
    remote = loaded(embedding_timeout=0.5, embedding_retries=1)
    served.script(Fault(delay=1.5, then_answer=True))
    assert len(remote.embed_passages_sync(PASSAGES[:1])) == 1  # the retry answers

    served.script(Fault(delay=1.5, then_answer=True), Fault(delay=1.5, then_answer=True))
    with pytest.raises(EmbeddingUnavailableError, match=r"no answer within 0.5s \(2 attempts\)"):
        remote.embed_query_sync("anything")


def test_a_client_error_is_not_retried(loaded: Callable[..., Embedder], served: EmbeddingServer) -> None:
    remote = loaded()
    served.script(Fault(status=401, json={"error": {"message": "invalid api key"}}))
    with pytest.raises(EmbeddingUnavailableError, match=r"refused the request \(401\): invalid api key"):
        remote.embed_passages_sync(PASSAGES[:1])
    assert len(served.requests) == 1


# --- answers that are not embeddings ----------------------------------------------------------


def test_wrong_dimension_is_refused(loaded: Callable[..., Embedder], served: EmbeddingServer) -> None:
    remote = loaded()
    served.script(Fault(dimension=100))
    with pytest.raises(EmbeddingUnavailableError, match=r"100-d vectors for a 384-d model"):
        remote.embed_passages_sync(PASSAGES[:1])


def test_html_error_pages_are_reported_by_their_title(loaded: Callable[..., Embedder], served: EmbeddingServer) -> None:
    remote = loaded(embedding_retries=0)
    served.script(Fault(status=502, html=HTML_502))
    with pytest.raises(EmbeddingUnavailableError, match=r"answered 502: an HTML page \(502 Bad Gateway\), not JSON"):
        remote.embed_passages_sync(PASSAGES[:1])
    served.script(Fault(status=200, html="<html><title>Sign in - Corporate Proxy</title></html>"))
    with pytest.raises(
        EmbeddingUnavailableError, match=r"answered 200 with an HTML page \(Sign in - Corporate Proxy\)"
    ):
        remote.embed_passages_sync(PASSAGES[:1])


def test_a_query_over_the_window_is_refused_not_cut(loaded: Callable[..., Embedder]) -> None:
    remote = loaded(embedding_window_tokens=64, chunk_tokens=48, chunk_overlap_tokens=8)
    with pytest.raises(TooLargeError, match=r"the query measures 334 tokens, over the embedding model's window of 64"):
        remote.embed_query_sync("word " * 200)


def test_chunks_fit_a_tokenizer_budget(remote_settings: Callable[..., Settings], model_dir: Path) -> None:
    settings = remote_settings(embedding_tokenizer=model_dir / "tokenizer.json", embedding_window_tokens=254)
    remote = remote_embedder(settings)
    try:
        assert remote.count_tokens(["A man is eating food."]) == [6]
        assert remote.window_tokens == 254
    finally:
        remote.provider.close()


# --- end to end over MCP ----------------------------------------------------------------------


async def test_ingest_and_search_over_mcp(
    remote_settings: Callable[..., Settings], served: EmbeddingServer, tmp_path: Path
) -> None:
    async with remote_runtime(remote_settings(), tmp_path) as rt, Client(build_server(lambda: rt)) as client:
        for i, text in enumerate(PASSAGES):
            await call(client, "ingest_text", text=text, title=f"doc {i}", source_uri=f"mem://{i}")
        assert served.requests, "the remote provider embedded the passages"
        served.requests.clear()
        found = await call(client, "search", query="replacement valve for an espresso machine", mode="dense")
        assert found["results"][0]["source_uri"] == "mem://1"
        assert len(served.requests) == 1 and served.requests[0]["input"] == [
            "replacement valve for an espresso machine"
        ]
        # Lexical search needs no remote call at all (BM25 is local).
        served.requests.clear()
        found = await call(client, "search", query="XQ-4471", mode="lexical")
        assert found["results"][0]["source_uri"] == "mem://1" and served.requests == []
        # A query over the window is an error the agent can read, not a cut query.
        error = await call_error(client, "search", query="espresso " * 400)
        assert "over the embedding model's window" in error


async def test_a_batch_that_partly_fails_writes_nothing(
    remote_settings: Callable[..., Settings], served: EmbeddingServer, tmp_path: Path
) -> None:
    text = "\n\n".join(f"Paragraph {i} about valves, pumps and pressure in espresso machines. " * 12 for i in range(12))
    settings = remote_settings(embedding_request_inputs=2, embedding_retries=0)
    async with remote_runtime(settings, tmp_path) as rt, Client(build_server(lambda: rt)) as client:
        served.requests.clear()
        served.script(Fault(dimension=None, then_answer=True), Fault(status=400, json={"error": {"message": "bad"}}))
        error = await call_error(client, "ingest_text", text=text, title="long", source_uri="mem://long")
        assert "answered 400: bad" in error
        assert len(served.requests) >= 2, "one request was answered, another failed"
        listed = await call(client, "list_documents")
        assert listed["documents"] == []
        stats = await call(client, "stats")
        assert stats["chunks"] == 0 and stats["documents"] == 0
        # The same document goes in whole once the server answers.
        await call(client, "ingest_text", text=text, title="long", source_uri="mem://long")
        assert (await call(client, "stats"))["documents"] == 1


# --- the model fingerprint --------------------------------------------------------------------


async def test_another_model_under_the_same_name_is_refused(
    remote_settings: Callable[..., Settings], served: EmbeddingServer, tmp_path: Path
) -> None:
    settings = remote_settings()
    async with remote_runtime(settings, tmp_path) as rt, Client(build_server(lambda: rt)) as client:
        await call(client, "ingest_text", text=PASSAGES[0], title="cat", source_uri="mem://cat")
    served.impostor = True
    with pytest.raises(ConfigurationError) as refused:
        async with remote_runtime(settings, tmp_path):
            pass
    message = str(refused.value)
    assert message.count("openai:all-minilm (384-d, fingerprint") == 2
    assert "another model served under that name" in message


@pytest.mark.parametrize("engine", ["qdrant-edge", "qdrant-server"])
async def test_an_index_refuses_a_model_whose_fingerprint_differs(
    remote_settings: Callable[..., Settings], served: EmbeddingServer, tmp_path: Path, engine: str
) -> None:
    genuine = remote_embedder(remote_settings())
    impostor = remote_embedder(remote_settings())
    try:
        good = await genuine.load()
        served.impostor = True
        bad = await impostor.load()
    finally:
        genuine.provider.close()
        impostor.provider.close()
    assert bad.fingerprint_distance(good) > 10 * FINGERPRINT_TOLERANCE
    client = QdrantClient(":memory:")  # both handles of the server engine share one local Qdrant

    def handle() -> VectorIndex:
        return EdgeIndex(tmp_path / "index") if engine == "qdrant-edge" else QdrantServerIndex(client)

    index = handle()
    await index.open(good)
    await index.close()
    again = handle()
    with pytest.raises(ModelMismatchError, match="another model served under that name"):
        await again.open(bad)
    await again.open(good)  # the genuine model still opens it
    await again.close()


# --- a provider that does not answer at start -------------------------------------------------


@pytest.mark.integration
async def test_an_unreachable_provider_at_start_is_not_ready_with_the_reason_then_recovers(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path: Path
) -> None:
    late = EmbeddingServer(model_dir)  # its port is chosen, nothing listens on it yet
    _, dsn = scratch_database(pg_server, template_db)
    env = base_env(
        database_url=dsn,
        model_dir=model_dir,
        data_dir=tmp_path / "data",
        embedding_provider="openai",
        embedding_base_url=late.base_url,
        embedding_model="all-minilm",
        embedding_retries=0,
        embedding_timeout=1.0,
        sync_interval_seconds=0.2,
    )
    proc = ServerProcess(env, tmp_path / "srv").start()
    try:
        async with httpx.AsyncClient(base_url=proc.base_url, timeout=10) as http:
            response = await poll(http, lambda r: r.status_code == 503)
            reasons = " ".join(response.json()["reasons"])
            assert f"embedding provider: embedding server at {late.base_url}/embeddings: cannot reach it" in reasons
            assert (await http.get("/health")).status_code == 200  # not-ready, not dead: no restart wanted
            async with mcp_http(proc.base_url + "/mcp") as client:
                error = await call_error(client, "ingest_text", text="Written while the provider is down.")
                assert "the embedding model is not loaded yet" in error and "cannot reach it" in error
                error = await call_error(client, "search", query="anything")
                assert "the embedding model is not loaded yet" in error
            late.start()
            try:
                response = await poll(http, lambda r: r.status_code == 200)
                assert response.json()["status"] == "ready"
                assert late.requests, "the server loaded the model from the provider once it answered"
                async with mcp_http(proc.base_url + "/mcp") as client:
                    await call(client, "ingest_text", text="Written once the provider answers.", source_uri="mem://x")
                    found = await call(client, "search", query="once the provider answers")
                    assert [r["source_uri"] for r in found["results"]] == ["mem://x"]
            finally:
                late.stop()
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()


async def poll(http: httpx.AsyncClient, done: Callable[[httpx.Response], bool], seconds: float = 60) -> httpx.Response:
    deadline = time.monotonic() + seconds
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        try:
            last = await http.get("/ready")
            if done(last):
                return last
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"/ready never got there: {last.status_code if last else None} {last.text if last else ''}")
