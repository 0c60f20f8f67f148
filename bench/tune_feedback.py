"""What pseudo-relevance feedback, title weighting and other ways of scoring could add to hybrid
search, on a BEIR dataset, from one ingest: nDCG@10 of the ten documents the search tool returns
(``top_k=10``, one hit per document) and Recall@100 of the documents folded from the first 200 hits.

    python -m bench.tune_feedback ../shared/eval/scifact-train --data-dir /var/tmp/mcp-rag-tune-docs

Reuses the store ``bench.tune_documents`` ingests (the ingest is skipped when the collection already
holds every document; nothing is embedded again). Every configuration is scored in memory on the
store's own vectors, the way the index scores them: cosine on the dense side, ``sum(query weight *
IDF * stored BM25 weight)`` with Qdrant's IDF on the lexical side, 200 candidates a side, DBSF
fusion. The ``baseline`` row must therefore agree with ``mcp-rag eval`` (0.7406 / 0.9596 on
SciFact-train): that checks the simulation. Each row also gives nDCG@10 on each half of the queries
and the mean per-query difference from the baseline with its standard error.

Grids (``--grids``, comma-separated):
* ``prf-lex``: RM3-style lexical feedback. The best chunks of the first ``k`` documents of the fused
  ranking give term weights (each chunk's stored BM25 weights normalised to sum 1, summed over the
  feedback chunks; ``sel=tfidf`` multiplies by the term's IDF when choosing); the ``m`` heaviest
  terms form the expansion; the new lexical query is ``alpha * query + (1 - alpha) * expansion``
  (each normalised to sum 1, the index applying IDF on top), fused again with the same dense list.
* ``prf-dense``: Rocchio on the query vector: ``q + beta * mean(feedback chunk vectors)``.
* ``title``: a third DBSF signal, the query against the documents' titles alone (BM25 with the
  titles' own IDF, or cosine with the titles' embeddings), weight ``w``.
* ``lexical``: lexical-only search with and without feedback.
* ``fusion``: DBSF weights, DBSF with a missing side's real score, min-max convex combinations.
* ``doc``: fusion over documents (each side's best chunk; or the mean chunk vector on the dense side).
* ``doctext``: BM25 of the whole document (title and every chunk) on the lexical side.
* ``stack``: the best of the above together.
* ``bm25``: BM25 parameters (k1, b, average length), the passages' sparse vectors computed again.
Prints one JSON line per configuration, best last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio
import numpy as np
from fastembed.common.utils import remove_non_alphanumeric

from bench.tune_fusion import COLLECTION, ingest_corpus
from mcp_rag.evaluation import load_qrels, load_queries, ndcg_at_k, recall_at_k
from mcp_rag.extract import iter_corpus
from mcp_rag.index.base import FusionParams, IndexQuery, SearchFilter
from mcp_rag.logging import configure_logging
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.settings import Settings
from mcp_rag.types import SparseVector

CANDIDATES = 200
FOLDED = 200
TOOL_TOP_K = 10

Scores = dict[int, float]  # chunk (row number) -> score
K = TypeVar("K")


@dataclass
class Corpus:
    ids: list[int]
    """Chunk id of each chunk row."""
    doc_of: list[str]
    """Corpus id of each chunk row."""
    dense: np.ndarray
    sparse: list[dict[int, float]]
    postings: dict[int, tuple[np.ndarray, np.ndarray]]
    idf: dict[int, float]
    doc_rows: dict[str, list[int]]


def qdrant_idf(n_points: int, df: int) -> float:
    """The IDF the index applies to a sparse term (Qdrant's modifier)."""
    return math.log((n_points - df + 0.5) / (df + 0.5) + 1.0)


def build_postings(
    vectors: Sequence[dict[int, float]],
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[int, float]]:
    rows: dict[int, list[int]] = {}
    weights: dict[int, list[float]] = {}
    for row, vec in enumerate(vectors):
        for term, w in vec.items():
            rows.setdefault(term, []).append(row)
            weights.setdefault(term, []).append(w)
    postings = {t: (np.array(rows[t]), np.array(weights[t], dtype=np.float64)) for t in rows}
    idf = {t: qdrant_idf(len(vectors), len(rows[t])) for t in rows}
    return postings, idf


def sparse_scores(
    query: dict[int, float],
    postings: dict[int, tuple[np.ndarray, np.ndarray]],
    idf: dict[int, float],
    n: int,
    limit: int = CANDIDATES,
) -> Scores:
    total = np.zeros(n)
    touched = np.zeros(n, dtype=bool)
    for term, qw in query.items():
        if term in postings:
            rows, w = postings[term]
            np.add.at(total, rows, qw * idf[term] * w)
            touched[rows] = True
    idx = np.flatnonzero(touched)
    return top(dict(zip(idx.tolist(), total[idx].tolist(), strict=True)), limit)


def sparse_scores_all(
    query: dict[int, float], postings: dict[int, tuple[np.ndarray, np.ndarray]], idf: dict[int, float], n: int
) -> np.ndarray:
    total = np.zeros(n)
    for term, qw in query.items():
        if term in postings:
            rows, w = postings[term]
            np.add.at(total, rows, qw * idf[term] * w)
    return total


def dense_scores(vector: np.ndarray, matrix: np.ndarray, limit: int = CANDIDATES) -> Scores:
    sims = matrix @ vector
    idx = np.argpartition(-sims, limit)[:limit] if len(sims) > limit else np.arange(len(sims))
    return {int(i): float(sims[i]) for i in idx}


def top(scores: Scores, n: int) -> Scores:
    return dict(sorted(scores.items(), key=lambda kv: -kv[1])[:n])


def dbsf(scores: Mapping[K, float]) -> dict[K, float]:
    """(s - (mean - 3 sd)) / (6 sd), as Qdrant's DBSF normalises each prefetch."""
    if not scores:
        return {}
    values = np.array(list(scores.values()))
    mean, sd = float(values.mean()), float(values.std()) or 1.0
    low = mean - 3 * sd
    return {k: (v - low) / (6 * sd) for k, v in scores.items()}


def fuse(*sides: tuple[Scores, float]) -> list[int]:
    total: dict[int, float] = {}
    for scores, weight in sides:
        for k, v in dbsf(scores).items():
            total[k] = total.get(k, 0.0) + weight * v
    return sorted(total, key=lambda k: -total[k])


def fuse_documents(
    corpus: Corpus, *sides: tuple[Scores, float], titles: tuple[Scores, float] | None = None
) -> list[int]:
    """DBSF over documents: each side scores a document by its best chunk; ``titles`` (scores by title
    row, which is the document's place in sorted corpus ids) adds a document-level signal. Returns
    each document's best chunk, best document first."""
    total: dict[str, float] = {}
    rep: dict[str, int] = {}
    for scores, weight in sides:
        best: dict[str, tuple[int, float]] = {}
        for r, v in sorted(scores.items(), key=lambda kv: -kv[1]):
            best.setdefault(corpus.doc_of[r], (r, v))
        for doc, v in dbsf({d: score for d, (_, score) in best.items()}).items():
            total[doc] = total.get(doc, 0.0) + weight * v
            rep.setdefault(doc, best[doc][0])
    if titles is not None:
        doc_ids = sorted(corpus.doc_rows)
        scores, weight = titles
        for i, v in dbsf(scores).items():
            if doc_ids[i] in total:
                total[doc_ids[i]] += weight * v
    return [rep[d] for d in sorted(total, key=lambda d: -total[d])]


def documents(ranked_chunks: Sequence[int], corpus: Corpus, limit: int | None = None) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for row in ranked_chunks:
        doc = corpus.doc_of[row]
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
            if limit is not None and len(out) >= limit:
                break
    return out


def best_chunks(ranked_chunks: Sequence[int], corpus: Corpus, k: int) -> list[int]:
    """The best chunk of each of the first ``k`` documents."""
    out: list[int] = []
    seen: set[str] = set()
    for row in ranked_chunks:
        doc = corpus.doc_of[row]
        if doc not in seen:
            seen.add(doc)
            out.append(row)
            if len(out) >= k:
                break
    return out


def expansion(feedback: Sequence[int], corpus: Corpus, m: int, by_idf: bool) -> dict[int, float]:
    """The ``m`` heaviest terms of the feedback chunks, weights summing to 1."""
    weights: dict[int, float] = {}
    for row in feedback:
        vec = corpus.sparse[row]
        norm = sum(vec.values()) or 1.0
        for term, w in vec.items():
            weights[term] = weights.get(term, 0.0) + w / norm
    if by_idf:
        weights = {t: w * corpus.idf.get(t, 0.0) for t in weights}
    chosen = dict(sorted(weights.items(), key=lambda kv: -kv[1])[:m])
    total = sum(chosen.values()) or 1.0
    return {t: w / total for t, w in chosen.items()}


def mix(query: dict[int, float], extra: dict[int, float], alpha: float) -> dict[int, float]:
    qn = sum(query.values()) or 1.0
    out = {t: alpha * w / qn for t, w in query.items()}
    for t, w in extra.items():
        out[t] = out.get(t, 0.0) + (1 - alpha) * w
    return out


async def load_corpus(rt: Runtime, dataset: Path) -> tuple[Corpus, dict[str, str], list[str]]:
    tenant = rt.settings.default_tenant
    expected = sum(1 for d in iter_corpus(dataset / "corpus.jsonl", rt.settings.max_document_bytes) if d.text.strip())
    async with rt.store._reading() as conn:  # a benchmark may peek
        cur = await conn.execute(
            "SELECT count(*) FROM documents WHERE tenant = %s AND collection = %s", (tenant, COLLECTION)
        )
        row = await cur.fetchone()
        have = int(row[0]) if row else 0
    if have != expected:
        await ingest_corpus(rt, dataset)
    print(json.dumps({"store": {"documents": expected, "ingest_skipped": have == expected}}), flush=True)
    async with rt.store._reading() as conn:
        cur = await conn.execute(
            "SELECT d.metadata->>'corpus_id', d.title, c.dense, c.sparse_indices, c.sparse_values, c.text, c.id"
            " FROM chunks c JOIN documents d ON d.id = c.document_id"
            " WHERE d.tenant = %s AND d.collection = %s ORDER BY c.id",
            (tenant, COLLECTION),
        )
        rows = await cur.fetchall()
    doc_of = [r[0] for r in rows]
    dense = np.stack([np.frombuffer(r[2], dtype="<f4") for r in rows]).astype(np.float64)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    sparse = [dict(zip(r[3], r[4], strict=True)) for r in rows]
    postings, idf = build_postings(sparse)
    doc_rows: dict[str, list[int]] = {}
    for i, d in enumerate(doc_of):
        doc_rows.setdefault(d, []).append(i)
    titles = {r[0]: r[1] or "" for r in rows}
    return Corpus([r[6] for r in rows], doc_of, dense, sparse, postings, idf, doc_rows), titles, [r[5] for r in rows]


async def verify(
    rt: Runtime,
    corpus: Corpus,
    q_dense: dict[str, np.ndarray],
    q_sparse: dict[str, dict[int, float]],
    qids: Sequence[str],
    qrels: dict[str, dict[str, int]],
) -> None:
    """The same queries through the real index (one fused DBSF query, 200 candidates a side, as search
    sends it), plain and with lexical feedback (k 10, m 20, alpha 0.8): the top ten documents and
    nDCG@10 must agree with the in-memory scoring."""
    flt = SearchFilter(tenant=rt.settings.default_tenant, collections=[COLLECTION])
    row_of = {cid: i for i, cid in enumerate(corpus.ids)}
    n = len(corpus.ids)
    for name in ("baseline", "prf-lex k=10 m=20 sel=tf alpha=0.8"):
        same = 0
        ndcg_sim = ndcg_index = 0.0
        for q in qids:
            dense = dense_scores(q_dense[q], corpus.dense)
            lexical = q_sparse[q]
            if name != "baseline":
                fused = fuse((dense, 1.0), (sparse_scores(lexical, corpus.postings, corpus.idf, n), 1.0))
                lexical = mix(lexical, expansion(best_chunks(fused, corpus, 10), corpus, 20, False), 0.8)
            simulated = documents(
                fuse((dense, 1.0), (sparse_scores(lexical, corpus.postings, corpus.idf, n), 1.0)), corpus, TOOL_TOP_K
            )
            hits = await rt.index.query(
                IndexQuery(
                    filter=flt,
                    limit=TOOL_TOP_K * 4,
                    dense=q_dense[q].tolist(),
                    sparse=SparseVector(indices=list(lexical), values=list(lexical.values())),
                    fusion=FusionParams("dbsf", prefetch_limit=CANDIDATES),
                )
            )
            indexed = documents([row_of[h.id] for h in hits], corpus, TOOL_TOP_K)
            same += simulated == indexed
            ndcg_sim += ndcg_at_k(simulated, qrels[q])
            ndcg_index += ndcg_at_k(indexed, qrels[q])
        print(
            json.dumps(
                {
                    "verify": name,
                    "queries": len(qids),
                    "same_top10": same,
                    "ndcg@10 in memory": round(ndcg_sim / len(qids), 4),
                    "ndcg@10 index": round(ndcg_index / len(qids), 4),
                }
            ),
            flush=True,
        )


async def main(
    dataset: Path, data_dir: Path, max_queries: int | None, cache: Path, grids: set[str], verify_queries: int
) -> None:
    settings = Settings(data_dir=data_dir, sync_in_server=False, _env_file=None)  # type: ignore[call-arg]
    queries = load_queries(dataset / "queries.jsonl")
    qrels = load_qrels(dataset / "qrels.tsv")
    judged = [q for q in queries if q in qrels][:max_queries]
    async with open_runtime(settings) as rt:
        corpus, titles, chunk_texts = await load_corpus(rt, dataset)
        started = time.perf_counter()
        q_dense: dict[str, np.ndarray] = {}
        q_sparse: dict[str, dict[int, float]] = {}
        for q in judged:
            e = rt.embedder.embed_query_sync(queries[q])
            assert e.dense is not None
            v = np.asarray(e.dense, dtype=np.float64)
            q_dense[q] = v / np.linalg.norm(v)
            q_sparse[q] = dict(zip(e.sparse.indices, e.sparse.values, strict=True))
        title_docs = sorted(titles)
        title_dense = np.load(cache) if cache.exists() else np.zeros((0, 0))
        if title_dense.shape[0] != len(title_docs):
            embedded = rt.embedder.embed_passages_sync([titles[d] for d in title_docs])
            title_dense = np.stack([np.asarray(x.dense, dtype=np.float64) for x in embedded])
            np.save(cache, title_dense)
        title_dense /= np.linalg.norm(title_dense, axis=1, keepdims=True)
        title_sparse_vecs: list[SparseVector] = rt.embedder._bm25.embed_passages([titles[d] for d in title_docs])
        bm25_model = rt.embedder._bm25._model.model  # a benchmark may peek: fastembed's BM25 itself
        bm25_texts = [f"{titles[d]}\n{t}" if titles[d] else t for d, t in zip(corpus.doc_of, chunk_texts, strict=True)]
        print(json.dumps({"prepared_seconds": round(time.perf_counter() - started, 1)}), flush=True)
        if verify_queries:
            await verify(rt, corpus, q_dense, q_sparse, judged[:verify_queries], qrels)
    title_sparse = [dict(zip(s.indices, s.values, strict=True)) for s in title_sparse_vecs]
    t_postings, t_idf = build_postings(title_sparse)
    n = len(corpus.doc_of)

    base_dense = {q: dense_scores(q_dense[q], corpus.dense) for q in judged}
    base_sparse = {q: sparse_scores(q_sparse[q], corpus.postings, corpus.idf, n) for q in judged}
    base_fused = {q: fuse((base_dense[q], 1.0), (base_sparse[q], 1.0)) for q in judged}

    rows: list[dict[str, object]] = []
    base_ndcg: list[float] = []  # per query, of the first configuration reported (the baseline)

    def report(name: str, ranking: Callable[[str], list[int]]) -> None:
        ndcg: list[float] = []
        recall = 0.0
        for q in judged:
            ranked = ranking(q)
            ndcg.append(ndcg_at_k(documents(ranked, corpus, TOOL_TOP_K), qrels[q]))
            recall += recall_at_k(documents(ranked[:FOLDED], corpus), qrels[q])
        half = len(judged) // 2
        if not base_ndcg:
            base_ndcg.extend(ndcg)
        diff = np.array(ndcg) - np.array(base_ndcg)
        row = {
            "config": name,
            "ndcg@10": round(sum(ndcg) / len(judged), 4),
            "recall@100": round(recall / len(judged), 4),
            "halves": [round(sum(ndcg[:half]) / half, 4), round(sum(ndcg[half:]) / (len(judged) - half), 4)],
            "vs_baseline": [round(float(diff.mean()), 4), round(float(diff.std(ddof=1) / math.sqrt(len(diff))), 4)],
            "queries": len(judged),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    report("baseline (dbsf 1:1 over chunks)", lambda q: base_fused[q])
    if "lexical" in grids:
        report("lexical only", lambda q: sorted(base_sparse[q], key=lambda r: -base_sparse[q][r]))
        for k, m, alpha in ((3, 10, 0.5), (5, 10, 0.5), (5, 20, 0.7), (10, 20, 0.7)):

            def lex_only(q: str, k: int = k, m: int = m, alpha: float = alpha) -> list[int]:
                ranked = sorted(base_sparse[q], key=lambda r: -base_sparse[q][r])
                fb = best_chunks(ranked, corpus, k)
                expanded = mix(q_sparse[q], expansion(fb, corpus, m, False), alpha)
                s = sparse_scores(expanded, corpus.postings, corpus.idf, n)
                return sorted(s, key=lambda r: -s[r])

            report(f"lexical only + prf-lex k={k} m={m} sel=tf alpha={alpha}", lex_only)

    if "doc" in grids:
        for ws in (1.0, 1.25):

            def doc_level(q: str, ws: float = ws) -> list[int]:
                return fuse_documents(corpus, (base_dense[q], 1.0), (base_sparse[q], ws))

            report(f"doc-level dbsf 1:{ws}", doc_level)

        # A document's dense score as the cosine with the mean of its chunk vectors (not its best chunk).
        doc_ids = sorted(corpus.doc_rows)
        mean_vectors = np.stack([corpus.dense[corpus.doc_rows[d]].mean(axis=0) for d in doc_ids])
        mean_vectors /= np.linalg.norm(mean_vectors, axis=1, keepdims=True)
        for ws in (1.0, 1.25):

            def mean_dense(q: str, ws: float = ws) -> list[int]:
                dense_docs = dense_scores(q_dense[q], mean_vectors)
                best: dict[str, int] = {}
                for r, _ in sorted(base_sparse[q].items(), key=lambda kv: -kv[1]):
                    best.setdefault(corpus.doc_of[r], r)
                lex = {d: base_sparse[q][r] for d, r in best.items()}
                total = {doc_ids[i]: v for i, v in dbsf(dense_docs).items()}
                for d, v in dbsf(lex).items():
                    total[d] = total.get(d, 0.0) + ws * v
                return [best.get(d, corpus.doc_rows[d][0]) for d in sorted(total, key=lambda d: -total[d])]

            report(f"doc-level dbsf, dense = cosine with the mean chunk vector, 1:{ws}", mean_dense)

    if "doctext" in grids:
        # Lexical evidence of the whole document (title + every chunk) instead of one chunk.
        doc_ids = sorted(corpus.doc_rows)
        doc_texts = [" ".join([titles[d]] + [chunk_texts[r] for r in corpus.doc_rows[d]]) for d in doc_ids]
        doc_vectors = [
            dict(zip(e.indices.tolist(), e.values.tolist(), strict=True)) for e in bm25_model.raw_embed(doc_texts)
        ]
        d_postings, d_idf = build_postings(doc_vectors)
        doc_lex = {q: sparse_scores(q_sparse[q], d_postings, d_idf, len(doc_ids)) for q in judged}
        report(
            "lexical only, whole documents",
            lambda q: [corpus.doc_rows[doc_ids[i]][0] for i in sorted(doc_lex[q], key=lambda i: -doc_lex[q][i])],
        )
        for ws in (1.0, 1.25):
            for chunk_side in (0.0, 0.5):

                def whole(q: str, ws: float = ws, chunk_side: float = chunk_side) -> list[int]:
                    best: dict[str, tuple[int, float]] = {}
                    for r, v in sorted(base_dense[q].items(), key=lambda kv: -kv[1]):
                        best.setdefault(corpus.doc_of[r], (r, v))
                    dn = dbsf({d: v for d, (_, v) in best.items()})
                    ln = dbsf({doc_ids[i]: v for i, v in doc_lex[q].items()})
                    total: dict[str, float] = {d: v for d, v in dn.items()}
                    for d, v in ln.items():
                        total[d] = total.get(d, 0.0) + ws * v
                    if chunk_side:
                        cbest: dict[str, float] = {}
                        for r, v in sorted(base_sparse[q].items(), key=lambda kv: -kv[1]):
                            cbest.setdefault(corpus.doc_of[r], v)
                        for d, v in dbsf(cbest).items():
                            total[d] = total.get(d, 0.0) + chunk_side * v
                    rep = {d: r for d, (r, _) in best.items()}
                    return [rep.get(d, corpus.doc_rows[d][0]) for d in sorted(total, key=lambda d: -total[d])]

                report(
                    f"doc-level dbsf: best dense chunk 1 : whole-document BM25 {ws} : best BM25 chunk {chunk_side}",
                    whole,
                )

    if "stack" in grids:
        # The best of each kind together: an upper bound of what stacking them could give on this split.
        for k, m, alpha, tw in ((10, 20, 0.8, 0.1), (5, 20, 0.8, 0.1), (10, 20, 0.8, 0.0)):

            def stacked(q: str, k: int = k, m: int = m, alpha: float = alpha, tw: float = tw) -> list[int]:
                fb = best_chunks(base_fused[q], corpus, k)
                expanded = mix(q_sparse[q], expansion(fb, corpus, m, False), alpha)
                lex = sparse_scores(expanded, corpus.postings, corpus.idf, n)
                t = dense_scores(q_dense[q], title_dense) if tw else None
                return fuse_documents(
                    corpus, (base_dense[q], 1.0), (lex, 1.25), titles=(t, tw) if t is not None else None
                )

            report(f"stacked: doc-level dbsf 1:1.25 + prf-lex k={k} m={m} alpha={alpha} + title-dense w={tw}", stacked)

    if "bm25" in grids:
        texts = bm25_texts
        for k1, b, avg in (
            (1.2, 0.75, 256.0),
            (1.2, 0.75, 0.0),
            (0.9, 0.4, 256.0),
            (0.9, 0.4, 0.0),
            (1.2, 0.4, 0.0),
            (1.5, 0.75, 0.0),
        ):
            model = bm25_model
            lengths = [len(model._stem(model.tokenizer.tokenize(remove_non_alphanumeric(t)))) for t in texts]
            model.k, model.b = k1, b
            model.avg_len = avg or sum(lengths) / len(lengths)
            vectors = [dict(zip(e.indices.tolist(), e.values.tolist(), strict=True)) for e in model.raw_embed(texts)]
            same = sum(1 for a, c in zip(vectors, corpus.sparse, strict=True) if a.keys() == c.keys())
            postings, idf = build_postings(vectors)
            lex = {q: sparse_scores(q_sparse[q], postings, idf, n) for q in judged}
            tag = f"k1={k1} b={b} avg_len={round(model.avg_len, 1)}"
            print(json.dumps({"bm25": tag, "same_terms_as_stored": same, "chunks": n}), flush=True)

            def lexical(q: str, lex: dict[str, Scores] = lex) -> list[int]:
                return sorted(lex[q], key=lambda r: -lex[q][r])

            def hybrid(q: str, lex: dict[str, Scores] = lex) -> list[int]:
                return fuse((base_dense[q], 1.0), (lex[q], 1.0))

            report(f"lexical only, BM25 {tag}", lexical)
            report(f"hybrid dbsf 1:1, BM25 {tag}", hybrid)

    if "fusion" in grids:
        for ws in (0.8, 1.25, 1.5):

            def weighted(q: str, ws: float = ws) -> list[int]:
                return fuse((base_dense[q], 1.0), (base_sparse[q], ws))

            report(f"dbsf 1:{ws}", weighted)

        def complete(q: str, ws: float = 1.0) -> list[int]:
            """DBSF where a chunk missing from one side's candidates gets its real score on that side
            (normalised with that side's candidate statistics) instead of 0."""
            d, s = base_dense[q], base_sparse[q]
            union = list(d.keys() | s.keys())
            d_all = corpus.dense[union] @ q_dense[q]
            s_all = sparse_scores_all(q_sparse[q], corpus.postings, corpus.idf, n)[union]
            total = np.zeros(len(union))
            for values, cand, w in ((d_all, d, 1.0), (s_all, s, ws)):
                arr = np.array(list(cand.values()))
                mean, sd = float(arr.mean()), float(arr.std()) or 1.0
                total += w * (values - (mean - 3 * sd)) / (6 * sd)
            return [union[i] for i in np.argsort(-total)]

        for ws in (1.0, 1.25):
            report(f"dbsf 1:{ws} with the missing side's real score", partial(complete, ws=ws))
        for lam in (0.3, 0.4, 0.5, 0.6, 0.7):
            for low in ("list", "theory"):

                def convex(q: str, lam: float = lam, low: str = low) -> list[int]:
                    d, s = base_dense[q], base_sparse[q]
                    d_lo = min(d.values()) if low == "list" else -1.0
                    s_lo = min(s.values()) if low == "list" else 0.0
                    d_hi, s_hi = max(d.values()), max(s.values())
                    total: dict[int, float] = {}
                    for r, v in d.items():
                        total[r] = lam * (v - d_lo) / ((d_hi - d_lo) or 1.0)
                    for r, v in s.items():
                        total[r] = total.get(r, 0.0) + (1 - lam) * (v - s_lo) / ((s_hi - s_lo) or 1.0)
                    return sorted(total, key=lambda r: -total[r])

                report(f"min-max convex dense={lam} min={low}", convex)

    for k in (3, 5, 10) if "prf-lex" in grids else ():
        for m in (5, 10, 20):
            for sel in ("tf", "tfidf"):
                for alpha in (0.5, 0.7, 0.8):

                    def prf_lex(q: str, k: int = k, m: int = m, sel: str = sel, alpha: float = alpha) -> list[int]:
                        fb = best_chunks(base_fused[q], corpus, k)
                        expanded = mix(q_sparse[q], expansion(fb, corpus, m, sel == "tfidf"), alpha)
                        s = sparse_scores(expanded, corpus.postings, corpus.idf, n)
                        return fuse((base_dense[q], 1.0), (s, 1.0))

                    report(f"prf-lex k={k} m={m} sel={sel} alpha={alpha}", prf_lex)

    for k in (3, 5, 10) if "prf-dense" in grids else ():
        for beta in (0.25, 0.5, 1.0):

            def prf_dense(q: str, k: int = k, beta: float = beta) -> list[int]:
                fb = best_chunks(base_fused[q], corpus, k)
                v = q_dense[q] + beta * corpus.dense[fb].mean(axis=0)
                d = dense_scores(v / np.linalg.norm(v), corpus.dense)
                return fuse((d, 1.0), (base_sparse[q], 1.0))

            report(f"prf-dense k={k} beta={beta}", prf_dense)

    doc_index = {d: i for i, d in enumerate(title_docs)}
    for kind in ("bm25", "dense") if "title" in grids else ():
        for w in (0.1, 0.25, 0.5):

            def titled(q: str, kind: str = kind, w: float = w) -> list[int]:
                if kind == "bm25":
                    t = sparse_scores(q_sparse[q], t_postings, t_idf, len(title_docs))
                else:
                    t = dense_scores(q_dense[q], title_dense)
                t_norm = dbsf(t)
                fused_d = dbsf(base_dense[q])
                fused_s = dbsf(base_sparse[q])
                total: dict[int, float] = {}
                for row in fused_d.keys() | fused_s.keys():
                    title_part = t_norm.get(doc_index[corpus.doc_of[row]], 0.0)
                    total[row] = fused_d.get(row, 0.0) + fused_s.get(row, 0.0) + w * title_part
                return sorted(total, key=lambda r: -total[r])

            report(f"title-{kind} w={w}", titled)

    best = max(rows, key=lambda r: float(r["ndcg@10"]))  # type: ignore[arg-type]
    print(json.dumps({"best": best}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/mcp-rag-tune-docs"))
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--grids", default="prf-lex,prf-dense,title,lexical,fusion,doc,doctext,stack,bm25")
    parser.add_argument(
        "--title-cache",
        type=Path,
        default=Path("/var/tmp/mcp-rag-tune-feedback-titles.npy"),
        help="the titles' dense vectors, kept between runs",
    )
    parser.add_argument(
        "--verify", type=int, default=0, help="check the in-memory scoring against the index on this many queries"
    )
    args = parser.parse_args()
    configure_logging(level="WARNING")
    anyio.run(
        main, args.dataset, args.data_dir, args.max_queries, args.title_cache, set(args.grids.split(",")), args.verify
    )
    sys.exit(0)
