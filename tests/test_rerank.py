"""Reranking after fusion, against a real rerank endpoint on 127.0.0.1 (tests/embedding_server.py
scores each candidate by the real model's cosine to the query): over-fetch, reorder, return top_k;
a reranker that fails, answers an error page or is too slow leaves the fused order and says so."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mcp import Client

from mcp_rag.embedding import Embedder
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.rerank import Reranker, rerank_results
from mcp_rag.runtime import open_runtime
from mcp_rag.server import build_server
from mcp_rag.service import SearchResult
from mcp_rag.settings import Settings
from tests.embedding_server import EmbeddingServer
from tests.mcp_calls import call
from tests.pgcluster import free_port

pytestmark = pytest.mark.timeout(120)

CORPUS = [
    "Espresso machines force hot water through finely ground coffee at about nine bars of pressure.",
    "A pressure valve releases steam when the boiler of a coffee machine gets too hot.",
    "Cats sleep up to sixteen hours a day, often in warm spots near a fire.",
    "The barista tamped the coffee grounds before pulling a double shot.",
    "Glaciers carve U-shaped valleys as they grind through mountains.",
    "Descaling removes mineral deposits from the pipes of a coffee maker.",
    "The valve on a bicycle tyre holds the air in; a pump pushes more in.",
    "Milk is steamed to about sixty degrees for a latte.",
]
QUERY = "how does an espresso machine make coffee"


@pytest.fixture(scope="module")
def rerank_server(model_dir: Path) -> Iterator[EmbeddingServer]:
    server = EmbeddingServer(model_dir).start()
    yield server
    server.stop()


@pytest.fixture
def reranker(rerank_server: EmbeddingServer) -> Iterator[EmbeddingServer]:
    rerank_server.reset()
    yield rerank_server
    rerank_server.reset()


@pytest.fixture
def connect(make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path) -> Callable[..., Any]:
    @asynccontextmanager
    async def opener(**overrides: Any) -> AsyncIterator[Client]:
        settings = make_settings(**overrides)
        index = EdgeIndex(tmp_path / f"index-{uuid.uuid4().hex[:8]}")
        async with (
            open_runtime(settings, index=index, embedder=embedder) as rt,
            Client(build_server(lambda: rt)) as client,
        ):
            for i, text in enumerate(CORPUS):
                await call(client, "ingest_text", text=text, source_uri=f"mem://{i}")
            yield client

    return opener


def cosine_order(embedder: Embedder, query: str, texts: list[str]) -> list[str]:
    q = embedder.embed_query_sync(query).dense
    assert q is not None
    vectors = [e.dense for e in embedder.embed_passages_sync(texts)]
    return [texts[i] for i in np.argsort([-float(np.dot(q, v)) for v in vectors], kind="stable")]


async def test_results_are_reordered_by_the_reranker(
    connect: Callable[..., Any], reranker: EmbeddingServer, embedder: Embedder
) -> None:
    async with connect() as client:
        fused = await call(client, "search", query=QUERY, top_k=3)
    assert fused["reranked"] is None and reranker.rerank_requests == []

    async with connect(reranker_url=reranker.rerank_url, reranker_candidates=6, reranker_model="test-rr") as client:
        answer = await call(client, "search", query=QUERY, top_k=3)
    assert answer["reranked"] is True and answer["notice"] is None
    [sent] = reranker.rerank_requests
    assert sent["query"] == QUERY and sent["model"] == "test-rr"
    assert len(sent["documents"]) == 6 and sent["top_n"] == 6  # over-fetched: 6 candidates for top_k 3
    texts = [r["text"] for r in answer["results"]]
    assert len(texts) == 3
    assert texts == cosine_order(embedder, QUERY, sent["documents"])[:3]
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)


async def test_a_tei_style_answer_is_understood(connect: Callable[..., Any], reranker: EmbeddingServer) -> None:
    reranker.rerank_style = "list"
    async with connect(reranker_url=reranker.rerank_url, reranker_candidates=5) as client:
        answer = await call(client, "search", query=QUERY, top_k=2)
    assert answer["reranked"] is True and len(answer["results"]) == 2
    assert reranker.rerank_requests[0]["texts"] == reranker.rerank_requests[0]["documents"]


@pytest.mark.parametrize("fault", ["error page", "timeout", "unreachable"])
async def test_a_failing_reranker_leaves_the_fused_order(
    connect: Callable[..., Any], reranker: EmbeddingServer, fault: str
) -> None:
    async with connect() as client:
        fused = await call(client, "search", query=QUERY, top_k=4)
    url = reranker.rerank_url
    if fault == "error page":
        reranker.rerank_down = True
    elif fault == "timeout":
        reranker.rerank_delay = 3.0
    else:
        url = f"http://127.0.0.1:{free_port()}/rerank"
    async with connect(reranker_url=url, reranker_timeout=0.5) as client:
        started = time.monotonic()
        answer = await call(client, "search", query=QUERY, top_k=4)
        elapsed = time.monotonic() - started
    assert answer["reranked"] is False
    assert [r["text"] for r in answer["results"]] == [r["text"] for r in fused["results"]]
    assert [r["score"] for r in answer["results"]] == pytest.approx([r["score"] for r in fused["results"]])
    expected = {
        "error page": "answered 502 (text/html)",
        "timeout": "no answer within 0.5s",
        "unreachable": "cannot reach",
    }
    assert expected[fault] in answer["notice"] and "fused order" in answer["notice"]
    assert elapsed < 2.0


async def test_a_long_list_is_reranked_at_its_head_and_keeps_its_tail(reranker: EmbeddingServer) -> None:
    """An evaluation asks for 100: the reranker sees the first 50 (the tool's bound), the rest
    follows in fused order, scored no higher than the reranked ones."""
    results = [
        SearchResult(
            i,
            f"d{i}",
            "c",
            f"mem://{i}",
            "",
            {},
            0,
            f"passage {i} about {'coffee' if i % 7 else 'cats'}",
            0,
            10,
            (),
            score=1.0 - i / 100,
        )
        for i in range(55)
    ]
    rr = Reranker(url=reranker.rerank_url, model=None, api_key=None, timeout=10, candidates=2)
    answer = await rerank_results(rr, "cats", results, 60)
    [sent] = reranker.rerank_requests
    assert len(sent["documents"]) == 50
    assert answer.reranked is True and len(answer.results) == 55
    assert {r.chunk_id for r in answer.results[:50]} == set(range(50))
    assert answer.results[0].text.endswith("cats")
    assert [r.chunk_id for r in answer.results[50:]] == list(range(50, 55))
    assert max(r.score for r in answer.results[50:]) <= min(r.score for r in answer.results[:50])
