"""Search latency over the real transports, and where the time goes.

    python -m bench.latency [--quick] [--sizes 10000,100000] [--queries 300]

For each corpus size (see ``bench/corpus.py`` for how the corpus is made) and each mode
(hybrid, dense, lexical):

* ``inprocess``: the steps of ``RagService.search`` timed separately in this process on the same
  data: query embedding (BM25, plus the dense model unless the mode is lexical), index query (Edge),
  Postgres hydration, and the whole ``service.search`` call;
* ``e2e``: ``search`` tool calls through ``mcp.Client`` over a real ``mcp-rag serve`` stdio subprocess,
  and over streamable HTTP to a ``mcp-rag serve --transport http`` subprocess (top_k 10);
* ``breakdown``: the medians side by side, with the protocol overhead: per call, the client's
  end-to-end time minus the time the server spent inside the tool (its ``tool call`` log line),
  i.e. client library + transport + the SDK's request handling, median over the calls.

Queries are the dataset's queries (SciFact-train: real claims), the modes interleaved per query.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import (
    EXTRA_SETTINGS,
    TENANT,
    Postgres,
    check_dataset,
    emit,
    fresh_dir,
    http_client,
    http_server,
    latency_fields,
    log,
    median,
    model_dir,
    parser,
    read_queries,
    server_env,
    stdio_client,
    tool_error,
)
from bench.corpus import CORPUS_COLLECTION, build_corpus, load_seed, settings_for

BENCH = "latency"
MODES = ("hybrid", "dense", "lexical")
TOP_K = 10


def targets_for(size: int, transport: str, mode: str) -> dict[str, tuple[str, float]] | None:
    if transport != "stdio" or mode != "hybrid":
        return None
    if size == 10_000:
        return {"p50_ms": ("<=", 8.0), "p95_ms": ("<=", 20.0)}
    if size == 100_000:
        return {"p50_ms": ("<=", 30.0)}
    return None


async def in_process(settings: Any, queries: list[str], warmup: int) -> dict[str, dict[str, list[float]]]:
    from mcp_rag.index.base import FusionParams, IndexQuery
    from mcp_rag.runtime import open_runtime
    from mcp_rag.service import SearchFilters

    steps: dict[str, dict[str, list[float]]] = {
        m: {"embed": [], "index": [], "hydrate": [], "service": []} for m in MODES
    }
    async with open_runtime(settings, follow_changes=False) as rt:
        service = rt.service
        filters = SearchFilters(collection=CORPUS_COLLECTION)
        search_filter = service._index_filter(TENANT, filters)
        s = settings
        fusion = FusionParams(
            method=s.fusion,
            rrf_k=s.rrf_k,
            weights=(s.dense_weight, s.sparse_weight),
            prefetch_limit=max(s.prefetch_limit, TOP_K),
        )
        for i, query in enumerate(queries[:warmup] + queries):
            for mode in MODES:
                t0 = time.perf_counter()
                e = await rt.embedder.embed_query(query, dense=mode != "lexical")
                t1 = time.perf_counter()
                hits = await rt.index.query(
                    IndexQuery(
                        filter=search_filter,
                        limit=TOP_K,
                        fusion=fusion,
                        dense=e.dense.tolist() if e.dense is not None else None,
                        sparse=e.sparse if mode in ("hybrid", "lexical") else None,
                    )
                )
                t2 = time.perf_counter()
                await rt.store.hydrate(TENANT, [h.id for h in hits])
                t3 = time.perf_counter()
                await service.search(TENANT, query, mode=mode, top_k=TOP_K, filters=filters)
                t4 = time.perf_counter()
                if i >= warmup:
                    for key, value in (
                        ("embed", t1 - t0),
                        ("index", t2 - t1),
                        ("hydrate", t3 - t2),
                        ("service", t4 - t3),
                    ):
                        steps[mode][key].append(value)
    return steps


async def over_client(client: Any, queries: list[str], warmup: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    errors = dict.fromkeys(MODES, 0)
    async with client:
        for i, query in enumerate(queries[:warmup] + queries):
            for mode in MODES:
                started = time.perf_counter()
                try:
                    result = await client.call_tool(
                        "search", {"query": query, "mode": mode, "top_k": TOP_K, "collection": CORPUS_COLLECTION}
                    )
                    failed = tool_error(result) is not None or not result.structured_content["results"]
                except Exception as exc:
                    log(f"search failed: {exc!r}")
                    failed = True
                seconds = time.perf_counter() - started
                if i >= warmup:
                    samples[mode].append(seconds)
                    errors[mode] += int(failed)
    return samples, errors


def server_tool_seconds(log_path: Path, count: int) -> list[float]:
    """The server's own duration of the last ``count`` search calls (its "tool call" log lines)."""
    durations = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "tool call" and record.get("tool") == "search":
            durations.append(float(record["duration_ms"]) / 1000)
    return durations[-count:]


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--sizes", default=None, help="corpus sizes in chunks (default 10000,100000; quick 10000)")
    p.add_argument("--queries", type=int, default=None, help="queries per mode (default 300; quick 100)")
    p.add_argument("--transports", default="stdio,http")
    args = p.parse_args()
    dataset = check_dataset(args.dataset)
    if args.tiny:
        sizes, n_queries, seed_docs, warmup = [300], args.queries or 5, None, 2
    elif args.quick:
        sizes, n_queries, seed_docs, warmup = [10_000], args.queries or 100, 1000, 10
    else:
        sizes, n_queries, seed_docs, warmup = [10_000, 100_000], args.queries or 300, None, 20
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    model = model_dir(args.model_dir)
    work = args.work_dir
    pool = read_queries(dataset)
    queries = [pool[i % len(pool)] for i in range(n_queries)]
    pg = Postgres(args.pg_dsn)
    try:
        seed = load_seed(dataset, seed_docs, model, pg, work)
        for size in sizes:
            corpus = build_corpus(seed, size, pg, work)
            data_dir = fresh_dir(work / "latency" / f"data-{size}")
            db = f"bench_latency_{size}"
            dsn = corpus.materialize(pg, db, data_dir)
            common = {"chunks": corpus.chunks, "real_chunks": corpus.real_chunks, "queries": n_queries}
            log(f"{size}: in-process step timings")
            steps = anyio.run(in_process, settings_for(data_dir, dsn, model, **EXTRA_SETTINGS), queries, warmup)
            for mode in MODES:
                emit(
                    BENCH,
                    "inprocess",
                    mode=mode,
                    **common,
                    **{f"{k}_p50_ms": median(v) * 1000 for k, v in steps[mode].items()},
                    **{f"{k}_p95_ms": sorted(v)[int(0.95 * (len(v) - 1))] * 1000 for k, v in steps[mode].items()},
                )
            env = server_env(data_dir, model, dsn)
            e2e: dict[str, dict[str, list[float]]] = {}
            outside: dict[str, dict[str, list[float]]] = {}
            for transport in transports:
                log(f"{size}: search over {transport}")
                server_log = work / "latency" / f"{transport}-{size}.log"
                server_log.unlink(missing_ok=True)
                if transport == "stdio":
                    client = stdio_client(env, server_log, data_dir)
                    samples, errors = anyio.run(over_client, client, queries, warmup)
                else:
                    with http_server(env, server_log, cwd=data_dir) as server:
                        samples, errors = anyio.run(over_client, http_client(server.url), queries, warmup)
                e2e[transport] = samples
                # The server logs each call's duration inside the tool; calls alternate the modes.
                inside = server_tool_seconds(server_log, len(queries) * len(MODES))
                outside[transport] = {}
                for k, mode in enumerate(MODES):
                    tool = inside[k :: len(MODES)] if len(inside) == len(queries) * len(MODES) else []
                    outside[transport][mode] = [a - b for a, b in zip(samples[mode], tool, strict=False)]
                    emit(
                        BENCH,
                        "e2e",
                        transport=transport,
                        mode=mode,
                        **common,
                        n=len(samples[mode]),
                        errors=errors[mode],
                        **latency_fields(samples[mode]),
                        server_tool_p50_ms=median(tool) * 1000 if tool else None,
                        outside_tool_p50_ms=median(outside[transport][mode]) * 1000 if tool else None,
                        targets=targets_for(size, transport, mode),
                    )
            for mode in MODES:
                row: dict[str, Any] = {f"{k}_p50_ms": median(v) * 1000 for k, v in steps[mode].items()}
                for transport, samples in e2e.items():
                    row[f"{transport}_p50_ms"] = median(samples[mode]) * 1000
                    row[f"{transport}_overhead_p50_ms"] = (
                        median(outside[transport][mode]) * 1000 if outside[transport][mode] else None
                    )
                emit(BENCH, "breakdown", mode=mode, chunks=corpus.chunks, **row)
            pg.drop(db)
    finally:
        pg.close()


if __name__ == "__main__":
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")
    main()
