"""``mcp-rag serve --transport http|sse`` on a shared data directory: hold it, or relay to its holder.

An HTTP server that finds its data directory held by another process (a stdio server, a command)
still serves: authentication, the transports and the probes run here, every MCP session runs in the
holder (``relayed_sessions``) with the principal authenticated here. This process loads no model and
no index until the holder goes away; then it takes the data directory itself (``session.Successor``)
and its sessions carry on there.

Routes of the relaying server: ``/health`` (this process answers), ``/ready`` (ready when the holder
answers and is ready itself; otherwise 503 with the reason), ``/metrics`` (the holder's metrics,
where the tool calls are counted), the MCP routes (``/mcp``, ``/sse``, ``/messages/``), and the mobile
API answering 503 with a reason (it is served by a server that holds its data directory).
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import FrameType

import anyio
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import Receive, Scope, Send

from ..auth import ApiKeys, principal_from_scope
from ..errors import RagError, UnavailableError
from ..guards import MetricsToken, SessionLimits, SingleSecurityHeaders, metrics_refusal, session_owners
from ..http_front import BearerAuth, require_authentication, transport_security
from ..logging import get_logger
from ..serving import DrainingServer, bind, uvicorn_config
from ..settings import Settings
from .address import address
from .connect import HELLO_TIMEOUT, NoHolder
from .election import try_hold
from .questions import QUESTION_TIMEOUT, HolderQuestions, ask
from .relayed_sessions import RelayedSessions, RelayedSSE, RelayedStreamableHTTP
from .session import Successor

log = get_logger(__name__)


def run_http_shared(settings: Settings, *, sse_only: bool) -> None:
    """Hold the data directory and serve it (``transports.run_http``), or relay to the process holding it."""
    where = address(settings.data_dir)
    while True:
        lock = try_hold(where)
        if lock is not None:
            from ..transports import run_http

            run_http(settings, sse_only=sse_only, lock=lock)
            return
        if anyio.run(_holder_answers, settings):
            break
        time.sleep(0.05)  # the holder went away meanwhile: try to take the data directory again
    run_relaying(settings, sse_only=sse_only)


async def _holder_answers(settings: Settings) -> bool:
    """Whether the holder answers (``False``: it went away meanwhile, take the data directory); a holder
    that refuses this process (another version, another store) is the ``RagError`` saying so."""
    try:
        with anyio.fail_after(HELLO_TIMEOUT):
            await ask(settings, "ready")
    except NoHolder:
        return False
    except TimeoutError:
        raise UnavailableError(
            f"another process holds {settings.data_dir} but does not answer; stop it (or wait for it to "
            "finish starting) and try again"
        ) from None
    return True


class _Relaying:
    """What the drain sees: the requests the relayed sessions wait on, and the start of shutting down."""

    def __init__(self) -> None:
        self.sessions: RelayedSessions | None = None
        self.shutting_down = False

    @property
    def calls(self) -> _Relaying:
        return self

    @property
    def count(self) -> int:
        return self.sessions.count if self.sessions is not None else 0

    def begin_shutdown(self) -> None:
        self.shutting_down = True


def create_relaying_app(settings: Settings, state: _Relaying | None = None, *, sse_only: bool = False) -> Starlette:
    require_authentication(settings)
    state = state or _Relaying()
    security = transport_security(settings)
    resource_server = None
    if settings.oauth_enabled:
        from ..resource_server import ResourceServer

        resource_server = ResourceServer(settings)
    holder = HolderQuestions(settings)
    sessions = state.sessions = RelayedSessions(Successor(settings))
    streamable: RelayedStreamableHTTP | None = None
    mcp_routes: list[BaseRoute] = []
    if not sse_only:
        streamable = RelayedStreamableHTTP(
            sessions,
            stateless=settings.stateless_http,
            security_settings=security,
            max_request_body_size=settings.max_request_bytes,
            session_idle_timeout=settings.session_idle_seconds,
            max_sessions=settings.max_sessions,
        )
        mcp_routes.append(Route("/mcp", endpoint=StreamableHTTPASGIApp(streamable)))
    sse_transport = SseServerTransport(
        "/messages/", security_settings=security, max_request_body_size=settings.max_request_bytes
    )
    sse = RelayedSSE(sessions, sse_transport)

    async def sse_endpoint(request: Request) -> Response:
        await sse.handle_sse(request.scope, request.receive, request._send)
        return Response()

    mcp_routes += [
        Route("/sse", sse_endpoint, methods=["GET"]),
        Mount("/messages/", app=sse_transport.handle_post_message),
    ]

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if state.shutting_down:
            return JSONResponse({"status": "not ready", "reasons": ["shutting down"]}, status_code=503)
        reasons = await holder.readiness()
        if resource_server is not None:
            reasons += await resource_server.readiness()
        if reasons:
            return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready", "region": settings.region})

    async def metrics_endpoint(request: Request) -> Response:
        refusal = metrics_refusal(principal_from_scope(request.scope))
        if refusal is not None:
            return refusal
        try:
            with anyio.fail_after(QUESTION_TIMEOUT + settings.db_timeout):
                text = str((await ask(settings, "metrics")).get("text", ""))
        except (NoHolder, TimeoutError, RagError, OSError, ValueError):
            return JSONResponse(
                {"error": "unavailable", "message": "the process holding the data directory does not answer; retry"},
                status_code=503,
            )
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET", "HEAD"]),
        Route("/ready", ready, methods=["GET", "HEAD"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/api/mobile/{rest:path}", endpoint=_MobileAPI(settings, sessions.successor)),
        *mcp_routes,
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # (a data directory this process took is let go)
            sessions.successor.task_group = tg
            if resource_server is not None:
                stack.push_async_callback(resource_server.aclose)
            if streamable is not None:
                await stack.enter_async_context(streamable.run())
            yield
            state.begin_shutdown()

    app = Starlette(routes=routes, lifespan=lifespan)
    owners = None if streamable is None or settings.stateless_http else session_owners(streamable)
    app.add_middleware(SessionLimits, limit=settings.max_sessions_per_principal, owners=owners)
    app.add_middleware(
        BearerAuth, keys=ApiKeys(settings.api_keys), default_tenant=settings.default_tenant, security=security
    )
    if resource_server is not None:
        from ..resource_server import OAuthGate

        app.add_middleware(
            OAuthGate, resource_server=resource_server, keys=ApiKeys(settings.api_keys), tool_scopes=holder.tool_scopes
        )
    metrics_route = Route("/metrics", metrics_endpoint, methods=["GET"])
    app.add_middleware(MetricsToken, token=settings.metrics_token, endpoint=metrics_route.handle)
    app.add_middleware(SingleSecurityHeaders)
    app.state.relaying = state
    return app


class _MobileAPI:
    """The mobile API: it needs the runtime of this process, so it answers 503 while the server relays,
    and is served once this server took the data directory over."""

    def __init__(self, settings: Settings, successor: Successor) -> None:
        self.settings = settings
        self.successor = successor
        self._router: Router | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        holder = self.successor.holder
        if holder is None:
            response = JSONResponse(
                {
                    "error": "unavailable",
                    "message": f"this server relays to the process holding {self.settings.data_dir}; the mobile "
                    "API is served by an HTTP server that holds its data directory (start it first, or give it "
                    "its own MCP_RAG_DATA_DIR)",
                },
                status_code=503,
                headers={"Retry-After": "30"},
            )
            await response(scope, receive, send)
            return
        if self._router is None:
            from ..mobile import mobile_routes

            self._router = Router(routes=mobile_routes(holder.get_runtime))
        await self._router(scope, receive, send)


def run_relaying(settings: Settings, *, sse_only: bool = False) -> None:
    """Serve the HTTP app whose sessions run in the holder (see the module doc)."""
    listener = bind(settings.host, settings.port)
    state = _Relaying()
    app = create_relaying_app(settings, state, sse_only=sse_only)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, state, settings.shutdown_grace_seconds, settings)
    log.info("relaying to the process holding the data directory", data_dir=str(address(settings.data_dir).data_dir))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        return None  # uvicorn re-raises the stop signal it handled; ignoring it lets a drained server exit 0

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        anyio.run(server.serve, [listener])
    finally:
        listener.close()
    log.info("server stopped")
