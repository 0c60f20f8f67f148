"""Many processes, one data directory.

One process per data directory *holds* it: it owns the embedded index and loads the embedding model,
and serves the other ``mcp-rag`` processes of the same user over a Unix socket next to the data
(``address``). Which process holds is decided by a lock file (``election``); the holder side is
``holder``. A stdio server that does not hold relays its MCP session to the holder (``relay``), an
HTTP server that does not hold relays each of its sessions with the caller it authenticated (``web``,
``relayed_sessions``; both relays use ``session``), and a CLI command that does not hold sends its
command line (``commands``). When the holder ends or is killed, the next process to find the socket
dead takes the lock and becomes the holder.
"""

from __future__ import annotations

from ..settings import Settings


def shared(settings: Settings) -> bool:
    """Whether processes on this data directory share one holder: the embedded index allows
    only one process, so they must. With a Qdrant server every process opens its own connections."""
    return settings.resolved_index_backend == "embedded"
