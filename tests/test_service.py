"""The service use cases over a real Postgres, the real model and each index engine (the ``runtime`` fixture
runs every test here once on embedded Qdrant Edge and once on qdrant-client's local mode)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fpdf import FPDF
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_rag.embedding import Embedder
from mcp_rag.errors import IndexUnavailableError, InvalidInputError, NotFoundError, RagError, TooLargeError
from mcp_rag.extract import SourceDocument, read_file, walk
from mcp_rag.index.base import Hit, IndexPoint, PointPayload, SearchFilter
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.service import RagService, SearchFilters, SearchResult, group_by_document, kept_hits, passage_texts
from mcp_rag.settings import Settings
from mcp_rag.sources import SourceFailure
from mcp_rag.store.postgres import DocumentWrite, NewChunk
from tests.conftest import make_index
from tests.pgcluster import PgServer

T = "t1"

# Ten short documents on distinct topics: (key, title, text, collection, metadata).
CORPUS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    (
        "volcano",
        "Volcanoes",
        "Volcanoes form where magma rises through cracks in the crust. When pressure builds, an eruption throws ash and "
        "lava down the slopes; basalt flows cool into black rock. Mount Etna in Sicily erupts every few years.",
        "science",
        {"lang": "en", "tags": ["geology", "fire"], "year": 2021},
    ),
    (
        "bees",
        "Honeybees",
        "A honeybee colony lives in a hive ruled by a single queen. Worker bees collect nectar and pollen from flowers "
        "and store honey in wax honeycomb cells. Beekeepers harvest the surplus in late summer.",
        "science",
        {"lang": "en", "tags": ["biology"], "year": 2019},
    ),
    (
        "chess",
        "Chess openings",
        "In chess the opening moves decide control of the centre. The Sicilian Defence answers the king's pawn with a "
        "flank pawn; grandmasters memorise long lines of theory before a tournament.",
        "hobbies",
        {"lang": "en", "tags": ["games"], "year": 2020},
    ),
    (
        "sourdough",
        "Sourdough bread",
        "Sourdough bread rises with a starter of wild yeast and lactic bacteria instead of baker's yeast. Mix flour and "
        "water, let the dough ferment overnight, then bake it in a very hot oven.",
        "cooking",
        {"lang": "fr", "tags": ["food", "baking"], "year": 2021},
    ),
    (
        "jupiter",
        "Jupiter",
        "Jupiter is the largest planet in the solar system, a gas giant with a Great Red Spot storm larger than Earth. "
        "Its moons Io, Europa, Ganymede and Callisto were discovered by Galileo in 1610.",
        "science",
        {"lang": "en", "tags": ["space"], "year": 2022},
    ),
    (
        "cycling",
        "Bicycle maintenance",
        "Keep a bicycle chain clean and lubricated so it does not rust. Check tyre pressure before every ride and adjust "
        "the brake pads when they squeal against the rim.",
        "hobbies",
        {"lang": "de", "tags": ["sport"], "year": 2018},
    ),
    (
        "tea",
        "Green tea",
        "Green tea leaves are steamed or pan-fired soon after picking to stop oxidation. Brew them in water below boiling "
        "for two minutes; matcha is the powdered form used in the Japanese tea ceremony.",
        "cooking",
        {"lang": "de", "tags": ["food", "drink"], "year": 2020},
    ),
    (
        "violin",
        "Learning the violin",
        "A violinist draws the bow across four strings tuned in fifths. Beginners practise scales slowly, rosin the "
        "horsehair of the bow and learn to keep the left wrist relaxed.",
        "hobbies",
        {"lang": "fr", "tags": ["music"], "year": 2017},
    ),
    (
        "tax",
        "Filing income tax",
        "Each spring employees file an income tax return listing wages, deductions and credits. Keep receipts for "
        "deductible expenses; a refund arrives if too much was withheld from the salary.",
        "money",
        {"lang": "en", "tags": ["finance"], "year": 2023},
    ),
    (
        "glacier",
        "Glaciers",
        "Glaciers are rivers of ice that creep downhill under their own weight. As they retreat in a warming climate they "
        "leave moraines of rubble and lakes of meltwater in the valleys.",
        "science",
        {"lang": "de", "tags": ["geology", "ice"], "year": 2022},
    ),
]


Corpus = tuple[Runtime, dict[str, str]]
"""A runtime with CORPUS ingested, and topic key -> document id."""


def uri(key: str, collection: str) -> str:
    return f"file:///corpus/{collection}/{key}.md"


async def ingest_corpus(service: RagService, tenant: str = T) -> dict[str, str]:
    """Ingests CORPUS, one batch per collection; returns topic key -> document id."""
    ids = {}
    for collection in sorted({c for _, _, _, c, _ in CORPUS}):
        docs = [
            SourceDocument(uri(key, c), text, title, metadata)
            for key, title, text, c, metadata in CORPUS
            if c == collection
        ]
        report = await service.ingest(tenant, collection, docs)
        assert report.added == len(docs)
        for outcome in report.documents:
            assert outcome.document_id is not None
            ids[outcome.source_uri.rsplit("/", 1)[1].removesuffix(".md")] = outcome.document_id
    return ids


@pytest.fixture(scope="module", params=["qdrant-edge", "qdrant-server"])
async def corpus(
    request: pytest.FixtureRequest,
    pg_server: PgServer,
    template_db: str,
    embedder: Embedder,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Corpus]:
    """CORPUS ingested once per index engine, for the tests that only read."""
    name = f"c_{uuid.uuid4().hex[:16]}"
    dsn = pg_server.create_database(name, template=template_db)
    tmp = tmp_path_factory.mktemp("corpus")
    settings = Settings(
        data_dir=tmp / "data", database_url=dsn, embedding_model_dir=model_dir, sync_in_server=False, _env_file=None
    )
    try:
        async with open_runtime(settings, index=make_index(str(request.param), tmp / "index"), embedder=embedder) as rt:
            yield rt, await ingest_corpus(rt.service)
    finally:
        pg_server.drop_database(name)


async def assert_index_matches_store(rt: Runtime, tenant: str | None = None) -> set[int]:
    """The index holds exactly the chunks Postgres has: nothing missing, nothing stale."""
    in_store = await rt.store.all_chunk_ids(tenant)
    in_index = await rt.index.point_ids(SearchFilter(tenant=tenant) if tenant else None)
    assert in_index == in_store
    assert await rt.syncer.lag() == 0
    return in_store


async def snapshot(rt: Runtime) -> tuple[int, int, int, int]:
    stats = await rt.store.stats()
    return stats.documents, stats.chunks, stats.last_change_seq, await rt.index.count()


def file_sources(
    paths: Sequence[Path], max_bytes: int, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> Iterator[SourceDocument | SourceFailure]:
    """What the CLI feeds the service: documents, and a failure for each file that cannot be read."""
    for path in walk(paths, include, exclude):
        try:
            yield from read_file(path, max_bytes)
        except RagError as exc:
            yield SourceFailure(str(path), str(exc))


def make_pdf(text: str, title: str) -> bytes:
    pdf = FPDF()
    pdf.set_title(title)
    pdf.set_font("helvetica", size=12)
    pdf.add_page()
    pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


async def top(rt: Runtime, query: str, mode: str = "hybrid", **filters: Any) -> list[str]:
    results = await rt.service.search(T, query, mode=mode, top_k=50, filters=SearchFilters(**filters))
    return [r.document_id for r in results]


# --- every source type -----------------------------------------------------------------------------------


async def test_inline_text_and_markdown(runtime: Runtime) -> None:
    service = runtime.service
    plain = await service.ingest_text(T, "Lighthouses guide ships past dangerous rocks at night.")
    assert plain.status == "added"
    assert plain.source_uri.startswith("text:")  # identity by content
    again = await service.ingest_text(T, "Lighthouses guide ships past dangerous rocks at night.")
    assert (again.status, again.source_uri) == ("unchanged", plain.source_uri)

    markdown = (
        "# Knots\n\nSailors tie knots.\n\n## Bowline\n\nThe bowline makes a fixed loop at the end of a rope."
        "\n\n## Clove hitch\n\nThe clove hitch binds a rope to a post quickly.\n"
    )
    outcome = await service.ingest_text(
        T, markdown, collection="sea", title="Knots", source_uri="notes://knots", metadata={"kind": "howto"}
    )
    assert outcome.chunks == 3
    [hit] = await service.search(T, "bowline loop", mode="lexical", top_k=1)
    assert hit.document_id == outcome.document_id
    assert list(hit.heading_path) == ["Knots", "Bowline"]
    assert (hit.title, hit.collection, hit.source_uri, hit.metadata) == (
        "Knots",
        "sea",
        "notes://knots",
        {"kind": "howto"},
    )
    doc = await service.get_document(T, outcome.document_id)
    assert doc.content is not None
    assert doc.content[hit.start_char : hit.end_char] == hit.text
    assert hit.text.startswith("## Bowline")


async def test_files_of_every_type_from_a_directory(runtime: Runtime, tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "guide").mkdir(parents=True)
    (root / "guide" / "otters.md").write_text("# Otters\n\nSea otters float on their backs and crack shellfish.\n")
    (root / "beavers.txt").write_text("Beavers build dams of branches and mud across streams.\n")
    (root / "herons.html").write_text(
        "<html><head><title>Grey herons</title><script>var hidden = 'scriptword';</script></head><body>"
        "<nav><a href='/'>Home</a></nav><article><h1>Grey herons</h1><p>Grey herons stand motionless in shallow "
        "water and spear fish with their long bills. They nest in colonies called heronries.</p></article>"
        "</body></html>"
    )
    (root / "puffins.pdf").write_bytes(
        make_pdf(
            "Atlantic puffins dig burrows on cliff tops and carry sand eels crosswise in their colourful beaks.",
            "Puffins",
        )
    )
    (root / "guide" / "draft.md").write_text("# Draft\n\nNot ready: walruses.\n")
    (root / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")

    report = await runtime.service.ingest(T, "wildlife", file_sources([root], 1 << 20, exclude=["*draft*"]))
    assert (report.added, report.updated, report.unchanged, report.failed) == (4, 0, 0, [])
    titles = {d.title for d in (await runtime.service.list_documents(T, collection="wildlife")).documents}
    assert titles == {"Otters", "beavers.txt", "Grey herons", "Puffins"}

    for query, title in [
        ("shellfish", "Otters"),
        ("dams", "beavers.txt"),
        ("heronries", "Grey herons"),
        ("burrows", "Puffins"),
    ]:
        [hit] = await runtime.service.search(T, query, mode="lexical", top_k=1)
        assert hit.title == title
        assert hit.source_uri.startswith((root.resolve()).as_uri())
    assert await runtime.service.search(T, "walruses", mode="lexical") == []
    assert await runtime.service.search(T, "scriptword", mode="lexical") == []
    pdf_doc = next(d for d in (await runtime.service.list_documents(T)).documents if d.title == "Puffins")
    assert pdf_doc.metadata == {"content_type": "application/pdf", "pages": 1}

    only_md = await runtime.service.ingest(T, "md-only", file_sources([root], 1 << 20, include=["*.md"]))
    assert only_md.added == 2
    await assert_index_matches_store(runtime, T)


async def test_pdf_outline_and_sphinx_headings_reach_the_search_hits(runtime: Runtime, tmp_path: Path) -> None:
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    pdf.add_page()
    pdf.start_section("3 Storage", level=0)
    pdf.multi_cell(0, 8, "3 Storage", new_x="LMARGIN", new_y="NEXT")
    pdf.start_section("3.2 Cold rooms", level=1)
    pdf.multi_cell(0, 8, "3.2 Cold rooms", new_x="LMARGIN", new_y="NEXT")
    pdf.multi_cell(0, 8, "Apples keep for months in cold rooms with little oxygen.", new_x="LMARGIN", new_y="NEXT")
    (tmp_path / "orchard.pdf").write_bytes(bytes(pdf.output()))
    (tmp_path / "policy.html").write_text(
        "<html><head><title>Pruning \u2014 Orchard docs</title></head><body><div class='body' role='main'>"
        "<section><h1>Pruning<a class='headerlink' href='#pruning'>\u00b6</a></h1><section>"
        "<h2>Winter cuts<a class='headerlink' href='#winter'>\u00b6</a></h2>"
        "<p>Cut <code>water_sprouts</code> in late winter before the buds swell.</p></section></section></div>"
        "<div class='sphinxsidebar' role='navigation'><a href='#'>Sidebar link</a></div></body></html>"
    )
    report = await runtime.service.ingest(T, "orchard", file_sources([tmp_path], 1 << 20))
    assert report.added == 2
    [hit] = await runtime.service.search(T, "oxygen", mode="lexical", top_k=1)
    assert (hit.title, list(hit.heading_path)) == (
        "3 Storage",
        ["3 Storage", "3.2 Cold rooms"],
    )  # title: first bookmark
    [hit] = await runtime.service.search(T, "buds swell", mode="lexical", top_k=1)
    assert (hit.title, list(hit.heading_path)) == ("Pruning \u2014 Orchard docs", ["Pruning", "Winter cuts"])
    assert "Cut `water_sprouts` in late winter" in hit.text
    assert await runtime.service.search(T, "Sidebar", mode="lexical") == []


async def test_beir_corpus_file(runtime: Runtime, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(json.dumps({"_id": key, "title": title, "text": text}) for key, title, text, _, _ in CORPUS[:4])
        + "\n",
        encoding="utf-8",
    )
    report = await runtime.service.ingest(T, "beir", file_sources([corpus], 1 << 20))
    assert report.added == 4
    hits = await runtime.service.search(T, "honeycomb", mode="lexical", top_k=1)
    assert hits[0].metadata == {"corpus_id": "bees"}
    assert hits[0].source_uri == corpus.resolve().as_uri() + "#bees"


# --- the document life cycle -------------------------------------------------------------------------------


async def test_ingest_reingest_modify_delete(runtime: Runtime) -> None:
    service, store, index = runtime.service, runtime.store, runtime.index
    original = (
        "# Kites\n\nA zanzibarian kite climbs on the sea breeze. "
        + "The line hums in the wind. " * 30
        + "\n\n## Landing\n\nWalk the kite down slowly."
    )
    first = await service.ingest_text(T, original, source_uri="notes://kites", title="Kites")
    assert first.status == "added"
    assert first.chunks >= 2
    doc_id = first.document_id
    assert doc_id is not None
    seq = await store.last_change_seq()
    ids_v1 = await assert_index_matches_store(runtime, T)

    again = await service.ingest_text(T, original, source_uri="notes://kites", title="Kites")
    assert (again.status, again.document_id, again.chunks) == ("unchanged", None, 0)
    assert await store.last_change_seq() == seq  # nothing logged
    assert await assert_index_matches_store(runtime, T) == ids_v1

    changed = original.replace("zanzibarian", "patagonian").replace("slowly", "gently")
    updated = await service.ingest_text(T, changed, source_uri="notes://kites", title="Kites")
    assert (updated.status, updated.document_id) == ("updated", doc_id)
    assert await store.last_change_seq() == seq + 1
    ids_v2 = await assert_index_matches_store(runtime, T)
    assert not ids_v1 & ids_v2  # every old chunk is gone from both
    info = await service.get_document(T, doc_id)
    assert info.chunk_count == updated.chunks
    assert await index.count(SearchFilter(tenant=T, document_ids=[doc_id])) == info.chunk_count
    assert await service.search(T, "zanzibarian", mode="lexical") == []
    assert [r.document_id for r in await service.search(T, "patagonian", mode="lexical")] == [doc_id]

    deleted = await service.delete_document(T, doc_id)
    assert deleted.id == doc_id
    assert await store.all_chunk_ids() == set()
    assert await index.count() == 0
    assert (await store.stats()).documents == 0
    assert await service.search(T, "patagonian kite", mode="hybrid") == []
    with pytest.raises(NotFoundError):
        await service.get_document(T, doc_id)
    with pytest.raises(NotFoundError):
        await service.delete_document(T, doc_id)


async def test_crash_between_commit_and_index_is_repaired_by_sync(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, syncer = runtime.service, runtime.syncer
    first = await service.ingest_text(T, "Otters hold hands while they sleep.", source_uri="notes://otters")
    assert first.document_id is not None

    async def index_down() -> int:
        raise IndexUnavailableError("the index does not answer")

    async def crash() -> int:
        raise RuntimeError("process died after the commit")

    # The index fails after the commit: the write is durable, so it is acknowledged.
    monkeypatch.setattr(syncer, "catch_up", index_down)
    updated = await service.ingest_text(
        T, "Sea otters wrap themselves in kelp before sleeping.", source_uri="notes://otters"
    )
    assert updated.status == "updated"
    # The process dies after the commit: the caller sees the failure, Postgres has the document.
    monkeypatch.setattr(syncer, "catch_up", crash)
    with pytest.raises(RuntimeError, match="process died"):
        await service.ingest_text(T, "Hedgehogs hibernate through the winter.", source_uri="notes://hedgehogs")
    monkeypatch.undo()
    assert (await service.get_document(T, first.document_id)).content == (
        "Sea otters wrap themselves in kelp before sleeping."
    )
    assert len((await service.list_documents(T)).documents) == 2

    assert await syncer.lag() == 2
    assert await service.search(T, "kelp", mode="lexical") == []  # the index is behind...
    assert await service.search(T, "hands", mode="lexical") == []  # ...and its stale chunk is never shown
    assert await syncer.catch_up() == 2  # what `mcp-rag sync` does
    await assert_index_matches_store(runtime, T)
    assert [r.source_uri for r in await service.search(T, "kelp", mode="lexical")] == ["notes://otters"]
    assert [r.source_uri for r in await service.search(T, "hibernate", mode="lexical")] == ["notes://hedgehogs"]


async def test_write_without_index_update_is_caught_up(runtime: Runtime) -> None:
    """A batch committed straight to Postgres (the index never heard of it) is applied by catch_up."""
    service, store, syncer = runtime.service, runtime.store, runtime.syncer
    text = "Penguins huddle together against the Antarctic wind."
    [e] = await runtime.embedder.embed_passages([text])
    await store.write_documents(
        [
            DocumentWrite(
                T,
                "default",
                "notes://penguins",
                "",
                {},
                text,
                "h",
                [NewChunk(0, text, 0, len(text), (), e.dense, e.sparse)],
            )
        ]
    )
    assert await syncer.lag() == 1
    assert await runtime.index.count() == 0
    assert await syncer.catch_up() == 1
    await assert_index_matches_store(runtime, T)
    [hit] = await service.search(T, "Antarctic penguins", mode="hybrid", top_k=1)
    assert hit.source_uri == "notes://penguins"


async def test_reindex_rebuilds_the_same_points(runtime: Runtime) -> None:
    docs = [SourceDocument(uri(key, c), text, title, metadata) for key, title, text, c, metadata in CORPUS[2:6]]
    await runtime.service.ingest(T, "mixed", docs)
    before = await assert_index_matches_store(runtime, T)
    first_hits = await top(runtime, "gas giant moons", mode="hybrid")

    assert await runtime.syncer.reindex() == len(before)
    assert await assert_index_matches_store(runtime, T) == before
    assert await runtime.index.get_cursor() == await runtime.store.last_change_seq()
    assert await top(runtime, "gas giant moons", mode="hybrid") == first_hits

    await runtime.index.clear()  # a lost index
    assert await runtime.index.count() == 0
    assert await runtime.syncer.reindex() == len(before)
    assert await assert_index_matches_store(runtime, T) == before


# --- search ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "query", "expected"),
    [
        ("lexical", "honeycomb", "bees"),
        ("lexical", "Ganymede Callisto", "jupiter"),
        ("lexical", "moraines", "glacier"),
        ("lexical", "matcha ceremony", "tea"),
        ("dense", "insects that make something sweet", "bees"),
        ("dense", "how to fix a squeaky bike", "cycling"),
        ("dense", "paying the government on my earnings", "tax"),
        ("dense", "a board game strategy", "chess"),
        ("hybrid", "when does Mount Etna erupt", "volcano"),
        ("hybrid", "fermented loaf with wild yeast", "sourdough"),
        ("hybrid", "playing a string instrument with a bow", "violin"),
        ("hybrid", "frozen rivers of ice retreating", "glacier"),
    ],
)
async def test_each_mode_ranks_the_right_document_first(corpus: Corpus, mode: str, query: str, expected: str) -> None:
    rt, ids = corpus
    results = await rt.service.search(T, query, mode=mode, top_k=3)
    assert results
    assert results[0].document_id == ids[expected]
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)


async def test_only_the_modes_that_rank_by_meaning_run_the_dense_model(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, ids = corpus
    provider = rt.embedder.provider
    queries: list[str] = []
    real_embed_query = provider.embed_query

    def counting_embed_query(text: str) -> Any:
        queries.append(text)
        return real_embed_query(text)

    monkeypatch.setattr(provider, "embed_query", counting_embed_query)
    assert (await rt.service.search(T, "honeycomb", mode="lexical"))[0].document_id == ids["bees"]
    assert queries == []
    for mode in ("dense", "hybrid"):
        assert (await rt.service.search(T, "honeycomb", mode=mode))[0].document_id == ids["bees"]
    assert queries == ["honeycomb", "honeycomb"]


async def test_lexical_needs_shared_words_dense_does_not(corpus: Corpus) -> None:
    rt, ids = corpus
    assert await rt.service.search(T, "insects that make something sweet", mode="lexical") == []
    assert (await rt.service.search(T, "insects that make something sweet", mode="dense"))[0].document_id == (
        ids["bees"]
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from("abcdef"), max_size=30),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=5),
)
def test_the_hits_kept_before_reading_postgres_are_the_chunks_grouping_shows(
    documents: list[str], limit: int, per_document: int
) -> None:
    hits = [Hit(id=i, score=1.0 - i / 100, document_id=d) for i, d in enumerate(documents)]
    results = [
        SearchResult(h.id, h.document_id, "c", f"doc://{h.document_id}", "", {}, 0, "t", 0, 1, (), h.score)
        for h in hits
    ]
    grouped = group_by_document(results, limit, per_document)
    shown = [r.chunk_id for first in grouped for r in (first, *first.passages)]
    assert [h.id for h in kept_hits(hits, limit, per_document)] == sorted(shown)


async def test_a_hit_postgres_does_not_have_costs_no_place(runtime: Runtime, embedder: Embedder) -> None:
    # The index is ahead of this region's Postgres: its best hit names a chunk Postgres does not have.
    service = runtime.service
    for name in ("herons", "egrets", "storks"):
        await service.ingest_text(T, f"{name.title()} wade through shallow marsh water.", source_uri=f"birds://{name}")
    query = "birds wading through the marsh"
    probe = embedder.embed_query_sync(query)
    assert probe.dense is not None
    ghost = IndexPoint(
        id=10**12,
        dense=probe.dense.tolist(),
        sparse=probe.sparse,
        payload=PointPayload(T, "default", str(uuid.uuid4()), "birds://ghost", {}),
    )
    await runtime.index.upsert([ghost])
    found = await service.search(T, query, top_k=3)
    assert sorted(r.source_uri for r in found) == ["birds://egrets", "birds://herons", "birds://storks"]
    raw = await service.search(T, query, top_k=3, per_document=None)  # the search reads past the ghost
    assert sorted(r.source_uri for r in raw) == ["birds://egrets", "birds://herons", "birds://storks"]


async def test_filters(corpus: Corpus) -> None:
    rt, ids = corpus
    by_key = {key: (collection, metadata) for key, _, _, collection, metadata in CORPUS}

    def expected(pred: Any) -> set[str]:
        return {ids[k] for k, (c, m) in by_key.items() if pred(k, c, m)}

    query = "an interesting topic"  # dense mode scores every point: the filter alone decides the set
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"collection": "cooking"}, expected(lambda k, c, m: c == "cooking")),
        ({"document_ids": [ids["chess"], ids["tax"]]}, {ids["chess"], ids["tax"]}),
        ({"source_prefix": "file:///corpus/hobbies/"}, expected(lambda k, c, m: c == "hobbies")),
        ({"source_prefix": "file:///corpus/science/g"}, {ids["glacier"]}),
        ({"metadata": {"lang": "de"}}, expected(lambda k, c, m: m["lang"] == "de")),
        ({"metadata": {"year": 2021}}, expected(lambda k, c, m: m["year"] == 2021)),
        ({"metadata": {"tags": "geology"}}, {ids["volcano"], ids["glacier"]}),
        ({"metadata": {"tags": ["food", "space"]}}, {ids["sourdough"], ids["tea"], ids["jupiter"]}),
        ({"metadata": {"lang": ["fr", "de"]}}, expected(lambda k, c, m: m["lang"] in ("fr", "de"))),
        (
            {"collection": "science", "metadata": {"lang": "en", "tags": ["space", "biology"]}},
            {ids["jupiter"], ids["bees"]},
        ),
        ({"metadata": {"lang": "xx"}}, set()),
        ({"collection": "no-such-collection"}, set()),
    ]
    for filters, want in cases:
        for mode in ("dense", "hybrid"):
            got = set(await top(rt, query, mode=mode, **filters))
            assert got == want, (filters, mode)


async def test_several_collections(runtime: Runtime) -> None:
    service = runtime.service
    a = await service.ingest_text(T, "Tulips flower in spring.", collection="garden", source_uri="notes://flowers")
    b = await service.ingest_text(T, "Tulips flower in spring.", collection="archive", source_uri="notes://flowers")
    assert a.document_id != b.document_id
    assert {c.name: c.documents for c in await service.list_collections(T)} == {"garden": 1, "archive": 1}
    assert set(await top(runtime, "tulips", mode="lexical")) == {a.document_id, b.document_id}
    assert await top(runtime, "tulips", mode="lexical", collection="garden") == [a.document_id]

    assert await service.delete_collection(T, "garden") == 1
    assert [c.name for c in await service.list_collections(T)] == ["archive"]
    assert await top(runtime, "tulips", mode="lexical") == [b.document_id]
    await assert_index_matches_store(runtime, T)
    with pytest.raises(NotFoundError, match="no collection named 'garden'"):
        await service.delete_collection(T, "garden")


async def test_tenants_are_isolated(runtime: Runtime) -> None:
    service = runtime.service
    mine = await service.ingest_text("alpha", "Alpha's secret recipe uses saffron.", source_uri="notes://recipe")
    theirs = await service.ingest_text("beta", "Beta's recipe uses paprika.", source_uri="notes://recipe")
    assert mine.status == theirs.status == "added"  # same source, different tenants: two documents
    assert mine.document_id != theirs.document_id
    assert mine.document_id is not None

    for mode in ("lexical", "dense", "hybrid"):
        results = await service.search("beta", "saffron recipe", mode=mode, top_k=50)
        assert {r.document_id for r in results} == {theirs.document_id}
    with pytest.raises(NotFoundError):
        await service.get_document("beta", mine.document_id)
    with pytest.raises(NotFoundError):
        await service.delete_document("beta", mine.document_id)
    filtered = await service.search(
        "beta", "saffron", mode="lexical", filters=SearchFilters(document_ids=[mine.document_id])
    )
    assert filtered == []
    assert [d.id for d in (await service.list_documents("beta")).documents] == [theirs.document_id]
    stats, points, pending = await service.stats("beta")
    assert (stats.documents, points, pending) == (1, 1, 0)
    assert (await service.get_document("alpha", mine.document_id)).title == ""


# --- bad input: the right error, and nothing written --------------------------------------------------------


async def test_bad_ingest_inputs_write_nothing(runtime: Runtime, tmp_path: Path) -> None:
    service = runtime.service
    await service.ingest_text(T, "A document that was here before.", source_uri="notes://before")
    before = await snapshot(runtime)
    small = RagService(
        runtime.settings.model_copy(update={"max_document_bytes": 200}),
        runtime.store,
        runtime.index,
        runtime.embedder,
        runtime.syncer,
    )
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: service.ingest_text(T, ""), InvalidInputError, "text is empty"),
        (lambda: service.ingest_text(T, " \n\t "), InvalidInputError, "text is empty"),
        (lambda: small.ingest_text(T, "x " * 150), TooLargeError, "300 bytes, over the limit of 200"),
        (
            lambda: service.ingest_text(T, "Fine.", metadata={"nested": {"a": 1}}),
            InvalidInputError,
            "nested objects are not allowed",
        ),
        (
            lambda: service.ingest_text(T, "Fine.", metadata={"bad key": 1}),
            InvalidInputError,
            "invalid metadata key 'bad key'",
        ),
        (
            lambda: service.ingest_text(T, "Fine.", metadata={"n": float("nan")}),
            InvalidInputError,
            "numbers must be finite",
        ),
        (
            lambda: service.ingest_text(T, "Fine.", metadata={"l": list(range(101))}),
            TooLargeError,
            "over the limit of 100",
        ),
        (
            lambda: service.ingest_text(T, "Fine.", metadata="lang=en"),
            InvalidInputError,  # type: ignore[arg-type]
            "metadata must be an object",
        ),
        (
            lambda: service.ingest_text(T, "Fine.", collection="bad name!"),
            InvalidInputError,
            "invalid collection name 'bad name!'",
        ),
        (lambda: service.ingest_text(T, "Fine.", collection="-leading"), InvalidInputError, "invalid collection name"),
        (lambda: service.ingest_text(T, "Fine.", title="t" * 1001), InvalidInputError, "title must be at most"),
        (lambda: service.ingest_text(T, "NUL \x00 inside"), InvalidInputError, "NUL characters"),
        (lambda: service.ingest_text(T, "lone \ud800 surrogate"), InvalidInputError, "not valid Unicode"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            await call()
        assert await snapshot(runtime) == before, message


async def test_unreadable_files_are_reported_and_write_nothing(runtime: Runtime, tmp_path: Path) -> None:
    (tmp_path / "slides.ppt").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "broken.pptx").write_bytes(b"PK\x03\x04")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "big.md").write_text("# Big\n\n" + "word " * 100)
    (tmp_path / "fake.pdf").write_text("not a pdf")
    before = await snapshot(runtime)
    named = [tmp_path / n for n in ("slides.ppt", "broken.pptx", "latin1.txt", "big.md", "fake.pdf")]
    report = await runtime.service.ingest(T, None, file_sources(named, max_bytes=200))
    assert (report.added, report.updated, report.unchanged) == (0, 0, 0)
    reasons = {Path(f.source).name: f.reason for f in report.failed}
    assert "unsupported file type '.ppt'" in reasons["slides.ppt"]
    assert "not a PPTX file" in reasons["broken.pptx"]
    assert "not valid UTF-8" in reasons["latin1.txt"]
    assert "exceeds the limit of 200 bytes" in reasons["big.md"]
    assert "not a PDF file" in reasons["fake.pdf"]
    assert await snapshot(runtime) == before

    with pytest.raises(InvalidInputError, match="unsupported file type"):  # a single source is raised
        await runtime.service.ingest(
            T, None, [SourceFailure("x.pptx", "x.pptx: unsupported file type '.pptx'")], raise_on_failure=True
        )
    assert await snapshot(runtime) == before


async def test_one_bad_document_does_not_stop_the_others(runtime: Runtime) -> None:
    docs = [
        SourceDocument("notes://good-1", "Good one."),
        SourceDocument("notes://empty", "   "),
        SourceDocument("notes://good-2", "Good two.", metadata={"x": {"nested": True}}),
    ]
    report = await runtime.service.ingest(T, None, docs)
    assert report.added == 1
    assert sorted(f.source for f in report.failed) == ["notes://empty", "notes://good-2"]
    assert [d.source_uri for d in (await runtime.service.list_documents(T)).documents] == ["notes://good-1"]


async def test_bad_search_inputs(corpus: Corpus) -> None:
    rt, _ = corpus
    before = await snapshot(rt)
    s = rt.service
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: s.search(T, "bees", top_k=0), InvalidInputError, "top_k must be an integer from 1 to 50, got 0"),
        (lambda: s.search(T, "bees", top_k=51), InvalidInputError, "top_k must be an integer from 1 to 50, got 51"),
        (lambda: s.search(T, "bees", top_k=True), InvalidInputError, "top_k"),
        (
            lambda: s.search(T, "bees", mode="fuzzy"),
            InvalidInputError,
            "unknown search mode 'fuzzy': use one of hybrid, dense, lexical",
        ),
        (lambda: s.search(T, ""), InvalidInputError, "query is empty"),
        (lambda: s.search(T, "   "), InvalidInputError, "query is empty"),
        (lambda: s.search(T, "q" * 4001), TooLargeError, "over the limit of 4000"),
        (
            lambda: s.search(T, "bees", filters=SearchFilters(collection="bad name!")),
            InvalidInputError,
            "invalid collection name",
        ),
        (lambda: s.search(T, "bees", filters=SearchFilters(metadata={"tags": []})), InvalidInputError, "empty list"),
        (
            lambda: s.search(T, "bees", filters=SearchFilters(metadata={"a": {"b": 1}})),
            InvalidInputError,
            "nested objects",
        ),
        (lambda: s.list_documents(T, limit=0), InvalidInputError, "limit must be an integer from 1 to 100"),
        (lambda: s.list_documents(T, cursor="garbage"), InvalidInputError, "invalid cursor"),
        (lambda: s.get_document(T, "not-a-uuid"), NotFoundError, "no document with id 'not-a-uuid'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            await call()
    assert await snapshot(rt) == before


# --- bounded batches ------------------------------------------------------------------------------------


async def test_ingest_commits_in_bounded_batches(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    service = RagService(
        runtime.settings.model_copy(update={"ingest_batch_chunks": 8}),
        runtime.store,
        runtime.index,
        runtime.embedder,
        runtime.syncer,
    )
    sizes: list[int] = []
    original = runtime.store.write_documents

    async def recording(writes: Sequence[DocumentWrite]) -> Any:
        sizes.append(sum(len(w.chunks) for w in writes))
        assert await runtime.syncer.lag() == 0  # the previous batch is already in the index
        return await original(writes)

    monkeypatch.setattr(runtime.store, "write_documents", recording)
    progress: list[tuple[int, int | None]] = []

    async def on_progress(done: int, total: int | None, message: str) -> None:
        progress.append((done, total))

    docs = (
        SourceDocument(f"notes://n{i:02d}", f"Note {i} is about subject number {i} and nothing else.")
        for i in range(40)
    )
    report = await service.ingest(T, "notes", docs, total=40, progress=on_progress)
    assert report.added == 40
    assert sum(sizes) == report.chunks == 40
    assert len(sizes) >= 5
    assert max(sizes) <= 8
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert progress[-1] == (40, 40)
    await assert_index_matches_store(runtime, T)


def test_passage_texts_keep_every_chunk_token_in_the_model_window(embedder: Embedder) -> None:
    chunk = "alpha beta gamma " * 60  # 180 tokens: within chunk_tokens=200
    long_title = " ".join(f"term{i}" for i in range(300))  # far more than the window
    items = [
        (SourceDocument("a", "x", title=long_title), ("Methods",), chunk),
        (SourceDocument("b", "x", title="Short title"), ("Methods", "Dosage"), "The dose was 5 mg."),
        (SourceDocument("c", "x"), (), "No context at all."),
    ]
    texts = passage_texts(embedder, 200, items)
    assert texts[0].startswith("term0 term1 term2") and texts[0].endswith("\n" + chunk)
    # the context clipped to the window less chunk_tokens: the chunk is whole and inside the window
    context_tokens, chunk_tokens = embedder.count_tokens([texts[0].removesuffix("\n" + chunk), chunk])
    assert context_tokens == embedder.window_tokens - 200
    assert embedder.count_tokens([texts[0]])[0] == context_tokens + chunk_tokens <= embedder.window_tokens
    assert texts[1] == "Short title > Methods > Dosage\nThe dose was 5 mg."
    assert texts[2] == "No context at all."


def test_clip_tokens_cuts_at_token_boundaries(embedder: Embedder) -> None:
    assert embedder.clip_tokens(["Hello wonderful world", "hi"], 2) == ["Hello wonderful", "hi"]
    assert embedder.clip_tokens(["unbelievably"], 1) == ["un"]  # word pieces: un ##bel ##ie ##va ##bly
    assert embedder.clip_tokens(["anything"], 0) == [""]
    assert embedder.window_tokens == 254


def test_passage_texts_clip_the_context_of_a_whole_document_chunk(embedder: Embedder) -> None:
    """A one-chunk document longer than chunk_tokens: its context gets what the chunk leaves of the window."""
    chunk = "alpha beta gamma " * 78  # 234 tokens: over chunk_tokens, within the window
    long_title = " ".join(f"term{i}" for i in range(300))
    [text] = passage_texts(embedder, 200, [(SourceDocument("a", "x", title=long_title), (), chunk)])
    assert text.endswith("\n" + chunk) and text.startswith("term0 term1")
    context_tokens, chunk_tokens = embedder.count_tokens([text.removesuffix("\n" + chunk), chunk])
    assert chunk_tokens == 234
    assert context_tokens == embedder.window_tokens - 234


async def test_a_document_that_fits_the_window_is_one_chunk(runtime: Runtime) -> None:
    """About 230 tokens of one section: one chunk behind its title (two when whole documents are off)."""
    text = " ".join(f"Sentence {i} talks about harbour tides and keel depth in detail." for i in range(20))
    tokens = runtime.embedder.count_tokens([text])[0]
    assert runtime.settings.chunk_tokens < tokens < runtime.embedder.window_tokens - 10
    whole = await runtime.service.ingest_text(T, text, title="Tides", source_uri="notes://whole")
    assert whole.chunks == 1
    cut = RagService(
        runtime.settings.model_copy(update={"chunk_whole_documents": False}),
        runtime.store,
        runtime.index,
        runtime.embedder,
        runtime.syncer,
    )
    split = await cut.ingest_text(T, text, title="Tides", source_uri="notes://cut")
    assert split.chunks == 2
    [hit] = await runtime.service.search(
        T, "harbour tides keel", top_k=1, filters=SearchFilters(source_prefix="notes://whole")
    )
    assert (hit.text, hit.start_char, hit.end_char) == (text, 0, len(text))
