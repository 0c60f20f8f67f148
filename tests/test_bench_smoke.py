"""Smoke runs of every benchmark (``python -m bench.<name> --tiny``) on a small generated corpus.

Asserts only that each benchmark runs and prints well-formed JSON lines with the expected keys
and sane values (positive figures, zero errors) — never timings. The benchmarks share one
work directory so the seed embedding and the corpus template are built once, and each benchmark
runs once per module whichever test asks for it first (so any test can run alone, in any order).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.all import BEGIN, END, render, write_doc
from bench.common import machine, versions, write_tiny_dataset
from tests.pgcluster import PgServer

REPO = Path(__file__).resolve().parents[1]

Lines = list[dict[str, Any]]


pytestmark = [pytest.mark.slow, pytest.mark.integration]

EXTRA_ARGS = {
    "ingest": (),
    "latency": (),
    "concurrency": ("--clients", "1,4", "--seconds", "1"),
    "memory": ("--load-seconds", "1"),
    "coldstart": ("--setups", "external"),
    "retrieval": (),
    "listing": (),
    "providers": ("--docs", "6", "--queries", "3"),
    "shared_store": (),
    "quantization": (),
}


@pytest.fixture(scope="module")
def bench_env(pg_server: PgServer, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Lines]:
    root = tmp_path_factory.mktemp("bench")
    dataset = write_tiny_dataset(root / "dataset")
    done: dict[str, Lines] = {}

    def run(name: str) -> Lines:
        if name in done:
            return done[name]
        cmd = [
            sys.executable,
            "-m",
            f"bench.{name}",
            "--tiny",
            "--dataset",
            str(dataset),
            "--work-dir",
            str(root / "work"),
            "--pg-dsn",
            pg_server.dsn(),
            "--model-dir",
            str(model_dir),
            *EXTRA_ARGS[name],
        ]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, f"bench.{name} failed:\n{out.stdout}\n{out.stderr[-4000:]}"
        lines = [json.loads(line) for line in out.stdout.splitlines()]  # every stdout line is JSON
        assert lines, f"bench.{name} printed nothing"
        for line in lines:
            assert line["bench"] == name
            assert isinstance(line["measurement"], str)
            if "targets" in line:
                assert set(line["met"]) <= set(line["targets"])
        done[name] = lines
        return lines

    return run


def positive(line: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = line[key]
        assert isinstance(value, int | float), (key, line)
        assert not isinstance(value, bool), (key, line)
        assert math.isfinite(value), (key, line)
        assert value > 0, (key, line)


def of(lines: Lines, measurement: str) -> Lines:
    found = [x for x in lines if x["measurement"] == measurement]
    assert found, f"no {measurement!r} line in {lines}"
    return found


def test_ingest(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("ingest")
    for line in of(lines, "round") + of(lines, "summary"):
        positive(
            line,
            "docs",
            "chunks",
            "ingest_seconds",
            "raw_seconds",
            "fixed_seconds",
            "ingest_chunks_per_s",
            "ingest_docs_per_s",
            "raw_chunks_per_s",
            "efficiency",
        )
    summary = of(lines, "summary")[0]
    assert summary["targets"] == {"efficiency": [">=", 0.9]}


def test_latency(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("latency")
    e2e = of(lines, "e2e")
    assert {(x["transport"], x["mode"]) for x in e2e} == {
        (t, m) for t in ("stdio", "http") for m in ("hybrid", "dense", "lexical")
    }
    for line in e2e:
        assert line["errors"] == 0
        positive(line, "chunks", "n", "p50_ms", "p95_ms", "p99_ms")
        assert line["p50_ms"] <= line["p95_ms"] <= line["p99_ms"]
    for line in of(lines, "inprocess"):
        positive(line, "embed_p50_ms", "index_p50_ms", "hydrate_p50_ms", "service_p50_ms")
    for line in of(lines, "breakdown"):
        assert {"stdio_overhead_p50_ms", "http_overhead_p50_ms"} <= set(line)


def test_concurrency(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("concurrency")
    levels = of(lines, "level")
    assert [(x["setup"], x["clients"]) for x in levels] == [
        ("ONNX threads default", 1),
        ("ONNX threads default", 4),
        ("ONNX threads 1", 1),
        ("ONNX threads 1", 4),
    ]
    for line in levels:
        assert line["errors"] == 0, line["error_samples"]
        positive(line, "searches", "searches_per_s", "p50_ms", "p95_ms", "server_cpu_s", "server_cpu_ms_per_search")


def test_memory(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("memory")
    rss = of(lines, "rss")
    assert {(x["mode"], x["phase"]) for x in rss} == {
        (m, p)
        for m in ("embedded", "server")
        for p in ("idle", "ingest", "search", "idle_large", "search_large", "ingest_large")
    }
    for line in rss:
        positive(line, "rss_mib", "peak_mib", "hwm_mib", "anon_mib")
        assert line["rss_mib"] <= line["hwm_mib"]
        assert line.get("errors", 0) == 0
    assert all(x["ingested_chunks"] > 0 for x in rss if x["phase"].startswith("ingest"))


def test_coldstart(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("coldstart")
    ready = of(lines, "ready")
    assert [x["setup"] for x in ready] == ["external"]
    positive(ready[0], "median_s", "min_s", "max_s")
    positive(of(lines, "imports")[0], "median_s")


def test_retrieval(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("retrieval")
    evals = of(lines, "eval")
    assert sorted(x["mode"] for x in evals) == ["dense", "hybrid", "lexical"]
    for line in evals:
        assert 0 < line["ndcg_at_10"] <= 1
        assert 0 < line["recall_at_100"] <= 1
        positive(line, "queries")


def test_listing(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("listing")
    pages = of(lines, "page")
    assert {line["case"] for line in pages} == {
        "first page",
        "random keyset",
        "one collection, random keyset",
        "source prefix",
    }
    for line in pages:
        positive(line, "p50_ms", "p95_ms")
    [plan] = of(lines, "plan")
    assert plan["index_range_scan"] is True


def test_report_keeps_the_rest_of_the_page(bench_env: Callable[[str], Lines], tmp_path: Path) -> None:
    """bench.all replaces only its generated section: the hand-written text around it survives."""
    lines = [line for name in EXTRA_ARGS for line in bench_env(name)]
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nSTALE-GENERATED-TEXT\n{END}\n\n## Retrieval quality\n\nkept\n")
    info = {"date": "today", "machine": machine(), "versions": versions(), "command": "python -m bench.all --tiny"}
    write_doc(page, render(lines, info))
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n")
    assert text.endswith("## Retrieval quality\n\nkept\n")
    assert "STALE-GENERATED-TEXT" not in text
    assert "### Figures against targets" in text
    assert "| ingest |" in text
    for heading in ("Ingest", "Search latency", "Concurrency", "Memory", "Cold start", "Retrieval quality, `mcp-rag"):
        assert f"### {heading}" in text


def test_providers(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("providers")
    ingest = of(lines, "ingest")
    assert [(x["provider"], x["clients"]) for x in ingest] == [
        (p, c) for p in ("fastembed", "openai") for c in (1, 4, 16)
    ]
    for line in ingest:
        positive(line, "docs", "chunks", "docs_per_s")
    embed = of(lines, "embed")
    assert [x["provider"] for x in embed] == ["fastembed", "openai"]
    for line in embed:
        positive(line, "passages", "passages_per_s")
    search = of(lines, "search")
    assert [x["setup"] for x in search] == ["local", "remote", "remote + rerank", "local + rerank"]
    for line in search:
        positive(line, "queries", "p50_ms")
        assert line["reranked"] == (line["queries"] if "rerank" in line["setup"] else 0)
    evals = of(lines, "eval")
    assert [x["setup"] for x in evals] == ["fused", "reranked"]
    for line in evals:
        positive(line, "queries", "recall_at_100")


def test_shared_store(bench_env: Callable[[str], Lines]) -> None:
    lines = bench_env("shared_store")
    memory = of(lines, "memory")[0]
    assert memory["relays"] == 3 and memory["processes_with_model"] == 1
    positive(memory, "holder_rss_mib", "relay_rss_max_mib")
    latency = of(lines, "latency")
    assert [x["call"] for x in latency] == ["search", "list_prompts"]
    for line in latency:
        positive(line, "holder_p50_ms", "relayed_p50_ms")
    handover = of(lines, "handover")[0]
    positive(handover, "seconds")
    assert handover["new_holder_was_relay"] is True


def test_quantization(bench_env: Callable[[str], Lines]) -> None:
    lines = {line["measurement"]: line for line in bench_env("quantization")}
    assert set(lines) == {"passage_embedding", "query_embedding", "int8_vectors"}
    for kind in ("passage_embedding", "query_embedding"):
        line = lines[kind]
        assert line["samples"] > 0
        for key in (
            "fp32_cpu_ms",
            "int8_cpu_ms",
            "int8_fused_cpu_ms",
            "fp32_wall_ms",
            "int8_wall_ms",
            "cpu_ratio",
            "wall_ratio",
            "fused_ratio",
        ):
            assert line[key] > 0, (kind, key)
    vectors = lines["int8_vectors"]
    assert 0.8 < vectors["cosine_min"] <= vectors["cosine_mean"] < 0.999
    assert 0.99 < vectors["fused_cosine_min"] <= vectors["fused_cosine_mean"] <= 1.0
    assert vectors["model_onnx_mb"]["int8"] < vectors["model_onnx_mb"]["fp32"] / 3


@pytest.mark.integration
def test_peer_side_by_side(pg_server: PgServer, model_dir: Path, tmp_path: Path) -> None:
    """bench.peer drives mcp-rag and mcp-server-qdrant (installed from PyPI into its own venv, kept
    across runs) over stdio on one corpus and reports both sides and the ratios. Skips only when the
    package index cannot be reached (the benchmark's exit status 75 says so); any other failure fails."""
    from bench.common import DEFAULT_WORK_DIR
    from bench.peer import PEER_VERSION, UNREACHABLE

    dataset = write_tiny_dataset(tmp_path / "dataset", docs_per_topic=4)
    venv = DEFAULT_WORK_DIR / "peer" / f"venv-{PEER_VERSION}"
    cmd = [
        sys.executable,
        "-m",
        "bench.peer",
        "--tiny",
        "--dataset",
        str(dataset),
        "--work-dir",
        str(tmp_path / "work"),
        "--pg-dsn",
        pg_server.dsn(),
        "--model-dir",
        str(model_dir),
        "--peer-venv",
        str(venv),
        "--queries",
        "6",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode == UNREACHABLE:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, f"bench.peer failed:\n{out.stdout}\n{out.stderr[-4000:]}"
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(line["bench"] == "peer" for line in lines)
    [setup] = of(lines, "setup")
    assert setup["docs"] == 20
    sides = {line["server"]: line for line in of(lines, "side")}
    assert set(sides) == {"mcp-rag", "mcp-server-qdrant"}
    for line in sides.values():
        assert line["errors"] == 0, line["error_samples"]
        assert line["docs"] == 20 and line["searches"] == 6
        positive(line, "ingest_docs_per_s", "ingest_call_p50_ms", "search_p50_ms", "search_p95_ms", "peak_rss_mib")
        assert line["search_p50_ms"] <= line["search_p95_ms"]
        # both sides really found the judged documents: the peer was fed the same model offline
        assert line["judged_queries"] > 0
        assert line["recall_at_10"] > 0.5, line
    [ratio] = of(lines, "ratio")
    positive(ratio, "search_p50_ratio", "ingest_docs_per_s_ratio", "peak_rss_ratio", "bulk_docs_per_s")
    assert ratio["bulk_over_peer_per_call"] == pytest.approx(
        ratio["bulk_docs_per_s"] / sides["mcp-server-qdrant"]["ingest_docs_per_s"], rel=0.01
    )  # emitted figures are rounded
    assert set(ratio["targets"]) == {"search_p50_ratio", "ingest_docs_per_s_ratio", "bulk_over_peer_per_call"}
