"""The origin's mobile API (mcp_rag.mobile) directly, without the edge worker: the HTTP app in
process over a real database, the embedded index and the real model; two tenants, bearer keys
with different scopes. The edge worker in front of it is tested by tests/test_edge_worker.py."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openapi_spec_validator
import pytest

from mcp_rag.embedding import Embedder
from mcp_rag.http import create_app
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.mobile import EXCERPT_CHARS, MAX_QUERY_CHARS, MAX_RESULTS, SNIPPET_CHARS, snippet
from mcp_rag.runtime import open_runtime
from mcp_rag.settings import ApiKey, Settings
from tests.pgcluster import PgServer

TOKEN_A = "mobile-acme-read-write-01"
TOKEN_B = "mobile-globex-read-write1"
TOKEN_READ = "mobile-acme-read-only-001"
TOKEN_WRITE_ONLY = "mobile-acme-write-only-01"
KEYS = [
    ApiKey(token=TOKEN_A, tenant="acme", scopes=["read", "write"]),
    ApiKey(token=TOKEN_B, tenant="globex", scopes=["read", "write"]),
    ApiKey(token=TOKEN_READ, tenant="acme", scopes=["read"]),
    ApiKey(token=TOKEN_WRITE_ONLY, tenant="acme", scopes=["write"]),
]

LONG_TEXT = " ".join(
    f"Paragraph {i}: the lighthouse keeper polished the Fresnel lens, trimmed the wick and wound the clockwork."
    for i in range(40)
)
DOCS: dict[str, list[tuple[str | None, str, str, str]]] = {
    "acme": [
        ("manuals", "Lens care", "acme://manuals/lens", LONG_TEXT),
        (
            "manuals",
            "Foghorn checklist",
            "acme://manuals/foghorn",
            "Foghorn inspection: drain the air tanks, test the compressor and sound the lighthouse horn.",
        ),
        (
            None,
            "Keeper's log",
            "acme://log/1",
            "Quiet night at the lighthouse. The Fresnel lens turned without fault until dawn.",
        ),
    ],
    "globex": [
        (
            None,
            "Museum guide",
            "globex://museum",
            "The harbour museum shows an old lighthouse lens; open daily, tickets at the harbour office.",
        ),
        (None, "Coffee notes", "globex://coffee", "Roast the beans medium brown and rest them two days."),
    ],
}


@dataclass
class Mobile:
    client: httpx.AsyncClient
    ids: dict[str, list[str]]

    async def get(self, path: str, token: str | None = TOKEN_A, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.client.get(path, params=params, headers=headers)

    async def search(self, q: str, token: str | None = TOKEN_A, **params: Any) -> httpx.Response:
        return await self.get("/api/mobile/search", token, q=q, **params)


@pytest.fixture(scope="module")
async def mobile(
    pg_server: PgServer, template_db: str, model_dir: Path, embedder: Embedder, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mobile]:
    """One database, runtime and app for the module: every test here only reads."""
    name = f"mobile_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name, template=template_db)
    root = tmp_path_factory.mktemp("mobile")
    settings = Settings(
        data_dir=root / "data",
        database_url=dsn,
        embedding_model_dir=model_dir,
        api_keys=KEYS,
        sync_in_server=False,
        _env_file=None,
    )
    try:
        async with open_runtime(settings, index=EdgeIndex(root / "index"), embedder=embedder) as runtime:
            ids: dict[str, list[str]] = {}
            for tenant, docs in DOCS.items():
                for collection, title, source, text in docs:
                    outcome = await runtime.service.ingest_text(
                        tenant, text, collection=collection, title=title, source_uri=source
                    )
                    assert outcome.document_id is not None
                    ids.setdefault(tenant, []).append(outcome.document_id)
            app = create_app(settings, runtime=runtime)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                yield Mobile(client, ids)
    finally:
        pg_server.drop_database(name)


def error_of(response: httpx.Response, status: int, error: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == error
    assert body["message"]
    return str(body["message"])


async def test_search_returns_compact_results(mobile: Mobile) -> None:
    response = await mobile.search("  lighthouse   lens ", limit=2)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "private, max-age=30"
    body = response.json()
    assert set(body) == {"query", "results"}
    assert body["query"] == "lighthouse lens"
    assert 1 <= len(body["results"]) <= 2
    for result in body["results"]:
        assert set(result) == {"document_id", "title", "snippet", "score", "source"}
        assert result["document_id"] in mobile.ids["acme"]
        assert isinstance(result["score"], float)
        assert len(result["snippet"]) <= SNIPPET_CHARS + 2
        assert re.search(r"lighthouse|lens", result["snippet"], re.IGNORECASE), result["snippet"]


async def test_snippet_of_a_long_document_is_a_window_around_a_query_word(mobile: Mobile) -> None:
    response = await mobile.search("clockwork", limit=10)
    long_doc = mobile.ids["acme"][0]
    snippets = [r["snippet"] for r in response.json()["results"] if r["document_id"] == long_doc]
    assert snippets, response.text
    for text in snippets:
        assert len(text) <= SNIPPET_CHARS + 2
        assert "clockwork" in text.lower()


def test_snippet_function_windows_on_word_bounds() -> None:
    text = ("alpha " * 100) + "needle " + ("omega " * 100)
    window = snippet(text, "the needle")
    assert "needle" in window
    assert window.startswith("…")
    assert window.endswith("…")
    assert len(window) <= SNIPPET_CHARS + 2
    inner = window.strip("…")
    assert all(word in {"alpha", "needle", "omega"} for word in inner.split())
    assert snippet("short text", "x") == "short text"


@pytest.mark.parametrize("limit", ["0", "11", "50", "-1", "abc", "2.5", ""])
async def test_limit_outside_1_to_10_is_rejected(mobile: Mobile, limit: str) -> None:
    message = error_of(await mobile.search("lighthouse", limit=limit), 400, "bad_request")
    assert "1 to 10" in message


async def test_limit_bounds_are_honoured(mobile: Mobile) -> None:
    for limit, most in (("1", 1), ("10", MAX_RESULTS)):
        response = await mobile.search("lighthouse", limit=limit)
        assert response.status_code == 200, response.text
        assert 1 <= len(response.json()["results"]) <= most
    default = await mobile.search("the")
    assert len(default.json()["results"]) <= 5


async def test_query_is_required_and_capped(mobile: Mobile) -> None:
    for q in ("", "   \t\n "):
        assert "q is required" in error_of(await mobile.search(q), 400, "bad_request")
    assert "256" in error_of(await mobile.search("a" * (MAX_QUERY_CHARS + 1)), 400, "bad_request")
    assert (await mobile.search("a" * MAX_QUERY_CHARS)).status_code == 200
    missing = await mobile.get("/api/mobile/search")
    error_of(missing, 400, "bad_request")


async def test_collection_narrows_the_search(mobile: Mobile) -> None:
    manuals = set(mobile.ids["acme"][:2])
    body = (await mobile.search("lighthouse", collection="manuals", limit=10)).json()
    assert body["results"]
    assert {r["document_id"] for r in body["results"]} <= manuals
    assert (await mobile.search("lighthouse", collection="nothing-here")).json()["results"] == []
    error_of(await mobile.search("lighthouse", collection="../bad name"), 400, "bad_request")


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", ""])
async def test_a_missing_or_wrong_token_gets_401(mobile: Mobile, token: str | None) -> None:
    for path in (
        "/api/mobile/search?q=lighthouse",
        f"/api/mobile/documents/{mobile.ids['acme'][0]}",
        "/api/mobile/openapi.json",
    ):
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        response = await mobile.client.get(path, headers=headers)
        error_of(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_tenants_are_isolated(mobile: Mobile) -> None:
    acme_doc = mobile.ids["acme"][0]
    error_of(await mobile.get(f"/api/mobile/documents/{acme_doc}", TOKEN_B), 404, "not_found")
    assert (await mobile.get(f"/api/mobile/documents/{acme_doc}", TOKEN_A)).status_code == 200
    for q in ("lighthouse lens", "Fresnel clockwork keeper", "foghorn compressor", "lighthouse"):
        results = (await mobile.search(q, TOKEN_B, limit=10)).json()["results"]
        assert {r["document_id"] for r in results} <= set(mobile.ids["globex"]), q
        results = (await mobile.search(q, TOKEN_A, limit=10)).json()["results"]
        assert {r["document_id"] for r in results} <= set(mobile.ids["acme"]), q


async def test_a_read_only_key_can_search_and_a_key_without_read_cannot(mobile: Mobile) -> None:
    response = await mobile.search("lighthouse", TOKEN_READ)
    assert response.status_code == 200, response.text
    assert {r["document_id"] for r in response.json()["results"]} <= set(mobile.ids["acme"])
    assert (await mobile.get(f"/api/mobile/documents/{mobile.ids['acme'][1]}", TOKEN_READ)).status_code == 200
    error_of(await mobile.search("lighthouse", TOKEN_WRITE_ONLY), 403, "forbidden")
    error_of(await mobile.get(f"/api/mobile/documents/{mobile.ids['acme'][1]}", TOKEN_WRITE_ONLY), 403, "forbidden")


async def test_document_is_compact_with_a_capped_excerpt(mobile: Mobile) -> None:
    long_doc = mobile.ids["acme"][0]
    response = await mobile.get(f"/api/mobile/documents/{long_doc}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"document_id", "title", "source", "collection", "excerpt"}
    assert body == {
        **body,
        "document_id": long_doc,
        "title": "Lens care",
        "source": "acme://manuals/lens",
        "collection": "manuals",
    }
    assert len(LONG_TEXT) > EXCERPT_CHARS
    assert len(body["excerpt"]) <= EXCERPT_CHARS + 1
    assert body["excerpt"].endswith("…")
    assert LONG_TEXT.startswith(body["excerpt"][:-1])

    short = (await mobile.get(f"/api/mobile/documents/{mobile.ids['acme'][2]}")).json()
    assert short["excerpt"] == DOCS["acme"][2][3]
    assert short["collection"] == "default"


async def test_unknown_and_malformed_document_ids_get_404(mobile: Mobile) -> None:
    error_of(await mobile.get(f"/api/mobile/documents/{uuid.uuid4()}"), 404, "not_found")
    error_of(await mobile.get("/api/mobile/documents/not-a-uuid"), 404, "not_found")


async def test_only_get_is_routed(mobile: Mobile) -> None:
    response = await mobile.client.post("/api/mobile/search?q=x", headers={"Authorization": f"Bearer {TOKEN_A}"})
    assert response.status_code == 405


async def test_openapi_document_describes_both_routes(mobile: Mobile) -> None:
    response = await mobile.get("/api/mobile/openapi.json")
    assert response.status_code == 200
    spec = json.loads(response.text)
    assert spec["openapi"].startswith("3.")
    assert {"/api/mobile/search", "/api/mobile/documents/{document_id}"} <= set(spec["paths"])
    params = {p["name"]: p for p in spec["paths"]["/api/mobile/search"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == MAX_RESULTS
    assert params["q"]["schema"]["maxLength"] == MAX_QUERY_CHARS
    openapi_spec_validator.validate(spec)
