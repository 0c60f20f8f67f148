"""What an agent reads, through the SDK's client against the real server: one hit per document by
default, compact citable text beside the full structured content, links to the documents, the chunks
around a passage, titles and annotations, and completions of collection names."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from mcp import Client
from mcp_types import PromptReference, ResourceLink, TextContent, TextResourceContents

from mcp_rag.runtime import Runtime
from mcp_rag.server import build_server
from tests.mcp_calls import call, call_error, text_of

# One long document whose every section is about tides, and short ones that mention them once.
TIDES = "# Tides\n\n" + "\n\n".join(
    f"## Part {i}\n\nTides rise and fall twice a day as the moon's gravity pulls the ocean; "
    f"spring tides follow the new and the full moon, neap tides the quarters. Section {i} adds detail {i} "
    + "about harbours, tidal ranges and coastal currents. "
    * 12
    for i in range(6)
)
SHORT = {  # paragraph-sized, like the passages agents usually read
    "bay": "The bay empties at low tide and the boats rest on the mud until the tide returns. " * 6,
    "moon": "The moon's pull raises a bulge of water: the tide follows the moon around the earth. " * 6,
    "mill": "A tide mill stores sea water at high tide and turns its wheel as the tide goes out. " * 6,
}


@pytest.fixture
def index_kind() -> str:
    return "qdrant-edge"


async def ingest_corpus(client: Client, collection: str) -> dict[str, str]:
    ids = {}
    out = await call(
        client, "ingest_text", text=TIDES, title="All about tides", collection=collection, source_uri="notes://tides"
    )
    ids["tides"] = out["documents"][0]["document_id"]
    assert out["chunks"] >= 4
    for key, text in SHORT.items():
        out = await call(
            client, "ingest_text", text=text, title=key.title(), collection=collection, source_uri=f"notes://{key}"
        )
        ids[key] = out["documents"][0]["document_id"]
    return ids


async def test_results_are_distinct_documents_unless_raw_chunks_are_asked_for(runtime: Runtime) -> None:
    collection = f"c-{uuid.uuid4().hex[:8]}"
    async with Client(build_server(lambda: runtime)) as client:
        ids = await ingest_corpus(client, collection)
        raw = await call(
            client, "search", query="spring tides and the moon", collection=collection, top_k=4, raw_chunks=True
        )
        raw_docs = [h["document_id"] for h in raw["results"]]
        assert len(raw_docs) == 4 and len(set(raw_docs)) < 4  # the long document fills several places

        found = await call(client, "search", query="spring tides and the moon", collection=collection, top_k=4)
        docs = [h["document_id"] for h in found["results"]]
        assert sorted(docs) == sorted(ids.values())  # four places, four documents
        assert all(h["passages"] == [] for h in found["results"])

        more = await call(
            client, "search", query="spring tides and the moon", collection=collection, top_k=2, passages_per_document=3
        )
        long_hit = next(h for h in more["results"] if h["document_id"] == ids["tides"])
        positions = [long_hit["position"]] + [p["position"] for p in long_hit["passages"]]
        assert len(long_hit["passages"]) == 2 and len(set(positions)) == 3
        assert [p["score"] for p in long_hit["passages"]] == sorted(
            (p["score"] for p in long_hit["passages"]), reverse=True
        )
        assert long_hit["score"] >= long_hit["passages"][0]["score"]

        message = await call_error(client, "search", query="tides", passages_per_document=6)
        assert "passages_per_document" in message


def overhead(result: Any) -> float:
    """Characters of the text block beyond the passage text it carries, as a fraction of that text."""
    hits = result.structured_content["results"]
    passages = sum(len(h["text"]) + sum(len(p["text"]) for p in h["passages"]) for h in hits)
    return len(text_of(result)) / passages - 1


async def test_the_text_is_compact_and_citable_and_links_each_document(runtime: Runtime) -> None:
    collection = f"c-{uuid.uuid4().hex[:8]}"
    async with Client(build_server(lambda: runtime)) as client:
        ids = await ingest_corpus(client, collection)
        result = await client.call_tool("search", {"query": "tide mill wheel", "collection": collection, "top_k": 4})
        assert not result.is_error
        text = text_of(result)
        hits = result.structured_content["results"]
        first = hits[0]
        assert text.startswith(f"[1] {first['title']}")
        assert f"{first['source_uri']} · document {first['document_id']} · chunk {first['position']}" in text
        for rank, hit in enumerate(hits, start=1):
            assert f"[{rank}] " in text and hit["text"] in text
        assert "{" not in text  # not JSON
        assert overhead(result) <= 0.40, (overhead(result), text)

        links = [c for c in result.content if isinstance(c, ResourceLink)]
        assert [str(link.uri) for link in links] == [f"rag://documents/{h['document_id']}" for h in hits]
        for link in links:  # every link resolves to its document
            [content] = (await client.read_resource(str(link.uri))).contents
            assert isinstance(content, TextResourceContents)
            assert f'"document_id": "{str(link.uri).rsplit("/", 1)[1]}"' in content.text
        assert set(ids.values()) >= {h["document_id"] for h in hits}

        empty = await client.call_tool("search", {"query": "volcano", "collection": "nothing-here"})
        assert text_of(empty) == "No results for 'volcano'."


async def test_other_tools_answer_in_compact_text_too(runtime: Runtime) -> None:
    collection = f"c-{uuid.uuid4().hex[:8]}"
    async with Client(build_server(lambda: runtime)) as client:
        ids = await ingest_corpus(client, collection)
        ingest = await client.call_tool(
            "ingest_text", {"text": SHORT["bay"], "title": "Bay", "collection": collection, "source_uri": "notes://bay"}
        )
        assert text_of(ingest).startswith("added 0, updated 0, unchanged 1, removed 0, failed 0")
        listed = await client.call_tool("list_documents", {"collection": collection})
        assert text_of(listed).count("\n- ") + 1 == 4 and ids["moon"] in text_of(listed)
        doc = await client.call_tool("get_document", {"document_id": ids["moon"]})
        assert text_of(doc).endswith("\n\n" + SHORT["moon"])
        for result in (ingest, listed, doc):
            assert result.structured_content is not None
            assert not text_of(result).startswith("{")


async def test_get_chunks_reads_around_a_passage_within_limits(runtime: Runtime) -> None:
    collection = f"c-{uuid.uuid4().hex[:8]}"
    async with Client(build_server(lambda: runtime)) as client:
        ids = await ingest_corpus(client, collection)
        total = (await call(client, "get_document", document_id=ids["tides"], include_text=False))["chunks"]
        around = await call(client, "get_chunks", document_id=ids["tides"], around=2, before=1, after=2)
        assert [c["position"] for c in around["returned"]] == [1, 2, 3, 4]
        assert around["chunks"] == total
        starts = [c["start_char"] for c in around["returned"]]
        assert starts == sorted(starts)
        doc = await call(client, "get_document", document_id=ids["tides"])
        for chunk in around["returned"]:
            assert doc["text"][chunk["start_char"] : chunk["end_char"]] == chunk["text"]

        edge = await call(client, "get_chunks", document_id=ids["tides"], around=0, before=5, after=0)
        assert [c["position"] for c in edge["returned"]] == [0]
        assert "past its end" in await call_error(client, "get_chunks", document_id=ids["tides"], around=total)
        assert "before" in await call_error(client, "get_chunks", document_id=ids["tides"], around=1, before=11)
        assert "no document with id" in await call_error(client, "get_chunks", document_id=str(uuid.uuid4()), around=0)


async def test_titles_annotations_and_a_smaller_tool_list(runtime: Runtime) -> None:
    async with Client(build_server(lambda: runtime)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for tool in tools.values():
            assert tool.title, tool.name
            assert tool.annotations is not None
        for name in ("ingest_text", "ingest_file", "ingest_url", "delete_document", "delete_collection"):
            assert tools[name].annotations.destructive_hint is True, name  # replacing is destructive
        for name in ("search", "fetch", "get_chunks", "get_document", "list_documents", "list_collections", "stats"):
            assert tools[name].annotations.read_only_hint is True, name
        # The schemas carry no generated titles ("Document Id" beside document_id), but keep a property
        # that is called "title".
        search = tools["search"]
        assert "Document Id" not in json.dumps(search.input_schema) + json.dumps(search.output_schema)
        assert "title" in search.output_schema["properties"]["results"]["items"]["properties"]
        assert "title" not in search.input_schema["properties"]["query"]


async def test_collection_names_complete_for_the_prompt(runtime: Runtime) -> None:
    async with Client(build_server(lambda: runtime)) as client:
        for name in ("oceans", "orchards", "volcanoes"):
            await call(client, "ingest_text", text=f"Notes on {name}.", collection=name)
        ref = PromptReference(type="ref/prompt", name="answer_with_citations")
        done = await client.complete(ref, {"name": "collection", "value": "o"})
        assert sorted(done.completion.values) == ["oceans", "orchards"]
        assert (await client.complete(ref, {"name": "question", "value": "o"})).completion.values == []
        assert isinstance(
            (await client.get_prompt("answer_with_citations", {"question": "q"})).messages[0].content, TextContent
        )
