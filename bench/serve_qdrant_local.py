"""``mcp-rag`` with the index replaced by ``QdrantServerIndex`` over qdrant-client local mode (``:memory:``).

    python -m bench.serve_qdrant_local serve --transport http --port 8000

There is no Qdrant server binary on these machines, so "server mode" is measured with the
server-backed index implementation talking to qdrant-client's in-process local mode. This
runs the real CLI (``mcp_rag.cli.main``) and swaps only the index factory; the index lives
in this process's memory and is rebuilt from the change log at every start.

Note for memory figures: against a real Qdrant server the vectors live in Qdrant's process,
not here; local mode keeps every point (numpy arrays + payload dicts) in this process.
"""

from __future__ import annotations

import sys
from typing import Any

import mcp_rag.runtime


def build_index(settings: Any) -> Any:
    from qdrant_client import QdrantClient

    from mcp_rag.index.qdrant_server import QdrantServerIndex

    return QdrantServerIndex(QdrantClient(":memory:"), settings.qdrant_collection)


if __name__ == "__main__":
    mcp_rag.runtime.build_index = build_index
    from mcp_rag.cli import main

    main(sys.argv[1:])
