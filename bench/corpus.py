"""Benchmark corpora of a given size, written through the real store and sync path.

Embedding 100k chunks takes about an hour on two cores, so the large corpora are made
from the real embedded chunks of the dataset (the *seed*, embedded once and cached) plus
synthetic copies of them:

* copy 0 is every seed document as ingested (real text, real dense and BM25 vectors);
* copy j >= 1 of a document keeps its chunks' text and BM25 vector, and replaces each
  chunk's dense vector by ``normalize(a * v + (1 - a) * w)`` where ``v`` is the chunk's own
  vector, ``w`` the vector of a random other seed chunk and ``a`` uniform in [0.55, 0.90]
  (seeded RNG): points that stay inside the cone of real embeddings, near real queries,
  without being duplicates. Its source URI is ``bench://synthetic/<j>/<corpus id>``.

Documents are stored with ``Store.write_documents`` (one transaction per batch, change-log
entries included) and indexed with ``IndexSyncer.catch_up`` into an Edge index, exactly as
an ingest does after embedding. A built corpus is kept as a template database plus an index
directory, and copied (``CREATE DATABASE ... TEMPLATE``) for each use.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from bench.common import TENANT, Postgres, file_key, log, read_corpus, write_subset

SEED_COLLECTION = "seed"
CORPUS_COLLECTION = "bench"


@dataclass
class Seed:
    key: str
    docs: list[dict[str, Any]]  # corpus_id, title, content, chunk range [first, last)
    chunks: list[dict[str, Any]]  # position, text, start, end, heading_path, sparse indices/values
    dense: np.ndarray[Any, np.dtype[np.float32]]
    model_name: str  # the identity of the build that embedded it (the server must load the same)

    @property
    def dimension(self) -> int:
        return int(self.dense.shape[1])


def model_name(model: Path) -> str:
    """The identity name a server gives the default model's build in ``model``."""
    from mcp_rag.embedding import DEFAULT_MODEL
    from mcp_rag.embedding.model_build import folder_quantization, identity_name

    return identity_name(DEFAULT_MODEL, folder_quantization(model) or "none")


def settings_for(data_dir: Path, database_url: str, model: Path, **extra: Any) -> Any:
    from mcp_rag.settings import Settings

    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        embedding_model_dir=model,  # type: ignore[call-arg]
        sync_in_server=False,
        _env_file=None,
        **extra,
    )


def load_seed(dataset: Path, doc_limit: int | None, model: Path, pg: Postgres, work: Path) -> Seed:
    """The dataset's first ``doc_limit`` documents, chunked and embedded by the real ingest (cached)."""
    corpus = dataset / "corpus.jsonl"
    # v2: chunks of even size; the identity name: another build (or run) of the model embeds anew
    key = file_key("seed-v2", corpus, doc_limit, model, model_name(model))
    cache_npz = work / "seeds" / f"seed-{key}.npz"
    cache_json = cache_npz.with_suffix(".json")
    if cache_npz.is_file() and cache_json.is_file():
        meta = json.loads(cache_json.read_text())
        dense = np.load(cache_npz)["dense"]
        return Seed(key, meta["docs"], meta["chunks"], dense, model_name(model))
    docs = read_corpus(dataset, doc_limit)
    log(f"embedding the seed corpus once ({len(docs)} documents; cached in {cache_npz.parent})")
    subset = write_subset(docs, work / "seeds" / f"seed-{key}", "corpus.jsonl")
    seed = anyio.run(_embed_seed, subset, model, pg, work / "seeds" / f"seed-{key}", key)
    cache_npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_npz, dense=seed.dense)
    cache_json.write_text(json.dumps({"docs": seed.docs, "chunks": seed.chunks}))
    shutil.rmtree(subset.parent, ignore_errors=True)
    return seed


async def _embed_seed(corpus: Path, model: Path, pg: Postgres, scratch: Path, key: str) -> Seed:
    from mcp_rag.extract import iter_corpus
    from mcp_rag.runtime import open_runtime

    db = f"bench_seed_{key}"
    dsn = pg.create(db)
    try:
        settings = settings_for(scratch / "data", dsn, model)
        async with open_runtime(settings, follow_changes=False) as rt:
            docs = list(iter_corpus(corpus, settings.max_document_bytes))
            report = await rt.service.ingest(TENANT, SEED_COLLECTION, docs)
            log(f"seed: {report.added} documents, {report.chunks} chunks")
            async with rt.store._reading() as conn:
                cur = await conn.execute(
                    """SELECT d.metadata->>'corpus_id', d.title, d.content, c.position, c.text, c.start_char,
                              c.end_char, c.heading_path, c.dense, c.sparse_indices, c.sparse_values
                       FROM chunks c JOIN documents d ON d.id = c.document_id
                       ORDER BY d.source_uri, c.position"""
                )
                rows = await cur.fetchall()
    finally:
        pg.drop(db)
    out_docs: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []
    vectors = []
    for r in rows:
        if not out_docs or out_docs[-1]["corpus_id"] != r[0]:
            out_docs.append({"corpus_id": r[0], "title": r[1], "content": r[2], "first": len(chunks)})
        chunks.append(
            {
                "position": r[3],
                "text": r[4],
                "start": r[5],
                "end": r[6],
                "heading_path": list(r[7]),
                "indices": list(r[9]),
                "values": list(r[10]),
            }
        )
        vectors.append(np.frombuffer(r[8], dtype="<f4"))
        out_docs[-1]["last"] = len(chunks)
    return Seed(key, out_docs, chunks, np.stack(vectors).astype(np.float32), model_name(model))


def synthetic_dense(seed: Seed, copy: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    if copy == 0:
        return seed.dense
    rng = np.random.default_rng(1_000_003 * copy + 17)
    n = seed.dense.shape[0]
    partners = rng.integers(0, n, n)
    a = rng.uniform(0.55, 0.90, n).astype(np.float32)[:, None]
    mixed = a * seed.dense + (1 - a) * seed.dense[partners]
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    return mixed.astype(np.float32)


@dataclass
class Corpus:
    template_db: str
    index_dir: Path
    chunks: int
    documents: int
    real_chunks: int

    def materialize(self, pg: Postgres, db_name: str, data_dir: Path) -> str:
        """A private copy: a database from the template and the index copied into ``data_dir/index``."""
        dsn = pg.create(db_name, template=self.template_db)
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(data_dir / "index", ignore_errors=True)
        shutil.copytree(self.index_dir, data_dir / "index")
        return dsn


SHARD_FORMAT = 2
"""Bumped when the embedded index's files change, so that cached corpora are built again (2: no WAL)."""


def build_corpus(seed: Seed, chunks: int, pg: Postgres, work: Path) -> Corpus:
    """A corpus of (at least) ``chunks`` chunks; built once per seed, size and Postgres server."""
    name = f"bench_c{seed.key}_{chunks}_s{SHARD_FORMAT}"
    folder = work / "corpora" / name
    done = folder / "corpus.json"
    if done.is_file() and pg.exists(name):
        info = json.loads(done.read_text())
        return Corpus(name, folder / "index", info["chunks"], info["documents"], info["real_chunks"])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log(f"building a {chunks}-chunk corpus ({name})")
    dsn = pg.create(name)
    info = anyio.run(_build, seed, chunks, dsn, folder / "index")
    done.write_text(json.dumps(info))
    return Corpus(name, folder / "index", info["chunks"], info["documents"], info["real_chunks"])


async def _build(seed: Seed, target: int, dsn: str, index_dir: Path) -> dict[str, int]:
    from mcp_rag.extract import SourceDocument
    from mcp_rag.index.qdrant_edge import EdgeIndex
    from mcp_rag.service import content_hash
    from mcp_rag.store.migrate import migrate
    from mcp_rag.store.postgres import DocumentWrite, NewChunk, Store
    from mcp_rag.sync import IndexSyncer
    from mcp_rag.types import ModelIdentity, SparseVector

    await migrate(dsn)
    store = Store(dsn, max_size=2)
    await store.open()
    index = EdgeIndex(index_dir)
    await index.open(ModelIdentity(seed.model_name, seed.dimension))
    syncer = IndexSyncer(store, index)
    written = documents = real = 0
    try:
        copy = 0
        while written < target:
            dense = synthetic_dense(seed, copy)
            batch: list[DocumentWrite] = []
            for doc in seed.docs:
                if written >= target:
                    break
                uri = (
                    f"file:///bench/corpus.jsonl#{doc['corpus_id']}"
                    if copy == 0
                    else f"bench://synthetic/{copy}/{doc['corpus_id']}"
                )
                title = doc["title"] if copy == 0 else f"{doc['title']} (synthetic {copy})"
                metadata = {"corpus_id": doc["corpus_id"], "copy": copy}
                source = SourceDocument(uri, doc["content"], title=title, metadata=metadata)
                new_chunks = []
                for i in range(doc["first"], doc["last"]):
                    c = seed.chunks[i]
                    new_chunks.append(
                        NewChunk(
                            c["position"],
                            c["text"],
                            c["start"],
                            c["end"],
                            tuple(c["heading_path"]),
                            dense[i],
                            SparseVector(c["indices"], c["values"]),
                        )
                    )
                batch.append(
                    DocumentWrite(
                        TENANT,
                        CORPUS_COLLECTION,
                        uri,
                        title,
                        metadata,
                        doc["content"],
                        content_hash(source),
                        new_chunks,
                    )
                )
                written += len(new_chunks)
                documents += 1
                if copy == 0:
                    real += len(new_chunks)
                if len(batch) >= 200:
                    await store.write_documents(batch)
                    batch = []
            if batch:
                await store.write_documents(batch)
            await syncer.catch_up()
            log(f"  corpus: {written} chunks written and indexed")
            copy += 1
        await index.settle()  # compacted, as a bulk `mcp-rag ingest` leaves it
    finally:
        await index.close()
        await store.close()
    return {"chunks": written, "documents": documents, "real_chunks": real}
