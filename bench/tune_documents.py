"""Choose how chunk evidence becomes a document ranking, on a BEIR dataset, from one ingest:
nDCG@10 / Recall@100 of the documents for several ways of scoring a document from its chunks.

    python -m bench.tune_documents ../shared/eval/scifact-train --data-dir /var/tmp/mcp-rag-tune-docs

Configurations (each from the same dense and BM25 candidate lists, 400 chunks a side):
* ``chunk-dbsf max``: DBSF fusion of chunks, a document ranked by its best chunk (what search does).
* ``doc-dbsf``: each side first scores a document by its best chunk, then DBSF fuses the documents.
* ``+ second``: a document's score plus ``lam`` times its second-best chunk on each side.
* weights: the dense : sparse weight of the fused sum.
Prints one JSON line per configuration, best last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from bench.tune_fusion import COLLECTION, ingest_corpus
from mcp_rag.evaluation import load_qrels, load_queries, ndcg_at_k, recall_at_k
from mcp_rag.index.base import FusionParams, Hit, IndexQuery, SearchFilter
from mcp_rag.logging import configure_logging
from mcp_rag.runtime import open_runtime
from mcp_rag.settings import Settings

CANDIDATES = 400


def dbsf(scores: dict[str, float]) -> dict[str, float]:
    """Distribution-based score normalisation: (s - (mean - 3 sd)) / (6 sd), as Qdrant's DBSF does."""
    if not scores:
        return {}
    values = list(scores.values())
    mean = statistics.fmean(values)
    sd = statistics.pstdev(values) or 1.0
    low, high = mean - 3 * sd, mean + 3 * sd
    return {k: (v - low) / (high - low) for k, v in scores.items()}


def by_document(hits: Sequence[Hit], corpus_of: dict[int, str], lam: float) -> dict[str, float]:
    best: dict[str, list[float]] = {}
    for h in hits:
        doc = corpus_of.get(h.id)
        if doc is not None:
            best.setdefault(doc, []).append(h.score)
    return {d: s[0] + (lam * s[1] if len(s) > 1 else 0.0) for d, s in best.items()}


async def main(dataset: Path, data_dir: Path, max_queries: int | None) -> None:
    settings = Settings(data_dir=data_dir, sync_in_server=False, _env_file=None)  # type: ignore[call-arg]
    queries = load_queries(dataset / "queries.jsonl")
    qrels = load_qrels(dataset / "qrels.tsv")
    judged = [q for q in queries if q in qrels][:max_queries]
    async with open_runtime(settings) as rt:
        tenant = settings.default_tenant
        corpus_of = await ingest_corpus(rt, dataset)
        flt = SearchFilter(tenant=tenant, collections=[COLLECTION])
        lists: dict[str, tuple[list[Hit], list[Hit], list[Hit]]] = {}
        for q in judged:
            e = rt.embedder.embed_query_sync(queries[q])
            dense = await rt.index.query(IndexQuery(filter=flt, limit=CANDIDATES, dense=e.dense.tolist()))
            sparse = await rt.index.query(IndexQuery(filter=flt, limit=CANDIDATES, sparse=e.sparse))
            fused = await rt.index.query(
                IndexQuery(
                    filter=flt,
                    limit=CANDIDATES,
                    dense=e.dense.tolist(),
                    sparse=e.sparse,
                    fusion=FusionParams("dbsf", prefetch_limit=CANDIDATES),
                )
            )
            lists[q] = (dense, sparse, fused)

        rows = []

        def report_row(name: str, rankings: dict[str, list[str]]) -> None:
            n = len(judged)
            row = {
                "config": name,
                "ndcg@10": round(sum(ndcg_at_k(rankings[q], qrels[q]) for q in judged) / n, 4),
                "recall@100": round(sum(recall_at_k(rankings[q], qrels[q]) for q in judged) / n, 4),
                "queries": n,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

        rankings: dict[str, list[str]] = {}
        for q in judged:
            scored = by_document(lists[q][2], corpus_of, 0.0)
            rankings[q] = sorted(scored, key=lambda d: -scored[d])
        report_row("chunk-dbsf max", rankings)
        for lam in (0.0, 0.1, 0.2, 0.35, 0.5):
            for weights in ((1.0, 1.0), (1.0, 1.25), (1.25, 1.0)):
                rankings = {}
                for q in judged:
                    dense, sparse, _ = lists[q]
                    d = dbsf(by_document(dense, corpus_of, lam))
                    s = dbsf(by_document(sparse, corpus_of, lam))
                    total = {k: weights[0] * d.get(k, 0.0) + weights[1] * s.get(k, 0.0) for k in d.keys() | s.keys()}
                    rankings[q] = sorted(total, key=lambda k: -total[k])
                report_row(f"doc-dbsf second={lam} w={weights}", rankings)
        best = max(rows, key=lambda r: float(r["ndcg@10"]))  # type: ignore[arg-type]
        print(json.dumps({"best": best}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/mcp-rag-tune-docs"))
    parser.add_argument("--max-queries", type=int, default=None)
    args = parser.parse_args()
    configure_logging(level="WARNING")
    anyio.run(main, args.dataset, args.data_dir, args.max_queries)
    sys.exit(0)
