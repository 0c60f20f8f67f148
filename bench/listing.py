"""``list_documents`` pages at 10k and 1M documents: keyset pagination on its index.

    python -m bench.listing [--quick] [--tiny] [--sizes 10000,1000000] [--pages 200]

The documents are generated inside PostgreSQL with ``generate_series`` (no embedding: listing
reads the documents table only), spread over three collections under random source URIs. For
each size:

* ``page``: ``Store.list_documents`` (limit 20) timed per call, for the first page, for pages
  that start at a random keyset (a cursor from the middle of the listing), within one
  collection, and under a source prefix;
* ``plan``: whether PostgreSQL answers a page with an index range scan (no sort, no sequential
  scan), and the same figure for the ordering used before migration 3 (``ORDER BY source_uri,
  id`` in the database's collation, which no index served), measured on the same data.
"""

from __future__ import annotations

import random
import time
from typing import Any

import anyio
import psycopg

from bench.common import Postgres, emit, latency_fields, log, parser
from mcp_rag.logging import configure_logging
from mcp_rag.store.migrate import migrate
from mcp_rag.store.postgres import Store, _encode_cursor, _list_documents_query

TENANT = "default"
COLLECTIONS = ("alpha", "beta", "gamma")
PAGE = 20
LEGACY_SQL = "SELECT id, source_uri FROM documents WHERE tenant = %s AND (source_uri, id) > (%s, %s) ORDER BY source_uri, id LIMIT %s"


def generate(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in COLLECTIONS:
            conn.execute("INSERT INTO collections (tenant, name) VALUES (%s, %s)", (TENANT, name))
        conn.execute(
            """INSERT INTO documents (id, tenant, collection, source_uri, title, content, content_hash, chunk_count)
               SELECT gen_random_uuid(), %s, (ARRAY['alpha','beta','gamma'])[1 + i %% 3],
                      'file:///corpus/' || substr(md5(i::text), 1, 2) || '/' || md5(i::text || 'x') || '.md',
                      'Document ' || i, 'x', md5(i::text), 1
               FROM generate_series(1, %s) AS i""",
            (TENANT, n),
        )
        conn.execute("VACUUM ANALYZE documents")


def plan_is_index_range(dsn: str, sql: str, params: list[Any]) -> tuple[bool, float]:
    """(an index scan without sort or seq scan, the execution time in ms) from EXPLAIN ANALYZE."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}".encode(), params).fetchone()
    assert row is not None
    top = row[0][0]
    kinds: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        kinds.append(node["Node Type"])
        for child in node.get("Plans", []):
            walk(child)

    walk(top["Plan"])
    ok = "Sort" not in kinds and "Seq Scan" not in kinds and any("Index" in k for k in kinds)
    return ok, float(top["Execution Time"])


async def measure(dsn: str, size: int, pages: int) -> None:
    rng = random.Random(size)
    store = Store(dsn, min_size=1, max_size=2)
    await store.open()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            keys = [
                (r[0], str(r[1]))
                for r in conn.execute("SELECT source_uri, id FROM documents ORDER BY random() LIMIT 2000").fetchall()
            ]
        cases: dict[str, list[dict[str, Any]]] = {
            "first page": [{}] * pages,
            "random keyset": [{"cursor": _encode_cursor(*rng.choice(keys))} for _ in range(pages)],
            "one collection, random keyset": [
                {"collection": rng.choice(COLLECTIONS), "cursor": _encode_cursor(*rng.choice(keys))}
                for _ in range(pages)
            ],
            "source prefix": [{"source_prefix": f"file:///corpus/{rng.randrange(256):02x}/"} for _ in range(pages)],
        }
        for case, calls in cases.items():
            samples = []
            for kwargs in calls:
                started = time.perf_counter()
                page = await store.list_documents(TENANT, limit=PAGE, **kwargs)
                samples.append(time.perf_counter() - started)
                assert len(page.documents) <= PAGE
            emit("listing", "page", documents=size, case=case, calls=len(samples), **latency_fields(samples))
    finally:
        await store.close()

    after = min(keys)
    sql, params = _list_documents_query(TENANT, None, None, PAGE, after)
    ok, ms = plan_is_index_range(dsn, sql, params)
    legacy_ok, legacy_ms = plan_is_index_range(dsn, LEGACY_SQL, [TENANT, after[0], after[1], PAGE + 1])
    emit(
        "listing",
        "plan",
        documents=size,
        index_range_scan=ok,
        execution_ms=ms,
        before_migration_3_index_range_scan=legacy_ok,
        before_migration_3_execution_ms=legacy_ms,
    )


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,1000000")
    p.add_argument("--pages", type=int, default=200)
    args = p.parse_args()
    configure_logging(level="WARNING")  # stdout carries the JSON lines only
    sizes = [2000] if args.tiny else [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    pages = 20 if args.tiny else args.pages
    pg = Postgres(args.pg_dsn)
    try:
        for size in sizes:
            name = f"bench_listing_{size}"
            dsn = pg.create(name)
            try:
                anyio.run(migrate, dsn)
                started = time.monotonic()
                generate(dsn, size)
                log(f"{size} documents generated in {time.monotonic() - started:.1f}s")
                anyio.run(measure, dsn, size, pages)
            finally:
                pg.drop(name)
    finally:
        pg.close()


if __name__ == "__main__":
    main()
