"""A stdio server that does not hold its data directory: its MCP session runs in the holder.

The relay copies JSON-RPC lines between this process's stdin/stdout and a connection to the holder
(``holder._serve_mcp`` runs the session there). It imports neither the MCP server nor the model or
the index, so a relaying process stays small.

Hand-over: when the holder's connection ends (the holder exited or was killed) the relay takes the
data directory itself if it can, or connects to whichever process did, replays the session's
``initialize`` handshake there and sends again every request that had no answer yet (the tools are
idempotent: ingesting the same content again reports it unchanged). A request that cannot be
delivered within ``HANDOVER_TIMEOUT`` is answered with a JSON-RPC error saying to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any, BinaryIO

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from ..errors import RagError, describe
from ..logging import get_logger
from ..settings import Settings
from .address import address
from .connect import NoHolder, connect
from .election import HoldLock, try_hold
from .protocol import MAX_LINE

log = get_logger(__name__)

HANDOVER_TIMEOUT = 60.0
"""Seconds a request waits for a holder before it is answered with a retryable error."""
REPLAY_ID = "mcp-rag-replay-initialize"
RETRYABLE = -32000
"""JSON-RPC error code of "no holder answered in time; retry"."""

_GONE = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
)


def _key(request_id: Any) -> str:
    return json.dumps(request_id)


_REPLAY_KEY = _key(REPLAY_ID)
_RESPONSE_HEAD = re.compile(rb'^\{"jsonrpc":"2\.0","id":(-?\d+|"(?:[^"\\]|\\.)*"),"(?:result|error)":')


def _answered_id(line: bytes) -> str | None:
    """The request id a holder's line answers (as ``_key`` spells it), ``None`` for anything else.

    The SDK writes responses as ``{"jsonrpc":"2.0","id":...,"result"|"error":...}``: the head is
    matched without parsing the (possibly large) result; other spellings are parsed."""
    head = _RESPONSE_HEAD.match(line)
    if head is not None:
        return _key(json.loads(head.group(1)))
    if b'"method"' in line:
        try:
            message = json.loads(line)
        except ValueError:
            return None
        if not isinstance(message, dict) or "method" in message or "id" not in message:
            return None
        return _key(message["id"])
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return _key(message["id"]) if isinstance(message, dict) and "id" in message else None


class Relay:
    def __init__(self, settings: Settings, wire_in: BinaryIO, wire_out: BinaryIO) -> None:
        self.settings = settings
        self.address = address(settings.data_dir)
        self._in = wire_in
        self._out = wire_out
        self._initialize: dict[str, Any] | None = None
        self._initialized: bytes | None = None
        self._pending: dict[str, bytes] = {}
        self._conn: anyio.abc.SocketStream | None = None
        self._send_lock = anyio.Lock()
        self._holding = False
        self.fatal: str | None = None
        self.exit_status = 0

    async def run(self) -> int:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._client_to_holder)
            try:
                await self._holder_to_client()
            except RagError as exc:
                failure = describe(exc)
                self.fatal = failure.message
                self.exit_status = failure.exit_status
                self._fail_pending(failure.message)
            tg.cancel_scope.cancel()
        return self.exit_status

    # -- client -> holder ------------------------------------------------------------------

    async def _client_lines(self) -> AsyncIterator[bytes]:
        """The client's lines: read by the event loop from a pipe (no thread hop per message), or in a
        worker thread from anything else (a file)."""
        mode = os.fstat(self._in.fileno()).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):  # a file, a terminal, /dev/null
            while line := await anyio.to_thread.run_sync(self._in.readline, abandon_on_cancel=True):
                yield line
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self._in)
        while line := await reader.readline():
            yield line

    async def _client_to_holder(self) -> None:
        async for line in self._client_lines():  # until the client closes stdin: the session is over
            if not line.strip():
                continue
            if not line.endswith(b"\n"):
                line += b"\n"
            async with self._send_lock:  # tracked and sent as one step: a (re)connection sends it once
                self._track_request(line)
                if self._conn is not None:
                    with contextlib.suppress(*_GONE):  # sent again from _pending once a holder answers
                        await self._conn.send(line)
        self._tg.cancel_scope.cancel()

    def _track_request(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if method == "initialize" and "id" in message:
            self._initialize = message
        elif method == "notifications/initialized":
            self._initialized = line
        if isinstance(method, str) and "id" in message:
            self._pending[_key(message["id"])] = line

    # -- holder -> client ------------------------------------------------------------------

    async def _holder_to_client(self) -> None:
        first = True
        while True:
            stream, receive = await self._reach_holder()
            async with self._send_lock:
                self._conn = stream
                try:
                    if not first:
                        await self._replay(stream)
                    else:
                        for line in self._pending.values():  # arrived before the first connection
                            await stream.send(line)
                except _GONE:
                    pass
            first = False
            await self._pump(receive)
            async with self._send_lock:
                self._conn = None
            await stream.aclose()
            log.warning(
                "the process holding the data directory went away; handing over",
                data_dir=str(self.address.data_dir),
                requests_in_flight=len(self._pending),
            )

    async def _replay(self, stream: anyio.abc.SocketStream) -> None:
        """A new holder knows nothing of this session: initialize it again, then resend what had no answer."""
        if self._initialize is not None and _key(self._initialize["id"]) not in self._pending:
            await stream.send(json.dumps({**self._initialize, "id": REPLAY_ID}).encode() + b"\n")
            if self._initialized is not None:
                await stream.send(self._initialized)
        for line in list(self._pending.values()):
            await stream.send(line)

    async def _pump(self, receive: BufferedByteReceiveStream) -> None:
        while True:
            try:
                line = await receive.receive_until(b"\n", MAX_LINE)
            except _GONE:
                return
            answered = _answered_id(line)
            if answered is not None:
                if answered == _REPLAY_KEY:
                    continue  # the answer to our replayed initialize: the client has its own already
                self._pending.pop(answered, None)
            self._write(line + b"\n")

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    def _fail_pending(self, message: str) -> None:
        for line in list(self._pending.values()):
            request = json.loads(line)
            error = {"code": RETRYABLE, "message": message}
            self._write(json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}).encode() + b"\n")
        self._pending.clear()

    # -- finding (or becoming) the holder ---------------------------------------------------

    async def _reach_holder(self) -> tuple[anyio.abc.SocketStream, BufferedByteReceiveStream]:
        deadline = time.monotonic() + HANDOVER_TIMEOUT
        while True:
            try:
                stream, receive, _info = await connect(self.settings, "mcp")
                return stream, receive
            except NoHolder:
                pass
            if not self._holding:
                lock = try_hold(self.address)
                if lock is not None:
                    self._holding = True
                    log.info("taking over the data directory", data_dir=str(self.address.data_dir))
                    await self._tg.start(self._hold, lock)
                    continue
            if time.monotonic() > deadline:
                self._fail_pending(
                    f"no mcp-rag process answers for {self.address.data_dir} yet (the previous one stopped); "
                    "retry in a few seconds"
                )
                deadline = time.monotonic() + HANDOVER_TIMEOUT
            await anyio.sleep(0.05)

    async def _hold(self, lock: HoldLock, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """This process holds the data directory from now on (until it exits)."""
        from .holder import hold

        async with hold(self.settings, lock) as holder:
            task_status.started()
            await anyio.sleep_forever()
        del holder


class _StopRequested(KeyboardInterrupt):
    """Raised by the SIGTERM handler."""


def run_relay(settings: Settings) -> None:
    """The stdio server of a process that does not hold the data directory (see the module doc)."""
    # The wire keeps private copies of fd 0 and 1; fd 1 then points at stderr so nothing printed by
    # accident (or by a library, once this process holds the data directory) corrupts the MCP stream.
    wire_in = os.fdopen(os.dup(0), "rb")
    wire_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _StopRequested

    signal.signal(signal.SIGTERM, stop)
    relay = Relay(settings, wire_in, wire_out)
    status = 0
    try:
        status = anyio.run(relay.run)
    except _StopRequested:
        log.info("stopped by signal")
    if relay.fatal:
        print(f"mcp-rag: {relay.fatal}", file=sys.stderr)
    sys.stderr.flush()
    wire_out.flush()
    os._exit(status)  # the thread blocked reading stdin would otherwise keep the process alive
