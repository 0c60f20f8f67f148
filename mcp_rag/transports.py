"""Running the server: stdio (one session per process) or the HTTP app under uvicorn.

On SIGTERM/SIGINT the HTTP server turns not-ready at once (``/ready`` answers 503) and refuses new
tool calls with a retryable error, lets the running tool calls finish within the grace period, then
stops accepting connections, closes the pools and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import FrameType

import anyio

from .errors import RagError, describe
from .http import RuntimeHolder, create_app
from .local import shared
from .local.election import HoldLock
from .logging import get_logger
from .runtime import Runtime, open_runtime
from .server import build_server
from .serving import DrainingServer, bind, uvicorn_config
from .settings import Settings
from .wire import serve_session

log = get_logger(__name__)


def run_stdio(settings: Settings) -> None:
    """Serve one MCP session on stdin/stdout. The runtime opens before the session starts: if it cannot,
    the client's ``initialize`` is answered with the same one-line error (instead of a closed pipe) and
    the error goes on to the command line's one line on stderr and its exit status."""
    if shared(settings):  # one process holds the data directory; the others relay to it
        from .local.stdio import run_stdio_shared

        run_stdio_shared(settings)
        return
    holder = RuntimeHolder()
    server = build_server(holder.get, read_only=settings.read_only, default_tenant=settings.default_tenant)

    async def serve() -> None:
        async with open_runtime(settings) as runtime:
            holder.runtime = runtime
            log.info("stdio server ready", region=settings.region)
            await serve_session(server)

    serve_stdio(serve)


def serve_stdio(serve: Callable[[], Awaitable[None]]) -> None:
    """Run a stdio session until its input ends or SIGTERM arrives (which unwinds like Ctrl-C, so pools
    close and the embedded Postgres is left cleanly); a runtime that cannot open answers the client's
    ``initialize`` with the reason, then goes on to the command line's one line and exit status."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _StopRequested

    signal.signal(signal.SIGTERM, stop)
    try:
        anyio.run(serve)
    except _StopRequested:
        # Everything is closed by now; only the thread blocked reading stdin remains, and it
        # would keep the process alive until the parent closes the pipe.
        log.info("stopped by signal")
        logging.shutdown()
        os._exit(0)
    except RagError as exc:
        refuse_initialize(describe(exc).message)
        raise


def refuse_initialize(message: str, wait_seconds: float = 5.0) -> None:
    """Answer the client's opening requests (``initialize``, or ``server/discover`` first for newer
    clients) with ``message`` as a JSON-RPC error, so the client shows why the server cannot start
    rather than "server disconnected". Returns after ``initialize`` is answered, when stdin closes, or
    after ``wait_seconds``."""
    deadline = time.monotonic() + wait_seconds
    stdin = sys.stdin.buffer
    pending = b""
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([stdin], [], [], left)
        if not readable:
            return
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if isinstance(request, dict) and "id" in request and "method" in request:
                error = {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32000, "message": message}}
                sys.stdout.write(json.dumps(error) + "\n")
                sys.stdout.flush()
                if request["method"] == "initialize":
                    return


class _StopRequested(KeyboardInterrupt):
    """Raised by the SIGTERM handler of the stdio server (and of the HTTP server while it starts)."""


def run_http(settings: Settings, *, sse_only: bool = False, lock: HoldLock | None = None) -> None:
    """Bind the port first (a port in use is a one-line conflict, before any start-up work), open the
    runtime (its failures are one line too), then serve; "http app ready" is logged once it really is.
    On a shared data directory: ``lock`` is this process's hold of it; without it ``local.web`` decides
    (hold it, or relay to the process holding it)."""
    if shared(settings) and lock is None:  # hold the data directory, or relay to the process that does
        from .local.web import run_http_shared

        run_http_shared(settings, sse_only=sse_only)
        return
    listener = bind(settings.host, settings.port)
    holder = RuntimeHolder()
    factory: Callable[[Settings], AbstractAsyncContextManager[Runtime]] = open_runtime
    if lock is not None:  # this server holds the data directory and serves the other local processes
        from .local.stdio import held_runtime_factory

        factory = held_runtime_factory(lock)
    app = create_app(settings, holder=holder, sse_only=sse_only)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, holder, settings.shutdown_grace_seconds, settings)
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # While starting: stop. After serving: uvicorn re-raises the stop signal it handled, with
        # this handler back in place; ignoring it then lets a drained server exit 0.
        if starting:
            raise _StopRequested

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    async def serve() -> None:
        nonlocal starting
        async with factory(settings) as runtime:
            holder.runtime = runtime
            starting = False
            await server.serve(sockets=[listener])

    try:
        anyio.run(serve)
    except _StopRequested:
        log.info("stopped by signal while starting")
        return
    finally:
        listener.close()
    log.info("server stopped")
