"""The wire between a process and the holder of its data directory.

Newline-delimited JSON over the Unix socket. The client's first line is a hello
``{"mcp_rag_hello": {...}}`` (version, what it wants, the store it expects), the holder answers with
its own hello (version, pid) or a refusal; after that:

* ``kind: "mcp"`` — the lines are the MCP session itself (JSON-RPC messages, one per line, as on
  stdio): the holder runs an MCP server session for the connection, for the hello's ``principal``
  (``{"tenant", "scopes", "key_id"}``, sent by an HTTP server for the caller it authenticated) or
  else the local user of the hello's ``tenant``;
* ``kind: "cli"`` — the holder runs the command line of the hello and sends
  ``{"out": text}`` / ``{"err": text}`` lines, then ``{"exit": status}``;
* ``kind: "ready"`` / ``"metrics"`` / ``"tool_scopes"`` — a question (``questions``): one JSON line
  answers it, then the holder closes the connection.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .. import __version__
from ..auth import Principal
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


def principal_to_hello(principal: Principal) -> dict[str, Any]:
    return {"tenant": principal.tenant, "scopes": sorted(principal.scopes), "key_id": principal.key_id}


def principal_from_hello(value: object) -> Principal | None:
    """The principal a hello carries; ``None`` when it carries none (or a malformed one)."""
    if not isinstance(value, dict):
        return None
    tenant, scopes, key_id = value.get("tenant"), value.get("scopes"), value.get("key_id")
    if not isinstance(tenant, str) or not isinstance(key_id, str) or not isinstance(scopes, list):
        return None
    return Principal(tenant=tenant, scopes=frozenset(str(s) for s in scopes), key_id=key_id)
