"""Entry points of the servers on a shared data directory: hold it, or relay to the process that does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from ..logging import get_logger
from ..settings import Settings
from .address import address
from .election import HoldLock, try_hold

if TYPE_CHECKING:
    from ..runtime import Runtime

log = get_logger(__name__)


def run_stdio_shared(settings: Settings) -> None:
    """``mcp-rag serve --transport stdio``: hold the data directory, or relay to its holder."""
    lock = try_hold(address(settings.data_dir))
    if lock is None:
        from .relay import run_relay

        run_relay(settings)
        return

    from ..server import build_server
    from ..wire import serve_session
    from .holder import hold

    async def serve() -> None:
        async with hold(settings, lock) as holder:
            server = build_server(
                holder.get_runtime,
                read_only=settings.read_only,
                default_tenant=settings.default_tenant,
                in_flight=holder.calls,
            )
            await serve_session(server)

    from ..transports import serve_stdio

    serve_stdio(serve)


def held_runtime_factory(lock: HoldLock) -> Callable[[Settings], AbstractAsyncContextManager[Runtime]]:
    """An ``open_runtime``-like factory for the HTTP app that also serves the other local processes."""
    from .holder import hold

    @asynccontextmanager
    async def factory(settings: Settings) -> AsyncIterator[Runtime]:
        async with hold(settings, lock) as holder:
            yield holder.runtime

    return factory
