"""The MCP surface through the SDK's in-memory client: every tool, resource and prompt against a real
Postgres, the real embedding model and a real index (both engines where the index matters)."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import TextContent, TextResourceContents

from mcp_rag import metrics
from mcp_rag.embedding import Embedder
from mcp_rag.errors import AccessDeniedError
from mcp_rag.extract import SourceDocument
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.server import build_server
from mcp_rag.settings import Settings
from mcp_rag.urlfetch import UrlPolicy
from tests.mcp_calls import call, call_error, text_of

READ_TOOLS = {
    "search",
    "fetch",
    "get_chunks",
    "get_document",
    "list_documents",
    "list_collections",
    "stats",
    "ingest_status",
}
WRITE_TOOLS = {"ingest_text", "ingest_file", "ingest_url", "delete_document", "delete_collection"}


@pytest.fixture
def index_kind() -> str:
    """Most tests here use the embedded engine; the search tests run over both."""
    return "qdrant-edge"


@asynccontextmanager
async def connect(runtime: Runtime, **options: Any) -> AsyncIterator[Client]:
    async with Client(build_server(lambda: runtime, **options)) as client:
        yield client


@pytest.fixture
def open_rt(make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path) -> Callable[..., Any]:
    """Opens a runtime with extra settings (allowed roots, URL policy...) on the test's database."""

    @asynccontextmanager
    async def opener(**overrides: Any) -> AsyncIterator[Runtime]:
        settings = make_settings(**overrides)
        index = EdgeIndex(tmp_path / f"index-{uuid.uuid4().hex[:8]}")
        async with open_runtime(settings, index=index, embedder=embedder) as rt:
            yield rt

    return opener


# --- search ------------------------------------------------------------------------------

CORPUS = [
    dict(
        text="The feline rested on the woven rug near the fireplace, purring softly all evening.",
        title="Cats",
        collection="pets",
        source_uri="https://example.com/pets/cat",
        metadata={"lang": "en", "year": 2021},
    ),
    dict(
        text="Part number XQ-4471 is the replacement pressure valve for the Model 9 espresso machine.",
        title="Valve",
        collection="kitchen",
        source_uri="https://example.com/kitchen/valve",
        metadata={"lang": "en", "year": 2023},
    ),
    dict(
        text="Der Hund spielt jeden Morgen im Garten mit einem roten Ball.",
        title="Hund",
        collection="pets",
        source_uri="file:///docs/hund.txt",
        metadata={"lang": "de", "year": 2022},
    ),
    dict(
        text="Quarterly revenue rose by twelve percent thanks to strong sales of coffee equipment.",
        title="Revenue",
        collection="default",
        source_uri="https://example.com/finance/q3",
        metadata={"lang": "en", "year": 2023, "tags": ["finance", "report"]},
    ),
]


async def ingest_corpus(client: Client) -> dict[str, str]:
    """Ingest CORPUS through the tool; returns title -> document id."""
    ids = {}
    for doc in CORPUS:
        out = await call(client, "ingest_text", **doc)
        assert out["added"] == 1
        ids[str(doc["title"])] = out["documents"][0]["document_id"]
    return ids


def titles(out: dict[str, Any]) -> list[str]:
    return [hit["title"] for hit in out["results"]]


@pytest.mark.parametrize("index_kind", ["qdrant-edge", "qdrant-server"])
async def test_search_each_mode_finds_the_right_document(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        ids = await ingest_corpus(client)

        dense = await call(client, "search", query="a cat sleeping on a carpet", mode="dense", top_k=2)
        assert dense["mode"] == "dense"
        assert titles(dense)[0] == "Cats"
        assert len(dense["results"]) == 2

        lexical = await call(client, "search", query="XQ-4471", mode="lexical")
        assert titles(lexical)[0] == "Valve"
        # Lexical search matches words only: a word in no document finds nothing.
        nothing = await call(client, "search", query="zeppelin", mode="lexical")
        assert nothing["results"] == []

        hybrid = await call(client, "search", query="espresso machine valve replacement")
        assert hybrid["mode"] == "hybrid"
        assert titles(hybrid)[0] == "Valve"
        assert len(hybrid["results"]) <= 5

        # Every hit carries its source and exact position in the stored document.
        hit = hybrid["results"][0]
        assert hit["document_id"] == ids["Valve"]
        assert hit["source_uri"] == "https://example.com/kitchen/valve"
        assert hit["collection"] == "kitchen"
        assert hit["metadata"] == {"lang": "en", "year": 2023}
        doc = await call(client, "get_document", document_id=hit["document_id"])
        assert doc["text"][hit["start_char"] : hit["end_char"]] == hit["text"]
        scores = [h["score"] for h in hybrid["results"]]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("index_kind", ["qdrant-edge", "qdrant-server"])
async def test_search_filters(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        ids = await ingest_corpus(client)
        query = "espresso coffee machine"

        in_pets = await call(client, "search", query=query, collection="pets", top_k=10)
        assert sorted(titles(in_pets)) == ["Cats", "Hund"]

        only = await call(client, "search", query=query, document_ids=[ids["Revenue"], ids["Hund"]], top_k=10)
        assert sorted(titles(only)) == ["Hund", "Revenue"]

        web = await call(client, "search", query=query, source_prefix="https://example.com/", top_k=10)
        assert sorted(titles(web)) == ["Cats", "Revenue", "Valve"]
        files = await call(client, "search", query=query, source_prefix="file:///docs/", top_k=10)
        assert titles(files) == ["Hund"]

        german = await call(client, "search", query=query, metadata={"lang": "de"}, top_k=10)
        assert titles(german) == ["Hund"]
        years = await call(client, "search", query=query, metadata={"year": [2021, 2022]}, top_k=10)
        assert sorted(titles(years)) == ["Cats", "Hund"]
        both = await call(client, "search", query=query, metadata={"lang": "en", "year": 2023}, top_k=10)
        assert sorted(titles(both)) == ["Revenue", "Valve"]
        tagged = await call(client, "search", query=query, metadata={"tags": "finance"}, top_k=10)
        assert titles(tagged) == ["Revenue"]

        combined = await call(client, "search", query=query, collection="pets", metadata={"lang": "en"}, top_k=10)
        assert titles(combined) == ["Cats"]
        none = await call(client, "search", query=query, collection="kitchen", metadata={"lang": "de"})
        assert none["results"] == []
        unknown_collection = await call(client, "search", query=query, collection="nonexistent")
        assert unknown_collection["results"] == []


def invalid_calls(tool: str) -> float:
    return metrics.REGISTRY.get_sample_value("mcp_rag_tool_calls_total", {"tool": tool, "outcome": "invalid"}) or 0.0


async def test_argument_validation_errors_are_readable(runtime: Runtime) -> None:
    rejected_before = invalid_calls("search")
    async with connect(runtime) as client:
        for top_k in (0, 51):
            message = await call_error(client, "search", query="x", top_k=top_k)
            assert "top_k" in message
        assert "query" in await call_error(client, "search", query="")
        message = await call_error(client, "search", query="x", mode="fuzzy")
        assert "mode" in message
        assert "hybrid" in message
        message = await call_error(client, "search", query="x", collection="bad name!")
        assert "invalid collection name 'bad name!'" in message
        message = await call_error(client, "search", query="x", metadata={"k": []})
        assert "empty list" in message
        message = await call_error(client, "search", query="x", metadata={"bad key": 1})
        assert "invalid metadata key" in message
        message = await call_error(client, "ingest_text", text="hello", collection="-leading-dash")
        assert "invalid collection name" in message
        assert "text" in await call_error(client, "ingest_text", text="")
        assert "limit" in await call_error(client, "list_documents", limit=101)
    # Calls rejected before the tool ran are still counted (top_k twice, query, mode), but the ones the
    # tool itself refused are counted as errors, not twice.
    assert invalid_calls("search") - rejected_before == 4


# --- ingest_text -------------------------------------------------------------------------


async def test_ingest_text_added_unchanged_updated(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        first = await call(
            client,
            "ingest_text",
            text="# Alpha\n\nThe aardvark digs burrows at night.",
            title="Alpha",
            source_uri="notes://alpha",
            metadata={"team": "zoo"},
        )
        assert (first["added"], first["updated"], first["unchanged"]) == (1, 0, 0)
        assert first["chunks"] >= 1
        doc_id = first["documents"][0]["document_id"]
        assert first["documents"][0] == {
            "source_uri": "notes://alpha",
            "status": "added",
            "document_id": doc_id,
            "chunks": first["chunks"],
        }

        again = await call(
            client,
            "ingest_text",
            text="# Alpha\n\nThe aardvark digs burrows at night.",
            title="Alpha",
            source_uri="notes://alpha",
            metadata={"team": "zoo"},
        )
        assert (again["added"], again["updated"], again["unchanged"], again["chunks"]) == (0, 0, 1, 0)
        assert again["documents"][0]["status"] == "unchanged"
        assert again["documents"][0]["document_id"] is None

        changed = await call(
            client,
            "ingest_text",
            text="# Alpha\n\nThe okapi browses quietly in the forest.",
            title="Alpha v2",
            source_uri="notes://alpha",
            metadata={"team": "zoo"},
        )
        assert (changed["added"], changed["updated"], changed["unchanged"]) == (0, 1, 0)
        assert changed["documents"][0]["document_id"] == doc_id

        # One document, with the new content only: no stale chunks in the index.
        listed = await call(client, "list_documents")
        assert [d["document_id"] for d in listed["documents"]] == [doc_id]
        assert listed["documents"][0]["title"] == "Alpha v2"
        assert (await call(client, "search", query="aardvark", mode="lexical"))["results"] == []
        hits = (await call(client, "search", query="okapi", mode="lexical"))["results"]
        assert [h["document_id"] for h in hits] == [doc_id]
        assert "okapi" in hits[0]["text"]
        stats = await call(client, "stats")
        assert stats["documents"] == 1
        assert stats["index_points"] == stats["chunks"] == changed["chunks"]

        # Without a source URI the content is the identity.
        anon = await call(client, "ingest_text", text="Anonymous text about zebras.")
        assert anon["documents"][0]["source_uri"].startswith("text:")
        anon_again = await call(client, "ingest_text", text="Anonymous text about zebras.")
        assert anon_again["unchanged"] == 1


# --- ingest_file -------------------------------------------------------------------------


def paragraph(topic: str, n: int = 12) -> str:
    return " ".join(f"Sentence {i} about {topic} explains one more detail of the subject." for i in range(n))


@pytest.fixture
def file_tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "alpha.md").write_text("# Alpha guide\n\n" + paragraph("alpacas"))
    (docs / "beta.md").write_text("# Beta guide\n\n" + paragraph("beavers"))
    (docs / "sub" / "gamma.md").write_text("# Gamma guide\n\n" + paragraph("gazelles"))
    (docs / "skip-me.md").write_text("# Skipped\n\n" + paragraph("skunks"))
    (docs / "delta.txt").write_text(paragraph("dolphins"))
    (docs / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("The launch code is swordfish-42.")
    (docs / "escape.md").symlink_to(outside / "secret.txt")
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    return {"root": root, "docs": docs, "outside": outside}


async def test_ingest_file_single_file(open_rt: Callable[..., Any], file_tree: dict[str, Path]) -> None:
    root = file_tree["root"]
    async with open_rt(allowed_roots=[root]) as rt, connect(rt) as client:
        out = await call(client, "ingest_file", path=str(file_tree["docs"] / "alpha.md"), collection="guides")
        assert (out["added"], out["failed"]) == (1, [])
        doc = out["documents"][0]
        assert doc["source_uri"] == (file_tree["docs"] / "alpha.md").resolve().as_uri()
        got = await call(client, "get_document", document_id=doc["document_id"])
        assert got["title"] == "Alpha guide"
        assert got["collection"] == "guides"
        # A path relative to the (first) allowed root works too, and unchanged files are skipped.
        again = await call(client, "ingest_file", path="docs/alpha.md", collection="guides")
        assert again["unchanged"] == 1
        # An unsupported file named explicitly fails with the reason.
        message = await call_error(client, "ingest_file", path=str(file_tree["docs"] / "picture.png"))
        assert "unsupported file type '.png'" in message


async def test_ingest_directory_with_include_exclude_and_progress(
    open_rt: Callable[..., Any], file_tree: dict[str, Path]
) -> None:
    root = file_tree["root"]
    # One document per batch, so that every file is its own progress step.
    async with open_rt(allowed_roots=[root], ingest_batch_chunks=1) as rt, connect(rt) as client:
        updates: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append((progress, total, message))

        result = await client.call_tool(
            "ingest_file",
            {"path": str(file_tree["docs"]), "include": ["*.md"], "exclude": ["skip-*"]},
            progress_callback=on_progress,
        )
        assert not result.is_error, text_of(result)
        out = result.structured_content
        assert out is not None
        assert out["added"] == 3
        ingested = sorted(Path(d["source_uri"]).name for d in out["documents"])
        assert ingested == ["alpha.md", "beta.md", "gamma.md"]  # not skip-me, delta.txt, picture.png, escape.md

        assert len(updates) >= 2, updates
        assert [u[0] for u in updates] == sorted(u[0] for u in updates)
        assert updates[-1][:2] == (3, 3)
        assert all(u[1] == 3 for u in updates)
        assert "3 added" in (updates[-1][2] or "")

        # The symlink escaping the root was not followed: its text is not searchable.
        leaked = await call(client, "search", query="swordfish launch code", mode="lexical")
        assert leaked["results"] == []

        # Ingesting the directory again: everything unchanged; without filters the .txt comes in too.
        second = await call(client, "ingest_file", path=str(file_tree["docs"]), exclude=["skip-*"])
        assert (second["added"], second["unchanged"]) == (1, 3)


async def test_ingest_directory_reports_broken_files_and_goes_on(open_rt: Callable[..., Any], tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "good.md").write_text("# Good\n\nA perfectly readable file about herons.")
    (root / "broken.pdf").write_bytes(b"this is not a pdf")
    (root / "empty.txt").write_text("   \n")
    async with open_rt(allowed_roots=[root]) as rt, connect(rt) as client:
        out = await call(client, "ingest_file", path=str(root))
        assert out["added"] == 1
        failed = {Path(f["source"]).name: f["reason"] for f in out["failed"]}
        assert set(failed) == {"broken.pdf", "empty.txt"}
        assert "not a PDF" in failed["broken.pdf"]
        assert "no text" in failed["empty.txt"]


async def test_ingest_file_refuses_paths_outside_the_allowed_roots(
    open_rt: Callable[..., Any], file_tree: dict[str, Path]
) -> None:
    root, outside = file_tree["root"], file_tree["outside"]
    async with open_rt(allowed_roots=[root]) as rt, connect(rt) as client:
        attempts = [
            str(outside / "secret.txt"),  # plainly outside
            f"{root}/docs/../../outside/secret.txt",  # '..' climbing out
            "../outside/secret.txt",  # relative, climbing out of the root
            str(file_tree["docs"] / "escape.md"),  # a symlink to a file outside
            str(root / "linked-dir"),  # a symlink to a directory outside
            str(root / "linked-dir" / "secret.txt"),
        ]
        for path in attempts:
            message = await call_error(client, "ingest_file", path=path)
            assert "outside the allowed roots" in message, (path, message)
            assert str(root) not in message.replace(path, "<path>"), "the answer names the server's roots"
            assert "symlinks and '..' are resolved" in message
        assert "no such file or directory" in await call_error(client, "ingest_file", path=str(root / "nope.md"))
        message = await call_error(client, "ingest_file", path=str(file_tree["docs"]), include=["*.rst"])
        assert "no ingestible files" in message
        assert (await call(client, "stats"))["documents"] == 0


async def test_ingest_file_without_allowed_roots_is_disabled(runtime: Runtime, tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\ntext")
    async with connect(runtime) as client:
        message = await call_error(client, "ingest_file", path=str(tmp_path / "a.md"))
        assert "disabled" in message
        assert "MCP_RAG_ALLOWED_ROOTS" in message


# --- ingest_url --------------------------------------------------------------------------

ARTICLE = """<!doctype html><html><head><title>Local Article About Lighthouses</title></head><body>
<nav>Home | About</nav>
<article>
<p>Lighthouses guide ships along dangerous coasts. The Fresnel lens, invented in 1822, focuses the lamp's light
into a beam visible for more than twenty nautical miles.</p>
<p>Before automation, keepers trimmed the wicks and wound the clockwork that turned the lens every few hours,
through every storm of the winter.</p>
</article></body></html>"""


hosts_seen: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        port = self.server.server_address[1]
        hosts_seen.append(self.headers.get("Host", ""))
        routes: dict[str, tuple[int, dict[str, str], bytes]] = {
            "/article.html": (200, {"Content-Type": "text/html; charset=utf-8"}, ARTICLE.encode()),
            "/notes.txt": (200, {"Content-Type": "text/plain"}, b"Plain notes about tide pools and anemones."),
            "/binary": (200, {"Content-Type": "application/octet-stream"}, b"\0\1\2\3" * 10),
            "/big": (200, {"Content-Type": "text/plain"}, b"x" * 5000),
            "/redirect-same-host": (302, {"Location": "/notes.txt"}, b""),
            "/redirect-to-alias": (302, {"Location": f"http://127.0.0.2:{port}/notes.txt"}, b""),
            "/redirect-to-ip": (302, {"Location": f"http://127.0.0.1:{port}/notes.txt"}, b""),
        }
        if self.path == "/big-unannounced":  # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"y" * 5000)
            return
        status, headers, body = routes.get(self.path, (404, {"Content-Type": "text/plain"}, b"not found"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[int]:
    """A real HTTP server on 127.0.0.1 serving the pages above; yields its port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_ingest_url_refuses_loopback_without_allowlist(runtime: Runtime, web: int) -> None:
    async with connect(runtime) as client:
        message = await call_error(client, "ingest_url", url=f"http://127.0.0.1:{web}/article.html")
        assert "refusing to fetch '127.0.0.1'" in message
        assert "non-public" in message
        assert "MCP_RAG_URL_ALLOWLIST" in message
        message = await call_error(client, "ingest_url", url=f"http://localhost:{web}/article.html")
        assert "refusing to fetch 'localhost'" in message
        # Other spellings of loopback and the unspecified address are resolved first and refused.
        for host in ("127.1", "2130706433", "0x7f000001", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"):
            message = await call_error(client, "ingest_url", url=f"http://{host}:{web}/article.html")
            assert "refusing to fetch" in message, (host, message)
            assert "non-public" in message, (host, message)
        assert (await call(client, "stats"))["documents"] == 0


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "fd00::1",
        "fe80::1",
        "224.0.0.1",
        "240.0.0.1",
    ],
)
async def test_url_policy_refuses_private_and_link_local_addresses(address: str) -> None:
    """Checked on the policy itself, so that no packet is ever sent to such an address."""
    with pytest.raises(AccessDeniedError, match="non-public"):
        await UrlPolicy().check_host(address, 80)
    await UrlPolicy([f"{address}/32" if ":" not in address else f"{address}/128"]).check_host(address, 80)


async def test_ingest_url_with_allowlist(open_rt: Callable[..., Any], web: int) -> None:
    async with open_rt(url_allowlist=["127.0.0.1"]) as rt, connect(rt) as client:
        url = f"http://127.0.0.1:{web}/article.html"
        out = await call(client, "ingest_url", url=url, collection="web", metadata={"site": "local"})
        assert out["added"] == 1
        doc = await call(client, "get_document", document_id=out["documents"][0]["document_id"])
        assert doc["title"] == "Local Article About Lighthouses"
        assert doc["source_uri"] == url
        assert doc["metadata"] == {"content_type": "text/html", "site": "local"}
        assert "Fresnel lens" in doc["text"]
        assert "Home | About" not in doc["text"]  # boilerplate removed
        hits = await call(client, "search", query="Fresnel lens beam", collection="web")
        assert hits["results"][0]["document_id"] == doc["document_id"]

        # The URL is the identity: fetching again is unchanged; a title can be given.
        assert (await call(client, "ingest_url", url=url, collection="web", metadata={"site": "local"}))[
            "unchanged"
        ] == 1
        # A redirect within the allowed host is followed; the requested URL stays the identity.
        redirected = await call(
            client, "ingest_url", url=f"http://127.0.0.1:{web}/redirect-same-host", title="Tide notes"
        )
        doc = await call(client, "get_document", document_id=redirected["documents"][0]["document_id"])
        assert doc["title"] == "Tide notes"
        assert doc["text"] == "Plain notes about tide pools and anemones."


async def test_ingest_url_checks_the_policy_on_every_redirect_hop(open_rt: Callable[..., Any], web: int) -> None:
    # The allowlist entry "127.0.0.1" is an address (a /32 network): another loopback address is not in it,
    # so a redirect from the allowed address to 127.0.0.2 is refused before connecting there.
    async with open_rt(url_allowlist=["127.0.0.1"]) as rt, connect(rt) as client:
        message = await call_error(client, "ingest_url", url=f"http://127.0.0.1:{web}/redirect-to-alias")
        assert "refusing to fetch '127.0.0.2'" in message
        assert (await call(client, "stats"))["documents"] == 0
    # A host-name entry allows that name only: the same server under its IP address is refused.
    async with open_rt(url_allowlist=["localhost"]) as rt, connect(rt) as client:
        direct = await call(client, "ingest_url", url=f"http://localhost:{web}/notes.txt")
        assert direct["added"] == 1
        message = await call_error(client, "ingest_url", url=f"http://localhost:{web}/redirect-to-ip")
        assert "refusing to fetch '127.0.0.1'" in message
        assert (await call(client, "stats"))["documents"] == 1


async def test_ingest_url_connects_to_the_address_it_checked(
    open_rt: Callable[..., Any], web: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a name that first resolves to an allowed address and then to another one must not
    move the connection. The answers are faked (no DNS server here); the connection is real: checked
    127.0.0.1 serves the page, while nothing listens on 127.0.0.2."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name == "rebind.test":
            lookups.append(name)
            return real("127.0.0.1" if len(lookups) == 1 else "127.0.0.2", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    async with open_rt(url_allowlist=["127.0.0.1"]) as rt, connect(rt) as client:
        hosts_seen.clear()
        out = await call(client, "ingest_url", url=f"http://rebind.test:{web}/notes.txt")
        assert out["added"] == 1
        assert out["documents"][0]["source_uri"] == f"http://rebind.test:{web}/notes.txt"
        assert hosts_seen == [f"rebind.test:{web}"]  # the site's name still reaches the server
        assert lookups == ["rebind.test"]  # resolved once, for the check


async def test_ingest_url_errors(open_rt: Callable[..., Any], web: int) -> None:
    base = f"http://127.0.0.1:{web}"
    async with open_rt(url_allowlist=["127.0.0.1/8"], url_max_bytes=1000) as rt, connect(rt) as client:
        assert "answered HTTP 404" in await call_error(client, "ingest_url", url=f"{base}/missing")
        message = await call_error(client, "ingest_url", url=f"{base}/binary")
        assert "content type 'application/octet-stream' cannot be ingested" in message
        assert "text/html" in message
        message = await call_error(client, "ingest_url", url=f"{base}/big")
        assert "5000 bytes exceeds the limit of 1000 bytes" in message
        message = await call_error(client, "ingest_url", url=f"{base}/big-unannounced")
        assert "larger than the limit of 1000 bytes" in message
        for url in ("file:///etc/passwd", "ftp://127.0.0.1/file.txt", "gopher://example.com/"):
            message = await call_error(client, "ingest_url", url=url)
            assert "only http and https URLs can be ingested" in message, message
        assert "no host" in await call_error(client, "ingest_url", url="http:///path")
        assert "credentials" in await call_error(client, "ingest_url", url=f"http://user:pw@127.0.0.1:{web}/")
        message = await call_error(client, "ingest_url", url="http://127.0.0.1:1/nothing-listens-here")
        assert "could not fetch" in message
        assert (await call(client, "stats"))["documents"] == 0


# --- documents and collections ---------------------------------------------------------------


async def test_get_document(runtime: Runtime) -> None:
    text = "# Heading\n\n" + paragraph("otters", 40)
    async with connect(runtime) as client:
        out = await call(
            client,
            "ingest_text",
            text=text,
            title="Otters",
            source_uri="notes://otters",
            collection="animals",
            metadata={"kind": "mammal"},
        )
        doc_id = out["documents"][0]["document_id"]

        full = await call(client, "get_document", document_id=doc_id)
        assert full["text"] == text
        assert full["truncated"] is False
        assert (full["document_id"], full["title"], full["collection"]) == (doc_id, "Otters", "animals")
        assert full["source_uri"] == "notes://otters"
        assert full["metadata"] == {"kind": "mammal"}
        assert full["chunks"] == out["chunks"] >= 2
        assert len(full["content_hash"]) == 64

        meta_only = await call(client, "get_document", document_id=doc_id, include_text=False)
        assert meta_only["text"] is None
        assert meta_only["truncated"] is False
        assert meta_only["title"] == "Otters"

        cut = await call(client, "get_document", document_id=doc_id, max_chars=50)
        assert cut["text"] == text[:50]
        assert cut["truncated"] is True

        missing = str(uuid.uuid4())
        message = await call_error(client, "get_document", document_id=missing)
        assert f"no document with id '{missing}'" in message
        assert "list_documents" in message
        message = await call_error(client, "get_document", document_id="not-a-uuid")
        assert "no document with id 'not-a-uuid'" in message
        assert "UUID" in message
        assert "max_chars" in await call_error(client, "get_document", document_id=doc_id, max_chars=0)


async def test_search_and_fetch_meet_the_chatgpt_connector_contract(runtime: Runtime) -> None:
    """ChatGPT connectors and deep research call `search` (results with id, title, url) and then
    `fetch(id)` (one document: id, title, text, url, metadata)."""
    text = "# Tides\n\n" + paragraph("tides", 30)
    async with connect(runtime) as client:
        out = await call(
            client,
            "ingest_text",
            text=text,
            title="Tides",
            source_uri="https://example.com/tides",
            collection="sea",
            metadata={"kind": "note"},
        )
        doc_id = out["documents"][0]["document_id"]
        hit = (await call(client, "search", query="tides"))["results"][0]
        assert (hit["id"], hit["title"], hit["url"]) == (doc_id, "Tides", "https://example.com/tides")
        assert hit["id"] == hit["document_id"]

        fetched = await call(client, "fetch", id=hit["id"])
        assert fetched == {
            "id": doc_id,
            "title": "Tides",
            "text": text,
            "url": "https://example.com/tides",
            "metadata": {"kind": "note", "collection": "sea"},
        }

        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["fetch"].input_schema["required"] == ["id"]
        missing = str(uuid.uuid4())
        assert f"no document with id '{missing}'" in await call_error(client, "fetch", id=missing)
        assert "UUID" in await call_error(client, "fetch", id="not-a-uuid")


async def test_list_documents_paginates(runtime: Runtime) -> None:
    docs = [
        SourceDocument(
            f"https://example.com/doc-{i:02d}", f"Document number {i} about topic {i % 3}.", title=f"Doc {i}"
        )
        for i in range(25)
    ]
    extra = [SourceDocument("https://other.example/x", "Another collection's document.", title="Other")]
    await runtime.service.ingest("default", None, docs)
    await runtime.service.ingest("default", "other", extra)
    async with connect(runtime) as client:
        seen: list[str] = []
        cursor = None
        pages = []
        while True:
            page = await call(
                client, "list_documents", collection="default", limit=10, **({"cursor": cursor} if cursor else {})
            )
            pages.append(len(page["documents"]))
            seen += [d["source_uri"] for d in page["documents"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [10, 10, 5]
        assert seen == [d.source_uri for d in docs]

        everything = await call(client, "list_documents", limit=100)
        assert len(everything["documents"]) == 26
        assert everything["next_cursor"] is None
        summary = everything["documents"][0]
        assert set(summary) == {
            "document_id",
            "collection",
            "source_uri",
            "title",
            "metadata",
            "chunks",
            "content_hash",
            "created_at",
            "updated_at",
        }
        assert "text" not in summary

        prefixed = await call(client, "list_documents", source_prefix="https://example.com/doc-1")
        assert [d["title"] for d in prefixed["documents"]] == [f"Doc {i}" for i in range(10, 20)]
        assert [d["title"] for d in (await call(client, "list_documents", collection="other"))["documents"]] == [
            "Other"
        ]

        message = await call_error(client, "list_documents", cursor="garbage")
        assert "invalid cursor" in message
        assert "next_cursor" in message


async def test_delete_document(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        keep = await call(client, "ingest_text", text="Walruses haul out on the ice floes.", source_uri="n://keep")
        gone = await call(
            client, "ingest_text", text="Narwhals have a long spiral tusk.", source_uri="n://gone", collection="arctic"
        )
        doc_id = gone["documents"][0]["document_id"]
        assert (await call(client, "search", query="narwhal tusk", mode="lexical"))["results"]

        deleted = await call(client, "delete_document", document_id=doc_id)
        assert deleted == {"deleted": doc_id, "source_uri": "n://gone", "collection": "arctic"}
        assert (await call(client, "search", query="narwhal tusk", mode="lexical"))["results"] == []
        assert "no document with id" in await call_error(client, "get_document", document_id=doc_id)
        assert "no document with id" in await call_error(client, "delete_document", document_id=doc_id)
        assert "UUID" in await call_error(client, "delete_document", document_id="42")
        remaining = await call(client, "list_documents")
        assert [d["document_id"] for d in remaining["documents"]] == [keep["documents"][0]["document_id"]]
        stats = await call(client, "stats")
        assert stats["documents"] == 1
        assert stats["index_points"] == stats["chunks"]


async def test_collections_and_stats(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        empty = await call(client, "stats")
        assert {k: empty[k] for k in ("collections", "documents", "chunks", "index_points", "pending_changes")} == {
            "collections": 0,
            "documents": 0,
            "chunks": 0,
            "index_points": 0,
            "pending_changes": 0,
        }
        assert empty["region"] == "local"
        assert (await call(client, "list_collections"))["collections"] == []

        await call(client, "ingest_text", text="Apples are pomes.", source_uri="f://apple", collection="fruit")
        await call(client, "ingest_text", text="Pears are pomes too.", source_uri="f://pear", collection="fruit")
        await call(client, "ingest_text", text="Carrots are roots.", source_uri="v://carrot", collection="veg")
        await call(client, "ingest_text", text="A default note.", source_uri="d://note")

        listed = {c["name"]: c for c in (await call(client, "list_collections"))["collections"]}
        assert sorted(listed) == ["default", "fruit", "veg"]
        assert (listed["fruit"]["documents"], listed["fruit"]["chunks"]) == (2, 2)
        assert listed["veg"]["documents"] == 1

        stats = await call(client, "stats")
        assert (stats["collections"], stats["documents"], stats["chunks"], stats["index_points"]) == (3, 4, 4, 4)
        assert stats["pending_changes"] == 0

        deleted = await call(client, "delete_collection", collection="fruit")
        assert deleted == {"deleted": "fruit", "documents": 2}
        assert (await call(client, "search", query="pomes", mode="lexical"))["results"] == []
        assert sorted(c["name"] for c in (await call(client, "list_collections"))["collections"]) == ["default", "veg"]
        stats = await call(client, "stats")
        assert (stats["collections"], stats["documents"], stats["index_points"]) == (2, 2, 2)

        message = await call_error(client, "delete_collection", collection="fruit")
        assert "no collection named 'fruit'" in message
        assert "list_collections" in message
        assert "invalid collection name" in await call_error(client, "delete_collection", collection="no/slash")


# --- resources and prompt --------------------------------------------------------------------


async def test_resources(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        out = await call(
            client,
            "ingest_text",
            text="Glaciers carve valleys over millennia.",
            title="Ice",
            source_uri="n://glacier",
            collection="geo",
        )
        doc_id = out["documents"][0]["document_id"]

        resources = await client.list_resources()
        assert [r.uri for r in resources.resources] == ["rag://collections"]
        templates = await client.list_resource_templates()
        assert [t.uri_template for t in templates.resource_templates] == ["rag://documents/{document_id}"]

        listed = await client.read_resource("rag://collections")
        content = listed.contents[0]
        assert isinstance(content, TextResourceContents)
        assert content.mime_type == "application/json"
        collections = json.loads(content.text)["collections"]
        assert [(c["name"], c["documents"]) for c in collections] == [("geo", 1)]

        document = await client.read_resource(f"rag://documents/{doc_id}")
        content = document.contents[0]
        assert isinstance(content, TextResourceContents)
        body = json.loads(content.text)
        assert (body["document_id"], body["title"], body["text"]) == (
            doc_id,
            "Ice",
            "Glaciers carve valleys over millennia.",
        )

        missing = str(uuid.uuid4())
        with pytest.raises(MCPError, match=f"no document with id '{missing}'"):
            await client.read_resource(f"rag://documents/{missing}")
        with pytest.raises(MCPError, match="UUID"):
            await client.read_resource("rag://documents/garbage")


async def test_prompt_answer_with_citations(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        prompts = await client.list_prompts()
        [prompt] = prompts.prompts
        assert prompt.name == "answer_with_citations"
        assert [(a.name, a.required) for a in prompt.arguments or []] == [("question", True), ("collection", False)]

        plain = await client.get_prompt("answer_with_citations", {"question": "How do glaciers form?"})
        text = plain.messages[0].content
        assert isinstance(text, TextContent)
        assert text.text.endswith("Question: How do glaciers form?")
        assert "`search`" in text.text
        assert "[title](source_uri)" in text.text
        assert "collection" not in text.text

        scoped = await client.get_prompt("answer_with_citations", {"question": "Why?", "collection": "geo"})
        text = scoped.messages[0].content
        assert isinstance(text, TextContent)
        assert "in the collection 'geo'" in text.text
        assert "collection='geo'" in text.text


# --- registration -------------------------------------------------------------------------


async def test_tool_annotations(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == READ_TOOLS | WRITE_TOOLS
        for name in READ_TOOLS:
            annotations = tools[name].annotations
            assert annotations is not None
            assert annotations.read_only_hint is True, name
            assert annotations.destructive_hint is False, name
        for name in WRITE_TOOLS:
            annotations = tools[name].annotations
            assert annotations is not None
            assert annotations.read_only_hint is False, name
            assert annotations.destructive_hint is True, name  # ingesting replaces what had the same source
        ingest_url = tools["ingest_url"].annotations
        assert ingest_url is not None
        assert ingest_url.open_world_hint is True
        for tool in tools.values():
            assert tool.description, tool.name
            assert tool.output_schema is not None, tool.name
        search = tools["search"].input_schema
        assert search["required"] == ["query"]
        assert {
            "query",
            "collection",
            "mode",
            "top_k",
            "document_ids",
            "source_prefix",
            "metadata",
            "passages_per_document",
            "raw_chunks",
        } == set(search["properties"])
        assert "ctx" not in search["properties"]


async def test_read_only_server_has_no_write_tools(runtime: Runtime) -> None:
    async with connect(runtime, read_only=True) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == READ_TOOLS
        result = await client.call_tool("ingest_text", {"text": "should not be stored"})
        assert result.is_error
        assert "ingest_text" in text_of(result)
        assert (await call(client, "stats"))["documents"] == 0
        # Reads still work, resources too.
        assert (await call(client, "search", query="anything"))["results"] == []
        assert (await client.read_resource("rag://collections")).contents


async def test_server_identity_and_instructions(runtime: Runtime) -> None:
    async with connect(runtime) as client:
        assert client.server_info is not None
        assert client.server_info.name == "mcp-rag"
        assert client.instructions is not None
        assert "`search`" in client.instructions
