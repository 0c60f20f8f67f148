"""Hostile input: every tool's arguments from hypothesis, files that lie about what they are,
parser bombs, paths and URLs that try to escape, oversized and malformed requests.

The property for every tool call (in-memory MCP client against a real runtime: real Postgres,
real embeddings, the edge index):

* it returns a result, or a tool error whose text names the tool *and* a reason — never the
  bare ``Error executing tool X`` the SDK shows for an unexpected exception, and never a
  traceback (the crash counter in the metrics stays put as well);
* when it errors, nothing was written (documents and change log unchanged);
* the server still answers a normal search afterwards.

URL fetching never connects anywhere but 127.0.0.1 here: an audit hook records every socket
connection and DNS lookup the process makes while the URL tests run.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pydantic_core
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_rag import metrics
from mcp_rag.embedding import Embedder
from mcp_rag.errors import AccessDeniedError, InvalidInputError, RagError
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.server import build_server
from mcp_rag.settings import Settings
from mcp_rag.urlfetch import UrlPolicy, fetch
from tests.reliability_support import MCP_RAG, ServerProc, base_env, http_client, tool_text

# Hypothesis warns when it builds the repr of a huge example (the 2-million-character strings);
# that is a remark about the example, not a failure of the server.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")

EXAMPLES = int(os.environ.get("MCP_RAG_TEST_HYPOTHESIS_EXAMPLES", "50"))
"""Hypothesis examples per tool: small by default (the whole file takes about a minute); raise
MCP_RAG_TEST_HYPOTHESIS_EXAMPLES for a deeper run."""

PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)

BASELINE = (
    "Lichens are symbiotic partnerships between a fungus and an alga or cyanobacterium; "
    "they colonise bare rock and slowly weather it into soil."
)
BASELINE_COLLECTION = "baseline-Kx7q"
MAX_DOC_BYTES = 20_000


# --- a runtime with an allowed root full of traps --------------------------------------------


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Parser bombs, made once: a second allowed root, out of reach of the generated paths."""
    bombs = tmp_path_factory.mktemp("bombs")
    (bombs / "bomb.pdf").write_bytes(pdf_form_bomb(invocations=50_000))
    (bombs / "flate-bomb.pdf").write_bytes(pdf_document(deflate_zeros(100 << 20)))
    (bombs / "deep.pdf").write_bytes(pdf_document(zlib.compress(b"[" * 300_000 + b"]" * 300_000)))
    (bombs / "attrs.html").write_text(  # 1500 attributes on one tag fit in the 20 KB limit
        "<html><body><p " + " ".join(f"a{i}=x" for i in range(1500)) + ">hello</p></body></html>"
    )
    (bombs / "deep.html").write_text(
        "<html><body>" + "<div>" * 100_000 + "deep" + "</div>" * 100_000 + "</body></html>"
    )
    return bombs


@pytest.fixture
def traps(tmp_path: Path, bombs: Path) -> dict[str, Path]:
    """An allowed root with honest and lying files, and things outside it to escape to."""
    root = tmp_path / "allowed"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP-SECRET-OUTSIDE-THE-ROOT do not ingest")
    (root / "ok.md").write_text("# Fine\n\nA perfectly ordinary markdown file about tide pools and anemones.\n")
    (root / "fake.pdf").write_text("This is plain text pretending to be a PDF.\n")
    (root / "binary.html").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    (root / "nul.txt").write_bytes(b"text with a NUL \x00 inside")
    (root / "empty.txt").write_bytes(b"")
    (root / "malformed.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 9 0 R >>\ntrailer <<>>\n%%EOF")
    (root / "truncated.pdf").write_bytes(pdf_document(b"BT /F1 12 Tf 72 712 Td (cut short) Tj ET")[:200])
    # File names that are not UTF-8 (the str paths carry lone surrogates).
    (root / os.fsdecode(b"name-\xff-ok.txt")).write_text("A readable file whose name is not valid UTF-8.")
    (root / os.fsdecode(b"name-\xfe-bad.txt")).write_bytes(b"\xff\xfe not text")
    with open(root / "sparse-huge.txt", "wb") as handle:  # 8 GiB on paper, nothing on disk
        handle.truncate(8 << 30)
    os.mkfifo(root / "pipe.txt")  # reading it would block forever
    (root / "escape-link.txt").symlink_to(outside / "secret.txt")
    (root / "escape-dir").symlink_to(outside, target_is_directory=True)
    (root / "etc-link.txt").symlink_to("/etc/passwd")
    (root / "loop").symlink_to(root / "loop")
    nested = root / "nested"
    nested.mkdir()
    (nested / "cycle").symlink_to(root, target_is_directory=True)
    (nested / "inner.txt").write_text("An inner text file about barnacles and limpets on the shore.")
    return {"root": root, "bombs": bombs, "outside": outside}


@pytest.fixture
async def hostile_runtime(
    make_settings: Callable[..., Settings], embedder: Embedder, tmp_path: Path, traps: dict[str, Path]
) -> AsyncIterator[Runtime]:
    settings = make_settings(
        max_document_bytes=MAX_DOC_BYTES,
        allowed_roots=[traps["root"], traps["bombs"]],
        url_fetch_timeout=5.0,
        url_max_bytes=MAX_DOC_BYTES,
    )
    async with open_runtime(settings, index=EdgeIndex(tmp_path / "index"), embedder=embedder) as runtime:
        yield runtime


# --- the property ------------------------------------------------------------------------


async def written(runtime: Runtime) -> tuple[int, int]:
    stats = await runtime.store.stats(None)
    return stats.documents, stats.last_change_seq


def crashes(tool: str) -> float:
    value = metrics.REGISTRY.get_sample_value("mcp_rag_tool_calls_total", {"tool": tool, "outcome": "crash"})
    return value or 0.0


def assert_readable_error(tool: str, text: str, args: Any) -> None:
    prefix = f"Error executing tool {tool}: "
    assert text.startswith(prefix), f"an error without a reason (an unexpected exception?): {text[:300]!r}"
    reason = text[len(prefix) :]
    assert reason.strip() and "Traceback" not in reason, text[:500]
    # Our own messages quote at most a bounded part of an argument. The SDK's argument
    # validation (pydantic) repeats offending dict keys in full, once per alternative of the
    # value's type: a few times the size of the arguments (which the request size limit bounds).
    bound = 50_000 if "validation error" not in reason else 50_000 + 10 * len(pydantic_core.to_json(args))
    assert len(text) < bound, f"the error echoes too much: {text[:300]!r}"


def sendable(args: Any) -> bool:
    """Whether an MCP client can put ``args`` on the wire at all (JSON nesting depth limit)."""
    try:
        pydantic_core.to_json(args)
        return True
    except (pydantic_core.PydanticSerializationError, ValueError):
        return False


async def call_and_check(client: Client, runtime: Runtime, tool: str, args: dict[str, Any]) -> Any:
    before, crashed = await written(runtime), crashes(tool)
    with anyio.fail_after(120):
        result = await client.call_tool(tool, args)
    assert crashes(tool) == crashed, f"{tool} crashed on {short(args)}: {tool_text(result)[:300]}"
    if result.is_error:
        assert_readable_error(tool, tool_text(result), args)
        assert await written(runtime) == before, f"{tool} failed but wrote something: {short(args)}"
    return result


def short(value: Any) -> str:
    return repr(value)[:400]


async def run_property(client: Client, runtime: Runtime, tool: str, strategy: st.SearchStrategy[Any]) -> int:
    """Run hypothesis in a worker thread, each example calling back into this event loop."""
    examples = 0

    @PROPERTY_SETTINGS
    @given(strategy)
    def prop(args: dict[str, Any]) -> None:
        nonlocal examples
        assume(sendable(args))
        examples += 1
        anyio.from_thread.run(call_and_check, client, runtime, tool, args)

    await anyio.to_thread.run_sync(prop)
    return examples


async def assert_still_serves(client: Client) -> None:
    result = await client.call_tool(
        "search", {"query": "fungus and alga weather rock", "top_k": 3, "collection": BASELINE_COLLECTION}
    )
    assert not result.is_error, tool_text(result)
    assert any("Lichens" in r["text"] for r in result.structured_content["results"])


async def ingest_baseline(client: Client) -> str:
    result = await client.call_tool(
        "ingest_text",
        {"text": BASELINE, "collection": BASELINE_COLLECTION, "title": "Lichens", "metadata": {"kind": "baseline"}},
    )
    assert not result.is_error, tool_text(result)
    return str(result.structured_content["documents"][0]["document_id"])


# --- strategies ----------------------------------------------------------------------------

# Every character but lone surrogates: no MCP client can send those (the SDK client fails to
# serialise them, and JSON parsers on the wire reject them); they are tried against the service
# API directly below, which an in-process caller (or the CLI, whose argv may carry them) reaches.
ANY_CHAR = st.characters(codec=None, exclude_categories=["Cs"])
WITH_SURROGATES = st.characters(codec=None, categories=None)
SPECIAL = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\u202e\u2066evil",
    "\ufeff",
    "😀" * 3,
    "ｆｕｌｌ",
    "'; DROP TABLE documents; --",
    "%",
    "_",
    "\\",
    "%_\\%",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/proc/self/environ",
    "~",
    "\n\r\t",
    "null",
    "true",
    "0",
    "-1",
    "NaN",
    "1e309",
    "{}",
    "[]",
    "default",
    "Default",
    ".hidden",
    "-dash",
    "a" * 64,
    "a" * 65,
    "${jndi:ldap://x}",
    "<script>alert(1)</script>",
]
HOSTILE_STR = st.one_of(
    st.text(ANY_CHAR, max_size=80),
    st.sampled_from(SPECIAL),
    st.builds(
        lambda piece, n: piece * n,
        st.sampled_from(["\x00", "a", "é", "😀", "%", " ", "../", "\u202e"]),
        st.sampled_from([1, 63, 64, 65, 999, 1000, 1001, 4000, 4001, 4096, 4097, 100_000, 2_000_000]),
    ),
)
HOSTILE_INT = st.one_of(
    st.integers(), st.sampled_from([0, -1, 1, 50, 51, 100, 101, 2**31, 2**63, -(2**63) - 1, 10**100])
)
HOSTILE_NUMBER = st.one_of(HOSTILE_INT, st.floats(allow_nan=True, allow_infinity=True))
SCALAR = st.one_of(st.none(), st.booleans(), HOSTILE_NUMBER, HOSTILE_STR)
ANY_JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(HOSTILE_STR, inner, max_size=4)),
    max_leaves=12,
)


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"k": value}
    return value


METADATA = st.one_of(
    st.dictionaries(
        st.one_of(HOSTILE_STR, st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)),
        st.one_of(SCALAR, st.lists(SCALAR, max_size=120), ANY_JSON),
        max_size=70,
    ),
    st.integers(1, 400).map(nested),
    st.just({f"k{i}": i for i in range(65)}),
    st.just({"big": "x" * 1025}),
    st.just({"many": list(range(101))}),
    st.just({"nested": {"a": 1}}),
    st.just({"ok": []}),
    ANY_JSON,
)
UUIDS = st.uuids().map(str)
IDS = st.one_of(UUIDS, HOSTILE_STR)
CURSORS = st.one_of(
    HOSTILE_STR,
    st.builds(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode(), ANY_JSON),
    st.builds(lambda s, d: base64.urlsafe_b64encode(json.dumps([s, d]).encode()).decode(), HOSTILE_STR, UUIDS),
)


def arguments(**params: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of the tool's parameters, each either a hostile value of roughly the right
    kind or any JSON value at all, sometimes with unknown extra keys."""
    fields = {name: st.one_of(strategy, ANY_JSON) for name, strategy in params.items()}
    extra = st.dictionaries(HOSTILE_STR.filter(lambda k: k not in params), ANY_JSON, max_size=2)
    return st.builds(
        lambda known, more: {**more, **known}, st.fixed_dictionaries({}, optional=fields), st.one_of(st.just({}), extra)
    )


def non_public_ip() -> st.SearchStrategy[str]:
    def refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return not (address.is_global and not address.is_multicast)

    return st.ip_addresses().filter(refused).map(lambda a: f"[{a}]" if a.version == 6 else str(a))


URLS = st.one_of(
    HOSTILE_STR.filter(lambda s: "://" not in s),
    st.sampled_from(
        [
            "http://127.0.0.1/",
            "http://localhost/",
            "http://LOCALHOST./admin",
            "http://[::1]/",
            "http://0.0.0.0/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:a00:1]/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/",
            "http://[fd00:ec2::254]/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://127.1/",
            "http://017700000001/",
            "file:///etc/passwd",
            "gopher://127.0.0.1:6379/_INFO",
            "ftp://10.0.0.1/",
            "javascript:alert(1)",
            "http://user:pass@10.0.0.1/",
            "http:///nohost",
            "http://[::1",
            "http://a b/",
            "https://[zz::]/",
            "http://127.0.0.1:99999/",
            "http://127.0.0.1:-1/",
            "data:text/plain,hello",
        ]
    ),
    st.builds(lambda ip, path: f"http://{ip}/{path}", non_public_ip(), st.text(ANY_CHAR, max_size=20)),
)


def paths(root: Path, outside: Path) -> st.SearchStrategy[str]:
    return st.one_of(
        HOSTILE_STR,
        st.sampled_from(
            [
                str(root),
                str(root / "ok.md"),
                "ok.md",
                "nested",
                str(root / "fake.pdf"),
                str(root / "binary.html"),
                str(root / "escape-link.txt"),
                str(root / "escape-dir" / "secret.txt"),
                str(root / "etc-link.txt"),
                str(root / "loop"),
                str(root / "pipe.txt"),
                str(root / "sparse-huge.txt"),
                str(root / ".." / "outside"),
                str(outside / "secret.txt"),
                f"{root}/../outside/secret.txt",
                "../outside/secret.txt",
                "/",
                "/etc/shadow",
                "/proc/self/environ",
                "/dev/zero",
                str(root / "nested" / "cycle" / "ok.md"),
                str(root) + "\x00/ok.md",
            ]
        ),
    )


GLOBS = st.lists(
    st.one_of(HOSTILE_STR, st.sampled_from(["*", "**", "*.md", "[", "[!a-", "?" * 256, "*" * 256])), max_size=60
)


def tool_strategies(traps: dict[str, Path]) -> dict[str, st.SearchStrategy[dict[str, Any]]]:
    root, outside = traps["root"], traps["outside"]
    return {
        "search": arguments(
            query=HOSTILE_STR,
            collection=HOSTILE_STR,
            mode=HOSTILE_STR,
            top_k=HOSTILE_INT,
            document_ids=st.one_of(st.lists(IDS, max_size=30), st.lists(UUIDS, min_size=1001, max_size=1001)),
            source_prefix=HOSTILE_STR,
            metadata=METADATA,
        ),
        "get_document": arguments(document_id=IDS, include_text=ANY_JSON, max_chars=HOSTILE_INT),
        "fetch": arguments(id=IDS),
        "get_chunks": arguments(document_id=IDS, around=HOSTILE_INT, before=HOSTILE_INT, after=HOSTILE_INT),
        "ingest_status": arguments(job_id=IDS),
        "list_documents": arguments(
            collection=HOSTILE_STR, source_prefix=HOSTILE_STR, limit=HOSTILE_INT, cursor=CURSORS
        ),
        "list_collections": arguments(),
        "stats": arguments(),
        "ingest_text": arguments(
            text=HOSTILE_STR, title=HOSTILE_STR, collection=HOSTILE_STR, source_uri=HOSTILE_STR, metadata=METADATA
        ),
        "ingest_file": arguments(
            path=paths(root, outside), collection=HOSTILE_STR, include=GLOBS, exclude=GLOBS, prune=ANY_JSON
        ),
        "ingest_url": arguments(url=URLS, collection=HOSTILE_STR, title=HOSTILE_STR, metadata=METADATA),
        "delete_document": arguments(document_id=IDS),
        "delete_collection": arguments(collection=HOSTILE_STR),
    }


# --- network watch: what did this process try to connect to or resolve? ------------------------

_WATCH: dict[str, list[Any]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _WATCH is None:
        return
    if event == "socket.connect":
        _WATCH["connect"].append(args[1])
    elif event == "socket.getaddrinfo":
        _WATCH["resolve"].append(args[0])


sys.addaudithook(_audit)


class NetworkWatch:
    def __enter__(self) -> NetworkWatch:
        global _WATCH
        _WATCH = {"connect": [], "resolve": []}
        self.seen = _WATCH
        return self

    def __exit__(self, *exc: object) -> None:
        global _WATCH
        _WATCH = None

    def connected_hosts(self) -> set[str]:
        return {str(address[0]) for address in self.seen["connect"] if isinstance(address, tuple)}


# --- 1. every tool, hypothesis-driven ------------------------------------------------------------


EXAMPLES_RUN: dict[str, int] = {}
TOOLS = [
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
]


@pytest.mark.slow  # hypothesis over every tool
@pytest.mark.parametrize("tool", TOOLS)
async def test_tool_survives_hostile_arguments(tool: str, hostile_runtime: Runtime, traps: dict[str, Path]) -> None:
    async with Client(build_server(lambda: hostile_runtime)) as client:
        await ingest_baseline(client)
        with NetworkWatch() as watch:
            count = await run_property(client, hostile_runtime, tool, tool_strategies(traps)[tool])
        assert count >= min(EXAMPLES, 10)
        EXAMPLES_RUN[tool] = count
        # Never a connection: URL fetching refuses every generated address before connecting.
        assert watch.connected_hosts() == set(), watch.seen["connect"]
        await assert_still_serves(client)


async def test_resources_and_prompt_survive_hostile_arguments(hostile_runtime: Runtime) -> None:
    async with Client(build_server(lambda: hostile_runtime)) as client:
        await ingest_baseline(client)
        before = await written(hostile_runtime)

        async def read(document_id: str) -> None:
            uri = f"rag://documents/{document_id}"
            try:
                with anyio.fail_after(60):
                    await client.read_resource(uri)
            except MCPError as exc:
                message = str(exc)
                assert message and not message.startswith("Error reading resource"), message[:300]

        async def prompt(args: dict[str, Any]) -> None:
            try:
                with anyio.fail_after(60):
                    result = await client.get_prompt("answer_with_citations", args)
                assert result.messages
            except MCPError as exc:
                assert str(exc).strip(), "an empty error"

        @PROPERTY_SETTINGS
        @given(st.one_of(IDS, st.sampled_from(["", "/", "..%2F..", "a/b", "%00", "\x00"])))
        def resource_prop(document_id: str) -> None:
            anyio.from_thread.run(read, document_id)

        @PROPERTY_SETTINGS
        @given(
            st.dictionaries(
                st.one_of(st.sampled_from(["question", "collection"]), HOSTILE_STR), HOSTILE_STR, max_size=4
            )
        )
        def prompt_prop(args: dict[str, str]) -> None:  # prompt arguments are strings by the protocol
            anyio.from_thread.run(prompt, args)

        await anyio.to_thread.run_sync(resource_prop)
        await anyio.to_thread.run_sync(prompt_prop)
        assert await written(hostile_runtime) == before
        await assert_still_serves(client)


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


KNOWN_HOSTILE = [
    # Regressions: each of these crashed a tool ("Error executing tool X") before it was fixed.
    ("list_documents", {"source_prefix": "\x00"}),
    ("list_documents", {"source_prefix": "file:///a\x00b"}),
    ("list_documents", {"cursor": _cursor(["a\x00b", "3f2b6a1e-0000-4000-8000-000000000000"])}),
    ("list_documents", {"cursor": _cursor(["\\ud800", "3f2b6a1e-0000-4000-8000-000000000000"])}),
    ("list_documents", {"cursor": _cursor([{"x": 1}, "3f2b6a1e-0000-4000-8000-000000000000"])}),
    ("list_documents", {"cursor": _cursor(["a", "b", "c"])}),
    ("list_documents", {"cursor": "%%%"}),
    ("search", {"query": "lichens", "source_prefix": "\x00"}),
    ("search", {"query": "lichens", "document_ids": ["\x00", "' OR 1=1 --"]}),
    ("search", {"query": "\x00" * 10}),
    ("search", {"query": "lichens", "metadata": {"kind": ["\x00"]}}),
    ("search", {"query": "lichens", "metadata": {"kind": []}}),
    ("search", {"query": "lichens", "metadata": {"k" * 65: 1}}),
    ("search", {"query": "lichens", "metadata": {"big": 2**64}}),
    ("search", {"query": "lichens", "top_k": 10**100}),
    ("get_document", {"document_id": "3f2b6a1e-0000-4000-8000-000000000000", "max_chars": -5}),
    ("ingest_text", {"text": "ok", "metadata": {"n": float("nan")}}),
    ("ingest_text", {"text": "ok", "metadata": {"n": [[1]]}}),
    ("ingest_text", {"text": "x" * (MAX_DOC_BYTES + 1)}),
    ("ingest_text", {"text": "   \n\t  "}),
    ("delete_collection", {"collection": "does-not-exist"}),
    ("delete_document", {"document_id": "00000000-0000-0000-0000-000000000000"}),
]


async def test_known_hostile_arguments(hostile_runtime: Runtime) -> None:
    async with Client(build_server(lambda: hostile_runtime)) as client:
        await ingest_baseline(client)
        for tool, args in KNOWN_HOSTILE:
            await call_and_check(client, hostile_runtime, tool, args)
        await assert_still_serves(client)


async def test_service_api_refuses_text_it_cannot_encode(hostile_runtime: Runtime) -> None:
    """In-process callers (and the CLI, whose argv may decode to lone surrogates) reach the
    service directly: invalid Unicode and NUL must give a RagError, never another exception."""
    from mcp_rag.service import SearchFilters

    service = hostile_runtime.service
    operations: list[Callable[[str], Any]] = [
        lambda s: service.search("default", s or "x"),
        lambda s: service.search("default", "lichens", filters=SearchFilters(source_prefix=s)),
        lambda s: service.search("default", "lichens", filters=SearchFilters(document_ids=[s])),
        lambda s: service.search("default", "lichens", filters=SearchFilters(metadata={"kind": s})),
        lambda s: service.list_documents("default", source_prefix=s),
        lambda s: service.get_document("default", s),
        lambda s: service.ingest_text("default", s),
        lambda s: service.ingest_text("default", "valid text", title=s),
        lambda s: service.ingest_text("default", "valid text", source_uri=s or "x"),
        lambda s: service.ingest_text("default", "valid text", metadata={"k": s}),
        lambda s: service.delete_document("default", s),
        lambda s: service.delete_collection("default", s or "x"),
    ]

    def encodable(text: str) -> bool:
        try:
            text.encode("utf-8")
            return "\x00" not in text
        except UnicodeEncodeError:
            return False

    async def check(text: str) -> None:
        # Valid text is the MCP properties' business; here only the writes that must be refused.
        for operation in operations if not encodable(text) else operations[:6]:
            before = await written(hostile_runtime)
            try:
                with anyio.fail_after(60):
                    await operation(text)
            except RagError as exc:
                assert str(exc).strip()
                assert await written(hostile_runtime) == before

    @PROPERTY_SETTINGS
    @given(
        st.one_of(
            st.text(WITH_SURROGATES, max_size=30),
            st.sampled_from(["\ud800", "a\udfffb", "\udcff", "\x00", "ok\x00", "\ud83d\ude00"]),
        )
    )
    def prop(text: str) -> None:
        anyio.from_thread.run(check, text)

    await anyio.to_thread.run_sync(prop)


# --- 2. files that lie, bombs, and escapes ------------------------------------------------------


@pytest.mark.slow  # parses every bomb to its limit
async def test_files_that_lie_and_parser_bombs_fail_cleanly(hostile_runtime: Runtime, traps: dict[str, Path]) -> None:
    import resource

    root, bombs = traps["root"], traps["bombs"]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with Client(build_server(lambda: hostile_runtime)) as client:
        await ingest_baseline(client)
        expectations = {
            "fake.pdf": "not a PDF file",
            "binary.html": "not valid UTF-8",
            "latin1.txt": "not valid UTF-8",
            "nul.txt": "NUL",
            "empty.txt": "no text",
            "malformed.pdf": "malformed or unreadable PDF",
            "truncated.pdf": "PDF",
            "bomb.pdf": "content operations",
            "flate-bomb.pdf": "exceeds the limit",  # 100 KB file: the size limit stops it before parsing
            "attrs.html": "attributes",
            "sparse-huge.txt": "exceeds the limit",
        }
        for name, needle in expectations.items():
            where = bombs if (bombs / name).exists() else root
            result = await call_and_check(client, hostile_runtime, "ingest_file", {"path": str(where / name)})
            assert result.is_error, f"{name} was ingested: {tool_text(result)[:300]}"
            assert needle in tool_text(result), f"{name}: {tool_text(result)[:300]}"
        # Deeply nested PDF arrays and HTML elements: a clean answer either way (they hold little text).
        for name in ("deep.pdf", "deep.html"):
            await call_and_check(client, hostile_runtime, "ingest_file", {"path": str(bombs / name)})
        # A FIFO is not a regular file: never opened (opening it would block forever).
        result = await call_and_check(client, hostile_runtime, "ingest_file", {"path": str(root / "pipe.txt")})
        assert result.is_error and "no ingestible files" in tool_text(result)

        # The whole directory: the honest files go in, every liar is listed with its reason,
        # nothing outside the root is read, symlink cycles end.
        result = await call_and_check(client, hostile_runtime, "ingest_file", {"path": str(root)})
        assert not result.is_error, tool_text(result)
        report = result.structured_content
        ingested = {d["source_uri"].rsplit("/", 1)[-1] for d in report["documents"]}
        assert {"ok.md", "inner.txt"} <= ingested
        failed = {f["source"].rsplit("/", 1)[-1] for f in report["failed"]}
        assert {"fake.pdf", "binary.html", "latin1.txt", "nul.txt", "sparse-huge.txt"} <= failed
        listed = await client.call_tool("list_documents", {"limit": 100})
        uris = [d["source_uri"] for d in listed.structured_content["documents"]]
        assert not any("secret" in u or "outside" in u or "passwd" in u for u in uris), uris
        found = await client.call_tool("search", {"query": "TOP-SECRET-OUTSIDE-THE-ROOT", "mode": "lexical"})
        assert all("TOP-SECRET" not in r["text"] for r in found.structured_content["results"])
        await assert_still_serves(client)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert growth_mib < 1024, f"peak memory grew by {growth_mib:.0f} MiB on bombs"


async def test_paths_escaping_the_allowed_root_are_refused(hostile_runtime: Runtime, traps: dict[str, Path]) -> None:
    root, outside = traps["root"], traps["outside"]
    async with Client(build_server(lambda: hostile_runtime)) as client:
        for path in [
            str(outside / "secret.txt"),
            f"{root}/../outside/secret.txt",
            "../outside/secret.txt",
            str(root / "escape-link.txt"),
            str(root / "escape-dir" / "secret.txt"),
            str(root / "escape-dir"),
            str(root / "etc-link.txt"),
            "/etc/passwd",
            "/proc/self/environ",
            "/",
        ]:
            result = await call_and_check(client, hostile_runtime, "ingest_file", {"path": path})
            assert result.is_error and "outside the allowed roots" in tool_text(result), (path, tool_text(result))
        for path in [str(root / "loop"), str(root / "missing.txt"), "\x00", str(root) + "\x00/ok.md"]:
            result = await call_and_check(client, hostile_runtime, "ingest_file", {"path": path})
            assert result.is_error, path
        # The same directory reached through a symlink cycle stays inside (and is read once per path).
        result = await call_and_check(
            client, hostile_runtime, "ingest_file", {"path": str(root / "nested" / "cycle" / "ok.md")}
        )
        assert not result.is_error, tool_text(result)


# --- 3. URLs: refused before any connection --------------------------------------------------------


class _Redirector(BaseHTTPRequestHandler):
    targets: dict[str, str] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        if self.path in self.targets:
            self.send_response(302)
            self.send_header("Location", self.targets[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"Plain text served on loopback for the allowlisted fetch test."
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def redirector() -> Iterator[tuple[str, type[_Redirector]]]:
    class Handler(_Redirector):
        targets: dict[str, str] = {}
        hits: list[str] = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    Handler.targets = {
        "/to-private": "http://10.0.0.1/",
        "/to-metadata": "http://169.254.169.254/latest/meta-data",
        "/to-metadata-v6": "http://[fd00:ec2::254]/latest/meta-data",
        "/to-v6-loopback": f"http://[::1]:{port}/page",
        "/to-mapped-private": "http://[::ffff:10.0.0.1]/",
        "/to-mapped-loopback": f"http://[::ffff:127.0.0.2]:{port}/page",
        "/to-link-local": "http://169.254.0.1/",
        "/to-zero": f"http://0.0.0.0:{port}/page",
        "/to-decimal": "http://167772161/",  # 10.0.0.1 as one number
        "/to-file": "file:///etc/passwd",
        "/to-gopher": "gopher://10.0.0.1:70/",
        "/loop": "/loop",
        "/relative": "/page",
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", Handler
    finally:
        server.shutdown()
        server.server_close()


FORBIDDEN = {
    "10.0.0.1",
    "169.254.169.254",
    "fd00:ec2::254",
    "::1",
    "::ffff:10.0.0.1",
    "169.254.0.1",
    "0.0.0.0",
    "127.0.0.2",
    "::ffff:127.0.0.2",
}


async def test_redirects_to_private_and_metadata_addresses_are_refused_without_connecting(
    redirector: tuple[str, type[_Redirector]],
) -> None:
    base, _ = redirector
    policy = UrlPolicy(["127.0.0.1"])  # only the test's own loopback server is allowed
    with NetworkWatch() as watch:
        fetched = await fetch(base + "/relative", policy, max_bytes=10_000, timeout=10)
        assert b"allowlisted fetch test" in fetched.data
        for path in [
            "/to-private",
            "/to-metadata",
            "/to-metadata-v6",
            "/to-v6-loopback",
            "/to-mapped-private",
            "/to-mapped-loopback",
            "/to-link-local",
            "/to-zero",
            "/to-decimal",
        ]:
            with pytest.raises(AccessDeniedError, match="non-public address"):
                await fetch(base + path, policy, max_bytes=10_000, timeout=10)
        for path in ["/to-file", "/to-gopher"]:
            with pytest.raises(InvalidInputError, match="only http and https"):
                await fetch(base + path, policy, max_bytes=10_000, timeout=10)
        with pytest.raises(InvalidInputError, match="redirects"):
            await fetch(base + "/loop", policy, max_bytes=10_000, timeout=10)
    connected = watch.connected_hosts()
    assert connected == {"127.0.0.1"}, connected
    assert not connected & FORBIDDEN


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/",
        "http://[fd00:ec2::254]/",
        "http://100.64.0.1/",
        "http://0x7f000001/",
        "http://2130706433/",
        "http://127.1/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        # IPv6 forms that embed an IPv4 address: NAT64, IPv4-compatible, 6to4, local-use NAT64.
        "http://[64:ff9b::7f00:1]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[::127.0.0.1]/",
        "http://[::8.8.8.8]/",
        "http://[2002:7f00:1::]/",
        "http://[2002:808:808::1]/",
        "http://[64:ff9b:1::a9fe:a9fe]/",
    ],
)
async def test_direct_non_public_urls_are_refused_without_connecting(url: str) -> None:
    with NetworkWatch() as watch, pytest.raises(AccessDeniedError, match="non-public address"):
        await fetch(url, UrlPolicy(), max_bytes=10_000, timeout=10)
    assert watch.seen["connect"] == []


async def test_nat64_of_a_public_address_is_allowed_and_connected_as_is() -> None:
    """A NAT64 address is judged by the IPv4 address it embeds; when that one is public the fetch
    connects to the IPv6 address itself (only the NAT64 gateway reaches the IPv4 one). Nothing is
    connected to here: ``check_host`` only resolves the literal."""
    with NetworkWatch() as watch:
        assert await UrlPolicy().check_host("64:ff9b::808:808", 80) == "64:ff9b::808:808"
        # An allowlisted loopback does not extend to its NAT64 spelling (a different host).
        with pytest.raises(AccessDeniedError, match=r"NAT64 address of 127\.0\.0\.1"):
            await UrlPolicy(["127.0.0.1"]).check_host("64:ff9b::7f00:1", 80)
    assert watch.seen["connect"] == []


async def test_dns_answer_that_changes_after_the_check_is_not_used(
    redirector: tuple[str, type[_Redirector]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the first answer (checked) is loopback-allowlisted, later answers point at
    10.0.0.1. The fetch must connect to the address it checked, not resolve again."""
    base, handler = redirector
    port = int(base.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"])

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("rebind.test", b"rebind.test"):
            address = next(answers, "10.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with NetworkWatch() as watch:
        fetched = await fetch(
            f"http://rebind.test:{port}/page", UrlPolicy(["127.0.0.0/8"]), max_bytes=10_000, timeout=10
        )
    assert b"allowlisted fetch test" in fetched.data
    assert "10.0.0.1" not in watch.connected_hosts()
    assert handler.hits == ["/page"]


async def test_ingest_url_tool_refuses_a_redirect_to_metadata(
    hostile_runtime: Runtime, redirector: tuple[str, type[_Redirector]]
) -> None:
    base, _ = redirector
    async with Client(build_server(lambda: hostile_runtime)) as client:
        with NetworkWatch() as watch:
            # 127.0.0.1 is not allowlisted in this runtime: refused at the first hop.
            result = await call_and_check(client, hostile_runtime, "ingest_url", {"url": base + "/to-metadata"})
        assert result.is_error and "non-public address" in tool_text(result)
        assert watch.seen["connect"] == []


# --- 4. oversized and malformed requests on the wire ------------------------------------------------


@pytest.fixture
def wire_server(database_url: str, model_dir: Path, tmp_path: Path) -> Iterator[ServerProc]:
    env = base_env(model_dir, tmp_path / "data", database_url, max_request_bytes="8192")
    server = ServerProc(env, tmp_path / "server.log")
    try:
        yield server.wait_healthy()
    finally:
        server.close()


MCP_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2025-06-18",
}


@pytest.mark.integration
async def test_http_rejects_oversized_and_malformed_bodies_with_4xx(wire_server: ServerProc) -> None:
    url = wire_server.url
    big = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"query":"'
        + b"a" * 20_000
        + b'"}}}'
    )

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit must count the bytes
        for _ in range(40):
            yield b"x" * 1000

    bodies: dict[str, Any] = {
        "not json": b"{not json",
        "empty": b"",
        "array": b"[]",
        "no method": b'{"jsonrpc":"2.0"}',
        "deep nesting": b"[" * 4000 + b"]" * 4000,
        "invalid utf-8": b'{"jsonrpc":"2.0","id":3,"x":"\xff\xfe"}',
        "lone surrogate": b'{"jsonrpc":"2.0","id":4,"method":"tools/list","x":"\\ud800"}',
        "params not an object": b'{"jsonrpc":"2.0","id":6,"method":"tools/call","params":"x"}',
        "batch": b'[{"jsonrpc":"2.0","id":7,"method":"tools/list"}]',
        "NUL bytes": b"\x00" * 100,
    }
    async with httpx.AsyncClient(timeout=60) as http:
        assert (await http.post(url, content=big, headers=MCP_HEADERS)).status_code == 413
        assert (await http.post(url, content=chunked(), headers=MCP_HEADERS)).status_code == 413
        sse_big = await http.post(wire_server.base + "/messages/?session_id=0", content=big, headers=MCP_HEADERS)
        assert sse_big.status_code == 413
        for name, body in bodies.items():
            response = await http.post(url, content=body, headers=MCP_HEADERS)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        wrong_type = await http.post(url, content=b"{}", headers={**MCP_HEADERS, "Content-Type": "text/plain"})
        assert 400 <= wrong_type.status_code < 500
    # And the server is fine: a normal session works.
    async with http_client(url) as client:
        result = await client.call_tool("list_collections", {})
        assert not result.is_error
    log = wire_server.stderr_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log


@pytest.mark.integration
def test_stdio_ignores_garbage_lines_and_keeps_serving(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    env = base_env(model_dir, tmp_path / "data", database_url)
    with open(tmp_path / "stdio.log", "wb") as log:
        proc = subprocess.Popen(
            [MCP_RAG, "serve"], env=env, cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
    lines: queue.Queue[bytes] = queue.Queue()
    assert proc.stdout is not None and proc.stdin is not None
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]

    def send(raw: bytes) -> None:
        proc.stdin.write(raw + b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def answer(request_id: int, timeout: float = 120) -> dict[str, Any]:
        while True:
            message = json.loads(lines.get(timeout=timeout))
            if message.get("id") == request_id:
                return dict(message)

    try:
        init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}).encode())
        assert "result" in answer(1)
        send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        garbage = [
            b"garbage",
            b"{",
            b"}",
            b"[]",
            b"null",
            b'{"jsonrpc":"2.0"}',
            b"\xff\xfe\x00\x01",
            b"[" * 5000,
            b'{"jsonrpc":"1.0","id":9,"method":"tools/list"}',
            b'{"jsonrpc":"2.0","id":"x","method":42}',
            b'{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"name":"search","arguments":"x"}}',
            b'{"jsonrpc":"2.0","id":11,"method":"tools/call","params":{"name":"nope","arguments":{}}}',
            b'{"jsonrpc":"2.0","id":12,"method":"no/such/method"}',
            b"\x00" * 1000,
            b"a" * 1_000_000,
        ]
        for raw in garbage:
            send(raw)
        # Requests with an id among the garbage get an error answer.
        assert "error" in answer(10) or answer(10).get("result", {}).get("isError")
        assert answer(12)["error"]["code"] == -32601
        send(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "tools/call",
                    "params": {"name": "list_collections", "arguments": {}},
                }
            ).encode()
        )
        reply = answer(2)
        assert reply["result"]["isError"] is False
        assert proc.poll() is None
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in (tmp_path / "stdio.log").read_text(errors="replace")


# --- PDF builders ---------------------------------------------------------------------------


def pdf_build(objects: list[bytes]) -> bytes:
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _stream(data: bytes, extra: bytes = b"", compressed: bool = True) -> bytes:
    head = b"<< /Length %d %s %s >>" % (len(data), b"/Filter /FlateDecode" if compressed else b"", extra)
    return head + b"\nstream\n" + data + b"\nendstream"


FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"


def pdf_document(content: bytes, compressed: bool = True) -> bytes:
    """One page whose content stream is ``content`` (already Flate-compressed when ``compressed``)."""
    return pdf_build(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
            b" /Resources << /Font << /F1 5 0 R >> >> >>",
            _stream(content, compressed=compressed),
            FONT,
        ]
    )


def deflate_zeros(size: int) -> bytes:
    """``size`` zero bytes, Flate-compressed a megabyte at a time (about 1 KB per MB)."""
    compressor = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(size >> 20)]
    return b"".join(parts) + compressor.flush()


def pdf_form_bomb(invocations: int) -> bytes:
    """A few KB: one form XObject of 100 KB of text operators, drawn ``invocations`` times."""
    form = b"BT /F1 12 Tf 72 712 Td (AAAA) Tj ET\n" * 3000
    page = b"/Fm Do\n" * invocations
    return pdf_build(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
            b" /Resources << /Font << /F1 5 0 R >> /XObject << /Fm 6 0 R >> >> >>",
            _stream(zlib.compress(page, 9)),
            FONT,
            _stream(
                zlib.compress(form, 9),
                b"/Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >>",
            ),
        ]
    )


@pytest.mark.slow  # extracts megabytes of text
def test_extraction_limits_are_about_work_not_size() -> None:
    """Unit-level, 10 MB size limit: bombs are stopped by work limits, ordinary PDFs still extract."""
    from mcp_rag.extract import extract_bytes

    ok = extract_bytes(
        pdf_document(zlib.compress(b"BT /F1 12 Tf 72 712 Td (Hello tide pools) Tj ET")),
        kind="pdf",
        source_uri="ok.pdf",
        max_bytes=MAX_DOC_BYTES,
    )
    assert "Hello tide pools" in ok.text
    bomb = pdf_form_bomb(invocations=50_000)
    assert len(bomb) < 20_000
    with pytest.raises(RagError, match="content operations"):
        extract_bytes(bomb, kind="pdf", source_uri="bomb.pdf", max_bytes=10 << 20)
    # 100 MiB of zeros in a 100 KB stream: pypdf's own decompression limit (75 MB) refuses it.
    flate = pdf_document(deflate_zeros(100 << 20))
    assert len(flate) < 200_000
    with pytest.raises(RagError, match="malformed or unreadable PDF"):
        extract_bytes(flate, kind="pdf", source_uri="flate.pdf", max_bytes=10 << 20)
    # One tag with 200k attributes (2 MB): libxml2 would take hours; refused after a linear scan.
    attrs = ("<html><body><p " + " ".join(f'a{i}="x"' for i in range(200_000)) + ">hi</p></body></html>").encode()
    with pytest.raises(RagError, match="attributes"):
        extract_bytes(attrs, kind="html", source_uri="attrs.html", max_bytes=10 << 20)
