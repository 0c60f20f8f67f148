"""Concurrent searches over streamable HTTP: 1, 8, 32 and 64 clients for a fixed time each.

    python -m bench.concurrency [--quick] [--clients 1,8,32,64] [--seconds 15] [--size 10000] [--threads default,1]

Every client is its own ``mcp.Client`` session to one ``mcp-rag serve --transport http``
subprocess, issuing hybrid ``search`` calls (top_k 10, real queries) back to back. All sessions are
opened before the clock starts. Reported per level: searches/s, latency percentiles, errors (tool
errors and exceptions), and the CPU seconds the server and this client process used (on two
shared cores the client's own work competes with the server's).

Each level runs against two server setups, side by side: ONNX Runtime's default threading (one
intra-op thread per core, spinning between runs: the lowest single-query latency) and
``MCP_RAG_EMBEDDING_THREADS=1``, the setting ``deploy/k8s`` ships (each query embedding on one
thread; concurrent requests spread over the cores instead, and no CPU burnt spinning against
the pod's CPU limit).
"""

from __future__ import annotations

import os
import random
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio

from bench.common import (
    Postgres,
    check_dataset,
    cpu_seconds,
    emit,
    fresh_dir,
    http_client,
    http_server,
    latency_fields,
    log,
    model_dir,
    parser,
    read_queries,
    server_env,
    tool_error,
)
from bench.corpus import CORPUS_COLLECTION, build_corpus, load_seed

BENCH = "concurrency"


async def level(url: str, clients: int, seconds: float, queries: list[str], warmup: int = 2) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    messages: list[str] = []
    async with AsyncExitStack() as stack:
        sessions = []
        for _ in range(clients):
            sessions.append(await stack.enter_async_context(http_client(url)))
        for session in sessions:  # one call each before the clock starts
            for _ in range(warmup):
                await session.call_tool("search", {"query": queries[0], "top_k": 10, "collection": CORPUS_COLLECTION})
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker(i: int, session: Any) -> None:
            nonlocal errors
            rng = random.Random(i)
            while time.perf_counter() < deadline:
                query = rng.choice(queries)
                t0 = time.perf_counter()
                try:
                    result = await session.call_tool(
                        "search", {"query": query, "top_k": 10, "collection": CORPUS_COLLECTION}
                    )
                    error = tool_error(result)
                except Exception as exc:
                    error = repr(exc)
                latencies.append(time.perf_counter() - t0)
                if error is not None:
                    errors += 1
                    if len(messages) < 3:
                        messages.append(error[:200])

        async with anyio.create_task_group() as tg:
            for i, session in enumerate(sessions):
                tg.start_soon(worker, i, session)
        elapsed = time.perf_counter() - started
    return {
        "searches": len(latencies),
        "elapsed_s": elapsed,
        "latencies": latencies,
        "errors": errors,
        "error_samples": messages,
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--clients", default="1,8,32,64")
    p.add_argument("--seconds", type=float, default=None, help="per level (default 15; quick 2)")
    p.add_argument("--size", type=int, default=None, help="corpus chunks (default 10000)")
    p.add_argument("--threads", default="default,1", help="server embedding_threads settings to compare")
    args = p.parse_args()
    dataset = check_dataset(args.dataset)
    seconds = args.seconds or (15.0 if not (args.quick or args.tiny) else 2.0)
    size = args.size or (300 if args.tiny else 10_000)
    seed_docs = 1000 if args.quick else None
    levels = [int(c) for c in args.clients.split(",")]
    if args.tiny:
        levels = [c for c in levels if c <= 8] or [1]
    model = model_dir(args.model_dir)
    work = args.work_dir
    queries = read_queries(dataset)
    pg = Postgres(args.pg_dsn)
    try:
        seed = load_seed(dataset, seed_docs, model, pg, work)
        corpus = build_corpus(seed, size, pg, work)
        data_dir = fresh_dir(work / "concurrency" / "data")
        db = "bench_concurrency"
        dsn = corpus.materialize(pg, db, data_dir)
        for threads in args.threads.split(","):
            setup = f"ONNX threads {threads}"
            extra = {} if threads == "default" else {"embedding_threads": int(threads)}
            env = server_env(data_dir, model, dsn, **extra)
            results: dict[int, dict[str, Any]] = {}
            with http_server(env, work / "concurrency" / f"server-{threads}.log", cwd=data_dir) as server:
                for clients in levels:
                    log(f"{setup}: {clients} concurrent clients for {seconds:.0f}s")
                    server_cpu, own_cpu = cpu_seconds(server.pid), cpu_seconds(os.getpid())
                    out = anyio.run(level, server.url, clients, seconds, queries)
                    server_cpu, own_cpu = cpu_seconds(server.pid) - server_cpu, cpu_seconds(os.getpid()) - own_cpu
                    throughput = out["searches"] / out["elapsed_s"]
                    results[clients] = {"throughput": throughput}
                    targets: dict[str, tuple[str, float]] = {"errors": ("<=", 0)}
                    if clients == 32:
                        targets["p95_ms"] = ("<=", 250.0)
                    if clients > 8 and 8 in results:
                        # "does not fall beyond 8 clients": within 10 % of the 8-client figure (noise allowance)
                        targets["searches_per_s"] = (">=", round(0.9 * results[8]["throughput"], 2))
                    elif clients == 8 and 1 in results:
                        targets["searches_per_s"] = (">=", round(results[1]["throughput"], 2))
                    emit(
                        BENCH,
                        "level",
                        setup=setup,
                        clients=clients,
                        chunks=corpus.chunks,
                        seconds=out["elapsed_s"],
                        searches=out["searches"],
                        searches_per_s=throughput,
                        errors=out["errors"],
                        error_samples=out["error_samples"],
                        **latency_fields(out["latencies"]),
                        server_cpu_s=server_cpu,
                        client_cpu_s=own_cpu,
                        server_cpu_ms_per_search=1000 * server_cpu / max(1, out["searches"]),
                        targets=targets,
                    )
        pg.drop(db)
    finally:
        pg.close()


if __name__ == "__main__":
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")
    main()
