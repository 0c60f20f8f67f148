"""Several clients on one data directory: one holder, three relaying stdio servers, the CLI.

    python -m bench.shared_store [--quick] [--docs 300] [--queries 300]

One ``mcp-rag serve --transport stdio`` process starts first and holds the data directory (the
embedded index and the model); ``mcp-rag ingest`` sends a subset of the dataset through it; three
more stdio servers start and relay their sessions to it. Measured side by side in this one run:

* ``memory``: VmRSS of the holder and of each relaying process, and how many processes have the
  ONNX runtime (the embedding model) mapped: one model in memory;
* ``latency``: ``search`` tool calls (hybrid, top_k 10) through ``mcp.Client`` over the holder's own
  stdio and over a relaying stdio server, alternating per query, on the same queries: the relay's
  added p50 is the difference of the two medians (and, less sensitive to drifting machine load, the
  median of the per-query differences); then the same with ``prompts/list`` requests, which need
  no store, index or model, so their difference is close to the relay hop alone;
* ``handover``: the holder is killed (SIGKILL) and a search is sent at once through a relaying
  server: the seconds until it is answered (a relaying process takes the data directory over, loads
  the model, catches the index up and answers the resent call).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

from bench.common import (
    Postgres,
    check_dataset,
    emit,
    fresh_dir,
    latency_fields,
    log,
    mcp_rag_command,
    median,
    model_dir,
    parser,
    proc_status,
    read_corpus,
    read_queries,
    server_env,
    stdio_client,
    tool_error,
    write_subset,
)

BENCH = "shared_store"
RELAYS = 3
FORWARDER_MIB = 60.0
ADDED_P50_MS = 1.0
HANDOVER_S = 2.0


def children(parent: int) -> list[int]:
    """Direct child processes of ``parent`` (the stdio servers the MCP clients spawned)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                found.append(int(entry))
    return found


def has_model(pid: int) -> bool:
    """Whether the process has the ONNX runtime (the embedding model's engine) mapped."""
    try:
        with open(f"/proc/{pid}/maps") as handle:
            return "onnxruntime" in handle.read()
    except OSError:
        return False


def holder_pid(data_dir: Path) -> int:
    from mcp_rag.local.address import address
    from mcp_rag.local.election import holder_info

    pid = holder_info(address(data_dir)).get("pid")
    assert isinstance(pid, int), "no process holds the data directory"
    return pid


async def search(client: Any, query: str) -> float:
    started = time.perf_counter()
    result = await client.call_tool("search", {"query": query, "mode": "hybrid", "top_k": 10})
    elapsed = time.perf_counter() - started
    error = tool_error(result)
    if error:
        raise RuntimeError(f"search failed: {error}")
    return elapsed


async def list_prompts(client: Any, query: str) -> float:
    """``prompts/list``: answered from the server's registry without touching the store, the index or the
    model, so the transport (and the relay) is most of what is timed."""
    started = time.perf_counter()
    await client.list_prompts()
    return time.perf_counter() - started


async def run(
    env: dict[str, str], data_dir: Path, work: Path, subset: Path, queries: list[str], warmup: int, hop_samples: int
) -> None:
    async with AsyncExitStack() as stack:
        holder_stack = AsyncExitStack()
        holder = await holder_stack.enter_async_context(stdio_client(env, work / "holder.log", data_dir))
        pid = holder_pid(data_dir)
        log(f"holder pid {pid}; ingesting {subset.name} through it with the CLI")
        done = subprocess.run(
            [*mcp_rag_command(), "ingest", str(subset), "--no-progress"],
            env=env,
            cwd=data_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mcp-rag ingest failed: {done.stderr}")
        log(done.stdout.strip())
        relays = [
            await stack.enter_async_context(stdio_client(env, work / f"relay{i}.log", data_dir)) for i in range(RELAYS)
        ]
        for client in (holder, *relays):
            await search(client, "warm up")
        relay_pids = [p for p in children(os.getpid()) if p != pid]
        rss = {p: proc_status(p).get("VmRSS", 0.0) for p in [pid, *relay_pids]}
        with_model = [p for p in rss if has_model(p)]
        emit(
            BENCH,
            "memory",
            holder_rss_mib=rss[pid],
            relays=len(relay_pids),
            relay_rss_mib=[rss[p] for p in relay_pids],
            relay_rss_max_mib=max(rss[p] for p in relay_pids),
            total_rss_mib=sum(rss.values()),
            processes_with_model=len(with_model),
            targets={"relay_rss_max_mib": ("<=", FORWARDER_MIB), "processes_with_model": ("<=", 1)},
        )

        hop_queries = queries * max(1, hop_samples // max(1, len(queries)))
        for call, label, sample in ((search, "search", queries), (list_prompts, "list_prompts", hop_queries)):
            direct: list[float] = []
            relayed: list[float] = []
            for i, query in enumerate([*sample[:warmup], *sample]):
                pair = [(holder, direct), (relays[0], relayed)]
                if i % 2:
                    pair.reverse()  # alternate who goes first (caches, scheduling)
                for client, samples in pair:
                    seconds = await call(client, query)
                    if i >= warmup:
                        samples.append(seconds)
            paired = [(r - d) * 1000 for r, d in zip(relayed, direct, strict=True)]
            emit(
                BENCH,
                "latency",
                call=label,
                calls=len(sample),
                load_average=os.getloadavg()[0],
                **latency_fields(direct, "holder_"),
                **latency_fields(relayed, "relayed_"),
                added_p50_ms=(median(relayed) - median(direct)) * 1000,
                paired_added_p50_ms=median(paired),
                targets={"added_p50_ms": ("<=", ADDED_P50_MS)} if label == "search" else None,
            )

        log("killing the holder (SIGKILL) and searching through a relaying server")
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        await search(relays[0], queries[0])
        handover = time.perf_counter() - killed
        new_pid = holder_pid(data_dir)
        emit(
            BENCH,
            "handover",
            seconds=handover,
            load_average=os.getloadavg()[0],
            new_holder_was_relay=new_pid in relay_pids,
            targets={"seconds": ("<=", HANDOVER_S)},
        )
        with contextlib.suppress(Exception):
            await holder_stack.aclose()


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--docs", type=int, default=None, help="documents ingested (default 300; tiny 20)")
    p.add_argument("--queries", type=int, default=None, help="search queries per side (default 300; quick 100)")
    p.add_argument("--hop-calls", type=int, default=None, help="prompts/list calls per side (default 2000; tiny 10)")
    args = p.parse_args()
    dataset = check_dataset(args.dataset)
    docs = args.docs or (20 if args.tiny else 300)
    n_queries = args.queries or (10 if args.tiny else 100 if args.quick else 300)
    warmup = 2 if args.tiny else 20
    model = model_dir(args.model_dir)
    work = fresh_dir(args.work_dir / "shared_store")
    pool = read_queries(dataset)
    queries = [pool[i % len(pool)] for i in range(n_queries)]
    subset = write_subset(read_corpus(dataset, docs), work, "subset.jsonl")
    pg = Postgres(args.pg_dsn)
    try:
        dsn = pg.create("bench_shared_store")
        data_dir = fresh_dir(work / "data")
        env = server_env(data_dir, model, dsn)
        hop_samples = args.hop_calls or (10 if args.tiny else 2000)
        anyio.run(run, env, data_dir, work, subset, queries, warmup, hop_samples)
        pg.drop("bench_shared_store")
    finally:
        pg.close()


if __name__ == "__main__":
    main()
