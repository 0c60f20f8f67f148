"""bench.tune_feedback scores hundreds of configurations in memory instead of through the index; its
figures mean something only if that scoring ranks exactly as the index does. Checked here on a small
generated corpus with real embeddings, a real PostgreSQL and each real index engine: the plain query
and a feedback-weighted one (term weights other than 1) rank the same chunks in the same order. The
candidate lists are kept shorter than the corpus, so that a chunk found by one side only, the IDF and
each side's normalisation all decide the order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from bench.tune_feedback import (
    best_chunks,
    dense_scores,
    expansion,
    fuse,
    load_corpus,
    mix,
    sparse_scores,
)
from bench.tune_fusion import COLLECTION
from mcp_rag.evaluation import load_queries
from mcp_rag.index.base import FusionParams, IndexQuery, SearchFilter
from mcp_rag.runtime import Runtime
from mcp_rag.types import SparseVector

CANDIDATES = 8
WORDS = [
    "protein",
    "gene",
    "cell",
    "tumour",
    "mouse",
    "receptor",
    "signal",
    "kinase",
    "pathway",
    "membrane",
    "neuron",
    "brain",
    "liver",
    "heart",
    "blood",
    "insulin",
    "glucose",
    "vaccine",
    "virus",
    "antibody",
    "infection",
    "immune",
    "therapy",
    "drug",
    "dose",
    "trial",
    "patient",
    "risk",
    "mortality",
    "cohort",
    "diet",
    "exercise",
    "sleep",
    "stress",
    "memory",
    "learning",
    "enzyme",
    "mutation",
    "cancer",
    "growth",
    "factor",
    "inflammation",
    "cytokine",
    "stem",
    "tissue",
    "bone",
    "muscle",
    "lung",
    "kidney",
    "hormone",
    "oxygen",
    "lipid",
    "cholesterol",
]


def write_dataset(folder: Path) -> Path:
    """Documents and queries drawn from one vocabulary with skewed word frequencies, so that terms
    differ in document frequency (the IDF matters) and the two sides disagree on candidates."""
    rng = random.Random(11)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    folder.mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as handle:
        for i in range(60):
            body = " ".join(rng.choices(WORDS, weights, k=rng.randint(15, 70)))
            handle.write(json.dumps({"_id": f"d{i}", "title": f"Study {i}", "text": f"{body}."}) + "\n")
    with (folder / "queries.jsonl").open("w") as handle:
        for i in range(12):
            handle.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.sample(WORDS, 4))}) + "\n")
    return folder


async def test_in_memory_scoring_ranks_as_the_index(runtime: Runtime, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "dataset")
    corpus, _, _ = await load_corpus(runtime, dataset)
    assert len(set(corpus.doc_of)) == 60  # every document ingested
    n = len(corpus.ids)
    flt = SearchFilter(tenant=runtime.settings.default_tenant, collections=[COLLECTION])
    feedback_changed = 0
    for text in load_queries(dataset / "queries.jsonl").values():
        e = runtime.embedder.embed_query_sync(text)
        assert e.dense is not None
        q_dense = np.asarray(e.dense, dtype=np.float64)
        q_dense /= np.linalg.norm(q_dense)
        plain = dict(zip(e.sparse.indices, e.sparse.values, strict=True))
        dense = dense_scores(q_dense, corpus.dense, CANDIDATES)
        first = fuse((dense, 1.0), (sparse_scores(plain, corpus.postings, corpus.idf, n, CANDIDATES), 1.0))
        weighted = mix(plain, expansion(best_chunks(first, corpus, 3), corpus, 5, False), 0.7)
        feedback_changed += weighted.keys() != plain.keys()
        for lexical in (plain, weighted):
            simulated = fuse((dense, 1.0), (sparse_scores(lexical, corpus.postings, corpus.idf, n, CANDIDATES), 1.0))
            hits = await runtime.index.query(
                IndexQuery(
                    filter=flt,
                    limit=10,
                    dense=e.dense.tolist(),
                    sparse=SparseVector(indices=list(lexical), values=list(lexical.values())),
                    fusion=FusionParams("dbsf", prefetch_limit=CANDIDATES),
                )
            )
            assert [h.id for h in hits] == [corpus.ids[r] for r in simulated[:10]], text
    assert feedback_changed  # the feedback query really differs from the plain one
