"""Many ``mcp-rag`` processes on one data directory (real processes, real clients).

One process holds the data directory (the embedded index and the model); stdio servers that start
later relay their MCP session to it, CLI commands send their command line to it. These tests drive
every kind of process at once, kill the holder, leave stale sockets and use awkward data directories.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from mcp_rag.local.address import address
from mcp_rag.local.election import holder_info
from tests.mcp_calls import call
from tests.reliability_support import MCP_RAG, base_env, http_client, run_cli, server_process

pytestmark = pytest.mark.integration


@asynccontextmanager
async def stdio_server(env: dict[str, str], workdir: Path, name: str) -> AsyncIterator[Client]:
    """A real ``mcp-rag serve --transport stdio`` process driven by the MCP client."""
    params = StdioServerParameters(command=MCP_RAG, args=["serve", "--transport", "stdio"], env=env, cwd=workdir)
    with (workdir / f"{name}.stderr").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=120) as client:
            yield client


def search_sources(result: dict[str, Any]) -> set[str]:
    return {r["source_uri"] for r in result["results"]}


def holder_pid(data_dir: Path) -> int:
    pid = holder_info(address(data_dir))["pid"]
    assert isinstance(pid, int)
    return pid


def write_doc(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


async def test_three_stdio_servers_and_the_cli_share_one_data_directory(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url)
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(stdio_server(env, tmp_path, f"stdio{i}")) for i in range(3)]
        holder = holder_pid(data)
        for i, client in enumerate(clients):
            await call(
                client,
                "ingest_text",
                text=f"Stdio client {i} writes about the zebra number {i}.",
                title=f"zebra {i}",
                source_uri=f"note://stdio/{i}",
            )
        doc = write_doc(tmp_path / "docs", "giraffe.md", "# Giraffes\n\nThe giraffe from the command line eats acacia.")
        done = run_cli("ingest", str(doc), env=env)
        assert done.returncode == 0, done.stderr
        assert "added 1" in done.stdout
        # As soon as the command returns every client finds what it ingested.
        for client in clients:
            found = await call(client, "search", query="giraffe acacia", mode="lexical", top_k=3)
            assert doc.as_uri() in search_sources(found)
            zebras = await call(client, "search", query="zebra", mode="lexical", top_k=10)
            assert {f"note://stdio/{i}" for i in range(3)} <= search_sources(zebras)
        cli = run_cli("search", "zebra", "--mode", "lexical", "--top-k", "10", "--json", env=env)
        assert cli.returncode == 0, cli.stderr
        assert {f"note://stdio/{i}" for i in range(3)} <= {r["source_uri"] for r in json.loads(cli.stdout)}
        stats = run_cli("stats", "--json", env=env)
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["documents"] == 4
        assert holder_pid(data) == holder  # nobody took the data directory from the first server
    logs = "".join((tmp_path / f"stdio{i}.stderr").read_text() for i in range(3))
    assert "Traceback" not in logs


# --- hand-over --------------------------------------------------------------------------------


def long_text(words: int, topic: str) -> str:
    sentences = [f"Paragraph {i} about {topic} and the weather of day {i} in the valley." for i in range(words // 12)]
    return "\n\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4))


@pytest.mark.slow
async def test_kill_9_of_the_holder_during_an_ingest_hands_over_without_losing_anything(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    import anyio

    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url)
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(stdio_server(env, tmp_path, "first"))
        survivor = await stack.enter_async_context(stdio_server(env, tmp_path, "survivor"))
        other = await stack.enter_async_context(stdio_server(env, tmp_path, "other"))
        holder = holder_pid(data)
        acknowledged = []
        for i, client in enumerate((first, survivor, other)):
            await call(
                client, "ingest_text", text=f"Acknowledged note {i} about the okapi.", source_uri=f"note://ack/{i}"
            )
            acknowledged.append(f"note://ack/{i}")
        # A long ingest through the survivor; the holder is killed while it runs.
        outcome: dict[str, Any] = {}

        async def long_ingest() -> None:
            outcome["result"] = await call(
                survivor,
                "ingest_text",
                text=long_text(6000, "the tapir"),
                title="tapir",
                source_uri="note://interrupted",
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_ingest)
            await anyio.sleep(1.0)
            assert "result" not in outcome, "the ingest ended before the holder was killed: make it longer"
            os.kill(holder, 9)
            killed_at = time.monotonic()
        # The interrupted call was answered (sent again to the new holder: ingesting is idempotent).
        assert [d["status"] for d in outcome["result"]["documents"]] in (["added"], ["unchanged"])
        new_holder = holder_pid(data)
        assert new_holder != holder
        handed_over = time.monotonic() - killed_at
        # Every survivor (and the CLI) finds everything that was acknowledged, and the interrupted document.
        for client in (survivor, other):
            found = await call(client, "search", query="okapi", mode="lexical", top_k=10)
            assert set(acknowledged) <= search_sources(found)
            tapir = await call(client, "search", query="tapir valley weather", mode="lexical", top_k=3)
            assert "note://interrupted" in search_sources(tapir)
        cli = run_cli("search", "okapi", "--mode", "lexical", "--top-k", "10", "--json", env=env)
        assert cli.returncode == 0, cli.stderr
        assert set(acknowledged) <= {r["source_uri"] for r in json.loads(cli.stdout)}
        # The first client's server is gone; closing its client must not hang the test.
        await stack.aclose()
    print(f"hand-over, kill to the interrupted call answered: {handed_over:.2f}s")
    logs = (tmp_path / "survivor.stderr").read_text() + (tmp_path / "other.stderr").read_text()
    assert "Traceback" not in logs
    assert "handing over" in logs


def initialize_line(request_id: int = 1) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        }
    ).encode()


def raw_session(proc: subprocess.Popen[bytes], *calls: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Speak MCP over a stdio server's pipes by hand (initialize, then the tool calls); their answers."""
    assert proc.stdin is not None and proc.stdout is not None
    lines = [initialize_line(), json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()]
    for i, (tool, arguments) in enumerate(calls, start=2):
        lines.append(
            json.dumps(
                {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
            ).encode()
        )
    proc.stdin.write(b"\n".join(lines) + b"\n")
    proc.stdin.flush()
    answers = []
    while len(answers) < len(calls) + 1:
        line = proc.stdout.readline()
        assert line, f"the server closed stdout (exit {proc.poll()})"
        message = json.loads(line)
        if "id" in message:
            answers.append(message)
    return answers[1:]


def test_five_processes_started_at_the_same_instant_elect_one_holder(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url)
    logs = [tmp_path / f"p{i}.stderr" for i in range(5)]
    procs = [
        subprocess.Popen(
            [MCP_RAG, "serve", "--transport", "stdio"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
        )
        for log in logs
    ]
    try:
        for i, proc in enumerate(procs):
            answers = raw_session(
                proc,
                ("ingest_text", {"text": f"Simultaneous note {i} on lemurs.", "source_uri": f"note://five/{i}"}),
                ("stats", {}),
            )
            assert all("result" in a and not a["result"].get("isError") for a in answers), answers
        final = raw_session(procs[0], ("search", {"query": "lemurs", "mode": "lexical", "top_k": 10}))[0]
        found = {r["source_uri"] for r in final["result"]["structuredContent"]["results"]}
        assert found == {f"note://five/{i}" for i in range(5)}
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        codes = [proc.wait(timeout=60) for proc in procs]
    texts = [log.read_text() for log in logs]
    holders = [
        t
        for t in texts
        if any("holding the data directory" in line and "[mcp_rag.local.holder]" in line for line in t.splitlines())
    ]
    assert len(holders) == 1, texts
    assert sum("embedding model loaded" in t for t in texts) == 1  # one model in memory
    assert not any("Traceback" in t or "[error" in t for t in texts), texts
    assert codes == [0] * 5


# --- awkward data directories -----------------------------------------------------------------


def test_a_stale_socket_after_kill_9_is_replaced(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url)
    log = tmp_path / "killed.stderr"
    proc = subprocess.Popen(
        [MCP_RAG, "serve", "--transport", "stdio"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
    )
    raw_session(proc, ("ingest_text", {"text": "Before the crash: the quokka.", "source_uri": "note://stale"}))
    proc.kill()
    proc.wait(timeout=30)
    socket = address(data).socket
    assert socket.exists()  # left behind by the killed holder
    done = run_cli("search", "quokka", "--mode", "lexical", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert [r["source_uri"] for r in json.loads(done.stdout)] == ["note://stale"]
    assert "Traceback" not in done.stderr


def test_a_long_data_directory_path_gets_a_short_socket(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / ("a-rather-long-folder-name-" * 3) / ("and-another-long-one-" * 3) / "data"
    assert len(str(data / "holder.sock")) > 108
    env = base_env(model_dir, data, database_url)
    socket = address(data).socket
    assert not socket.is_relative_to(data)
    assert len(os.fsencode(socket)) <= 100
    log = tmp_path / "holder.stderr"
    proc = subprocess.Popen(
        [MCP_RAG, "serve", "--transport", "stdio"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
    )
    try:
        raw_session(
            proc, ("ingest_text", {"text": "Deep in the folders lives the pangolin.", "source_uri": "note://deep"})
        )
        assert socket.exists() and (socket.stat().st_mode & 0o777) == 0o600
        assert (socket.parent.stat().st_mode & 0o777) == 0o700
        done = run_cli("search", "pangolin", "--mode", "lexical", "--json", env=env)
        assert done.returncode == 0, done.stderr
        assert [r["source_uri"] for r in json.loads(done.stdout)] == ["note://deep"]
        assert "embedding model loaded" not in done.stderr  # the command ran in the holder
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert not socket.exists()


def read_only_mount(folder: Path, *command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with ``folder`` bind-mounted read-only (a private mount namespace)."""
    script = f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *command],
        env=env,
        cwd=folder.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("command", [("stats",), ("serve", "--transport", "stdio")])
def test_a_read_only_data_directory_is_one_line(
    command: tuple[str, ...], database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = base_env(model_dir, data, database_url)
    probe = read_only_mount(data, "touch", str(data / "probe"), env=env)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot mount read-only here: {probe.stderr.strip()}")
    done = read_only_mount(data, MCP_RAG, *command, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"mcp-rag: the data directory {data} is not writable (Read-only file system)")
    assert "MCP_RAG_DATA_DIR" in lines[0]


def test_a_holder_of_another_version_is_refused_naming_both(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url)
    proc = subprocess.Popen(
        [MCP_RAG, "serve", "--transport", "stdio"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "h.stderr").open("wb"),
    )
    try:
        raw_session(proc, ("stats", {}))
        older = (
            "import sys, mcp_rag; mcp_rag.__version__ = '0.0.1'; from mcp_rag.cli import main; "
            "sys.argv = ['mcp-rag', *sys.argv[1:]]; main()"
        )
        python = str(Path(MCP_RAG).parent / "python")
        for args in (["stats"], ["serve", "--transport", "stdio"], ["serve", "--transport", "http", "--port", "0"]):
            done = subprocess.run(
                [python, "-c", older, *args],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 3, done.stderr  # a conflict
            assert len(lines) == 1, done.stderr
            import mcp_rag

            assert f"runs mcp-rag {mcp_rag.__version__}, this is mcp-rag 0.0.1" in lines[0]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


def test_an_embedded_postgres_that_cannot_start_is_one_line(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "postgres").write_text("not a folder")  # the embedded server cannot start here
    env = base_env(model_dir, data)
    for args in (("stats",), ("serve", "--transport", "stdio")):
        done = subprocess.run(
            [MCP_RAG, *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("20")]  # log lines
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("mcp-rag: could not start the embedded PostgreSQL")
        assert "Traceback" not in done.stderr


async def test_the_http_server_holds_and_stdio_servers_and_the_cli_use_it(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = base_env(model_dir, data, database_url)
    with server_process(env, tmp_path / "http.stderr") as http:
        async with AsyncExitStack() as stack:
            web = await stack.enter_async_context(http_client(http.url))
            clients = [await stack.enter_async_context(stdio_server(env, tmp_path, f"s{i}")) for i in range(3)]
            assert holder_pid(data) == http.pid
            await call(web, "ingest_text", text="Over HTTP: the narwhal.", source_uri="note://http")
            for i, client in enumerate(clients):
                await call(client, "ingest_text", text=f"Over stdio {i}: the narwhal.", source_uri=f"note://s/{i}")
            doc = write_doc(tmp_path / "docs", "n.md", "From the terminal: the narwhal and its tusk.")
            done = run_cli("ingest", str(doc), env=env)
            assert done.returncode == 0, done.stderr
            expected = {"note://http", doc.as_uri(), *(f"note://s/{i}" for i in range(3))}
            for client in (web, *clients):
                assert (
                    search_sources(await call(client, "search", query="narwhal", mode="lexical", top_k=10)) == expected
                )
            cli = run_cli("search", "narwhal", "--mode", "lexical", "--top-k", "10", "--json", env=env)
            assert {r["source_uri"] for r in json.loads(cli.stdout)} == expected
            # A second HTTP server on the same data directory serves it through the first one.
            with server_process(env, tmp_path / "second.stderr") as second:
                async with http_client(second.url) as relayed:
                    found = await call(relayed, "search", query="narwhal", mode="lexical", top_k=10)
                    assert search_sources(found) == expected
                assert holder_pid(data) == http.pid
                assert "relaying to the process holding the data directory" in second.stderr_text()


def test_a_relaying_stdio_server_stays_small_and_loads_no_model(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    env = base_env(model_dir, tmp_path / "data", database_url)

    def start(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [MCP_RAG, "serve", "--transport", "stdio"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / f"{name}.stderr").open("wb"),
        )

    holder = start("holder")
    relay = None
    try:
        raw_session(holder, ("ingest_text", {"text": "The axolotl regrows its limbs.", "source_uri": "note://ax"}))
        relay = start("relay")
        answer = raw_session(relay, ("search", {"query": "axolotl", "mode": "hybrid"}))[0]
        assert answer["result"]["structuredContent"]["results"][0]["source_uri"] == "note://ax"
        maps = Path(f"/proc/{relay.pid}/maps").read_text()
        for engine in ("onnxruntime", "qdrant_edge", "tokenizers"):
            assert engine not in maps, f"the relaying process loaded {engine}"
        assert "onnxruntime" in Path(f"/proc/{holder.pid}/maps").read_text()
        status = Path(f"/proc/{relay.pid}/status").read_text()
        rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
        assert rss_kib <= 60 * 1024, f"relaying process: {rss_kib / 1024:.1f} MiB"
    finally:
        for proc in (relay, holder):
            if proc is not None:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=60)


def test_commands_sent_to_the_holder_read_relative_paths_and_fail_in_one_line(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    env = base_env(model_dir, tmp_path / "data", database_url)
    holder = subprocess.Popen(
        [MCP_RAG, "serve", "--transport", "stdio"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "holder.stderr").open("wb"),
    )
    try:
        raw_session(holder, ("stats", {}))
        write_doc(tmp_path / "work" / "notes", "ibis.md", "# Ibis\n\nThe sacred ibis wades in the marsh.")

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [MCP_RAG, *args],
                env=env,
                cwd=tmp_path / "work",
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        done = cli("ingest", "notes")  # relative to the command's working directory, not the holder's
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("added 1,")
        assert "embedding model loaded" not in done.stderr  # it ran in the holder
        found = cli("search", "ibis marsh", "--json")
        assert [r["source_uri"] for r in json.loads(found.stdout)] == [(tmp_path / "work/notes/ibis.md").as_uri()]
        for args, status, message in (
            (("ingest", "no-such-folder"), 1, "mcp-rag: "),
            (("delete", "00000000-0000-0000-0000-000000000000"), 1, "mcp-rag: "),
            (("search", "x", "--filter", "oops"), 2, "mcp-rag: --filter 'oops': expected KEY=VALUE"),
        ):
            failed = cli(*args)
            assert failed.returncode == status, failed.stderr
            lines = failed.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(message), failed.stderr
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
