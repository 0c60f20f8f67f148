"""The wire between a process and the holder of its data directory.

Newline-delimited JSON over the Unix socket. The client's first line is a hello
``{"mcp_rag_hello": {...}}`` (version, what it wants, the store it expects), the holder answers with
its own hello (version, pid) or a refusal; after that:

* ``kind: "mcp"`` — the lines are the MCP session itself (JSON-RPC messages, one per line, as on
  stdio): the holder runs an MCP server session for the connection;
* ``kind: "cli"`` — the holder runs the command line of the hello and sends
  ``{"out": text}`` / ``{"err": text}`` lines, then ``{"exit": status}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .. import __version__
from ..settings import Settings

HELLO = "mcp_rag_hello"
MAX_LINE = 256 * 1024 * 1024
"""Bytes of one line (an MCP message with a large document, or a large search result)."""


def store_fingerprint(settings: Settings) -> str:
    """What must be the same for two processes to share one holder: the store, the index and the model."""
    parts = {
        "database_url": settings.database_url,
        "database_read_url": settings.database_read_url,
        "embedding_model": settings.embedding_model,
        "embedding_model_dir": str(settings.embedding_model_dir) if settings.embedding_model_dir else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def client_hello(settings: Settings, kind: str, **extra: Any) -> bytes:
    body = {
        "version": __version__,
        "pid": os.getpid(),
        "kind": kind,
        "store": store_fingerprint(settings),
        "read_only": settings.read_only,
        "tenant": settings.default_tenant,
        **extra,
    }
    return encode({HELLO: body})


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def version_refusal(holder_version: str, holder_pid: object, data_dir: object) -> str:
    return (
        f"the process holding {data_dir} (pid {holder_pid}) runs mcp-rag {holder_version}, this is mcp-rag "
        f"{__version__}; stop that process (or restart every client with one version) and try again"
    )
