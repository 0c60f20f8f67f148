"""Soak: concurrent streamable-HTTP clients mixing ``search`` and ``ingest_text`` for a bounded
time against one ``mcp-rag serve --transport http`` subprocess on 127.0.0.1.

    python -m bench.soak --seconds 180 [--clients 32] [--warmup 30] [--ingest-every 4] [--pg-dsn DSN]

Every client is its own MCP session, opened before the clock starts. Three calls in four are
hybrid searches; the fourth re-ingests one of the client's four documents with new text (an
update: old chunks deleted, new ones written and indexed), so the data set stays the same size
and memory has no reason to grow. The server's resident memory (``VmRSS``) and open file
descriptors (``/proc/<pid>/fd``) are sampled every ``--interval`` seconds.

Prints JSON lines: one ``sample`` per interval, then one ``summary`` with the verdicts
(no failed call; fds after warm-up within ``FD_SLACK`` of the warm-up value; RSS within
``RSS_GROWTH`` of it). Exits 1 when a verdict fails. These are resource bounds, not timings.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from bench.common import (
    Postgres,
    emit,
    http_client,
    http_server,
    log,
    model_dir,
    proc_status,
    server_env,
    tool_error,
)

BENCH = "soak"
FD_SLACK = 8
"""Open descriptors the server may gain after warm-up (a pool connection opened late, a log rotation)."""
RSS_GROWTH = 0.25
"""Resident memory the server may gain after warm-up, as a fraction of the warm-up value."""

WORDS = (
    "granite",
    "harbour",
    "lantern",
    "meadow",
    "orbit",
    "quartz",
    "ribbon",
    "saffron",
    "timber",
    "velvet",
    "walnut",
    "zephyr",
    "anchor",
    "bramble",
    "cobalt",
    "delta",
    "ember",
    "falcon",
    "glacier",
    "hollow",
    "indigo",
    "juniper",
    "kestrel",
    "lagoon",
    "basalt",
    "tide",
    "anemone",
    "lichen",
    "fungus",
    "moss",
    "fern",
    "cedar",
    "willow",
    "heron",
    "otter",
    "beaver",
    "salmon",
)


@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    calls: int
    errors: int


@dataclass
class SoakResult:
    seconds: float
    clients: int
    warmup: float
    calls: int = 0
    searches: int = 0
    ingests: int = 0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    warm: Sample | None = None

    @property
    def after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.t >= self.warmup]

    def verdict(self) -> dict[str, Any]:
        warm = self.warm or (self.samples[0] if self.samples else Sample(0, 0, 0, 0, 0))
        later = self.after_warmup or [warm]
        end = later[-1]
        max_fds = max(s.fds for s in later)
        max_rss = max(s.rss_kb for s in later)
        return {
            "rss_kb_warm": warm.rss_kb,
            "rss_kb_end": end.rss_kb,
            "rss_kb_max_after_warmup": max_rss,
            "rss_growth": (end.rss_kb - warm.rss_kb) / warm.rss_kb if warm.rss_kb else 0.0,
            "fds_warm": warm.fds,
            "fds_end": end.fds,
            "fds_max_after_warmup": max_fds,
            "no_errors": self.errors == 0,
            "fds_flat": max_fds <= warm.fds + FD_SLACK,
            "rss_flat": max_rss <= warm.rss_kb * (1 + RSS_GROWTH),
        }

    @property
    def passed(self) -> bool:
        v = self.verdict()
        return bool(v["no_errors"] and v["fds_flat"] and v["rss_flat"] and self.calls > 0)


def proc_sample(pid: int) -> tuple[int, int]:
    """(VmRSS in kB, open file descriptors) of a live process."""
    return round(proc_status(pid)["VmRSS"] * 1024), len(os.listdir(f"/proc/{pid}/fd"))


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


async def soak(
    url: str,
    pid: int,
    *,
    seconds: float,
    clients: int = 32,
    warmup: float = 30.0,
    interval: float = 1.0,
    ingest_every: int = 4,
    on_sample: Callable[[Sample], None] | None = None,
) -> SoakResult:
    """Run the load; returns counts and the samples (the caller judges them with ``verdict``)."""
    result = SoakResult(seconds=seconds, clients=clients, warmup=warmup)
    run = uuid.uuid4().hex[:8]
    async with AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(http_client(url)) for _ in range(clients)]
        for i, session in enumerate(sessions):  # one document per client before the clock starts
            seeded = await session.call_tool(
                "ingest_text",
                {"text": _text(random.Random(i), 30), "source_uri": f"soak://{run}/c{i}/0", "title": f"c{i}"},
            )
            if tool_error(seeded):
                raise RuntimeError(f"seeding failed: {tool_error(seeded)}")
        started = time.monotonic()
        deadline = started + seconds

        async def worker(i: int, session: Any) -> None:
            rng = random.Random(1000 + i)
            k = 0
            while time.monotonic() < deadline:
                k += 1
                try:
                    if not ingest_every or k % ingest_every:
                        outcome = await session.call_tool("search", {"query": _text(rng, 4), "top_k": 5})
                        result.searches += 1
                    else:
                        outcome = await session.call_tool(
                            "ingest_text",
                            {
                                "text": _text(rng, rng.randint(20, 60)),
                                "source_uri": f"soak://{run}/c{i}/{k % 16 // 4}",
                                "title": f"client {i} document {k % 16 // 4}",
                            },
                        )
                        result.ingests += 1
                    error = tool_error(outcome)
                except Exception as exc:  # a transport failure counts as an error too
                    error = f"{type(exc).__name__}: {exc}"
                result.calls += 1
                if error:
                    result.errors += 1
                    if len(result.error_messages) < 10:
                        result.error_messages.append(error[:300])

        async def sampler() -> None:
            while True:
                now = time.monotonic() - started
                rss, fds = proc_sample(pid)
                sample = Sample(round(now, 2), rss, fds, result.calls, result.errors)
                result.samples.append(sample)
                if result.warm is None and now >= warmup:
                    result.warm = sample
                if on_sample is not None:
                    on_sample(sample)
                if now >= seconds:
                    return
                await anyio.sleep(min(interval, max(0.0, seconds - now)))

        async with anyio.create_task_group() as tg:
            for i, session in enumerate(sessions):
                tg.start_soon(worker, i, session)
            tg.start_soon(sampler)
    return result


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--warmup", type=float, default=None, help="seconds before the baseline sample (default: 1/6)")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--ingest-every", type=int, default=4, help="every Nth call of a client is an ingest (0: none)")
    p.add_argument(
        "--pg-dsn",
        default=os.environ.get("MCP_RAG_BENCH_PG_DSN"),
        help="admin DSN of a running PostgreSQL (default: start one with tests/pgcluster.py)",
    )
    p.add_argument("--work-dir", type=Path, default=Path("/var/tmp/mcp-rag-soak"))
    p.add_argument("--model-dir", type=Path, default=None)
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else max(5.0, args.seconds / 6)

    postgres = Postgres(args.pg_dsn)
    name = f"soak_{uuid.uuid4().hex[:8]}"
    try:
        dsn = postgres.create(name)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        data_dir = args.work_dir / name
        env = server_env(data_dir, model_dir(args.model_dir), dsn)
        with http_server(env, args.work_dir / f"{name}.log") as server:
            log(f"soak: {args.clients} clients for {args.seconds:.0f}s against pid {server.pid}")

            def on_sample(s: Sample) -> None:
                emit(BENCH, "sample", t=s.t, rss_mib=s.rss_kb / 1024, fds=s.fds, calls=s.calls, errors=s.errors)

            result = anyio.run(
                lambda: soak(
                    server.url,
                    server.pid,
                    seconds=args.seconds,
                    clients=args.clients,
                    warmup=warmup,
                    interval=args.interval,
                    ingest_every=args.ingest_every,
                    on_sample=on_sample,
                )
            )
        verdict = result.verdict()
        emit(
            BENCH,
            "summary",
            seconds=args.seconds,
            clients=args.clients,
            warmup_s=warmup,
            ingest_every=args.ingest_every,
            calls=result.calls,
            searches=result.searches,
            ingests=result.ingests,
            errors=result.errors,
            calls_per_s=result.calls / args.seconds,
            error_examples=result.error_messages,
            rss_mib_warm=verdict["rss_kb_warm"] / 1024,
            rss_mib_end=verdict["rss_kb_end"] / 1024,
            rss_mib_max_after_warmup=verdict["rss_kb_max_after_warmup"] / 1024,
            rss_growth=verdict["rss_growth"],
            fds_warm=verdict["fds_warm"],
            fds_end=verdict["fds_end"],
            fds_max_after_warmup=verdict["fds_max_after_warmup"],
            passed={
                "no_errors": verdict["no_errors"],
                "fds_flat": verdict["fds_flat"],
                "rss_flat": verdict["rss_flat"],
            },
        )
        if not result.passed:
            sys.exit(1)
    finally:
        shutil.rmtree(args.work_dir / name, ignore_errors=True)  # the data; the log stays
        postgres.drop(name)
        postgres.close()


if __name__ == "__main__":
    main()
