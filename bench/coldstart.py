"""Cold start: from process start to ``/ready`` answering 200, with the model already provisioned.

    python -m bench.coldstart [--quick] [--repeats 5]

``mcp-rag serve --transport http`` is started and ``/ready`` polled every 10 ms, then the server
is stopped (SIGTERM) and started again:

* ``external``: an external PostgreSQL already running (tests/pgcluster.py), database migrated
  and index created by a first, unmeasured start;
* ``embedded``: the embedded PostgreSQL (no MCP_RAG_DATABASE_URL): its first start (initdb) is
  reported on its own, then restarts on the existing data directory (the server stops the
  embedded PostgreSQL when it exits, so each restart starts it again).

Also reported: the time to import the serving code alone (``python -c 'import mcp_rag.transports'``).
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import (
    Postgres,
    emit,
    fresh_dir,
    log,
    median,
    model_dir,
    parser,
    server_env,
    start_http_server,
    stop_process,
)

BENCH = "coldstart"
TARGET_S = 3.0


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--repeats", type=int, default=None, help="measured starts per setup (default 5; quick 3)")
    p.add_argument("--setups", default="external,embedded")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.tiny else 3 if args.quick else 5)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    model = model_dir(args.model_dir)
    work = fresh_dir(args.work_dir / "coldstart")
    pg = Postgres(args.pg_dsn) if "external" in setups else None
    try:
        imports = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import mcp_rag.transports"], check=True, cwd=work)
            imports.append(time.perf_counter() - started)
        emit(BENCH, "imports", module="mcp_rag.transports", median_s=median(imports), samples_s=imports)
        for setup in setups:
            data_dir = fresh_dir(work / f"data-{setup}")
            dsn = pg.create("bench_coldstart") if setup == "external" and pg is not None else None
            env = server_env(data_dir, model, dsn)
            first = start_http_server(env, work / f"{setup}.log", cwd=data_dir)
            stop_process(first.process)
            if setup == "embedded":
                emit(BENCH, "first_start", setup=setup, seconds=first.ready_seconds)
            samples = []
            for i in range(repeats):
                server = start_http_server(env, work / f"{setup}.log", cwd=data_dir)
                samples.append(server.ready_seconds)
                stop_process(server.process)
                log(f"{setup} start {i + 1}/{repeats}: {server.ready_seconds:.2f}s")
            emit(
                BENCH,
                "ready",
                setup=setup,
                repeats=repeats,
                median_s=median(samples),
                min_s=min(samples),
                max_s=max(samples),
                samples_s=samples,
                targets={"median_s": ("<=", TARGET_S)},
            )
            if dsn is not None and pg is not None:
                pg.drop("bench_coldstart")
    finally:
        if pg is not None:
            pg.close()


if __name__ == "__main__":
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")
    main()
