"""One contract for every VectorIndex engine: the same tests run against each of them.

The vectors are synthetic (unit vectors on a few axes of a 384-d space, hand-made
sparse vectors), so every expected ranking is known exactly.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from qdrant_client import QdrantClient

from mcp_rag.index.base import (
    Cursor,
    CursorConflictError,
    FusionParams,
    Hit,
    IndexPoint,
    IndexQuery,
    IndexUnavailableError,
    MetadataValue,
    ModelIdentity,
    ModelMismatchError,
    PointPayload,
    SearchFilter,
    SparseVector,
    VectorIndex,
)
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.index.qdrant_server import QdrantServerIndex

DIM = 384
MODEL = ModelIdentity("test/minilm", DIM)
REPO = Path(__file__).resolve().parents[1]

Meta = Mapping[str, MetadataValue | Sequence[MetadataValue]]


def vec(**axes: float) -> list[float]:
    """A unit vector with the given weights on axes ``a0``, ``a1``, ..."""
    v = [0.0] * DIM
    for name, weight in axes.items():
        v[int(name[1:])] = weight
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def sparse(terms: Mapping[int, float]) -> SparseVector:
    return SparseVector(indices=list(terms), values=list(terms.values()))


COMMON = sparse({7: 1.0})  # every point of the filter corpus has this term


def pt(
    id: int,
    dense: list[float] | None = None,
    terms: SparseVector = COMMON,
    *,
    tenant: str = "a",
    collection: str = "c1",
    document_id: str = "d1",
    source_uri: str = "file:///docs/x.md",
    metadata: Meta | None = None,
) -> IndexPoint:
    payload = PointPayload(tenant, collection, document_id, source_uri, dict(metadata or {}))
    return IndexPoint(id=id, dense=dense or vec(a0=1.0), sparse=terms, payload=payload)


def ids(hits: list[Hit]) -> list[int]:
    return [h.id for h in hits]


@dataclass
class Backend:
    name: str
    make: Callable[[], VectorIndex]


@pytest.fixture(params=["qdrant-server", "qdrant-edge"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "qdrant-server":
        client = QdrantClient(":memory:")
        return Backend(request.param, lambda: QdrantServerIndex(client))
    return Backend(request.param, lambda: EdgeIndex(tmp_path))


@pytest.fixture
async def index(backend: Backend) -> AsyncIterator[VectorIndex]:
    idx = backend.make()
    await idx.open(MODEL)
    yield idx
    await idx.close()


async def reopen(index: VectorIndex, backend: Backend, model: ModelIdentity = MODEL) -> VectorIndex:
    """Close ``index`` and open a new instance over the same storage."""
    await index.close()
    again = backend.make()
    await again.open(model)
    return again


# -- basics ---------------------------------------------------------------------------


async def test_upsert_and_count(index: VectorIndex) -> None:
    await index.upsert([pt(1), pt(2), pt(3, tenant="b")])
    assert await index.count() == 3
    assert await index.count(SearchFilter("a")) == 2
    assert await index.count(SearchFilter("b")) == 1
    assert await index.point_ids() == {1, 2, 3}
    assert await index.point_ids(SearchFilter("a")) == {1, 2}


async def test_empty_index(index: VectorIndex) -> None:
    assert await index.count() == 0
    assert await index.point_ids() == set()
    assert await index.query(IndexQuery(SearchFilter("a"), limit=5, dense=vec(a0=1.0))) == []
    await index.ping()


async def test_point_ids_pages_through_many_points(index: VectorIndex) -> None:
    await index.upsert([pt(i, vec(a0=1.0, a1=i / 2500)) for i in range(1, 2501)])
    assert await index.point_ids() == set(range(1, 2501))
    assert await index.count(SearchFilter("a")) == 2500


async def test_upsert_of_existing_id_replaces_it(index: VectorIndex) -> None:
    await index.upsert([pt(1, vec(a0=1.0), collection="old"), pt(2, vec(a1=1.0), collection="old")])
    await index.upsert([pt(1, vec(a5=1.0), collection="new")])
    assert await index.count() == 2
    assert await index.point_ids(SearchFilter("a", collections=["old"])) == {2}
    assert await index.point_ids(SearchFilter("a", collections=["new"])) == {1}
    hits = await index.query(IndexQuery(SearchFilter("a"), limit=2, dense=vec(a5=1.0)))
    assert hits[0].id == 1
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)


# -- ranking --------------------------------------------------------------------------


async def test_dense_query_returns_nearest_first(index: VectorIndex) -> None:
    await index.upsert(
        [
            pt(1, vec(a0=1.0, a1=1.0)),  # cos 0.707
            pt(2, vec(a0=1.0)),  # cos 1
            pt(3, vec(a1=1.0)),  # cos 0
            pt(4, vec(a0=1.0, a1=0.25)),  # cos 0.970
            pt(5, vec(a0=-1.0)),  # cos -1
        ]
    )
    hits = await index.query(IndexQuery(SearchFilter("a"), limit=3, dense=vec(a0=1.0)))
    assert ids(hits) == [2, 4, 1]
    assert [h.score for h in hits] == pytest.approx([1.0, 0.9701, 0.7071], abs=1e-3)


async def test_sparse_query_ranks_by_term_overlap(index: VectorIndex) -> None:
    await index.upsert(
        [
            pt(1, terms=sparse({1: 1.0})),
            pt(2, terms=sparse({1: 1.0, 2: 1.0, 3: 1.0})),
            pt(3, terms=sparse({4: 1.0})),  # nothing in common with the query
            pt(4, terms=sparse({1: 1.0, 2: 1.0})),
        ]
    )
    hits = await index.query(IndexQuery(SearchFilter("a"), limit=10, sparse=sparse({1: 1.0, 2: 1.0, 3: 1.0})))
    assert ids(hits) == [2, 4, 1]


async def test_sparse_idf_rare_term_outweighs_common_one(index: VectorIndex) -> None:
    # Without IDF point 1 would win (2.0 vs 1.0 on the query's terms); with IDF the
    # term that five of six points share is worth little, the rare one a lot.
    await index.upsert(
        [pt(1, terms=sparse({10: 2.0})), pt(2, terms=sparse({11: 1.0}))]
        + [pt(i, terms=sparse({10: 1.0, 12: 1.0})) for i in range(3, 7)]
    )
    hits = await index.query(IndexQuery(SearchFilter("a"), limit=2, sparse=sparse({10: 1.0, 11: 1.0})))
    assert ids(hits) == [2, 1]
    assert hits[0].score > 2 * hits[1].score


async def test_empty_sparse_query_matches_nothing(index: VectorIndex) -> None:
    await index.upsert([pt(1)])
    assert await index.query(IndexQuery(SearchFilter("a"), limit=5, sparse=sparse({}))) == []


async def test_query_without_vectors_is_an_error(index: VectorIndex) -> None:
    with pytest.raises(ValueError, match="dense or a sparse"):
        await index.query(IndexQuery(SearchFilter("a"), limit=5))


FUSION_CORPUS = [
    pt(1, vec(a0=1.0), sparse({50: 1.0})),  # dense #1, no shared term
    pt(2, vec(a0=-1.0), sparse({60: 2.0})),  # sparse #1, last in dense space
    pt(3, vec(a0=1.0, a1=1.0), sparse({60: 1.0})),  # dense #2 and sparse #2
    pt(4, vec(a3=1.0), sparse({99: 1.0})),  # found by neither
]


async def fused(index: VectorIndex, fusion: FusionParams) -> list[Hit]:
    await index.upsert(FUSION_CORPUS)
    query = IndexQuery(SearchFilter("a"), limit=10, dense=vec(a0=1.0), sparse=sparse({60: 1.0}), fusion=fusion)
    return await index.query(query)


async def test_rrf_fuses_both_result_lists(index: VectorIndex) -> None:
    hits = await fused(index, FusionParams("rrf", rrf_k=60, prefetch_limit=2))
    assert hits[0].id == 3  # the only point both lists found
    assert set(ids(hits)) == {1, 2, 3}
    # Qdrant's RRF: 1 / (k + 0-based rank), summed over the lists.
    assert hits[0].score == pytest.approx(2 / 61, rel=1e-3)
    assert [h.score for h in hits[1:]] == pytest.approx([1 / 60, 1 / 60], rel=1e-3)


@pytest.mark.parametrize(("weights", "expected"), [((3.0, 1.0), [3, 1, 2]), ((1.0, 3.0), [3, 2, 1])])
async def test_weighted_rrf_favours_the_heavier_list(
    index: VectorIndex, weights: tuple[float, float], expected: list[int]
) -> None:
    hits = await fused(index, FusionParams("rrf", rrf_k=60, weights=weights, prefetch_limit=2))
    assert ids(hits) == expected


async def test_dbsf_fuses_both_result_lists(index: VectorIndex) -> None:
    hits = await fused(index, FusionParams("dbsf", prefetch_limit=2))
    assert set(ids(hits)) == {1, 2, 3}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


async def test_fused_query_respects_limit(index: VectorIndex) -> None:
    # Default prefetch limit: the dense list holds all four points, 3 still wins.
    await index.upsert(FUSION_CORPUS)
    query = IndexQuery(SearchFilter("a"), limit=1, dense=vec(a0=1.0), sparse=sparse({60: 1.0}))
    assert ids(await index.query(query)) == [3]


@pytest.mark.parametrize("kind", ["dense", "sparse", "fused"])
async def test_hits_name_their_documents(index: VectorIndex, kind: str) -> None:
    # What lets a search group hits by document before it reads their text.
    await index.upsert(
        [
            pt(1, vec(a0=1.0), sparse({1: 1.0}), document_id="doc-one"),
            pt(2, vec(a0=1.0, a1=0.5), sparse({1: 1.0, 2: 1.0}), document_id="doc-two"),
            pt(3, vec(a0=1.0, a1=1.0), sparse({1: 1.0, 3: 1.0}), document_id="doc-two"),
        ]
    )
    dense = vec(a0=1.0) if kind != "sparse" else None
    terms = sparse({1: 1.0}) if kind != "dense" else None
    hits = await index.query(IndexQuery(SearchFilter("a"), limit=10, dense=dense, sparse=terms))
    assert {h.id: h.document_id for h in hits} == {1: "doc-one", 2: "doc-two", 3: "doc-two"}


# -- filters --------------------------------------------------------------------------

FILTER_CORPUS = [
    pt(
        1,
        collection="notes",
        document_id="n1",
        source_uri="file:///notes/one.md",
        metadata={"lang": "en", "year": 2024, "tags": ["x", "y"], "draft": False, "rating": 4.5, "dotted.key": "v"},
    ),
    pt(
        2,
        collection="notes",
        document_id="n2",
        source_uri="file:///notes/sub/two.md",
        metadata={"lang": "fr", "year": 2023, "tags": ["y"], "draft": True, "rating": 3.0},
    ),
    pt(
        3,
        collection="papers",
        document_id="p1",
        source_uri="https://example.org/p1.pdf",
        metadata={"lang": "en", "year": 2023, "tags": ["z"], "draft": True},
    ),
    pt(4, collection="papers", document_id="p1", source_uri="https://example.org/p1.pdf", metadata={"lang": "en"}),
    # Tenant b reuses tenant a's collection, document id and source.
    pt(
        5,
        tenant="b",
        collection="notes",
        document_id="n1",
        source_uri="file:///notes/one.md",
        metadata={"lang": "en", "year": 2024, "tags": ["x"]},
    ),
    pt(6, tenant="b", collection="other", document_id="o1", source_uri="file:///other.md", metadata={"lang": "de"}),
]

FILTER_CASES: list[tuple[SearchFilter, set[int]]] = [
    (SearchFilter("a"), {1, 2, 3, 4}),
    (SearchFilter("b"), {5, 6}),
    (SearchFilter("nobody"), set()),
    (SearchFilter("a", collections=["notes"]), {1, 2}),
    (SearchFilter("b", collections=["notes"]), {5}),
    (SearchFilter("a", collections=["notes", "papers"]), {1, 2, 3, 4}),
    (SearchFilter("a", collections=["other"]), set()),
    (SearchFilter("a", collections=[]), set()),
    (SearchFilter("a", document_ids=["n1"]), {1}),
    (SearchFilter("b", document_ids=["n1"]), {5}),
    (SearchFilter("a", document_ids=["n1", "p1"]), {1, 3, 4}),
    (SearchFilter("a", document_ids=[]), set()),
    (SearchFilter("a", source_prefix="file:///notes/"), {1, 2}),
    (SearchFilter("a", source_prefix="file:///notes/sub/"), {2}),
    (SearchFilter("a", source_prefix="file:///notes/one.md"), {1}),
    (SearchFilter("a", source_prefix="https://"), {3, 4}),
    (SearchFilter("a", source_prefix="notes"), set()),
    (SearchFilter("b", source_prefix="file:///"), {5, 6}),
    (SearchFilter("a", metadata={"lang": "en"}), {1, 3, 4}),
    (SearchFilter("a", metadata={"year": 2023}), {2, 3}),
    (SearchFilter("a", metadata={"tags": "y"}), {1, 2}),  # a list payload contains the value
    (SearchFilter("a", metadata={"draft": True}), {2, 3}),
    (SearchFilter("a", metadata={"draft": False}), {1}),
    (SearchFilter("a", metadata={"rating": 4.5}), {1}),
    (SearchFilter("a", metadata={"dotted.key": "v"}), {1}),
    (SearchFilter("a", metadata={"missing": "x"}), set()),
    (SearchFilter("a", metadata={"lang": ["en", "fr"]}), {1, 2, 3, 4}),
    (SearchFilter("a", metadata={"year": [2024, 2022]}), {1}),
    (SearchFilter("a", metadata={"tags": ["x", "z"]}), {1, 3}),
    (SearchFilter("a", metadata={"draft": [True]}), {2, 3}),
    (SearchFilter("a", metadata={"rating": [3.0, 4.5]}), {1, 2}),
    (SearchFilter("a", metadata={"lang": []}), set()),
    (SearchFilter("a", metadata={"lang": "en", "year": 2023}), {3}),
    (SearchFilter("b", metadata={"lang": "en", "year": 2024}), {5}),
    (
        SearchFilter(
            "a",
            collections=["papers", "notes"],
            document_ids=["p1", "n2"],
            source_prefix="https://example.org/",
            metadata={"lang": "en", "tags": ["z", "q"]},
        ),
        {3},
    ),
]


@pytest.mark.parametrize(("flt", "expected"), FILTER_CASES, ids=[str(i) for i in range(len(FILTER_CASES))])
async def test_filter(index: VectorIndex, flt: SearchFilter, expected: set[int]) -> None:
    """Every read path applies the filter the same way."""
    await index.upsert(FILTER_CORPUS)
    dense, terms = vec(a0=1.0), COMMON
    for q in (
        IndexQuery(flt, limit=10, dense=dense),
        IndexQuery(flt, limit=10, sparse=terms),
        IndexQuery(flt, limit=10, dense=dense, sparse=terms, fusion=FusionParams("rrf")),
        IndexQuery(flt, limit=10, dense=dense, sparse=terms, fusion=FusionParams("dbsf")),
    ):
        assert set(ids(await index.query(q))) == expected, q
    assert await index.point_ids(flt) == expected
    assert await index.count(flt) == len(expected)


async def test_tenant_isolation(index: VectorIndex) -> None:
    """Tenant b's best match for tenant a's exact vectors is still one of b's own points."""
    await index.upsert([pt(1, vec(a0=1.0), sparse({1: 1.0})), pt(2, vec(a1=1.0), sparse({2: 1.0}), tenant="b")])
    query = IndexQuery(SearchFilter("b"), limit=10, dense=vec(a0=1.0), sparse=sparse({1: 1.0}))
    assert ids(await index.query(query)) == [2]
    assert ids(await index.query(IndexQuery(SearchFilter("b"), limit=10, sparse=sparse({1: 1.0})))) == []


async def test_concurrent_calls(index: VectorIndex) -> None:
    """Reads and writes issued at once from the event loop neither fail nor interleave badly."""
    await index.upsert(FILTER_CORPUS)
    query = IndexQuery(SearchFilter("a"), limit=10, dense=vec(a0=1.0), sparse=COMMON)
    writes = asyncio.gather(*(index.upsert([pt(100 + i, vec(a1=1.0), tenant="c")]) for i in range(20)))
    queries = asyncio.gather(*(index.query(query) for _ in range(20)))
    counts = asyncio.gather(*(index.count(SearchFilter("a")) for _ in range(20)))
    _, hits, numbers = await asyncio.gather(writes, queries, counts)
    assert all(set(ids(h)) == {1, 2, 3, 4} for h in hits)
    assert numbers == [4] * 20
    assert await index.count(SearchFilter("c")) == 20


# -- deletes --------------------------------------------------------------------------


async def test_delete_points(index: VectorIndex) -> None:
    await index.upsert(FILTER_CORPUS)
    await index.delete_points([1, 5, 999])
    await index.delete_points([])
    assert await index.point_ids() == {2, 3, 4, 6}


async def test_delete_documents(index: VectorIndex) -> None:
    await index.upsert(FILTER_CORPUS)
    await index.delete_documents("a", ["n1", "p1", "unknown"])
    assert await index.point_ids() == {2, 5, 6}  # tenant b's n1 (point 5) stays
    await index.delete_documents("a", [])
    assert await index.point_ids() == {2, 5, 6}


async def test_delete_documents_keeps_the_new_chunks(index: VectorIndex) -> None:
    old = [pt(i, document_id="doc") for i in (10, 11, 12)]
    await index.upsert([*old, pt(20, document_id="other"), pt(30, document_id="doc", tenant="b")])
    # Replace the document: new chunks first, then drop every other chunk of it.
    await index.upsert([pt(13, document_id="doc"), pt(11, document_id="doc")])
    await index.delete_documents("a", ["doc"], keep_ids=[13, 11])
    assert await index.point_ids() == {11, 13, 20, 30}


async def test_delete_collection_only_hits_that_tenants_collection(index: VectorIndex) -> None:
    await index.upsert(FILTER_CORPUS)
    await index.delete_collection("a", "notes")
    assert await index.point_ids() == {3, 4, 5, 6}
    await index.delete_collection("a", "nonexistent")
    assert await index.point_ids() == {3, 4, 5, 6}


# -- cursor, model identity, clear ---------------------------------------------------


async def test_cursor_round_trip_and_persistence(index: VectorIndex, backend: Backend) -> None:
    assert await index.get_cursor() == 0
    await index.set_cursor(42)
    assert await index.get_cursor() == 42
    await index.set_cursor(43)
    again = await reopen(index, backend)
    try:
        assert await again.get_cursor() == 43
    finally:
        await again.close()


async def test_cursor_keeps_its_origin(index: VectorIndex, backend: Backend) -> None:
    assert await index.read_cursor() == Cursor()
    await index.set_cursor(12, "12@1764500000000001")
    assert await index.read_cursor() == Cursor(12, "12@1764500000000001")
    again = await reopen(index, backend)
    try:
        assert await again.read_cursor() == Cursor(12, "12@1764500000000001")
        assert await again.get_cursor() == 12
    finally:
        await again.close()


async def test_cursor_compare_and_set(index: VectorIndex, backend: Backend) -> None:
    await index.set_cursor(5, "5@1")
    await index.set_cursor(8, "8@2", expected=5)  # still 5: applied
    assert await index.read_cursor() == Cursor(8, "8@2")
    with pytest.raises(CursorConflictError, match="expected 5"):
        await index.set_cursor(9, "9@3", expected=5)  # another writer moved it to 8 meanwhile
    assert await index.read_cursor() == Cursor(8, "8@2")  # nothing changed
    again = await reopen(index, backend)
    try:
        assert await again.read_cursor() == Cursor(8, "8@2")
    finally:
        await again.close()


async def test_reopen_keeps_points(index: VectorIndex, backend: Backend) -> None:
    await index.upsert(FILTER_CORPUS)
    again = await reopen(index, backend)
    try:
        assert await again.point_ids() == {1, 2, 3, 4, 5, 6}
        hits = await again.query(IndexQuery(SearchFilter("a", collections=["papers"]), limit=5, sparse=COMMON))
        assert set(ids(hits)) == {3, 4}
    finally:
        await again.close()


@pytest.mark.parametrize("other", [ModelIdentity("other/mpnet", 768), ModelIdentity("other/minilm", DIM)])
async def test_reopening_with_another_model_fails(index: VectorIndex, backend: Backend, other: ModelIdentity) -> None:
    await index.upsert([pt(1)])
    await index.close()
    stranger = backend.make()
    with pytest.raises(ModelMismatchError) as exc:
        await stranger.open(other)
    message = str(exc.value)
    assert f"{MODEL.name} ({DIM}-d)" in message
    assert f"{other.name} ({other.dimension}-d)" in message
    assert "ingest the documents again" in message
    await stranger.close()
    again = await reopen(stranger, backend)  # the right model still opens it, data intact
    try:
        assert await again.point_ids() == {1}
    finally:
        await again.close()


async def test_clear(index: VectorIndex, backend: Backend) -> None:
    await index.upsert(FILTER_CORPUS)
    await index.set_cursor(7, "7@1")
    await index.clear()
    assert await index.count() == 0
    assert await index.read_cursor() == Cursor()
    await index.upsert([pt(1, vec(a0=1.0), sparse({3: 1.0}))])  # still usable afterwards
    assert ids(await index.query(IndexQuery(SearchFilter("a"), limit=5, sparse=sparse({3: 1.0})))) == [1]
    again = await reopen(index, backend)
    try:
        assert await again.point_ids() == {1}
        assert await again.get_cursor() == 0
    finally:
        await again.close()
    with pytest.raises(ModelMismatchError):  # the model identity survived the clear
        await reopen(again, backend, ModelIdentity("other/mpnet", 768))


async def test_ping(index: VectorIndex) -> None:
    await index.ping()


# -- engine specific ------------------------------------------------------------------


async def test_server_unreachable_names_the_url() -> None:
    index = QdrantServerIndex.from_url("http://127.0.0.1:9", api_key=None, collection="x", timeout=2)
    with pytest.raises(IndexUnavailableError, match=r"127\.0\.0\.1:9"):
        await index.ping()
    with pytest.raises(IndexUnavailableError, match=r"127\.0\.0\.1:9"):
        await index.open(MODEL)
    await index.close()


def run_edge_script(directory: Path, body: str) -> subprocess.Popen[str]:
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        from pathlib import Path
        from mcp_rag.index.base import *
        from mcp_rag.index.qdrant_edge import EdgeIndex

        async def main(index):
        {body}

        index = EdgeIndex(Path(sys.argv[1]))
        asyncio.run(main(index))
        """
    ).format(body=textwrap.indent(textwrap.dedent(body), "    "))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


async def test_edge_reopens_after_kill_9_right_after_upsert_at_a_cursor_it_holds(tmp_path: Path) -> None:
    """The shard keeps no log of its own: what was not flushed may be lost, and the cursor (written
    with the flush) then says so, for the change log to apply it again. Never a cursor ahead of the
    points, nor a shard that does not open."""
    child = run_edge_script(
        tmp_path,
        f"""
        await index.open(ModelIdentity({MODEL.name!r}, {DIM}))
        vec = [1.0] + [0.0] * {DIM - 1}
        payload = PointPayload("a", "c", "d", "file:///x")
        await index.upsert([IndexPoint(i, vec, SparseVector([1], [1.0]), payload) for i in range(1, 501)])
        await index.set_cursor(500)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)  # the dead process's locks went with it
    try:
        cursor = await index.get_cursor()
        assert cursor in (0, 500)  # the one set (if the flush ran), or the one of the last flush
        assert await index.point_ids() <= set(range(1, 501))
        if cursor == 500:
            assert await index.count() == 500
        vec = [1.0] + [0.0] * (DIM - 1)  # what a catch-up from the cursor does: the writes again
        payload = PointPayload("a", "c", "d", "file:///x")
        await index.upsert([IndexPoint(i, vec, SparseVector([1], [1.0]), payload) for i in range(1, 501)])
        assert await index.count() == 500
    finally:
        await index.close()


@pytest.mark.parametrize("flushed", [False, True])
async def test_edge_kill_9_rewinds_the_cursor_to_the_last_flush(tmp_path: Path, flushed: bool) -> None:
    """Flushes are grouped: a process killed before its writes were flushed reopens at the cursor of
    the last flush, so the change log re-applies what was not flushed; once flushed, the cursor stays."""
    child = run_edge_script(
        tmp_path,
        f"""
        index = EdgeIndex(Path(sys.argv[1]), flush_seconds=3600)
        await index.open(ModelIdentity({MODEL.name!r}, {DIM}))
        vec = [1.0] + [0.0] * {DIM - 1}
        payload = PointPayload("a", "c", "d", "file:///x")
        await index.upsert([IndexPoint(i, vec, SparseVector([1], [1.0]), payload) for i in range(1, 11)])
        await index.set_cursor(7, "7@1")
        await index.flush()
        await index.upsert([IndexPoint(i, vec, SparseVector([1], [1.0]), payload) for i in range(11, 21)])
        await index.set_cursor(9, "9@1")
        if {flushed!r}:
            await index.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)
    try:
        assert await index.read_cursor() == (Cursor(9, "9@1") if flushed else Cursor(7, "7@1"))
        held = await index.point_ids()
        # What the cursor names is there; of the unflushed writes, whatever reached the disk.
        assert held == set(range(1, 21)) if flushed else set(range(1, 11)) <= held <= set(range(1, 21))
    finally:
        await index.close()
    meta = json.loads((tmp_path / "index_meta.json").read_text())
    assert "flushed" not in meta  # a clean close leaves nothing to re-apply


async def test_edge_writes_flush_by_themselves(tmp_path: Path) -> None:
    """Without close or flush, the grouped flush comes within flush_seconds of the first write."""
    index = EdgeIndex(tmp_path, flush_seconds=1.0)
    await index.open(MODEL)
    try:
        vec = [1.0] + [0.0] * (DIM - 1)
        await index.upsert([IndexPoint(1, vec, SparseVector([1], [1.0]), PointPayload("a", "c", "d", "file:///x"))])
        await index.set_cursor(3, "3@1")
        # The durable cursor names what the flushed segments hold: not yet the write above.
        assert json.loads((tmp_path / "index_meta.json").read_text())["cursor"] == 0
        assert await index.read_cursor() == Cursor(3, "3@1")
        for _ in range(500):
            if json.loads((tmp_path / "index_meta.json").read_text())["cursor"] == 3:
                break
            await asyncio.sleep(0.02)
        meta = json.loads((tmp_path / "index_meta.json").read_text())
        assert meta["cursor"] == 3 and meta["origin"] == "3@1" and "flushed" not in meta
    finally:
        await index.close()


async def test_edge_cursor_without_unflushed_writes_is_durable_at_once(tmp_path: Path) -> None:
    """A cursor that moves while every write is flushed (a change that touched no point) is written
    to the meta file at once: nothing pending would write it."""
    index = EdgeIndex(tmp_path, flush_seconds=3600)
    await index.open(MODEL)
    try:
        await index.set_cursor(4, "4@1")
        assert json.loads((tmp_path / "index_meta.json").read_text())["cursor"] == 4
    finally:
        await index.close()


async def test_edge_reads_the_flushed_cursor_of_an_earlier_meta_file(tmp_path: Path) -> None:
    """Meta files of earlier versions kept the cursor of the last flush beside a later cursor; an
    index left that way by a killed owner reopens at the flushed one."""
    index = EdgeIndex(tmp_path, flush_seconds=3600)
    await index.open(MODEL)
    await index.set_cursor(5, "5@1")
    await index.close()
    meta = json.loads((tmp_path / "index_meta.json").read_text())
    meta.update(cursor=9, origin="9@1", flushed={"cursor": 5, "origin": "5@1"})
    (tmp_path / "index_meta.json").write_text(json.dumps(meta))
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)
    try:
        assert await index.read_cursor() == Cursor(5, "5@1")
    finally:
        await index.close()


async def test_edge_directory_is_locked_by_the_process_using_it(tmp_path: Path) -> None:
    child = run_edge_script(
        tmp_path,
        f"""
        await index.open(ModelIdentity({MODEL.name!r}, {DIM}))
        print("ready", flush=True)
        sys.stdin.readline()
        await index.close()
        """,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(IndexUnavailableError, match=rf"in use by another mcp-rag process \(pid {child.pid}\)"):
            await EdgeIndex(tmp_path).open(MODEL)
    finally:
        child.communicate("\n", timeout=60)
    assert child.returncode == 0
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)  # free again once the other process closed it
    await index.close()


async def test_edge_second_instance_in_the_same_process(tmp_path: Path) -> None:
    first = EdgeIndex(tmp_path)
    await first.open(MODEL)
    try:
        with pytest.raises(IndexUnavailableError, match="already open in this process"):
            await EdgeIndex(tmp_path).open(MODEL)
    finally:
        await first.close()


async def test_edge_meta_file_is_plain_json(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path)
    await index.open(MODEL)
    await index.set_cursor(9, "9@1700000000000000")
    await index.close()
    meta = json.loads((tmp_path / "index_meta.json").read_text())
    assert meta == {
        "model_name": MODEL.name,
        "dimension": DIM,
        "provider": "fastembed",
        "fingerprint": [],
        "cursor": 9,
        "origin": "9@1700000000000000",
        "churn": 0,
        "compacted": 0,
    }
    assert not list(tmp_path.glob("*.tmp"))


async def test_edge_closed_index_is_unavailable(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path)
    with pytest.raises(IndexUnavailableError, match="not open"):
        await index.ping()
    await index.open(MODEL)
    await index.close()
    with pytest.raises(IndexUnavailableError, match="not open"):
        await index.count()
