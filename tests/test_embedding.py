"""The embedder with the real offline model: dense vectors, BM25 sparse vectors, token counts, batching,
the event loop, and the model identity the index checks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
import pytest
from qdrant_client import QdrantClient

from mcp_rag.embedding import Embedder
from mcp_rag.embedding.tokens import CharacterBudget
from mcp_rag.errors import ConfigurationError, ModelMismatchError
from mcp_rag.index.base import VectorIndex
from mcp_rag.index.qdrant_edge import EdgeIndex
from mcp_rag.index.qdrant_server import QdrantServerIndex
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.settings import Settings
from mcp_rag.store.postgres import Store
from mcp_rag.types import FINGERPRINT_PROBE, ModelIdentity, fingerprint_of


def two_handles(kind: str, directory: Path) -> tuple[VectorIndex, VectorIndex]:
    """Two index objects over the same storage (a directory, or one Qdrant "server")."""
    if kind == "qdrant-server":
        client = QdrantClient(":memory:")
        return QdrantServerIndex(client), QdrantServerIndex(client)
    return EdgeIndex(directory), EdgeIndex(directory)


FIXED_SENTENCE = "The quick brown fox jumps over the lazy dog."
# The first components of FIXED_SENTENCE's embedding, computed once with the offline build of
# sentence-transformers/all-MiniLM-L6-v2 (rounded to 4 decimals).
FIXED_PREFIX = [0.0439, 0.0589, 0.0482, 0.0775, 0.0267, -0.0376, -0.0026, -0.0599]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def weights(embedder: Embedder, text: str) -> dict[int, float]:
    sparse = embedder.embed_passages_sync([text])[0].sparse
    return dict(zip(sparse.indices, sparse.values, strict=True))


# --- dense ---------------------------------------------------------------------------------------


def test_identity_and_dimension(embedder: Embedder) -> None:
    assert embedder.loaded
    identity = embedder.identity
    assert (identity.provider, identity.name, identity.dimension) == (
        "fastembed",
        "sentence-transformers/all-MiniLM-L6-v2",
        384,
    )
    # The fingerprint: the leading components of the unit vector of a fixed probe text.
    [probe] = embedder.embed_passages_sync([FINGERPRINT_PROBE])
    assert identity.fingerprint == fingerprint_of(probe.dense.tolist())
    assert len(identity.fingerprint) == 16
    assert identity.matches(ModelIdentity(identity.name, 384))  # recorded before fingerprints: matches on the rest
    assert not identity.matches(ModelIdentity(identity.name, 384, provider="openai", fingerprint=identity.fingerprint))
    [e] = embedder.embed_passages_sync(["anything at all"])
    assert e.dense.shape == (384,)
    assert e.dense.dtype == np.float32


def test_vectors_are_unit_length(embedder: Embedder) -> None:
    for e in embedder.embed_passages_sync(["short", "A longer sentence about rivers and mountains.", "x " * 300]):
        assert float(np.linalg.norm(e.dense)) == pytest.approx(1.0, abs=1e-4)
    assert float(np.linalg.norm(embedder.embed_query_sync("a query").dense)) == pytest.approx(1.0, abs=1e-4)


def test_reference_similarities(embedder: Embedder) -> None:
    """The values sentence-transformers gives for the same weights."""
    food, bread, market = embedder.embed_passages_sync(
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    )
    assert cosine(food.dense, bread.dense) == pytest.approx(0.7553, abs=0.01)
    assert cosine(food.dense, market.dense) == pytest.approx(0.0037, abs=0.01)


def test_fixed_vector(embedder: Embedder) -> None:
    [e] = embedder.embed_passages_sync([FIXED_SENTENCE])
    assert e.dense[:8].tolist() == pytest.approx(FIXED_PREFIX, abs=1e-3)
    # queries get no prefix with this model: the same text gives the same vector
    assert embedder.embed_query_sync(FIXED_SENTENCE).dense[:8].tolist() == pytest.approx(FIXED_PREFIX, abs=1e-3)


def test_related_closer_than_unrelated(embedder: Embedder) -> None:
    query = embedder.embed_query_sync("How do I bake sourdough bread at home?").dense
    related, unrelated = embedder.embed_passages_sync(
        [
            "Mix flour, water and a starter, let the dough rise overnight, then bake it in a hot oven.",
            "The spacecraft entered orbit around Jupiter after a five-year journey.",
        ]
    )
    assert cosine(query, related.dense) > cosine(query, unrelated.dense) + 0.2


# --- sparse (BM25) -----------------------------------------------------------------------------


def test_sparse_drops_stopwords(embedder: Embedder) -> None:
    with_stopwords = weights(embedder, "the cat and the dog")
    without = weights(embedder, "cat dog")
    assert set(with_stopwords) == set(without)
    assert len(without) == 2
    assert weights(embedder, "the and of it") == {}


def test_sparse_repeated_term_weighs_more(embedder: Embedder) -> None:
    cat = embedder.embed_query_sync("cat").sparse.indices[0]
    dog = embedder.embed_query_sync("dog").sparse.indices[0]
    w = weights(embedder, "cat cat cat dog")
    assert w[cat] > w[dog] > 0


def test_sparse_query_vector(embedder: Embedder) -> None:
    """Queries get plain term presence (the engine applies IDF); repeated terms are not counted twice."""
    sparse = embedder.embed_query_sync("the cat chased the cat up a tree").sparse
    assert len(sparse.indices) == 3  # cat, chase(d), tree
    assert list(sparse.values) == [1.0, 1.0, 1.0]
    passage = weights(embedder, "the cat chased the cat up a tree")
    assert set(sparse.indices) == set(passage)


def test_query_without_the_dense_vector_has_the_same_terms(embedder: Embedder) -> None:
    full = embedder.embed_query_sync("the cat chased the cat up a tree")
    lexical = embedder.embed_query_sync("the cat chased the cat up a tree", dense=False)
    assert lexical.dense is None
    assert full.dense is not None
    assert lexical.sparse == full.sparse


# --- tokens --------------------------------------------------------------------------------------


def test_count_tokens(embedder: Embedder) -> None:
    assert embedder.count_tokens([]) == []
    short, punctuated, pieces, long = embedder.count_tokens(
        ["hello world", "hello, world!", "tokenization", "word " * 400]
    )
    assert short == 2  # no [CLS]/[SEP]
    assert punctuated == 4  # punctuation marks are tokens
    assert pieces == 2  # token ##ization
    assert long == 400  # never truncated to the model window


# --- batching and the event loop -------------------------------------------------------------------


@pytest.mark.parametrize(("threads", "sizes_seen"), [(1, [4, 4, 2]), (2, [8, 2])])
def test_large_batches_match_one_by_one(
    model_dir: Path, tmp_path: Path, embedder: Embedder, threads: int, sizes_seen: list[int]
) -> None:
    # Calls of 4 passages; with two threads, two such calls at once (side by side on the cores).
    sizes: list[int] = []
    small = Embedder(
        Settings(
            data_dir=tmp_path,
            embedding_model_dir=model_dir,
            embedding_batch_size=4,
            embedding_threads=threads,
            _env_file=None,
        ),
        on_batch=lambda n, seconds: sizes.append(n),
    )
    texts = [f"Passage number {i} talks about topic {i * 7 % 5} in some detail." for i in range(10)]
    batched = small.embed_passages_sync(texts)
    assert sizes == sizes_seen
    for text, got in zip(texts, batched, strict=True):
        [alone] = embedder.embed_passages_sync([text])
        np.testing.assert_allclose(got.dense, alone.dense, atol=1e-5)
        assert list(got.sparse.indices) == list(alone.sparse.indices)
        np.testing.assert_allclose(got.sparse.values, alone.sparse.values, rtol=1e-6)


@pytest.mark.parametrize("threads", [None, 1, 2])
def test_queries_and_passages_get_the_same_vectors_whatever_the_threads(
    model_dir: Path, tmp_path: Path, embedder: Embedder, threads: int | None
) -> None:
    # Queries run in their own single-threaded session of the model: the same model, the same vectors.
    other = Embedder(
        Settings(data_dir=tmp_path, embedding_model_dir=model_dir, embedding_threads=threads, _env_file=None)
    )
    texts = ["Lichens grow on bare rock.", "How do glaciers carve valleys?"]
    for text, passage in zip(texts, embedder.embed_passages_sync(texts), strict=True):
        query = other.embed_query_sync(text).dense
        assert query is not None
        np.testing.assert_allclose(query, passage.dense, atol=1e-5)


IDLE_CPU_SCRIPT = """
import sys, time
from pathlib import Path
from mcp_rag.embedding import Embedder
from mcp_rag.settings import Settings

embedder = Embedder(Settings(data_dir=Path(sys.argv[2]), embedding_model_dir=Path(sys.argv[1]), _env_file=None))
embedder.load_sync()
text = "Columnar basalt forms hexagonal prisms as a thick lava flow cools. " * 12
spent = []
for _ in range(5):
    embedder.embed_passages_sync([text])  # a lone passage: the session that runs on every core
    before = time.process_time()
    time.sleep(0.2)
    spent.append(time.process_time() - before)
print(sorted(spent)[2])
"""


def test_the_model_threads_leave_the_cores_when_a_passage_is_done(model_dir: Path, tmp_path: Path) -> None:
    """ONNX Runtime's worker threads spin for about 100 ms after a run by default (about 40 ms of
    CPU here), taking a core from whatever the process does next. Measured in a process of its own:
    its CPU time while it sleeps after a passage."""
    out = subprocess.run(
        [sys.executable, "-c", IDLE_CPU_SCRIPT, str(model_dir), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert float(out.stdout.split()[-1]) < 0.01, out.stdout  # CPU seconds in 0.2 s of sleep


def test_passages_after_the_provider_closed_are_still_embedded(
    model_dir: Path, tmp_path: Path, embedder: Embedder
) -> None:
    # Shutting down while an ingest is in hand: its passages run in the calling thread instead.
    other = Embedder(Settings(data_dir=tmp_path, embedding_model_dir=model_dir, embedding_threads=2, _env_file=None))
    texts = ["Moss grows on the north side.", "Rivers carry silt to the sea.", "Owls hunt at night."]
    other.load_sync()
    other.provider.close()
    for got, expected in zip(other.embed_passages_sync(texts), embedder.embed_passages_sync(texts), strict=True):
        np.testing.assert_allclose(got.dense, expected.dense, atol=1e-5)


async def test_embedding_does_not_block_the_event_loop(embedder: Embedder) -> None:
    texts = [f"Paragraph {i}: " + "the river flows past the old mill and the meadow " * 12 for i in range(32)]
    ticks = 0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            await anyio.sleep(0.001)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        result = await embedder.embed_passages(texts)
        done.set()
    assert len(result) == len(texts)
    assert ticks >= 3


async def test_async_and_sync_agree(embedder: Embedder) -> None:
    [a] = await embedder.embed_passages(["same text"])
    [b] = embedder.embed_passages_sync(["same text"])
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-6)
    q = await embedder.embed_query("same text")
    np.testing.assert_allclose(q.dense, a.dense, atol=1e-5)
    assert await embedder.embed_passages([]) == []


# --- model identity ---------------------------------------------------------------------------------


def test_unknown_model_name_is_a_configuration_error(model_dir: Path, tmp_path: Path) -> None:
    other = Embedder(
        Settings(data_dir=tmp_path, embedding_model="other/model", embedding_model_dir=model_dir, _env_file=None)
    )
    with pytest.raises(ConfigurationError, match="other/model"):
        other.load_sync()
    assert not other.loaded


async def test_index_refuses_another_model(runtime: Runtime) -> None:
    """fastembed refuses unknown model names before any index is touched, so the mismatch is checked on the
    index itself: an index built with one model will not open for another (of any dimension)."""
    await runtime.index.close()
    with pytest.raises(ModelMismatchError) as info:
        await runtime.index.open(ModelIdentity("other", 384))
    assert "other" in str(info.value)
    assert "sentence-transformers/all-MiniLM-L6-v2" in str(info.value)
    await runtime.index.open(runtime.embedder.identity)  # the right model still opens it


async def test_runtime_over_an_index_of_another_model_is_a_configuration_error(
    make_settings: Callable[..., Settings], embedder: Embedder, index_kind: str, tmp_path: Path
) -> None:
    first, reopened = two_handles(index_kind, tmp_path / "index")
    await first.open(ModelIdentity("other/model", 384))
    await first.close()
    with pytest.raises(ConfigurationError) as info:
        async with open_runtime(make_settings(), index=reopened, embedder=embedder):
            pass
    assert "other/model" in str(info.value)
    assert "sentence-transformers/all-MiniLM-L6-v2" in str(info.value)


async def test_runtime_over_a_database_of_another_model_is_a_configuration_error(
    make_settings: Callable[..., Settings], embedder: Embedder, database_url: str
) -> None:
    """Postgres records the model its vectors belong to: a fresh index (where a reindex would
    copy those vectors) cannot hide a model switch."""
    async with open_runtime(make_settings(), embedder=embedder):
        pass  # the first runtime claims the database for the configured model
    store = Store(database_url, min_size=0, max_size=1)
    await store.open()
    try:
        assert await store.claim_model(ModelIdentity("other/model", 384)) == embedder.identity
        async with store._writing() as conn:  # as if the database had been filled by another model
            await conn.execute("UPDATE embedding_model SET name = 'other/model'")
    finally:
        await store.close()
    with pytest.raises(ConfigurationError) as info:
        async with open_runtime(make_settings(data_dir=make_settings().data_dir / "fresh"), embedder=embedder):
            pass
    assert "the database holds vectors of model fastembed:other/model (384-d" in str(info.value)
    assert "sentence-transformers/all-MiniLM-L6-v2" in str(info.value)


def test_a_character_budget_counts_and_clips_by_characters() -> None:
    budget = CharacterBudget(window_tokens=100, chars_per_token=3.0)
    assert budget.window_tokens == 100
    assert budget.count(["", "abc", "abcd", "x" * 300]) == [0, 1, 2, 100]
    assert budget.clip(["abcdefgh", "ab"], 2) == ["abcdef", "ab"]
