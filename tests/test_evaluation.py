"""Retrieval evaluation: the metrics on hand-computed cases, and a full run over the small BEIR-format
fixture in ``tests/fixtures/beir-mini`` (in process on both index engines, and once through the CLI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from math import log2
from pathlib import Path

import pytest

from mcp_rag.errors import InvalidInputError
from mcp_rag.evaluation import load_qrels, load_queries, ndcg_at_k, recall_at_k, run_evaluation
from mcp_rag.runtime import Runtime
from mcp_rag.store.postgres import Store

BEIR_MINI = Path(__file__).parent / "fixtures" / "beir-mini"
MODES = ["hybrid", "dense", "lexical"]


# --- metrics -------------------------------------------------------------------------------------------


def test_ndcg_single_relevant_document() -> None:
    assert ndcg_at_k(["a", "b", "c"], {"a": 1}) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "a", "c"], {"a": 1}) == pytest.approx(1 / log2(3))  # 0.6309
    assert ndcg_at_k(["b", "c", "a"], {"a": 1}) == pytest.approx(0.5)  # 1 / log2(4)


def test_ndcg_two_relevant_documents() -> None:
    # DCG = 1/log2(3) + 1/log2(4); ideal = 1 + 1/log2(3)
    assert ndcg_at_k(["b", "a", "c"], {"a": 1, "c": 1}) == pytest.approx((1 / log2(3) + 0.5) / (1 + 1 / log2(3)))
    assert ndcg_at_k(["a", "c", "b"], {"a": 1, "c": 1}) == pytest.approx(1.0)


def test_ndcg_graded_relevance() -> None:
    # the less relevant one first: DCG = 1 + 2/log2(3); ideal = 2 + 1/log2(3)  -> 0.8597
    value = ndcg_at_k(["a", "b"], {"a": 1, "b": 2})
    assert value == pytest.approx((1 + 2 / log2(3)) / (2 + 1 / log2(3)))
    assert value == pytest.approx(0.8597, abs=1e-4)


def test_ndcg_cutoff_and_empty_cases() -> None:
    ranked = [f"x{i}" for i in range(10)] + ["a"]
    assert ndcg_at_k(ranked, {"a": 1}, k=10) == 0.0  # found at rank 11: outside the top 10
    assert ndcg_at_k(ranked, {"a": 1}, k=11) == pytest.approx(1 / log2(12))
    assert ndcg_at_k([], {"a": 1}) == 0.0
    assert ndcg_at_k(["a"], {}) == 0.0
    # more relevant documents than k: the ideal ranking is cut at k as well
    many = {f"r{i}": 1 for i in range(5)}
    assert ndcg_at_k(["r0", "r1"], many, k=2) == pytest.approx(1.0)


def test_recall() -> None:
    assert recall_at_k(["a", "b", "c"], {"a": 1, "d": 1}) == pytest.approx(0.5)
    assert recall_at_k(["a", "d"], {"a": 1, "d": 3}) == pytest.approx(1.0)
    assert recall_at_k(["b", "c", "a"], {"a": 1}, k=2) == 0.0
    assert recall_at_k(["b", "c", "a"], {"a": 1}, k=3) == 1.0
    assert recall_at_k(["a"], {}) == 0.0


# --- dataset files ----------------------------------------------------------------------------------------


def test_fixture_files_load() -> None:
    queries = load_queries(BEIR_MINI / "queries.jsonl")
    qrels = load_qrels(BEIR_MINI / "qrels.tsv")
    assert len(queries) == 12
    assert set(qrels) <= set(queries)
    assert len(qrels) == 11  # q12 has no judgments
    assert qrels["q08"] == {"d22": 1, "d13": 1}
    assert qrels["q11"] == {"d28": 2}  # the zero-score row is dropped, the header skipped
    corpus_lines = (BEIR_MINI / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(corpus_lines) == 30


def test_bad_dataset_files(tmp_path: Path) -> None:
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "fine"}\n{"_id": "q2"}\n')
    with pytest.raises(InvalidInputError, match=r"queries\.jsonl:2: expected a JSON object with '_id' and 'text'"):
        load_queries(tmp_path / "queries.jsonl")
    (tmp_path / "qrels.tsv").write_text("q1\td1\thigh\n")
    with pytest.raises(InvalidInputError, match="relevance score 'high' is not an integer"):
        load_qrels(tmp_path / "qrels.tsv")


# --- full runs --------------------------------------------------------------------------------------------


async def test_run_evaluation_in_process(runtime: Runtime) -> None:
    results = await run_evaluation(runtime.service, BEIR_MINI, modes=MODES)
    assert [r.mode for r in results] == MODES
    for r in results:
        assert r.queries == 11
        assert 0.0 <= r.ndcg_at_10 <= 1.0
        assert 0.0 <= r.recall_at_100 <= 1.0
        assert r.ndcg_at_10 > 0.5, r
        assert r.recall_at_100 > 0.5, r
        assert 0.5 < r.ndcg_at_10_folded <= 1.0, r
    # the scratch collection is gone from Postgres and from the index
    assert await runtime.service.list_collections(runtime.settings.default_tenant) == []
    assert (await runtime.store.stats()).documents == 0
    assert await runtime.index.count() == 0


async def test_run_evaluation_options(runtime: Runtime) -> None:
    tenant = runtime.settings.default_tenant
    [result] = await run_evaluation(runtime.service, BEIR_MINI, modes=["lexical"], max_queries=3, keep=True)
    assert result.queries == 3
    [kept] = await runtime.service.list_collections(tenant)
    assert kept.name.startswith("eval-")
    assert kept.documents == 30


async def test_run_evaluation_refuses_incomplete_datasets(runtime: Runtime, tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    with pytest.raises(InvalidInputError, match=r"missing queries\.jsonl, qrels\.tsv"):
        await run_evaluation(runtime.service, tmp_path, modes=MODES)
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (tmp_path / "qrels.tsv").write_text("q9\td1\t1\n")
    with pytest.raises(InvalidInputError, match="no query has relevance judgments"):
        await run_evaluation(runtime.service, tmp_path, modes=MODES)
    assert (await runtime.store.stats()).documents == 0


@pytest.mark.integration
async def test_eval_command(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")} | {
        "MCP_RAG_DATABASE_URL": database_url,
        "MCP_RAG_EMBEDDING_MODEL_DIR": str(model_dir),
        "MCP_RAG_DATA_DIR": str(tmp_path / "data"),
    }
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mcp-rag"), "eval", str(BEIR_MINI)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"mode\s+nDCG@10\s+Recall@100\s+queries\s+nDCG@10 folded", lines[0])
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == MODES
    for mode, ndcg, recall, queries, folded in rows:
        assert 0.5 < float(ndcg) <= 1.0, mode
        assert 0.5 < float(recall) <= 1.0, mode
        assert queries == "11"
        assert 0.5 < float(folded) <= 1.0, mode

    store = Store(database_url)
    await store.open()
    try:
        assert (await store.stats()).documents == 0  # the scratch collection was deleted
        assert await store.list_collections("default") == []
    finally:
        await store.close()
