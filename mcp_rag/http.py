"""The one HTTP app on one port: streamable HTTP at /mcp, SSE at /sse, probes, metrics, mobile API.

Bearer authentication wraps every route except the probes; the principal it resolves is
left in the ASGI scope for the tools and routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import metrics
from .auth import ApiKeys, principal_from_scope
from .errors import RagError
from .guards import MetricsToken, SessionLimits, SingleSecurityHeaders, metrics_refusal, session_owners
from .http_front import BearerAuth, require_authentication, transport_security
from .logging import get_logger
from .resource_server import OAuthGate, ResourceServer, tool_scopes
from .runtime import Runtime, open_runtime
from .server import build_server
from .settings import Settings
from .types import InFlight

log = get_logger(__name__)


class RuntimeHolder:
    """Late binding: routes and tools are built before the runtime starts."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self.shutting_down = False
        self.calls = InFlight()

    def get(self) -> Runtime:
        if self.runtime is None:
            raise RagError("the server is still starting; retry in a moment")
        return self.runtime

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        if self.runtime is not None:
            self.runtime.draining = True


def create_app(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    holder: RuntimeHolder | None = None,
    sse_only: bool = False,
    runtime_factory: Callable[[Settings], Any] = open_runtime,
) -> Starlette:
    """The HTTP app. With ``runtime`` given it is used as is; otherwise the app's lifespan starts one."""
    require_authentication(settings)
    holder = holder or RuntimeHolder(runtime)
    mcp = build_server(
        holder.get, read_only=settings.read_only, default_tenant=settings.default_tenant, in_flight=holder.calls
    )
    security = transport_security(settings)
    resource_server = ResourceServer(settings) if settings.oauth_enabled else None
    mcp_routes: list[BaseRoute] = []
    if not sse_only:
        streamable = mcp.streamable_http_app(
            streamable_http_path="/mcp",
            stateless_http=settings.stateless_http,
            transport_security=security,
            max_request_body_size=settings.max_request_bytes,
            session_idle_timeout=settings.session_idle_seconds,
            max_sessions=settings.max_sessions,
            host=settings.host,
        )
        mcp_routes += streamable.routes
    sse = mcp.sse_app(
        sse_path="/sse",
        message_path="/messages/",
        transport_security=security,
        max_request_body_size=settings.max_request_bytes,
        host=settings.host,
    )
    mcp_routes += sse.routes

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if holder.shutting_down:
            return JSONResponse({"status": "not ready", "reasons": ["shutting down"]}, status_code=503)
        if holder.runtime is None:
            return JSONResponse({"status": "not ready", "reasons": ["starting"]}, status_code=503)
        reasons = await holder.runtime.readiness()
        if resource_server is not None:
            reasons += await resource_server.readiness()
        if reasons:
            return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready", "region": settings.region})

    async def metrics_endpoint(request: Request) -> Response:
        refusal = metrics_refusal(principal_from_scope(request.scope))
        if refusal is not None:
            return refusal
        if holder.runtime is not None:
            # Both lag gauges are measured now, on the scrape; if the read database does not
            # answer in time they keep their last value and the scrape still answers.
            with anyio.move_on_after(settings.db_timeout + 1):
                try:
                    await holder.runtime.refresh_lag_metrics()
                except Exception as exc:
                    log.debug("could not refresh the lag gauges for metrics", error=str(exc))
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    from .mobile import mobile_routes

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET", "HEAD"]),
        Route("/ready", ready, methods=["GET", "HEAD"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *mobile_routes(holder.get),
        *mcp_routes,
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if holder.runtime is None:
                holder.runtime = await stack.enter_async_context(runtime_factory(settings))
            if resource_server is not None:
                stack.push_async_callback(resource_server.aclose)
            if not sse_only:
                await stack.enter_async_context(mcp.session_manager.run())
            yield
            holder.begin_shutdown()

    app = Starlette(routes=routes, lifespan=lifespan)
    owners = None if sse_only or settings.stateless_http else session_owners(mcp.session_manager)
    app.add_middleware(SessionLimits, limit=settings.max_sessions_per_principal, owners=owners)
    app.add_middleware(
        BearerAuth, keys=ApiKeys(settings.api_keys), default_tenant=settings.default_tenant, security=security
    )
    if resource_server is not None:
        app.add_middleware(
            OAuthGate, resource_server=resource_server, keys=ApiKeys(settings.api_keys), tool_scopes=tool_scopes(mcp)
        )
    metrics_route = Route("/metrics", metrics_endpoint, methods=["GET"])
    app.add_middleware(MetricsToken, token=settings.metrics_token, endpoint=metrics_route.handle)
    app.add_middleware(SingleSecurityHeaders)
    app.state.holder = holder
    app.state.mcp = mcp
    return app
