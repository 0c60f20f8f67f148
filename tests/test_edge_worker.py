"""Integration test of the ``mobile-preprocessor`` Cloudflare Worker (deploy/edge) against a real origin.

A module-scoped fixture starts ``mcp-rag serve --transport http`` on 127.0.0.1 over its own
database in the session PostgreSQL, with documents of two tenants; the worker's own test suite
(``node --test deploy/edge/test/``, Miniflare = the real workerd runtime) then runs against it,
told about the origin, the tokens and the document ids through environment variables. A second
test builds the worker with ``wrangler deploy --dry-run`` (offline, no Cloudflare login).

Needs Node.js >= 20.3 and npm (``npm ci`` runs in deploy/edge when node_modules is missing);
fails with a clear message without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from qdrant_client import QdrantClient

from mcp_rag.embedding import Embedder
from mcp_rag.index.qdrant_server import QdrantServerIndex
from mcp_rag.runtime import open_runtime
from mcp_rag.settings import Settings
from tests.pgcluster import PgServer, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EDGE_DIR = Path(__file__).resolve().parents[1] / "deploy" / "edge"
START_TIMEOUT = 120.0
NODE_TEST_TIMEOUT = 600.0

TENANT_A, TENANT_B = "acme", "globex"
TOKENS = {
    "TOKEN_A": ("edge-acme-read-write-0001", TENANT_A, ["read", "write"]),
    "TOKEN_B": ("edge-globex-read-write-01", TENANT_B, ["read", "write"]),
    "TOKEN_READ": ("edge-acme-read-only-00001", TENANT_A, ["read"]),
    "TOKEN_WRITE_ONLY": ("edge-acme-write-only-0001", TENANT_A, ["write"]),
}
SEARCH_QUERY = "lighthouse lens"

LENS_MANUAL = " ".join(
    [
        "Lighthouse lens maintenance.",
        "The first-order Fresnel lens of the lighthouse is cleaned every morning with a soft linen cloth and",
        "a little spirit; never use abrasive powder on the prisms. Inspect the brass frame for verdigris,",
        "tighten the clamps that hold each panel, and record any chipped prism in the keeper's log.",
        "Before the lamp is lit at dusk, draw the curtains back, check the clockwork that turns the lens,",
        "and wind the weights to the top of the tower. A lens that turns unevenly flashes at the wrong",
        "rhythm and ships will misread the light. In winter, warm the lantern room slowly so the glass",
        "does not crack, and wipe condensation from the inside of the storm panes before every watch.",
    ]
    * 2
)

DOCUMENTS: dict[str, list[tuple[str | None, str, str, str]]] = {
    TENANT_A: [
        ("manuals", "Lighthouse lens maintenance", "acme://manuals/lens", LENS_MANUAL),
        (
            "manuals",
            "Foghorn inspection checklist",
            "acme://manuals/foghorn",
            "Foghorn inspection: test the compressor, drain the air tanks and sound the horn for five seconds. "
            "The lighthouse foghorn is tested weekly, after the lens has been cleaned.",
        ),
        (
            None,
            "Keeper's logbook, March",
            "acme://logbook/march",
            "Storm all night. The lighthouse lens turned without fault; replaced one cracked storm pane at dawn.",
        ),
    ],
    TENANT_B: [
        (
            None,
            "Lighthouse museum visitor guide",
            "globex://museum/guide",
            "Visitor guide: the museum displays a historic lighthouse lens from the old harbour tower, "
            "open daily from ten to five; tickets at the harbour office.",
        ),
        (
            None,
            "Coffee roasting notes",
            "globex://coffee/roast",
            "Roast the beans to a medium brown, rest them for two days, grind just before brewing.",
        ),
    ],
}


@dataclass(frozen=True)
class EdgeOrigin:
    url: str
    docs: dict[str, list[str]]
    manuals_a: list[str]

    def node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")}
        env.update({name: token for name, (token, _, _) in TOKENS.items()})
        env.update(
            {
                "ORIGIN_URL": self.url,
                "SEARCH_QUERY": SEARCH_QUERY,
                "DOCS_A": ",".join(self.docs[TENANT_A]),
                "DOCS_B": ",".join(self.docs[TENANT_B]),
                "DOCS_A_MANUALS": ",".join(self.manuals_a),
                "DOC_A": self.manuals_a[0],
                "NO_COLOR": "1",
            }
        )
        return env


def _node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    done = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    try:
        return int(done.stdout.strip().lstrip("v").split(".")[0])
    except ValueError:
        return None


@pytest.fixture(scope="module")
def edge_node_modules() -> Path:
    """deploy/edge/node_modules, installed with ``npm ci`` from package-lock.json when missing."""
    major = _node_major()
    if major is None or major < 20 or shutil.which("npm") is None:
        pytest.fail("Node.js >= 20.3 and npm are needed for the edge worker tests (apt-get install nodejs npm)")
    modules = EDGE_DIR / "node_modules"
    if not ((modules / "miniflare").is_dir() and (modules / ".bin" / "wrangler").exists()):
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=EDGE_DIR,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return modules


async def _ingest(settings: Settings, embedder: Embedder) -> tuple[dict[str, list[str]], list[str]]:
    """Writes the documents to Postgres (the origin's index catches up from the change log at start)."""
    docs: dict[str, list[str]] = {TENANT_A: [], TENANT_B: []}
    manuals: list[str] = []
    index = QdrantServerIndex(QdrantClient(":memory:"))
    async with open_runtime(settings, index=index, embedder=embedder, follow_changes=False) as runtime:
        for tenant, items in DOCUMENTS.items():
            for collection, title, source, text in items:
                outcome = await runtime.service.ingest_text(
                    tenant, text, collection=collection, title=title, source_uri=source
                )
                assert outcome.document_id is not None
                docs[tenant].append(outcome.document_id)
                if tenant == TENANT_A and collection == "manuals":
                    manuals.append(outcome.document_id)
    return docs, manuals


@pytest.fixture(scope="module")
def edge_origin(
    pg_server: PgServer, template_db: str, model_dir: Path, embedder: Embedder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EdgeOrigin]:
    """A real ``mcp-rag serve --transport http`` with documents of two tenants, on 127.0.0.1."""
    name = f"edge_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name, template=template_db)
    root = tmp_path_factory.mktemp("edge-origin")
    settings = Settings(
        data_dir=root / "ingest", database_url=dsn, embedding_model_dir=model_dir, sync_in_server=False, _env_file=None
    )
    docs, manuals = anyio.run(_ingest, settings, embedder)

    port = free_port()
    keys = [{"token": token, "tenant": tenant, "scopes": scopes} for token, tenant, scopes in TOKENS.values()]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MCP_RAG_")}
    env.update(
        {
            "MCP_RAG_DATA_DIR": str(root / "server"),
            "MCP_RAG_DATABASE_URL": dsn,
            "MCP_RAG_EMBEDDING_MODEL_DIR": str(model_dir),
            "MCP_RAG_API_KEYS": json.dumps(keys),
            "MCP_RAG_HOST": "127.0.0.1",
            "MCP_RAG_PORT": str(port),
            "MCP_RAG_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
    )
    executable = Path(sys.executable).parent / "mcp-rag"
    command = [str(executable)]
    if not executable.exists():
        command = [sys.executable, "-c", "from mcp_rag.cli import main; main()"]
    log_path = root / "origin.log"
    cwd = root / "cwd"  # an empty directory: no stray .env is read
    cwd.mkdir()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "serve", "--transport", "http"],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(url, proc, log_path)
            yield EdgeOrigin(url=url, docs=docs, manuals_a=manuals)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            pg_server.drop_database(name)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(timeout=5) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the origin exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
            try:
                if client.get(f"{url}/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the origin was not ready within {START_TIMEOUT:.0f} s:\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.2)


def test_worker_suite_passes_against_the_real_origin(edge_origin: EdgeOrigin, edge_node_modules: Path) -> None:
    """deploy/edge/test/*.test.mjs under workerd: the edge rules (echo origin) and the real origin, no skips."""
    done = subprocess.run(
        ["node", "--test", "--test-reporter=tap", "test/"],
        cwd=EDGE_DIR,
        env=edge_origin.node_env(),
        capture_output=True,
        text=True,
        timeout=NODE_TEST_TIMEOUT,
        check=False,
    )
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"node --test failed ({done.returncode}):\n{output}"
    assert "# fail 0" in done.stdout, output
    assert "# SKIP" not in done.stdout, f"some tests were skipped:\n{output}"
    assert "ok 1 - a search returns the compact result of the caller's tenant" in done.stdout, output


def test_wrangler_dry_run_builds_the_worker(edge_node_modules: Path) -> None:
    """``wrangler deploy --dry-run`` bundles the worker offline, without a Cloudflare login."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("CLOUDFLARE_", "CF_", "MCP_RAG_"))}
    with tempfile.TemporaryDirectory(prefix="edge-dry-run-") as tmp:
        env.update(
            {
                "WRANGLER_SEND_METRICS": "false",
                "XDG_CONFIG_HOME": str(Path(tmp) / "config"),
                "WRANGLER_LOG_PATH": str(Path(tmp) / "logs"),
                "NO_COLOR": "1",
            }
        )
        outdir = Path(tmp) / "dist"
        done = subprocess.run(
            ["npx", "--no-install", "wrangler", "deploy", "--dry-run", "--outdir", str(outdir)],
            cwd=EDGE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        output = f"{done.stdout}\n{done.stderr}"
        assert done.returncode == 0, output
        assert "--dry-run: exiting now." in output, output
        assert "env.ORIGIN_URL" in output, output
        bundle = (outdir / "worker.js").read_text()
        assert "caches.default" in bundle
        assert "crypto.subtle.digest" in bundle
