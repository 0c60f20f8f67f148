"""Retrieval evaluation on a BEIR-format dataset: nDCG@10 and Recall@100 per search mode.

The corpus is ingested into a scratch collection (title + text per document, as BEIR
does), every query is searched in every mode, chunk hits are folded into documents (a
document scores as its best chunk), and the scratch collection is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInputError, NotFoundError
from .extract import SourceDocument, iter_corpus
from .service import RagService, SearchResult

RETRIEVE_CHUNKS = 200
"""Chunks retrieved per query: enough to fill the top 100 documents after folding chunks."""


@dataclass(frozen=True, slots=True)
class EvalResult:
    mode: str
    ndcg_at_10: float
    """Of exactly what the search tool returns with its default arguments and top_k=10."""
    recall_at_100: float
    """Of the first 100 documents after folding the best RETRIEVE_CHUNKS chunks."""
    queries: int
    ndcg_at_10_folded: float
    """Of the first 10 documents after folding the best RETRIEVE_CHUNKS chunks (what earlier figures measured)."""


def load_queries(path: Path) -> dict[str, str]:
    queries = {}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                    queries[str(record["_id"])] = str(record["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InvalidInputError(f"{path}:{line_no}: expected a JSON object with '_id' and 'text'") from None
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for row in reader:
            if len(row) < 3 or row[0] == "query-id":
                continue
            try:
                score = int(row[2])
            except ValueError:
                raise InvalidInputError(f"{path}: relevance score {row[2]!r} is not an integer") from None
            if score > 0:
                qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def ndcg_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int = 10) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(rank + 2) for rank, rel in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int = 100) -> float:
    if not relevant:
        return 0.0
    return len(set(ranked[:k]) & set(relevant)) / len(relevant)


def _corpus(path: Path, max_bytes: int) -> Iterator[SourceDocument]:
    for doc in iter_corpus(path, max_bytes):
        if doc.text.strip():
            yield doc


def _ranked(hits: Iterable[SearchResult], uri_to_id: dict[str, str]) -> list[str]:
    """Corpus ids in order of their first hit."""
    ranked: list[str] = []
    for hit in hits:
        doc_id = uri_to_id.get(hit.source_uri)
        if doc_id is not None and doc_id not in ranked:
            ranked.append(doc_id)
    return ranked


async def run_evaluation(
    service: RagService,
    dataset: Path,
    *,
    modes: Sequence[str],
    max_queries: int | None = None,
    keep: bool = False,
    progress: bool = False,
    tenant: str | None = None,
) -> list[EvalResult]:
    files = {name: dataset / name for name in ("corpus.jsonl", "queries.jsonl", "qrels.tsv")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise InvalidInputError(f"{dataset}: missing {', '.join(missing)} (BEIR layout expected)")
    queries = load_queries(files["queries.jsonl"])
    qrels = load_qrels(files["qrels.tsv"])
    judged = [qid for qid in queries if qid in qrels]
    if max_queries is not None:
        judged = judged[:max_queries]
    if not judged:
        raise InvalidInputError(f"{dataset}: no query has relevance judgments in qrels.tsv")

    tenant = tenant or service.settings.default_tenant
    collection = f"eval-{uuid.uuid4().hex[:12]}"
    report = await service.ingest(
        tenant, collection, _corpus(files["corpus.jsonl"], service.settings.max_document_bytes)
    )
    if report.failed:
        raise InvalidInputError(
            f"{dataset}: {len(report.failed)} corpus records failed, e.g. {report.failed[0].reason}"
        )
    uri_to_id = {
        doc.source_uri: doc.metadata["corpus_id"]
        for doc in _corpus(files["corpus.jsonl"], service.settings.max_document_bytes)
    }
    results = []
    try:
        for mode in modes:
            ndcg = recall = folded_ndcg = 0.0
            iterator: Iterable[str] = judged
            if progress:
                from tqdm import tqdm

                iterator = tqdm(judged, desc=mode, unit="query", leave=False)
            for qid in iterator:
                from .service import SearchFilters

                scope = SearchFilters(collection=collection)
                as_the_tool = await service.search(tenant, queries[qid], mode=mode, top_k=10, filters=scope)
                ndcg += ndcg_at_k(_ranked(as_the_tool, uri_to_id), qrels[qid])
                chunks = await service.search_unbounded(
                    tenant,
                    queries[qid],
                    mode=mode,  # type: ignore[arg-type]
                    limit=RETRIEVE_CHUNKS,
                    filters=scope,
                )
                folded = _ranked(chunks, uri_to_id)
                folded_ndcg += ndcg_at_k(folded, qrels[qid])
                recall += recall_at_k(folded, qrels[qid])
            n = len(judged)
            results.append(EvalResult(mode, ndcg / n, recall / n, n, folded_ndcg / n))
    finally:
        if not keep:
            with contextlib.suppress(NotFoundError):
                await service.delete_collection(tenant, collection)
    return results
