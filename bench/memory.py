"""Resident memory of the server process: idle, during an ingest, under search load, after 100k chunks.

    python -m bench.memory [--quick] [--modes embedded,server] [--docs 1000] [--size 100000]

VmRSS of the ``mcp-rag serve --transport http`` process is sampled every 50 ms from
/proc/<pid>/status, and VmHWM (the kernel's own high-water mark since the process started) is read
after each phase, with RssAnon (heap: what an OOM kill is about) and RssFile (mapped files, e.g.
the Edge index's memory-mapped segments: page cache the kernel can reclaim under a cgroup limit).

* ``embedded``: the default, Qdrant Edge in-process;
* ``server``: ``QdrantServerIndex`` over qdrant-client local mode (``:memory:``) in the server
  process (``bench/serve_qdrant_local.py``): no Qdrant server binary exists here. With a real
  Qdrant server the vectors would live in Qdrant's process instead.

Phases, each on a fresh server: ``idle`` (a few seconds after /ready), ``ingest`` (the ``ingest_file`` tool
on the first ``--docs`` documents of the dataset), ``search`` (8 clients searching for 10 s);
then a server started on the ``--size``-chunk corpus: ``idle_large``, ``search_large`` and
``ingest_large`` (the same ingest on top of the large index: the worst case). In server
mode the large corpus is at most 20,000 chunks: local mode re-indexes everything from the change log
at every start and slows down as it grows (100k points did not finish within 10 minutes).
Postgres is external (its memory is not the server's).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import (
    Postgres,
    RssSampler,
    check_dataset,
    emit,
    fresh_dir,
    http_client,
    http_server,
    log,
    model_dir,
    parser,
    proc_status,
    read_corpus,
    read_queries,
    server_env,
    tool_error,
    write_subset,
)
from bench.concurrency import level
from bench.corpus import CORPUS_COLLECTION, build_corpus, load_seed

BENCH = "memory"
IDLE_MIB = 512.0
PEAK_MIB = 1024.0


def command(mode: str) -> list[str] | None:
    return [sys.executable, "-m", "bench.serve_qdrant_local"] if mode == "server" else None


async def ingest_file(url: str, path: Path) -> dict[str, Any]:
    async with http_client(url) as client:
        result = await client.call_tool("ingest_file", {"path": str(path), "collection": CORPUS_COLLECTION})
        error = tool_error(result)
        if error:
            raise RuntimeError(f"ingest_file failed: {error}")
        return dict(result.structured_content)


def record(mode: str, phase: str, sampler: RssSampler, pid: int, **extra: Any) -> None:
    status = proc_status(pid)
    targets: dict[str, tuple[str, float]] = {"hwm_mib": ("<=", PEAK_MIB)}
    if phase.startswith("idle"):
        targets["rss_mib"] = ("<=", IDLE_MIB)
    emit(
        BENCH,
        "rss",
        mode=mode,
        phase=phase,
        rss_mib=status.get("VmRSS"),
        peak_mib=sampler.peak(),
        hwm_mib=status.get("VmHWM"),
        anon_mib=status.get("RssAnon"),
        file_mib=status.get("RssFile"),
        targets=targets,
        **extra,
    )


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--modes", default="embedded,server")
    p.add_argument("--docs", type=int, default=None, help="documents ingested (default 1000; quick 200)")
    p.add_argument("--size", type=int, default=None, help="large corpus in chunks (default 100000; quick 10000)")
    p.add_argument(
        "--server-size",
        type=int,
        default=None,
        help="large corpus for server mode (default: --size, at most 20000: qdrant-client local mode"
        " indexes ~100 points/s at that size and warns above 20,000 points)",
    )
    p.add_argument("--load-seconds", type=float, default=None, help="search load per phase (default 10; quick 3)")
    args = p.parse_args()
    dataset = check_dataset(args.dataset)
    small = args.quick or args.tiny
    n_docs = args.docs or (200 if small else 1000)
    size = args.size or (300 if args.tiny else 10_000 if args.quick else 100_000)
    load_seconds = args.load_seconds or (2.0 if args.tiny else 3.0 if args.quick else 10.0)
    settle = 0.5 if args.tiny else 3.0
    seed_docs = 1000 if args.quick else None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    model = model_dir(args.model_dir)
    work = fresh_dir(args.work_dir / "memory")
    docs = read_corpus(dataset, n_docs)
    n_docs = len(docs)
    corpus_file = write_subset(docs, work / "input", "corpus.jsonl")
    queries = read_queries(dataset)
    pg = Postgres(args.pg_dsn)
    try:
        seed = load_seed(dataset, seed_docs, model, pg, args.work_dir)
        server_size = args.server_size or min(size, 20_000)
        for mode in modes:
            large = build_corpus(seed, server_size if mode == "server" else size, pg, args.work_dir)
            data_dir = fresh_dir(work / f"data-{mode}")
            db = f"bench_memory_{mode}"
            env = server_env(data_dir, model, pg.create(db), allowed_roots=corpus_file.parent)
            log(f"{mode}: idle, ingest of {n_docs} documents, search load")
            with (
                http_server(env, work / f"{mode}.log", command=command(mode), cwd=data_dir) as server,
                RssSampler(server.pid) as sampler,
            ):
                time.sleep(settle)
                record(mode, "idle", sampler, server.pid, ready_s=server.ready_seconds)
                sampler.reset()
                started = time.perf_counter()
                out = anyio.run(ingest_file, server.url, corpus_file)
                record(
                    mode,
                    "ingest",
                    sampler,
                    server.pid,
                    docs=n_docs,
                    ingested_chunks=out.get("chunks"),
                    seconds=time.perf_counter() - started,
                )
                sampler.reset()
                res = anyio.run(level, server.url, 8, load_seconds, queries)
                record(mode, "search", sampler, server.pid, clients=8, searches=res["searches"], errors=res["errors"])
            pg.drop(db)

            data_dir = fresh_dir(work / f"large-{mode}")
            db = f"bench_memory_large_{mode}"
            dsn = large.materialize(pg, db, data_dir)
            log(f"{mode}: server on the {large.chunks}-chunk corpus")
            env = server_env(data_dir, model, dsn, allowed_roots=corpus_file.parent)
            with (
                http_server(env, work / f"{mode}-large.log", command=command(mode), cwd=data_dir) as server,
                RssSampler(server.pid) as sampler,
            ):
                time.sleep(settle)
                record(mode, "idle_large", sampler, server.pid, chunks=large.chunks, ready_s=server.ready_seconds)
                sampler.reset()
                res = anyio.run(level, server.url, 8, load_seconds, queries)
                record(
                    mode,
                    "search_large",
                    sampler,
                    server.pid,
                    chunks=large.chunks,
                    clients=8,
                    searches=res["searches"],
                    errors=res["errors"],
                )
                sampler.reset()
                started = time.perf_counter()
                out = anyio.run(ingest_file, server.url, corpus_file)
                record(
                    mode,
                    "ingest_large",
                    sampler,
                    server.pid,
                    chunks=large.chunks,
                    docs=n_docs,
                    ingested_chunks=out.get("chunks"),
                    seconds=time.perf_counter() - started,
                )
            pg.drop(db)
    finally:
        pg.close()


if __name__ == "__main__":
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")
    main()
