"""Choose the hybrid fusion on a BEIR dataset: nDCG@10 / Recall@100 for dense, lexical and a grid
of fusions (RRF k and weights, DBSF), all from one ingest and one embedding of the queries.

    python -m bench.tune_fusion ../shared/eval/scifact-train --data-dir /var/tmp/mcp-rag-tune

Prints one JSON line per configuration, best last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anyio

from mcp_rag.evaluation import load_qrels, load_queries, ndcg_at_k, recall_at_k
from mcp_rag.extract import iter_corpus
from mcp_rag.index.base import FusionParams, IndexQuery, SearchFilter
from mcp_rag.logging import configure_logging
from mcp_rag.runtime import Runtime, open_runtime
from mcp_rag.settings import Settings

COLLECTION = "tune"


async def ingest_corpus(rt: Runtime, dataset: Path) -> dict[int, str]:
    """Ingest the dataset's corpus into the scratch collection once (printing how long it took); returns
    each chunk id's corpus id."""
    tenant = rt.settings.default_tenant
    started = time.perf_counter()
    docs = [d for d in iter_corpus(dataset / "corpus.jsonl", rt.settings.max_document_bytes) if d.text.strip()]
    report = await rt.service.ingest(tenant, COLLECTION, docs)
    seconds = round(time.perf_counter() - started, 1)
    print(
        json.dumps({"ingest": {"added": report.added, "unchanged": report.unchanged, "seconds": seconds}}), flush=True
    )
    async with rt.store._reading() as conn:  # a benchmark may peek: map chunk ids to corpus ids
        cur = await conn.execute(
            "SELECT c.id, d.metadata->>'corpus_id' FROM chunks c JOIN documents d ON d.id = c.document_id"
            " WHERE d.tenant = %s AND d.collection = %s",
            (tenant, COLLECTION),
        )
        return {row[0]: row[1] for row in await cur.fetchall()}


async def main(dataset: Path, data_dir: Path, max_queries: int | None) -> None:
    settings = Settings(data_dir=data_dir, sync_in_server=False, _env_file=None)  # type: ignore[call-arg]
    queries = load_queries(dataset / "queries.jsonl")
    qrels = load_qrels(dataset / "qrels.tsv")
    judged = [q for q in queries if q in qrels][:max_queries]
    async with open_runtime(settings) as rt:
        tenant = settings.default_tenant
        corpus_of = await ingest_corpus(rt, dataset)
        embedded = {q: rt.embedder.embed_query_sync(queries[q]) for q in judged}
        flt = SearchFilter(tenant=tenant, collections=[COLLECTION])

        async def evaluate(name: str, use_dense: bool, use_sparse: bool, fusion: FusionParams) -> dict[str, object]:
            ndcg = recall = 0.0
            for q in judged:
                e = embedded[q]
                hits = await rt.index.query(
                    IndexQuery(
                        filter=flt,
                        limit=200,
                        dense=e.dense.tolist() if use_dense else None,
                        sparse=e.sparse if use_sparse else None,
                        fusion=fusion,
                    )
                )
                ranked: list[str] = []
                for h in hits:
                    doc = corpus_of.get(h.id)
                    if doc is not None and doc not in ranked:
                        ranked.append(doc)
                ndcg += ndcg_at_k(ranked, qrels[q])
                recall += recall_at_k(ranked, qrels[q])
            row = {
                "config": name,
                "ndcg@10": round(ndcg / len(judged), 4),
                "recall@100": round(recall / len(judged), 4),
                "queries": len(judged),
            }
            print(json.dumps(row), flush=True)
            return row

        rows = [
            await evaluate("dense", True, False, FusionParams()),
            await evaluate("lexical", False, True, FusionParams()),
        ]
        for prefetch in (100, 200):
            for k in (2, 10, 30, 60):
                for weights in ((1.0, 1.0), (1.0, 1.5), (1.0, 2.0), (1.5, 1.0)):
                    rows.append(
                        await evaluate(
                            f"rrf k={k} w={weights} prefetch={prefetch}",
                            True,
                            True,
                            FusionParams("rrf", k, weights, prefetch),
                        )
                    )
            rows.append(
                await evaluate(f"dbsf prefetch={prefetch}", True, True, FusionParams("dbsf", prefetch_limit=prefetch))
            )
        best = max(rows[2:], key=lambda r: float(r["ndcg@10"]))  # type: ignore[arg-type]
        print(json.dumps({"best": best}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/mcp-rag-tune"))
    parser.add_argument("--max-queries", type=int, default=None)
    args = parser.parse_args()
    configure_logging(level="WARNING")
    anyio.run(main, args.dataset, args.data_dir, args.max_queries)
    sys.exit(0)
