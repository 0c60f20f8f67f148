"""Embedding providers and reranking: ingest docs/s with the local model and with the ``openai``
provider at 1, 4 and 16 concurrent ingests, search p50 with the query embedded locally, remotely,
and remotely + reranked, and ``mcp-rag eval`` with and without the reranker.

    python -m bench.providers [--quick | --tiny] [--docs 120] [--queries 40]

The remote side is tests/embedding_server.py in its own process on 127.0.0.1: the same offline
model behind ``POST /v1/embeddings`` and ``POST /rerank``. On this machine it shares the CPU with
the client, so the figures show what the remote path costs and how concurrency behaves, not what
a GPU server would add (there, the embedding cost moves off the pod; the client's share remains).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Postgres,
    check_dataset,
    emit,
    fresh_dir,
    latency_fields,
    log,
    mcp_rag_command,
    model_dir,
    parser,
    read_corpus,
    read_queries,
    server_env,
    write_tiny_dataset,
)

BENCH = "providers"
LEVELS = (1, 4, 16)


def start_embedding_server(model: Path, log_path: Path) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.embedding_server", "--model-dir", str(model)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log_path.open("w"),
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.match(r"ready (\d+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"the embedding server did not start: {line!r} (see {log_path})")
    return process, int(match.group(1))


def settings_for(provider: str, port: int, dsn: str, data: Path, model: Path, **extra: Any) -> Any:
    from mcp_rag.settings import Settings

    values: dict[str, Any] = {
        "data_dir": data,
        "database_url": dsn,
        "embedding_model_dir": model,
        "sync_in_server": False,
        "_env_file": None,
    }
    if provider == "openai":
        values.update(
            embedding_provider="openai",
            embedding_base_url=f"http://127.0.0.1:{port}/v1",
            embedding_model="all-minilm",
            embedding_concurrency=16,
            embedding_request_inputs=8,
            # The served model's own tokenizer: the same chunks as the local model, so the
            # comparison is like for like (a character budget cuts a little shorter).
            embedding_tokenizer=model / "tokenizer.json",
            embedding_window_tokens=254,
        )
    values.update(extra)
    return Settings(**values)


async def ingest_level(settings: Any, docs: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    from mcp_rag.runtime import open_runtime

    async with open_runtime(settings) as rt:
        queue = list(reversed(docs))
        chunks = 0

        async def worker() -> None:
            nonlocal chunks
            while queue:
                doc = queue.pop()
                outcome = await rt.service.ingest_text(
                    "default", doc["text"], title=doc.get("title", ""), source_uri=f"bench://{doc['_id']}"
                )
                chunks += outcome.chunks

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {"docs": len(docs), "chunks": chunks, "seconds": seconds, "docs_per_s": len(docs) / seconds}


def raw_embedding(settings: Any, texts: list[str]) -> dict[str, Any]:
    """The dense + BM25 embedding alone (no chunking, no store): passages per second."""
    from mcp_rag.embedding import Embedder

    embedder = Embedder(settings)
    try:
        embedder.load_sync()
        embedder.embed_passages_sync(texts[:8])  # warm-up
        started = time.perf_counter()
        embedder.embed_passages_sync(texts)
        seconds = time.perf_counter() - started
    finally:
        embedder.provider.close()
    return {"passages": len(texts), "seconds": seconds, "passages_per_s": len(texts) / seconds}


async def search_latency(settings: Any, docs: list[dict[str, Any]], queries: list[str]) -> dict[str, Any]:
    from mcp_rag.runtime import open_runtime

    async with open_runtime(settings) as rt:
        for doc in docs:
            await rt.service.ingest_text("default", doc["text"], title=doc.get("title", ""), source_uri=doc["_id"])
        await rt.service.search_answer("default", queries[0], top_k=5)  # warms connections up; not counted
        reranked = 0
        samples = []
        for query in queries:
            started = time.perf_counter()
            answer = await rt.service.search_answer("default", query, top_k=5)
            samples.append(time.perf_counter() - started)
            reranked += answer.reranked is True
    return {"queries": len(samples), "reranked": reranked, **latency_fields(samples)}


def run_eval(env: dict[str, str], dataset: Path, cwd: Path) -> dict[str, Any]:
    started = time.perf_counter()
    out = subprocess.run(
        [*mcp_rag_command(), "eval", str(dataset), "--modes", "hybrid"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"mcp-rag eval failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
    match = re.search(r"^hybrid\s+([\d.]+)\s+([\d.]+)\s+(\d+)", out.stdout, re.MULTILINE)
    assert match, out.stdout
    return {
        "ndcg_at_10": float(match.group(1)),
        "recall_at_100": float(match.group(2)),
        "queries": int(match.group(3)),
        "seconds": seconds,
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--docs", type=int, default=None, help="documents per ingest run (default 120; --tiny 16)")
    p.add_argument("--queries", type=int, default=None, help="search queries per setup (default 40; --tiny 8)")
    args = p.parse_args()
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")  # stderr: stdout carries the JSON lines
    dataset = check_dataset(args.dataset)
    n_docs = args.docs or (16 if args.tiny else 60 if args.quick else 120)
    n_queries = args.queries or (8 if args.tiny else 20 if args.quick else 40)
    model = model_dir(args.model_dir)
    work = fresh_dir(args.work_dir / BENCH)
    docs = read_corpus(dataset, n_docs)
    queries = read_queries(dataset, n_queries)
    tiny = write_tiny_dataset(work / "tiny-dataset")
    pg = Postgres(args.pg_dsn)
    server, port = start_embedding_server(model, work / "embedding-server.stderr")
    try:
        for provider in ("fastembed", "openai"):
            for clients in LEVELS:
                name = f"bench_prov_{provider}_{clients}"
                dsn = pg.create(name)
                try:
                    settings = settings_for(provider, port, dsn, fresh_dir(work / name), model)
                    log(f"ingest: {provider}, {clients} concurrent, {len(docs)} docs")
                    figures = asyncio.run(ingest_level(settings, docs, clients))
                finally:
                    pg.drop(name)
                emit(BENCH, "ingest", provider=provider, clients=clients, **figures)
        texts = [f"{d.get('title', '')}\n{d['text']}"[:600] for d in docs]  # within the window
        for provider in ("fastembed", "openai"):
            settings = settings_for(provider, port, "postgresql://unused", fresh_dir(work / f"raw-{provider}"), model)
            log(f"raw embedding: {provider}, {len(texts)} passages")
            emit(BENCH, "embed", provider=provider, **raw_embedding(settings, texts))
        search_docs = docs[: min(len(docs), 60)]
        for label, provider, extra in (
            ("local", "fastembed", {}),
            ("remote", "openai", {}),
            ("remote + rerank", "openai", {"reranker_url": f"http://127.0.0.1:{port}/rerank", "reranker_timeout": 60}),
            (
                "local + rerank",
                "fastembed",
                {"reranker_url": f"http://127.0.0.1:{port}/rerank", "reranker_timeout": 60},
            ),
        ):
            name = f"bench_prov_search_{provider}_{len(extra)}"
            dsn = pg.create(name)
            try:
                settings = settings_for(provider, port, dsn, fresh_dir(work / name), model, **extra)
                log(f"search: {label}, {len(queries)} queries over {len(search_docs)} docs")
                figures = asyncio.run(search_latency(settings, search_docs, queries))
            finally:
                pg.drop(name)
            emit(BENCH, "search", setup=label, docs=len(search_docs), **figures)
        for label, extra in (
            ("fused", {}),
            ("reranked", {"reranker_url": f"http://127.0.0.1:{port}/rerank", "reranker_timeout": 30}),
        ):
            name = f"bench_prov_eval_{label}"
            dsn = pg.create(name)
            try:
                env = server_env(fresh_dir(work / name), model, dsn, **extra)
                log(f"eval: {label}")
                figures = run_eval(env, tiny, work)
            finally:
                pg.drop(name)
            emit(BENCH, "eval", setup=label, dataset="tiny (bench.common.write_tiny_dataset)", **figures)
    finally:
        server.terminate()
        server.wait(30)
        pg.close()


if __name__ == "__main__":
    main()
