"""Serving the HTTP app under uvicorn: the listening socket, and the drain on a stop signal.

On SIGTERM/SIGINT the server turns not-ready at once (``/ready`` answers 503) and refuses new tool
calls with a retryable error, lets the running tool calls finish within the grace period, then stops
accepting connections and exits.
"""

from __future__ import annotations

import errno
import math
import signal
import socket
import time
from types import FrameType
from typing import Protocol

import uvicorn

from .errors import ConfigurationError, ConflictError
from .logging import get_logger
from .settings import Settings

log = get_logger(__name__)


class Calls(Protocol):
    @property
    def count(self) -> int: ...


class Drains(Protocol):
    """What the app tells the server while it drains: the tool calls still running, and the start of it."""

    @property
    def calls(self) -> Calls: ...

    def begin_shutdown(self) -> None: ...


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase: on the first stop signal readiness turns 503 and new tool calls
    are refused (retryable), while the running tool calls finish with the listener still open; then
    uvicorn's own graceful shutdown closes the connections. Both phases share the grace period.
    A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, holder: Drains, grace_seconds: float, settings: Settings) -> None:
        super().__init__(config)
        self._holder = holder
        self._grace = grace_seconds
        self._settings = settings
        self._drain_deadline: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            s = self._settings
            log.info("http app ready", host=s.host, port=s.port, region=s.region)

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


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    """How every HTTP server of this project runs under uvicorn: no access log or server header,
    logs through structlog, the lifespan on, in-flight requests given the shutdown grace."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds)),
        lifespan="on",
        server_header=False,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, or a ConflictError saying the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"MCP_RAG_HOST={host} cannot be resolved ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConflictError(
                f"port {port} on {host} is already in use (another server is listening there): "
                "stop it or set MCP_RAG_PORT (or --port) to a free port"
            ) from exc
        raise ConfigurationError(
            f"cannot listen on {host}:{port} ({exc.strerror}): check MCP_RAG_HOST/MCP_RAG_PORT"
        ) from exc
    sock.set_inheritable(True)
    return sock
