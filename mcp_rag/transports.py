"""Running the server: stdio (one session per process) or the HTTP app under uvicorn.

On SIGTERM/SIGINT the HTTP server turns not-ready at once (``/ready`` answers 503) and refuses new
tool calls with a retryable error, lets the running tool calls finish within the grace period, then
stops accepting connections, closes the pools and exits 0.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn

from .http import RuntimeHolder, create_app
from .local import shared
from .logging import get_logger
from .runtime import open_runtime
from .server import build_server
from .settings import Settings

log = get_logger(__name__)


def run_stdio(settings: Settings) -> None:
    if shared(settings):  # one process holds the data directory; the others relay to it
        from .local.stdio import run_stdio_shared

        run_stdio_shared(settings)
        return
    holder = RuntimeHolder()

    @asynccontextmanager
    async def lifespan(server: Any) -> AsyncIterator[dict[str, Any]]:
        async with open_runtime(settings) as runtime:
            holder.runtime = runtime
            yield {}

    server = build_server(
        holder.get, read_only=settings.read_only, default_tenant=settings.default_tenant, lifespan=lifespan
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _StopRequested

    # SIGTERM unwinds like Ctrl-C, so pools close and the embedded Postgres is left cleanly.
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run("stdio")
    except _StopRequested:
        # Everything is closed by now; only the thread blocked reading stdin remains, and it
        # would keep the process alive until the parent closes the pipe.
        log.info("stopped by signal")
        logging.shutdown()
        os._exit(0)


class _StopRequested(KeyboardInterrupt):
    """Raised by the SIGTERM handler of the stdio server."""


class _DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase: on the first stop signal readiness turns 503 and new tool calls
    are refused (retryable), while the running tool calls finish with the listener still open; then
    uvicorn's own graceful shutdown closes the connections. Both phases share the grace period.
    A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, holder: RuntimeHolder, grace_seconds: float) -> None:
        super().__init__(config)
        self._holder = holder
        self._grace = grace_seconds
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_deadline is None and not self.should_exit:
            log.info(
                "stop signal received: draining",
                signal=signal.Signals(sig).name,
                tool_calls_in_flight=self._holder.calls.count,
            )
            self._holder.begin_shutdown()
            self._drain_deadline = time.monotonic() + self._grace
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        deadline = self._drain_deadline
        if deadline is not None and not self.should_exit:
            now = time.monotonic()
            if self._holder.calls.count == 0 or now >= deadline:
                if self._holder.calls.count:
                    log.warning(
                        "grace period over: stopping with tool calls still running",
                        tool_calls_in_flight=self._holder.calls.count,
                    )
                self.config.timeout_graceful_shutdown = max(1, math.ceil(deadline - now))
                self.should_exit = True
        return await super().on_tick(counter)


def run_http(settings: Settings, *, sse_only: bool = False) -> None:
    holder = RuntimeHolder()
    if shared(settings):
        from .local.stdio import held_runtime_factory, hold_for_http

        factory = held_runtime_factory(hold_for_http(settings))
        app = create_app(settings, holder=holder, sse_only=sse_only, runtime_factory=factory)  # type: ignore[arg-type]
    else:
        app = create_app(settings, holder=holder, sse_only=sse_only)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds)),
        lifespan="on",
        server_header=False,
    )
    # uvicorn re-raises the stop signal after a graceful shutdown, with the handler that was
    # installed before it ran: make that one a no-op so a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    _DrainingServer(config, holder, settings.shutdown_grace_seconds).run()
    log.info("server stopped")
