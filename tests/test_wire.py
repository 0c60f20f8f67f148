"""This process's stdin and stdout as the MCP wire (``mcp_rag/wire.py``): a pipe is served by the
event loop, a file by a worker thread, and while a session runs nothing else reaches the wire."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.serverproc import MCP_RAG, base_env

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}
REQUESTS = [
    INITIALIZE,
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "search", "arguments": {"query": "anything", "top_k": 1}},
    },
]


@pytest.mark.integration
def test_answers_written_to_a_file_instead_of_a_pipe(database_url: str, model_dir: Path, tmp_path: Path) -> None:
    """A client that has the server write to a regular file gets every answer there: a file cannot be
    waited on by the event loop, so it is written in a worker thread."""
    answers = tmp_path / "answers.jsonl"
    env = base_env(database_url=database_url, model_dir=model_dir, data_dir=tmp_path / "data")
    with answers.open("wb") as stdout, (tmp_path / "stderr").open("wb") as stderr:
        server = subprocess.Popen([MCP_RAG, "serve"], stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, env=env)
        assert server.stdin is not None
        try:
            server.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in REQUESTS))
            server.stdin.flush()
            deadline = time.monotonic() + 180
            while b'"id":3' not in answers.read_bytes().replace(b" ", b"") and time.monotonic() < deadline:
                time.sleep(0.1)
            server.stdin.close()  # the end of the session
            assert server.wait(timeout=60) == 0, (tmp_path / "stderr").read_text()[-3000:]
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    by_id: dict[int, dict[str, Any]] = {}
    for line in answers.read_text().splitlines():
        message = json.loads(line)  # every line on the wire is a JSON-RPC message
        by_id[message["id"]] = message
    assert by_id[1]["result"]["serverInfo"]["name"] == "mcp-rag"
    assert "search" in {t["name"] for t in by_id[2]["result"]["tools"]}
    assert by_id[3]["result"]["isError"] is False and by_id[3]["result"]["structuredContent"]["results"] == []


CLAIM = """
import os, sys
from mcp_rag.wire import claimed_stdio
with claimed_stdio() as (wire_in, wire_out):
    print("stray", flush=True)  # fd 1 is stderr meanwhile
    os.system("echo child")  # so is a child's
    assert os.read(0, 10) == b""  # fd 0 reads /dev/null
    wire_out.write(wire_in.readline().upper())
    wire_out.flush()
print("after", flush=True)  # fd 1 is the wire again
"""


def test_the_claim_keeps_the_wire_to_itself_and_gives_it_back() -> None:
    done = subprocess.run([sys.executable, "-c", CLAIM], input=b"hello\n", capture_output=True, timeout=60, check=True)
    assert done.stdout == b"HELLO\nafter\n"
    assert done.stderr.split() == [b"stray", b"child"]


@pytest.mark.integration
def test_answers_still_in_the_pipe_when_the_client_closes_its_end_reach_it(
    database_url: str, model_dir: Path, tmp_path: Path
) -> None:
    """The client sends its requests and closes stdin before reading anything: the answers that do
    not fit the pipe's buffer (64 KiB, against about 22 KB per tool list) wait for it, complete, and
    the server exits once they are read."""
    lists = [{"jsonrpc": "2.0", "id": 10 + i, "method": "tools/list"} for i in range(12)]
    env = base_env(database_url=database_url, model_dir=model_dir, data_dir=tmp_path / "data")
    with (tmp_path / "stderr").open("wb") as stderr:
        server = subprocess.Popen(
            [MCP_RAG, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
        assert server.stdin is not None and server.stdout is not None
        try:
            server.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in [*REQUESTS[:2], *lists]))
            server.stdin.close()
            time.sleep(3)  # the session ends meanwhile, with answers waiting in the full pipe
            out = server.stdout.read()
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    assert server.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    answered = {json.loads(line)["id"]: json.loads(line) for line in out.splitlines()}
    listed = [a for i, a in answered.items() if i >= 10 and "result" in a]
    assert listed and sum(len(json.dumps(a)) for a in listed) > 65536
    assert all(len(a["result"]["tools"]) == len(listed[0]["result"]["tools"]) for a in listed)
