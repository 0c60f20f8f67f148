"""One MCP session relayed to the holder of the data directory, surviving hand-overs.

A ``SessionRelay`` copies JSON-RPC lines between a client (a stdio pipe, or one streamable-HTTP or SSE
session of the HTTP server) and a connection to the holder, which runs the session (``holder._serve_mcp``).
It imports neither the MCP server nor the model or the index, so a relaying process stays small.

Hand-over: when the holder's connection ends (the holder exited or was killed) the relay takes the
data directory for this process if it can (``Successor``: once per process, for all its sessions), or
connects to whichever process did, replays the session's ``initialize`` handshake there and sends again
every request that had no answer yet (the tools are idempotent: ingesting the same content again reports
it unchanged). A request that cannot be delivered within ``HANDOVER_TIMEOUT`` is answered with a
JSON-RPC error saying to retry.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from ..logging import get_logger
from ..settings import Settings
from .address import address
from .connect import NoHolder, connect
from .election import HoldLock, try_hold
from .protocol import MAX_LINE

if TYPE_CHECKING:
    from .holder import Holder

log = get_logger(__name__)

HANDOVER_TIMEOUT = 60.0
"""Seconds a request waits for a holder before it is answered with a retryable error."""
REPLAY_ID = "mcp-rag-replay-initialize"
RETRYABLE = -32000
"""JSON-RPC error code of "no holder answered in time; retry"."""

GONE = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
)

Deliver = Callable[[bytes], Awaitable[None]]
"""Hands one line (with its newline) from the holder to the client."""


def _key(request_id: Any) -> str:
    return json.dumps(request_id)


_REPLAY_KEY = _key(REPLAY_ID)
_RESPONSE_HEAD = re.compile(rb'^\{"jsonrpc":"2\.0","id":(-?\d+|"(?:[^"\\]|\\.)*"),"(?:result|error)":')


def answered_id(line: bytes) -> str | None:
    """The request id a holder's line answers (as ``_key`` spells it), ``None`` for anything else.

    The SDK writes responses as ``{"jsonrpc":"2.0","id":...,"result"|"error":...}``: the head is
    matched without parsing the (possibly large) result; other spellings are parsed."""
    head = _RESPONSE_HEAD.match(line)
    if head is not None:
        return _key(json.loads(head.group(1)))
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or "method" in message or "id" not in message:
        return None
    return _key(message["id"])


class Successor:
    """This process's claim to the data directory: when the holder is gone, the first session to notice
    takes it (the process then holds it until it exits) and every session reconnects to the new holder."""

    def __init__(self, settings: Settings, task_group: anyio.abc.TaskGroup | None = None) -> None:
        self.settings = settings
        self.address = address(settings.data_dir)
        self.task_group = task_group
        """Where this process holds the data directory once it took it (set before the sessions run)."""
        self._lock = anyio.Lock()
        self.holding = False
        self.holder: Holder | None = None
        """This process's holder, once it took the data directory and its runtime is open."""

    async def try_take(self) -> bool:
        """Take the data directory if nobody holds it; ``True`` once this process holds it."""
        async with self._lock:
            if self.holding:
                return True
            if self.task_group is None:
                raise RuntimeError("Successor.task_group is not set")
            lock = try_hold(self.address)
            if lock is None:
                return False
            self.holding = True
            log.info("taking over the data directory", data_dir=str(self.address.data_dir))
            await self.task_group.start(self._hold, lock)
            return True

    async def _hold(self, lock: HoldLock, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        from .holder import hold

        async with hold(self.settings, lock) as holder:
            self.holder = holder
            try:
                task_status.started()
                await anyio.sleep_forever()
            finally:
                self.holder = None


class SessionRelay:
    """The lines of one MCP session: ``send`` what the client sends, ``run`` delivers the holder's answers."""

    def __init__(
        self,
        successor: Successor,
        deliver: Deliver,
        hello: dict[str, Any] | None = None,
        *,
        opening: Sequence[bytes] = (),
        lazy: bool = False,
    ) -> None:
        """``opening``: lines that open the session on every connection to a holder, in place of the
        client's own handshake (a stateless HTTP request has none); the answers to them are not delivered.
        ``lazy``: connect once the client sent its first request (a notification alone needs no holder),
        not at once (a stdio relay: a holder that refuses this process is reported at start)."""
        self.successor = successor
        self._deliver = deliver
        self._hello = hello or {}
        self._opening = list(opening)
        self._initialize: dict[str, Any] | None = None
        self._initialized: bytes | None = None
        self.pending: dict[str, bytes] = {}
        self._conn: anyio.abc.SocketStream | None = None
        self._send_lock = anyio.Lock()
        self._wanted = anyio.Event()
        if not lazy:
            self._wanted.set()
        self._closed = False
        self.connected = anyio.Event()
        """Set once the session reached a holder that accepted it."""

    # -- client -> holder ------------------------------------------------------------------

    async def send(self, line: bytes) -> None:
        if not line.strip():
            return
        if not line.endswith(b"\n"):
            line += b"\n"
        async with self._send_lock:  # tracked and sent as one step: a (re)connection sends it once
            self._track_request(line)
            if self._conn is not None:
                with contextlib.suppress(*GONE):  # sent again from ``pending`` once a holder answers
                    await self._conn.send(line)

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
            self.pending[_key(message["id"])] = line
            self._wanted.set()

    async def close(self) -> bool:
        """End the session. ``True``: ``run`` returns by itself (its connection is closed now); ``False``:
        it has no connection (yet), cancel it."""
        self._closed = True
        async with self._send_lock:
            conn = self._conn
        if conn is None:
            return False
        await conn.aclose()  # (closing rather than cancelling a receive: anyio's Unix streams race there)
        return True

    # -- holder -> client ------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver the holder's lines until cancelled, handing over whenever the holder goes away.
        Raises the ``RagError`` of a holder that refuses this process (another version or store)."""
        if not self._wanted.is_set():
            await self._wanted.wait()
        first = True
        while True:
            stream, receive = await self._reach_holder()
            async with self._send_lock:
                self._conn = stream
                self.connected.set()
                with contextlib.suppress(*GONE):
                    await self._open(stream, first)
            first = False
            try:
                await self._pump(receive)
            finally:
                async with self._send_lock:
                    self._conn = None
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            if self._closed:
                return
            log.warning(
                "the process holding the data directory went away; handing over",
                data_dir=str(self.successor.address.data_dir),
                requests_in_flight=len(self.pending),
            )

    async def _open(self, stream: anyio.abc.SocketStream, first: bool) -> None:
        """Open the session on a holder's connection: the first time with what the client sent meanwhile;
        after a hand-over the new holder knows nothing of it, so initialize it again, then resend what
        had no answer."""
        for line in self._opening:
            await stream.send(line)
        if not first and self._initialize is not None and _key(self._initialize["id"]) not in self.pending:
            await stream.send(json.dumps({**self._initialize, "id": REPLAY_ID}).encode() + b"\n")
            if self._initialized is not None:
                await stream.send(self._initialized)
        for line in list(self.pending.values()):
            await stream.send(line)

    async def _pump(self, receive: BufferedByteReceiveStream) -> None:
        while True:
            try:
                line = await receive.receive_until(b"\n", MAX_LINE)
            except GONE:
                return
            answered = answered_id(line)
            if answered == _REPLAY_KEY:
                continue  # the answer to our replayed (or opening) initialize: not the client's
            await self._deliver(line + b"\n")
            if answered is not None:  # (only now: a server draining waits until every answer is handed on)
                self.pending.pop(answered, None)

    async def fail_pending(self, message: str) -> None:
        """Answer every request still waiting with a retryable JSON-RPC error."""
        waiting, self.pending = list(self.pending.values()), {}
        for line in waiting:
            request = json.loads(line)
            error = {"code": RETRYABLE, "message": message}
            await self._deliver(json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}).encode() + b"\n")

    # -- finding (or becoming) the holder ---------------------------------------------------

    async def _reach_holder(self) -> tuple[anyio.abc.SocketStream, BufferedByteReceiveStream]:
        deadline = time.monotonic() + HANDOVER_TIMEOUT
        while True:
            try:
                stream, receive, _info = await connect(self.successor.settings, "mcp", **self._hello)
                return stream, receive
            except NoHolder:
                pass
            if await self.successor.try_take():
                try:
                    stream, receive, _info = await connect(self.successor.settings, "mcp", **self._hello)
                    return stream, receive
                except NoHolder:
                    pass
            if time.monotonic() > deadline:
                await self.fail_pending(
                    f"no mcp-rag process answers for {self.successor.address.data_dir} yet (the previous one "
                    "stopped); retry in a few seconds"
                )
                deadline = time.monotonic() + HANDOVER_TIMEOUT
            await anyio.sleep(0.05)
