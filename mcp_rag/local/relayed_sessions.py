"""The MCP sessions of an HTTP server that does not hold its data directory: each runs in the holder.

The SDK's transports still speak HTTP here (streamable HTTP with its session ids, owners, limits and
idle timeouts; SSE); where the SDK would run an MCP server session on a transport's message streams,
a ``SessionRelay`` carries the messages to the holder instead, with the principal that authenticated
the request opening the session. The holder runs the session for that principal (its tenant, its
scopes), exactly as this server would if it held the data directory.

Only the handshake-era protocol versions are relayed: a request of a newer, handshake-less version is
answered "unsupported version" naming the handshake versions, and the client falls back to them.
The SDK session manager is reused by overriding the parts that start a session (pinned ``mcp<3``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import mcp_types as types
from anyio.abc import TaskStatus
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager, _send_and_report_status
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..auth import Principal, principal_from_scope
from ..errors import RagError, describe
from ..logging import get_logger
from .protocol import principal_to_hello
from .session import GONE, REPLAY_ID, SessionRelay, Successor

log = get_logger(__name__)


class RelayedSessions:
    """The live relayed sessions of this process: how many requests they wait on (the drain counts them)."""

    def __init__(self, successor: Successor) -> None:
        self.successor = successor
        self._live: set[SessionRelay] = set()

    @property
    def count(self) -> int:
        return sum(len(session.pending) for session in self._live)

    async def relay(
        self,
        read_stream: Any,
        write_stream: Any,
        principal: Principal | None,
        *,
        initialize_first: str | None = None,
    ) -> None:
        """Carry one session's messages between the transport's streams and the holder until the
        transport closes them. ``initialize_first``: open the holder's session with this protocol
        version (a stateless request has no handshake of its own)."""
        progress: dict[str, types.RequestId] = {}

        async def deliver(line: bytes) -> None:
            message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
            metadata = None
            related = _progress_request(message, progress)
            if related is not None:
                metadata = ServerMessageMetadata(related_request_id=related)
            with contextlib.suppress(*GONE):
                await write_stream.send(SessionMessage(message, metadata=metadata))

        hello = {"principal": principal_to_hello(principal)} if principal is not None else {}
        opening = _handshake(initialize_first) if initialize_first is not None else ()
        session = SessionRelay(self.successor, deliver, hello, opening=opening, lazy=True)
        self._live.add(session)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run, session)
                with contextlib.suppress(anyio.ClosedResourceError):  # the client ended the session
                    async for item in read_stream:
                        if isinstance(item, Exception):
                            continue  # the transport answered the malformed message itself
                        _remember_progress(item.message, progress)
                        line = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                        await session.send(line.encode() + b"\n")
                if not await session.close():
                    tg.cancel_scope.cancel()
        finally:
            self._live.discard(session)

    @staticmethod
    async def _run(session: SessionRelay) -> None:
        try:
            await session.run()
        except RagError as exc:  # a holder that refuses this process (another version or store)
            message = describe(exc).message
            log.error("the holder refused this session", reason=message)
            await session.fail_pending(message)


def _handshake(version: str) -> tuple[bytes, bytes]:
    """The handshake a stateless request's session opens with in the holder (its answer is not delivered)."""
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "mcp-rag-relay", "version": "1"}}
    request = {"jsonrpc": "2.0", "id": REPLAY_ID, "method": "initialize", "params": params}
    return json.dumps(request).encode() + b"\n", b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n'


def _remember_progress(message: Any, progress: dict[str, types.RequestId]) -> None:
    """A request asking for progress: its notifications belong on that request's response stream."""
    if isinstance(message, types.JSONRPCRequest) and isinstance(message.params, dict):
        meta = message.params.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            progress[json.dumps(meta["progressToken"])] = message.id


def _progress_request(message: Any, progress: dict[str, types.RequestId]) -> types.RequestId | None:
    if isinstance(message, types.JSONRPCNotification) and message.method == "notifications/progress":
        params = message.params if isinstance(message.params, dict) else {}
        return progress.get(json.dumps(params.get("progressToken")))
    if isinstance(message, types.JSONRPCResponse | types.JSONRPCError) and message.id is not None:
        for token, request_id in list(progress.items()):
            if request_id == message.id:
                del progress[token]
    return None


class RelayedStreamableHTTP(StreamableHTTPSessionManager):
    """The SDK's streamable-HTTP session manager, with each session relayed to the holder."""

    def __init__(self, sessions: RelayedSessions, **kwargs: Any) -> None:
        super().__init__(app=None, **kwargs)  # type: ignore[arg-type]  # never called: sessions are relayed
        self.sessions = sessions

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            self._task_group = tg  # type: ignore[assignment]
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                self._task_group = None
                self._server_instances.clear()
                self._session_owners.clear()

    async def _handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = MCP_PROTOCOL_VERSION_HEADER.encode("ascii")
        version = next((v.decode("latin-1") for k, v in scope["headers"] if k == header), None)
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            await _unsupported_version(version)(scope, receive, send)
            return
        if self.stateless:
            await self._handle_stateless_request(version, scope, receive, send)
        else:
            await self._handle_stateful_request(scope, receive, send)

    async def _handle_stateless_request(
        self, protocol_version_hint: str | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        transport = StreamableHTTPServerTransport(
            mcp_session_id=None,
            is_json_response_enabled=self.json_response,
            event_store=None,
            security_settings=self.security_settings,
        )
        principal = principal_from_scope(scope)
        version = protocol_version_hint or types.DEFAULT_NEGOTIATED_VERSION

        async def run_stateless(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            async with transport.connect() as (read_stream, write_stream):
                task_status.started()
                await self.sessions.relay(read_stream, write_stream, principal, initialize_first=version)

        assert self._task_group is not None
        try:
            await self._task_group.start(run_stateless)
            await transport.handle_request(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await transport.terminate()

    async def _serve_opening_request(
        self, http_transport: StreamableHTTPServerTransport, scope: Scope, receive: Receive, send: Send
    ) -> None:
        session_id = http_transport.mcp_session_id
        assert session_id is not None
        principal = principal_from_scope(scope)

        async def run_server(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            async with http_transport.connect() as (read_stream, write_stream):
                task_status.started()
                try:
                    idle_scope = http_transport.idle_scope or anyio.CancelScope()
                    with idle_scope:
                        await self.sessions.relay(read_stream, write_stream, principal)
                    if idle_scope.cancelled_caught:
                        log.info("relayed session idle timeout", session=session_id[:8])
                except Exception:
                    log.exception("relayed session failed", session=session_id[:8])
                finally:
                    await self._discard_session(session_id, http_transport)

        established = False
        try:
            assert self._task_group is not None
            await self._task_group.start(run_server)
            status = await _send_and_report_status(http_transport.handle_request, scope, receive, send)
            established = status is not None and status < 400
        finally:
            if not established:
                await self._discard_session(session_id, http_transport)


def _unsupported_version(version: str) -> Response:
    data = types.UnsupportedProtocolVersionErrorData(supported=list(HANDSHAKE_PROTOCOL_VERSIONS), requested=version)
    error = {
        "code": types.UNSUPPORTED_PROTOCOL_VERSION,
        "message": f"protocol version {version} is not served here; use one of {', '.join(HANDSHAKE_PROTOCOL_VERSIONS)}",
        "data": data.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return JSONResponse({"jsonrpc": "2.0", "id": None, "error": error}, status_code=400)


class RelayedSSE:
    """The SDK's SSE transport (``GET /sse`` + ``POST /messages/``), each stream's session relayed."""

    def __init__(self, sessions: RelayedSessions, transport: SseServerTransport) -> None:
        self.sessions = sessions
        self.transport = transport

    async def handle_sse(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_from_scope(scope)
        async with self.transport.connect_sse(scope, receive, send) as (read_stream, write_stream):
            await self.sessions.relay(read_stream, write_stream, principal)
