"""This process's stdin and stdout as the MCP wire of a stdio session.

``claimed_stdio`` takes private copies of fd 0 and fd 1 for the wire. While it is held, fd 0
reads ``/dev/null`` and fd 1 writes to stderr, so a child process or a stray ``print`` cannot touch
the wire. The event loop reads and writes a pipe or socket directly, with no worker-thread hop per
message. The MCP SDK's own stdio transport takes three hops per request: one to read the line,
then one each to write and to flush the answer. A file or terminal is still read and written in a
worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import anyio

from .local.protocol import MAX_LINE

if TYPE_CHECKING:
    from mcp.server import MCPServer

CLOSE_SECONDS = 5.0
"""How long the end of a session waits for a client to read the answers still in the pipe's buffer."""


@contextlib.contextmanager
def claimed_stdio() -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """The wire's ends (binary files on copies of fd 0 and 1); fd 0 and 1 are restored after, so a
    process that goes on writing to stdout (a one-line refusal) still reaches the client."""
    saved = os.dup(0), os.dup(1)
    wire_in = os.fdopen(os.dup(0), "rb")
    wire_out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
        yield cast(BinaryIO, wire_in), cast(BinaryIO, wire_out)
    finally:
        os.close(null)
        for fd, copy in zip((0, 1), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        for end in (wire_in, wire_out):
            with contextlib.suppress(OSError):
                end.close()


def _is_stream(file: BinaryIO) -> bool:
    """A pipe or a socket: what the event loop can wait on (a file or terminal cannot)."""
    mode = os.fstat(file.fileno()).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def read_lines(wire_in: BinaryIO) -> AsyncGenerator[bytes, None]:
    """The lines the client sends, each with its newline, until it closes its end."""
    if not _is_stream(wire_in):
        while line := await anyio.to_thread.run_sync(wire_in.readline, abandon_on_cancel=True):
            yield line
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), wire_in)
    try:
        while line := await reader.readline():
            yield line
    finally:
        transport.close()


class _PipeFlow(asyncio.Protocol):
    """The write end's state: whether its buffer has room, and whether it is closed."""

    def __init__(self) -> None:
        self.room = asyncio.Event()
        self.room.set()
        self.closed = asyncio.Event()

    def pause_writing(self) -> None:
        self.room.clear()

    def resume_writing(self) -> None:
        self.room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.room.set()
        self.closed.set()


class LineWriter:
    """Writes the answers to the client: through the event loop (waiting while the pipe is full), or
    in a worker thread for a file. A client that has gone stops nothing: its session ends when its
    input does."""

    def __init__(self, wire_out: BinaryIO, pipe: tuple[asyncio.WriteTransport, _PipeFlow] | None) -> None:
        self._out = wire_out
        self._pipe = pipe

    @classmethod
    async def open(cls, wire_out: BinaryIO) -> LineWriter:
        if not _is_stream(wire_out):
            return cls(wire_out, None)
        transport, flow = await asyncio.get_running_loop().connect_write_pipe(_PipeFlow, wire_out)
        return cls(wire_out, (transport, flow))

    async def write(self, data: bytes) -> None:
        if self._pipe is None:
            with contextlib.suppress(ConnectionError):
                await anyio.to_thread.run_sync(self._write_file, data)
            return
        transport, flow = self._pipe
        if not flow.closed.is_set():
            transport.write(data)
            await flow.room.wait()

    def _write_file(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    async def aclose(self) -> None:
        """Close the wire once what was written has reached the pipe: the last answers are not lost
        (unless the client has stopped reading for ``CLOSE_SECONDS``)."""
        if self._pipe is None:
            return
        transport, flow = self._pipe
        transport.close()
        with anyio.move_on_after(CLOSE_SECONDS, shield=True):
            await flow.closed.wait()


class _SdkLinesIn:
    """``read_lines`` as the text line iterator the SDK's stdio transport reads."""

    def __init__(self, lines: AsyncIterator[bytes]) -> None:
        self._lines = lines

    def __aiter__(self) -> _SdkLinesIn:
        return self

    async def __anext__(self) -> str:
        return (await anext(self._lines)).decode("utf-8", errors="replace")


class _SdkLinesOut:
    """A ``LineWriter`` as the text file the SDK's stdio transport writes (each line, then a flush)."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        await self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        return None


async def serve_session(server: MCPServer[Any]) -> None:
    """Run one MCP session of ``server`` on this process's stdin and stdout, until the client closes
    its end."""
    from mcp.server.stdio import stdio_server

    lowlevel = server._lowlevel_server
    with claimed_stdio() as (wire_in, wire_out):
        writer = await LineWriter.open(wire_out)
        lines = read_lines(wire_in)
        try:
            streams = stdio_server(stdin=cast(Any, _SdkLinesIn(lines)), stdout=cast(Any, _SdkLinesOut(writer)))
            async with streams as (read, write):
                await lowlevel.run(read, write, lowlevel.create_initialization_options())
        finally:
            await lines.aclose()
            await writer.aclose()
