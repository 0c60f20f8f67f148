"""The child process of an edge index compaction: ``python -m mcp_rag.index.edge_optimize SHARD PARENT_PID``.

It loads a copy of the serving shard, runs the engine's optimisers on it (they merge the plain
segments, drop deleted points and build the HNSW graph), flushes and closes it. The engine
holds the GIL while it optimises, so this runs in a process of its own, at a lower priority
than the server it works for; the server swaps the result in (``EdgeIndex``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def optimize(path: str) -> bool:
    from qdrant_edge import EdgeShard

    shard = EdgeShard.load(path)
    try:
        changed = shard.optimize()
        shard.flush()
    finally:
        shard.close()
    return changed


def die_with(parent: int) -> None:
    """End this process when the thread that started it ends (Linux): a copy whose server is gone
    is deleted by the next open, and nobody would swap it in."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent kills it on close
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m mcp_rag.index.edge_optimize SHARD_DIRECTORY PARENT_PID", file=sys.stderr)
        return 2
    die_with(int(argv[1]))
    os.nice(10)  # searches and writes of the serving process first
    try:
        optimize(argv[0])
    except Exception as exc:  # one line for the parent's log
        print(f"cannot optimise {argv[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
