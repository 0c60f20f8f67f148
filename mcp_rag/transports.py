"""Running the server: stdio (one session per process) or the HTTP app under uvicorn.

On SIGTERM/SIGINT the HTTP server turns not-ready at once, stops accepting connections,
lets in-flight calls finish within the grace period, closes the pools and exits 0.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn

from .http import RuntimeHolder, create_app
from .logging import get_logger
from .runtime import open_runtime
from .server import build_server
from .settings import Settings

log = get_logger(__name__)


def run_stdio(settings: Settings) -> None:
    holder = RuntimeHolder()

    @asynccontextmanager
    async def lifespan(server: Any) -> AsyncIterator[dict[str, Any]]:
        async with open_runtime(settings) as runtime:
            holder.runtime = runtime
            yield {}

    server = build_server(holder.get, read_only=settings.read_only, default_tenant=settings.default_tenant,
                          lifespan=lifespan)
    server.run("stdio")


class _DrainingServer(uvicorn.Server):
    """uvicorn, but readiness turns 503 the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, holder: RuntimeHolder) -> None:
        super().__init__(config)
        self._holder = holder

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("stop signal received: draining", signal=signal.Signals(sig).name)
        self._holder.begin_shutdown()
        super().handle_exit(sig, frame)


def run_http(settings: Settings, *, sse_only: bool = False) -> None:
    holder = RuntimeHolder()
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
    _DrainingServer(config, holder).run()
    log.info("server stopped")
