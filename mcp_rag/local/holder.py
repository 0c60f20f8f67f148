"""The holder of a data directory: the runtime (index, model, pools) of this process, served to the
other ``mcp-rag`` processes of the same user over the Unix socket of ``address``.

Each connection starts with a hello (``protocol``). An MCP connection becomes one MCP server session
over the socket, exactly as a stdio session would be, with the tenant and read-only setting of the
process at the other end (and, for a session an HTTP server relays, the principal it authenticated); a
command-line connection runs one ``mcp-rag`` command here and streams its output back; a question
(``questions``: readiness, metrics, the tools' scopes) gets one answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from .. import __version__
from ..auth import local_principal
from ..errors import ConfigurationError
from ..logging import get_logger
from ..runtime import Runtime, open_runtime
from ..settings import Settings
from ..types import InFlight
from .election import HoldLock
from .protocol import HELLO, MAX_LINE, encode, principal_from_hello, store_fingerprint, version_refusal
from .questions import QUESTIONS, answer

if TYPE_CHECKING:
    from ..embedding import Embedder

log = get_logger(__name__)

_GONE = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
)


class Holder:
    """This process's runtime, and the sessions and commands it serves for the other processes."""

    def __init__(self, settings: Settings, runtime: Runtime, lock: HoldLock) -> None:
        self.settings = settings
        self.runtime = runtime
        self.address = lock.address
        self.calls = InFlight()
        self._servers: dict[bool, Any] = {}
        self.connections = 0

    def get_runtime(self) -> Runtime:
        return self.runtime

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        async with anyio.create_task_group() as tg:
            await listener.serve(self._connection, task_group=tg)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        try:
            async with stream:
                peer = _peer_uid(stream)
                if peer is not None and peer != os.getuid():
                    log.warning("refused a local connection from another user", uid=peer)
                    return
                buffered = BufferedByteReceiveStream(stream)
                hello = _hello(await buffered.receive_until(b"\n", MAX_LINE))
                refusal = self._refusal(hello)
                await stream.send(encode({HELLO: {"version": __version__, "pid": os.getpid(), "refused": refusal}}))
                if refusal is not None:
                    return
                kind = hello.get("kind")
                if kind == "cli":
                    from .commands import serve_command

                    await serve_command(self, hello, stream)
                elif kind in QUESTIONS:
                    await stream.send(encode(await answer(self, str(kind))))
                else:
                    await self._serve_mcp(hello, buffered, stream)
        except _GONE:
            pass
        except Exception as exc:  # one connection must never take the holder down
            if not _only_disconnects(exc):
                log.exception("local connection failed")
        finally:
            self.connections -= 1

    def _refusal(self, hello: dict[str, Any]) -> str | None:
        version = hello.get("version")
        if version != __version__:
            # The other side names both versions (it knows which one it runs); this is for the log.
            return version_refusal(__version__, os.getpid(), self.address.data_dir)
        if hello.get("store") != store_fingerprint(self.settings):
            return (
                f"the process holding {self.address.data_dir} (pid {os.getpid()}) uses another database or "
                "embedding model (MCP_RAG_DATABASE_URL, MCP_RAG_EMBEDDING_MODEL*); give every process on one "
                "data directory the same settings"
            )
        return None

    def server(self, read_only: bool) -> Any:
        """The MCP server of the sessions served here (one per read-only setting); who calls is per session."""
        if read_only not in self._servers:
            from ..server import build_server

            self._servers[read_only] = build_server(
                self.get_runtime, read_only=read_only, default_tenant=self.settings.default_tenant, in_flight=self.calls
            )
        return self._servers[read_only]

    async def _serve_mcp(
        self, hello: dict[str, Any], receive: BufferedByteReceiveStream, stream: anyio.abc.SocketStream
    ) -> None:
        from mcp.server.stdio import stdio_server

        from ..tools.base import session_principal

        read_only = bool(hello.get("read_only")) or self.settings.read_only
        tenant = str(hello.get("tenant") or self.settings.default_tenant)
        # A session an HTTP server relays carries the principal its authentication established; a stdio
        # session is the local user. Only processes of this user get here (``_peer_uid``).
        principal = principal_from_hello(hello.get("principal")) or local_principal(tenant)
        lowlevel = self.server(read_only)._lowlevel_server
        lines_in = cast(Any, _LinesIn(receive))
        lines_out = cast(Any, _LinesOut(stream))
        token = session_principal.set(principal)
        try:
            async with stdio_server(stdin=lines_in, stdout=lines_out) as (read, write):
                await lowlevel.run(read, write, lowlevel.create_initialization_options())
        finally:
            session_principal.reset(token)


class _LinesIn:
    """The socket as the line iterator the SDK's stdio transport reads."""

    def __init__(self, receive: BufferedByteReceiveStream) -> None:
        self._receive = receive

    def __aiter__(self) -> _LinesIn:
        return self

    async def __anext__(self) -> str:
        try:
            return (await self._receive.receive_until(b"\n", MAX_LINE)).decode("utf-8", errors="replace")
        except _GONE:
            raise StopAsyncIteration from None


class _LinesOut:
    """The socket as the text file the SDK's stdio transport writes."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream

    async def write(self, text: str) -> None:
        with contextlib.suppress(*_GONE):
            await self._stream.send(text.encode())

    async def flush(self) -> None:
        return None


def _hello(line: bytes) -> dict[str, Any]:
    try:
        hello = json.loads(line)[HELLO]
    except (ValueError, KeyError, TypeError):
        raise ConnectionError("not an mcp-rag hello") from None
    if not isinstance(hello, dict):
        raise ConnectionError("not an mcp-rag hello")
    return hello


def _peer_uid(stream: anyio.abc.SocketStream) -> int | None:
    """The user id of the process at the other end (Linux ``SO_PEERCRED``); ``None`` where unknown."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610 - anyio, not Django
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # pragma: no cover - not Linux: the socket's 0600 mode is the guard
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return int(uid)


def _only_disconnects(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_disconnects(e) for e in exc.exceptions)
    return isinstance(exc, _GONE)


async def listen(path: Path) -> anyio.abc.SocketListener:
    """Listen on ``path`` (mode 0600), replacing a socket a dead holder left behind.

    Only the lock holder calls this, so whatever is at ``path`` is stale."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # noqa: ASYNC240 - one quick local call at start
    try:
        return await anyio.create_unix_listener(path, mode=0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot create the local socket {path}: {exc.strerror}") from None


@contextlib.asynccontextmanager
async def hold(
    settings: Settings, lock: HoldLock, *, follow_changes: bool | None = None, catch_up: bool = True
) -> AsyncIterator[Holder]:
    """Hold the data directory: open the runtime, serve the other processes while the body runs.

    The socket listens before the runtime opens, so processes starting meanwhile connect and wait
    (their connection is accepted once the runtime is ready) instead of racing for the lock."""
    try:
        listener = await listen(lock.address.socket)
        try:
            embedder = _start_loading_model(settings)
            async with open_runtime(
                settings, follow_changes=follow_changes, catch_up=catch_up, embedder=embedder
            ) as runtime:
                holder = Holder(settings, runtime, lock)
                log.info(
                    "holding the data directory", data_dir=str(lock.address.data_dir), socket=str(lock.address.socket)
                )
                async with _background(holder.serve, listener):
                    yield holder
        finally:
            await listener.aclose()
            with contextlib.suppress(FileNotFoundError):
                lock.address.socket.unlink()
    finally:
        lock.release()


def _start_loading_model(settings: Settings) -> Embedder:
    """The embedder, its model already loading in a thread while the runtime starts the database: a
    hand-over waits for the longer of the two instead of their sum. A failure here is left for
    ``open_runtime``'s own load, which raises it again."""
    from .. import metrics
    from ..embedding import Embedder

    embedder = Embedder(settings, on_batch=lambda n, secs: metrics.EMBED_BATCH_SECONDS.observe(secs))

    def load() -> None:
        with contextlib.suppress(Exception):
            embedder.load_sync()

    threading.Thread(target=load, name="mcp-rag-model-load", daemon=True).start()
    return embedder


@contextlib.asynccontextmanager
async def _background(fn: Any, *args: Any) -> AsyncIterator[None]:
    """Run ``fn(*args)`` while the body runs; the body's own exception comes out unwrapped."""
    error: BaseException | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(fn, *args)
        try:
            yield
        except BaseException as exc:
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
