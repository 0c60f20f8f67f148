"""Long ingests over MCP: a directory ingest that outlives its call returns a job, goes on in the
background, is followed with ingest_status, and survives a server restart (real server processes over
streamable HTTP, a real Postgres, index and model)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.mcp_calls import call, call_error, text_of
from tests.pgcluster import PgServer
from tests.serverproc import base_env, mcp_http, running, scratch_database

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILES = 40
RESTART_FILES = 200


def make_corpus(folder: Path, files: int = FILES, sentences_per_file: int = 8) -> Path:
    folder.mkdir(parents=True)
    for i in range(files):
        sentences = " ".join(
            f"Sentence {j} of note {i} is about topic {i % 11} and item {j * i}." for j in range(sentences_per_file)
        )
        (folder / f"note-{i:03d}.txt").write_text(sentences)
    return folder


def server_env(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path: Path, **settings: Any
) -> dict[str, str]:
    _, dsn = scratch_database(pg_server, template_db)
    return base_env(database_url=dsn, model_dir=model_dir, data_dir=tmp_path / "data", **settings)


async def wait_for(client: Client, job_id: str, status: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = await call(client, "ingest_status", job_id=job_id)
        if job["status"] == status:
            return job
        assert job["status"] in ("running", "interrupted"), job
        assert time.monotonic() < deadline, job
        await anyio.sleep(0.5)


async def test_long_ingest_returns_a_job_that_completes(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path: Path
) -> None:
    # Several chunks a file, four chunks a batch: far more than 3 s of embedding, even on an idle machine.
    corpus = make_corpus(tmp_path / "corpus", sentences_per_file=80)
    env = server_env(
        pg_server,
        template_db,
        model_dir,
        tmp_path,
        allowed_roots=str(corpus),
        ingest_job_after_seconds=3,
        ingest_batch_chunks=4,
    )
    with running(env, tmp_path / "server") as server:
        updates: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append(progress)

        async with mcp_http(server.base_url + "/mcp") as client:
            started = time.monotonic()
            result = await client.call_tool("ingest_file", {"path": str(corpus)}, progress_callback=on_progress)
            assert not result.is_error and result.structured_content is not None, text_of(result)
            out = result.structured_content
            assert "call ingest_status" in text_of(result)
            assert 2.5 < time.monotonic() - started < 30  # returned after the configured time, not at the end
            assert out["status"] == "running" and out["job_id"], out
            assert updates, "progress notifications reach the client while it waits"
            job = await call(client, "ingest_status", job_id=out["job_id"])
            assert job["status"] == "running"

            done = await wait_for(client, out["job_id"], "done")
            assert done["report"]["added"] == FILES
            assert done["attempts"] == 1
            assert text_of(await client.call_tool("ingest_status", {"job_id": out["job_id"]})).startswith(
                f"job {out['job_id']} ({corpus}): done\nadded {FILES},"
            )
            found = await call(client, "search", query="note 7 topic 7", mode="lexical", top_k=3)
            assert found["results"]

            # A quick ingest still answers with its report (everything is unchanged now).
            again = await call(client, "ingest_file", path=str(corpus))
            assert (again["status"], again["unchanged"]) == ("done", FILES)

            error = await call_error(client, "ingest_status", job_id="not-a-job")
            assert "no ingest job" in error


async def test_restart_during_a_job_resumes_it(
    pg_server: PgServer, template_db: str, model_dir: Path, tmp_path: Path
) -> None:
    corpus = make_corpus(tmp_path / "corpus", files=RESTART_FILES)  # long enough to stop it midway
    env = server_env(
        pg_server,
        template_db,
        model_dir,
        tmp_path,
        allowed_roots=str(corpus),
        ingest_job_after_seconds=0.5,
        ingest_batch_chunks=4,
    )
    with running(env, tmp_path / "first") as first:
        async with mcp_http(first.base_url + "/mcp") as client:
            out = await call(client, "ingest_file", path=str(corpus))
            job_id = out["job_id"]
            assert out["status"] == "running", out
            deadline = time.monotonic() + 120
            while (await call(client, "ingest_status", job_id=job_id))["done"] == 0:
                assert time.monotonic() < deadline
                await anyio.sleep(0.2)
        # SIGTERM mid-job: the server stops cleanly and leaves the job interrupted.
        assert first.stop() == 0, first.log()
    assert "ingest job interrupted" in first.log()

    with running(env, tmp_path / "second") as second:
        async with mcp_http(second.base_url + "/mcp") as client:
            done = await wait_for(client, job_id, "done")
            assert done["attempts"] == 2
            report = done["report"]
            assert (
                report["added"] + report["unchanged"] == RESTART_FILES
            )  # what the first server wrote is unchanged now
            assert report["unchanged"] > 0
            stats = await call(client, "stats")
            assert stats["documents"] == RESTART_FILES
    assert "resuming an ingest job" in second.log()
