"""Side by side with the official Qdrant MCP server (``mcp-server-qdrant`` from PyPI), in one run.

    python -m bench.peer [--quick | --tiny] [--docs N] [--queries N] [--peer-storage memory|path]

Both servers run as stdio subprocesses, driven by the same ``mcp.Client`` from this process, on
the same corpus (SciFact-train by default) with the same all-MiniLM-L6-v2 weights: the peer gets
our offline model folder through fastembed's cache layout (``FASTEMBED_CACHE_PATH`` with
``HF_HUB_OFFLINE=1``, so it downloads nothing). The peer is installed with pip into its own
virtualenv under the work directory (once; reused while its version matches).

* ingest: one call per document, the two servers taking turns in blocks of ``--block`` calls (20;
  which of them goes first alternates), so that other load on the machine hits both alike, with a
  pause of ``--switch-pause`` seconds (0.2) when they switch. The pause lets the server that just
  finished go idle: ONNX Runtime's worker threads keep spinning on a core for about 100 ms after a
  run (about 40 ms of CPU, measured on this machine), which would otherwise be charged to the other
  server's next call. ``--block 1 --switch-pause 0`` alternates call by call. mcp-rag's
  ``ingest_text`` (title, text, a source URI), the peer's ``qdrant-store`` (title and text as one
  ``information``, the document id in its metadata). Reported: documents/s over the summed call
  times, and the per-call p50/p95.
* search: the dataset's queries, top_k 10 on both sides (mcp-rag's ``search``, hybrid by default,
  one result per document; the peer's ``qdrant-find`` with ``QDRANT_SEARCH_LIMIT=10``),
  taking turns the same way. Reported: p50/p95/p99, and nDCG@10 / recall@10 of the ids each side
  returns against the dataset's qrels (queries whose relevant documents were all ingested).
* bulk: once both servers are gone, one ``mcp-rag ingest`` of the same documents (a JSONL file)
  into a fresh database and data directory, timed from the command's start to its exit, over the
  peer's per-call documents/s of this run (``bulk_over_peer_per_call``).
* memory: each server process's VmHWM (peak RSS since start) at the end, and its VmRSS after the
  ingest. mcp-rag's Postgres runs in its own processes and is not counted (the peer has no
  database: ``:memory:`` is the peer's whole store, lost when it exits).

Lines: ``side`` (one per server), ``ratio`` (mcp-rag over the peer, with the issue's targets) and
``setup`` (versions, the corpus). If the peer cannot be installed because PyPI is unreachable the
benchmark exits with status 75 and says so (the smoke test skips on exactly that).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from bench.common import (
    Postgres,
    check_dataset,
    default_model_dir,
    emit,
    fresh_dir,
    latency_fields,
    log,
    machine,
    median,
    model_dir,
    parser,
    percentile,
    proc_status,
    read_corpus,
    server_env,
    stdio_client,
    tool_error,
    write_subset,
)
from bench.ingest import run_cli_ingest

BENCH = "peer"
PEER_PACKAGE = "mcp-server-qdrant"
PEER_VERSION = "0.8.1"
PEER_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PEER_HF_REPO = "Qdrant/all-MiniLM-L6-v2-onnx"
"""Where fastembed 0.9 looks for PEER_MODEL's ONNX in its Hugging Face cache layout."""
PEER_COLLECTION = "bench"
TOP_K = 10
UNREACHABLE = 75  # EX_TEMPFAIL: PyPI could not be reached, so the peer could not be installed
MODEL_FILES = ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --- the peer's installation ------------------------------------------------------------------


class PeerUnavailable(RuntimeError):
    """The peer could not be installed because the package index is unreachable."""


def index_url() -> str:
    """The index pip uses here (``PIP_INDEX_URL`` or pip's configuration), else PyPI."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
            check=False,
        )
        url = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "https://pypi.org/simple"
    return url.rstrip("/")


def index_reachable(url: str, timeout: float = 10.0) -> str | None:
    """None when the package index answers for the peer's project, else why not."""
    try:
        with urllib.request.urlopen(f"{url}/{PEER_PACKAGE}/", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def install_peer(venv: Path, version: str) -> Path:
    """The peer's console script in its own virtualenv, installed with pip if not already there."""
    script = venv / "bin" / "mcp-server-qdrant"
    stamp = venv / "installed.json"
    if script.exists() and stamp.is_file() and json.loads(stamp.read_text()).get("version") == version:
        return script
    log(f"installing {PEER_PACKAGE}=={version} into {venv} (pip, a few minutes)")
    fresh_dir(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
            f"{PEER_PACKAGE}=={version}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        url = index_url()
        why = index_reachable(url)
        if why is not None:
            raise PeerUnavailable(
                f"{PEER_PACKAGE} could not be installed: the package index {url} is unreachable ({why})"
            )
        raise RuntimeError(f"pip install {PEER_PACKAGE}=={version} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    stamp.write_text(json.dumps({"version": version}))
    return script


def fastembed_cache(model: Path, cache: Path) -> Path:
    """A fastembed cache folder holding our offline model where fastembed looks for PEER_MODEL:
    the Hugging Face hub layout (``models--<org>--<name>/refs/main`` naming a snapshot folder)."""
    repo = cache / ("models--" + PEER_HF_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / "offline"
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("offline")
    for name in MODEL_FILES:
        source = model / name
        target = snapshot / name
        if target.is_symlink() or target.exists():
            target.unlink()
        if source.is_file():
            target.symlink_to(source.resolve())
    return cache


def peer_env(cache: Path, storage: str, data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "OMP_NUM_THREADS")
    }
    env.update(
        FASTEMBED_CACHE_PATH=str(cache),
        HF_HUB_OFFLINE="1",
        COLLECTION_NAME=PEER_COLLECTION,
        EMBEDDING_PROVIDER="fastembed",
        EMBEDDING_MODEL=PEER_MODEL,
        QDRANT_SEARCH_LIMIT=str(TOP_K),
    )
    if storage == "memory":
        env["QDRANT_URL"] = ":memory:"
    else:
        env["QDRANT_LOCAL_PATH"] = str(data_dir / "qdrant")
    return env


def peer_client(script: Path, env: dict[str, str], errlog_path: Path, cwd: Path) -> Any:
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client as transport

    params = StdioServerParameters(command=str(script), args=["--transport", "stdio"], env=env, cwd=str(cwd))
    errlog = errlog_path.open("a")

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[Any]:
        try:
            async with transport(params, errlog=errlog) as streams:
                yield streams
        finally:
            errlog.close()

    return Client(connect(), cache=None, read_timeout_seconds=600)


def child_pid(marker: str) -> int:
    """The pid of this process's child whose command line contains ``marker``."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and marker in cmdline:
            return int(entry.name)
    raise RuntimeError(f"no child process running {marker!r}")


# --- the corpus ---------------------------------------------------------------------------------


@dataclass
class Workload:
    docs: list[dict[str, Any]]
    queries: list[tuple[str, str]]  # (query id, text) searched, in order, repeating if needed
    qrels: dict[str, set[str]]  # judged queries whose relevant documents are all ingested


def workload(dataset: Path, n_docs: int | None, n_queries: int) -> Workload:
    """The first ``n_docs`` documents, plus any document judged relevant to a query so that the
    first queries with judgements have every relevant document in the corpus."""
    corpus = read_corpus(dataset)
    qrels: dict[str, set[str]] = {}
    path = dataset / "qrels.tsv"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[2].strip() not in ("", "0"):
                qrels.setdefault(parts[0], set()).add(parts[1])
    texts: dict[str, str] = {}
    qpath = dataset / "queries.jsonl"
    if qpath.is_file():
        for line in qpath.read_text(encoding="utf-8").splitlines():
            if line.strip():
                q = json.loads(line)
                texts[str(q["_id"])] = q["text"]
    judged = [(qid, texts[qid]) for qid in qrels if qid in texts]
    pool = judged or [(str(i), d.get("title") or d["text"][:80]) for i, d in enumerate(corpus)]
    if n_docs is None or n_docs >= len(corpus):
        chosen = corpus
    else:
        by_id = {str(d["_id"]): d for d in corpus}
        wanted: dict[str, dict[str, Any]] = {}
        for qid, _ in judged[: max(1, n_queries // 2)]:
            for doc_id in sorted(qrels[qid]):
                if doc_id in by_id and len(wanted) < n_docs // 2:
                    wanted[doc_id] = by_id[doc_id]
        for d in corpus:
            if len(wanted) >= n_docs:
                break
            wanted.setdefault(str(d["_id"]), d)
        chosen = list(wanted.values())
    ids = {str(d["_id"]) for d in chosen}
    kept = {qid: rel for qid, rel in qrels.items() if rel <= ids}
    ordered = [q for q in pool if q[0] in kept] + [q for q in pool if q[0] not in kept]
    queries = [ordered[i % len(ordered)] for i in range(n_queries)]
    return Workload(chosen, queries, kept)


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int = TOP_K) -> float:
    gain = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return gain / ideal if ideal else 0.0


# --- the two sides ------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    ingest: list[float] = field(default_factory=list)
    search: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ndcg: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    scored: set[str] = field(default_factory=set)
    pid: int = 0
    rss_after_ingest: float = 0.0
    hwm: float = 0.0
    ready_seconds: float = 0.0

    def fail(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message[:300])


class Ours:
    name = "mcp-rag"
    marker = "mcp-rag"

    async def ingest(self, client: Any, doc: dict[str, Any]) -> str | None:
        result = await client.call_tool(
            "ingest_text",
            {
                "text": doc["text"],
                "title": doc.get("title") or "",
                "source_uri": f"corpus:{doc['_id']}",
                "metadata": {"doc_id": str(doc["_id"])},
            },
        )
        return tool_error(result)

    async def search(self, client: Any, query: str) -> tuple[list[str], str | None]:
        result = await client.call_tool("search", {"query": query, "top_k": TOP_K})
        error = tool_error(result)
        if error:
            return [], error
        return [str(hit["source_uri"]).removeprefix("corpus:") for hit in result.structured_content["results"]], None


# The peer's entries carry the metadata as JSON inside its text (itself JSON-encoded when the
# result is a list, hence the optional backslashes).
_PEER_ID = re.compile(r'\\?"doc_id\\?":\s*\\?"([^"\\]*)')


class Peer:
    name = "mcp-server-qdrant"
    marker = "mcp-server-qdrant"

    async def ingest(self, client: Any, doc: dict[str, Any]) -> str | None:
        title = doc.get("title") or ""
        information = f"{title}\n\n{doc['text']}" if title else doc["text"]
        result = await client.call_tool(
            "qdrant-store", {"information": information, "metadata": {"doc_id": str(doc["_id"])}}
        )
        return tool_error(result)

    async def search(self, client: Any, query: str) -> tuple[list[str], str | None]:
        result = await client.call_tool("qdrant-find", {"query": query})
        error = tool_error(result)
        if error:
            return [], error
        text = "\n".join(getattr(c, "text", "") for c in result.content or [])
        return _PEER_ID.findall(text), None


async def timed(side: Side, call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    try:
        out = await call
    except Exception as exc:
        side.fail(repr(exc))
        return time.perf_counter() - started, None
    return time.perf_counter() - started, out


def turns(n: int, names: Sequence[str], block: int) -> list[tuple[str, range]]:
    """Which server runs which items, in order: blocks of ``block`` items, each block by both
    servers in turn, the first of them alternating from block to block."""
    out: list[tuple[str, range]] = []
    for k, start in enumerate(range(0, n, block)):
        items = range(start, min(start + block, n))
        out += [(name, items) for name in (names if k % 2 == 0 else names[::-1])]
    return out


async def run_both(
    clients: dict[str, Any], work: Workload, warmup: int, block: int, switch_pause: float
) -> dict[str, Side]:
    impls: dict[str, Ours | Peer] = {"mcp-rag": Ours(), "mcp-server-qdrant": Peer()}
    sides = {name: Side(name) for name in impls}
    async with contextlib.AsyncExitStack() as stack:
        for name, client in clients.items():
            started = time.perf_counter()
            await stack.enter_async_context(client)
            sides[name].ready_seconds = time.perf_counter() - started
            sides[name].pid = child_pid(impls[name].marker)
        names = list(impls)
        log(f"ingest: {len(work.docs)} documents, one call each, the servers taking turns in blocks of {block}")
        logged = 0
        for name, items in turns(len(work.docs), names, block):
            await anyio.sleep(switch_pause)
            for i in items:
                seconds, error = await timed(sides[name], impls[name].ingest(clients[name], work.docs[i]))
                sides[name].ingest.append(seconds)
                if error:
                    sides[name].fail(str(error))
            if items[-1] + 1 >= logged + 500:
                logged = items[-1] + 1
                log(f"  {logged} documents")
        for side in sides.values():
            side.rss_after_ingest = proc_status(side.pid).get("VmRSS", 0.0)
        log(f"search: {len(work.queries)} queries (+{warmup} warm-up), top_k {TOP_K}, the servers taking turns")
        queries = work.queries[:warmup] + work.queries
        for name, items in turns(len(queries), names, block):
            await anyio.sleep(switch_pause)
            side = sides[name]
            for i in items:
                qid, query = queries[i]
                seconds, out = await timed(side, impls[name].search(clients[name], query))
                if i < warmup:
                    continue
                side.search.append(seconds)
                ids, error = out if out is not None else ([], "no result")
                if error:
                    side.fail(str(error))
                elif qid in work.qrels and qid not in side.scored:
                    side.scored.add(qid)
                    relevant = work.qrels[qid]
                    side.ndcg.append(ndcg_at(ids, relevant))
                    side.recall.append(len(set(ids[:TOP_K]) & relevant) / len(relevant))
        for side in sides.values():
            side.hwm = proc_status(side.pid).get("VmHWM", 0.0)
    return sides


def bulk_ingest(pg: Postgres, docs: list[dict[str, Any]], model: Path, work_dir: Path) -> float:
    """Seconds of one ``mcp-rag ingest`` of ``docs`` (a JSONL file) into a fresh database and data
    directory, from the command's start to its exit: the bulk path, run once the servers are gone."""
    db = "bench_peer_bulk"
    dsn = pg.create(db)
    try:
        folder = fresh_dir(work_dir / "bulk")
        corpus = write_subset(docs, folder, "corpus.jsonl")
        log(f"bulk: mcp-rag ingest of {len(docs)} documents")
        seconds, _, _ = run_cli_ingest(server_env(fresh_dir(folder / "data"), model, dsn), corpus, folder)
        return seconds
    finally:
        pg.drop(db)


def summary(side: Side, n_docs: int) -> dict[str, Any]:
    ingest_total = sum(side.ingest)
    return {
        "docs": n_docs,
        "ingest_docs_per_s": n_docs / ingest_total if ingest_total else None,
        "ingest_call_p50_ms": median(side.ingest) * 1000,
        "ingest_call_p95_ms": percentile(side.ingest, 95) * 1000,
        "searches": len(side.search),
        **latency_fields(side.search, "search_"),
        "ndcg_at_10": sum(side.ndcg) / len(side.ndcg) if side.ndcg else None,
        "recall_at_10": sum(side.recall) / len(side.recall) if side.recall else None,
        "judged_queries": len(side.ndcg),
        "rss_after_ingest_mib": side.rss_after_ingest,
        "peak_rss_mib": side.hwm,
        "start_s": side.ready_seconds,
        "errors": side.errors,
        "error_samples": side.error_samples,
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--docs", type=int, default=None, help="documents to ingest (default all; quick 500; tiny all)")
    p.add_argument("--queries", type=int, default=None, help="searches per server (default 300; quick 100)")
    p.add_argument("--block", type=int, default=20, help="calls per server before the other takes its turn")
    p.add_argument("--switch-pause", type=float, default=0.2, help="seconds of rest when the servers switch (0: none)")
    p.add_argument("--peer-version", default=PEER_VERSION)
    p.add_argument(
        "--peer-venv",
        type=Path,
        default=None,
        help="the peer's virtualenv (default WORK_DIR/peer/venv-VERSION; installed when missing)",
    )
    p.add_argument(
        "--peer-storage",
        choices=("memory", "path"),
        default="memory",
        help="the peer's Qdrant: local mode in memory (QDRANT_URL=:memory:) or on disk (QDRANT_LOCAL_PATH)",
    )
    args = p.parse_args()
    dataset = check_dataset(args.dataset)
    if args.tiny:
        n_docs, n_queries, warmup = args.docs, args.queries or 10, 2
    elif args.quick:
        n_docs, n_queries, warmup = args.docs or 500, args.queries or 100, 5
    else:
        n_docs, n_queries, warmup = args.docs, args.queries or 300, 10
    work_dir = args.work_dir / "peer"
    venv = args.peer_venv or work_dir / f"venv-{args.peer_version}"
    try:
        script = install_peer(venv, args.peer_version)
    except PeerUnavailable as exc:
        print(f"bench peer: {exc}", file=sys.stderr)
        raise SystemExit(UNREACHABLE) from exc
    model = model_dir(args.model_dir)
    # The peer gets the float32 model it ships with, whatever build mcp-rag runs.
    cache = fastembed_cache(default_model_dir("none"), work_dir / "fastembed-cache")
    work = workload(dataset, n_docs, n_queries)
    emit(
        BENCH,
        "setup",
        docs=len(work.docs),
        queries=len(work.queries),
        judged_queries=len(work.qrels),
        peer=f"{PEER_PACKAGE} {args.peer_version}",
        peer_storage=args.peer_storage,
        block=max(1, args.block),
        switch_pause=max(0.0, args.switch_pause),
        dataset=dataset.name,
        load_avg=machine()["load_avg"],
    )
    pg = Postgres(args.pg_dsn)
    db = "bench_peer"
    try:
        dsn = pg.create(db)
        ours_dir = fresh_dir(work_dir / "mcp-rag-data")
        peer_dir = fresh_dir(work_dir / "peer-data")
        ours_log, peer_log = work_dir / "mcp-rag.log", work_dir / "peer.log"
        ours_log.unlink(missing_ok=True)
        peer_log.unlink(missing_ok=True)
        clients = {
            "mcp-rag": stdio_client(server_env(ours_dir, model, dsn), ours_log, ours_dir),
            "mcp-server-qdrant": peer_client(script, peer_env(cache, args.peer_storage, peer_dir), peer_log, peer_dir),
        }
        load_before = os.getloadavg()[0]
        sides = anyio.run(run_both, clients, work, warmup, max(1, args.block), max(0.0, args.switch_pause))
        load_after = os.getloadavg()[0]
        figures = {name: summary(side, len(work.docs)) for name, side in sides.items()}
        for name, fig in figures.items():
            emit(BENCH, "side", server=name, **fig)
        ours, peer = figures["mcp-rag"], figures["mcp-server-qdrant"]
        bulk_docs_per_s = len(work.docs) / bulk_ingest(pg, work.docs, model, work_dir)

        def ratio(key: str) -> float | None:
            a, b = ours.get(key), peer.get(key)
            return a / b if a is not None and b else None

        emit(
            BENCH,
            "ratio",
            docs=len(work.docs),
            searches=len(work.queries),
            search_p50_ratio=ratio("search_p50_ms"),
            search_p95_ratio=ratio("search_p95_ms"),
            ingest_docs_per_s_ratio=ratio("ingest_docs_per_s"),
            bulk_docs_per_s=bulk_docs_per_s,
            bulk_over_peer_per_call=bulk_docs_per_s / peer["ingest_docs_per_s"] if peer["ingest_docs_per_s"] else None,
            peak_rss_ratio=ratio("peak_rss_mib"),
            ndcg_at_10_delta=(ours["ndcg_at_10"] - peer["ndcg_at_10"])
            if ours["ndcg_at_10"] is not None and peer["ndcg_at_10"] is not None
            else None,
            load_before=load_before,
            load_after=load_after,
            targets={
                "search_p50_ratio": ("<=", 0.5),
                "ingest_docs_per_s_ratio": (">=", 1.0),
                "bulk_over_peer_per_call": (">=", 2.0),
            },
        )
        pg.drop(db)
    finally:
        pg.close()


if __name__ == "__main__":
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")
    main()
