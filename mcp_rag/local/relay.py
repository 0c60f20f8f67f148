"""A stdio server that does not hold its data directory: its MCP session runs in the holder.

The relay copies JSON-RPC lines between this process's stdin/stdout and the holder through a
``SessionRelay`` (``session``: the connection, the hand-over when the holder goes away, the replay).
It imports neither the MCP server nor the model or the index, so a relaying process stays small.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import BinaryIO

import anyio

from ..errors import RagError, describe
from ..logging import get_logger
from ..settings import Settings
from ..wire import LineWriter, claimed_stdio, read_lines
from .session import HANDOVER_TIMEOUT, SessionRelay, Successor

log = get_logger(__name__)


class Relay:
    def __init__(self, settings: Settings, wire_in: BinaryIO, wire_out: BinaryIO) -> None:
        self.settings = settings
        self._in = wire_in
        self._out = wire_out
        self._writer: LineWriter | None = None
        self.fatal: str | None = None
        self.exit_status = 0

    async def run(self) -> int:
        self._writer = await LineWriter.open(self._out)
        try:
            return await self._relay()
        finally:
            await self._writer.aclose()

    async def _relay(self) -> int:
        async with anyio.create_task_group() as tg:
            session = SessionRelay(Successor(self.settings, task_group=tg), self._write)
            tg.start_soon(self._client_to_holder, session, tg.cancel_scope)
            try:
                await session.run()
            except RagError as exc:
                failure = describe(exc)
                self.fatal = failure.message
                self.exit_status = failure.exit_status
                await session.fail_pending(failure.message)
            tg.cancel_scope.cancel()
        return self.exit_status

    async def _client_to_holder(self, session: SessionRelay, scope: anyio.CancelScope) -> None:
        async for line in read_lines(self._in):  # until the client closes stdin: the session is over
            await session.send(line)
        # Not before the holder answered once: a holder that refuses this process is still reported.
        with anyio.move_on_after(HANDOVER_TIMEOUT):
            await session.connected.wait()
        scope.cancel()

    async def _write(self, data: bytes) -> None:
        assert self._writer is not None
        await self._writer.write(data)


class _StopRequested(KeyboardInterrupt):
    """Raised by the SIGTERM handler."""


def run_relay(settings: Settings) -> None:
    """The stdio server of a process that does not hold the data directory (see the module doc)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _StopRequested

    signal.signal(signal.SIGTERM, stop)
    status = 0
    # The wire keeps private copies of fd 0 and 1; fd 1 points at stderr meanwhile, so nothing printed
    # by accident (or by a library, once this process holds the data directory) corrupts the stream.
    with claimed_stdio() as (wire_in, wire_out):
        relay = Relay(settings, wire_in, wire_out)
        try:
            status = anyio.run(relay.run)
        except _StopRequested:
            log.info("stopped by signal")
    if relay.fatal:
        print(f"mcp-rag: {relay.fatal}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(status)  # the thread blocked reading stdin would otherwise keep the process alive
