"""How a tool is declared and what every call goes through.

A tool is a module-level async function decorated with ``@tool(scope, annotations, title)``; ``register``
adds the declared tools to a server, wrapping each in ``instrument``: one log line and one metric per
call, the caller's scope checked, refusal while the server drains, and the one error translation
(``errors.describe``) into the ``ToolError`` a client reads. Inside a tool, ``current()`` is the call:
the process runtime and who is calling.
"""

from __future__ import annotations

import functools
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ResourceLink, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from .. import metrics
from ..auth import Principal, local_principal, principal_from_scope
from ..errors import RagError, UnavailableError, describe
from ..logging import get_logger
from ..runtime import Runtime
from ..service import RagService
from ..types import InFlight

log = get_logger("mcp_rag.tools")

R = TypeVar("R")
Scope = Literal["read", "write"]
ToolFn = Callable[..., Awaitable[Any]]

READ = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
REPLACE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)
"""Adds, or replaces what was stored under the same identity (so destructive in the spec's sense)."""
REPLACE_WEB = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=True)
DELETE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)

Collection = Annotated[
    str | None,
    Field(
        description="Collection (namespace) to use; omit for 'default'. 1-64 letters, digits, '_', '-', '.'.",
        max_length=64,
    ),
]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    fn: ToolFn
    scope: Scope
    annotations: ToolAnnotations
    title: str

    @property
    def name(self) -> str:
        return self.fn.__name__


TOOLS: list[ToolSpec] = []
"""Every declared tool, in declaration order (the order ``tools/list`` shows)."""


def tool(
    scope: Scope, annotations: ToolAnnotations, title: str
) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """Declare a tool: its name is the function's, its description the docstring, its schema the signature,
    ``title`` what a client shows people."""

    def declare(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        TOOLS.append(ToolSpec(fn, scope, annotations, title))
        return fn

    return declare


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call: the process runtime and the caller."""

    runtime: Runtime
    principal: Principal

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def service(self) -> RagService:
        return self.runtime.service


_call: ContextVar[Call | None] = ContextVar("mcp_rag_call", default=None)


def current() -> Call:
    """The call being served (set by ``instrument`` around every tool and resource)."""
    call = _call.get()
    if call is None:
        raise RuntimeError("current() outside a tool call")
    return call


_caller: ContextVar[Principal | None] = ContextVar("mcp_rag_caller", default=None)


def current_principal() -> Principal:
    principal = _caller.get()
    if principal is None:
        raise ToolError("not authenticated: send Authorization: Bearer <API key>")
    return principal


class _ToolCallState:
    """Set by the tool wrapper once a call reaches it (after argument validation)."""

    def __init__(self) -> None:
        self.reached = False


_tool_call: ContextVar[_ToolCallState | None] = ContextVar("mcp_rag_tool_call", default=None)


session_principal: ContextVar[Principal | None] = ContextVar("mcp_rag_session_principal", default=None)
"""Who calls in a session without HTTP requests of its own, when it is not this process's local user: set
around the whole session (its message handlers run in copies of that context)."""


class CallerMiddleware:
    """Resolves who sent each MCP message, once, for every tool, resource and prompt it reaches.

    HTTP messages carry the principal the bearer-auth middleware left in the ASGI scope;
    messages without an HTTP request come from ``session_principal`` when the session sets it (a
    session the holder of a data directory runs for another process: that process's local user, or
    the caller an HTTP server authenticated), else from the trusted local user (stdio, in-memory).
    A tool call rejected before it ran (invalid arguments) still gets its log line and metric.
    """

    def __init__(self, default_tenant: str, tools: set[str]) -> None:
        self._local = local_principal(default_tenant)
        self._tools = tools

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        request = getattr(ctx, "request", None)
        if request is None:
            principal: Principal | None = session_principal.get() or self._local
        else:
            principal = principal_from_scope(getattr(request, "scope", {}))
        token = _caller.set(principal)
        is_call = getattr(ctx, "method", None) == "tools/call"
        name = (getattr(ctx, "params", None) or {}).get("name") if is_call else None
        state = _ToolCallState()
        state_token = _tool_call.set(state)
        started = time.perf_counter()
        try:
            result = await call_next(ctx)
        finally:
            _tool_call.reset(state_token)
            _caller.reset(token)
        if isinstance(name, str) and name in self._tools and not state.reached and _is_error(result):
            tenant = principal.tenant if principal is not None else "-"
            log_call(name, "invalid", time.perf_counter() - started, getattr(ctx, "request_id", None) or "-", tenant)
        return result


def _is_error(result: Any) -> bool:
    if isinstance(result, dict):
        return bool(result.get("isError") or result.get("is_error"))
    return bool(getattr(result, "is_error", False))


def log_call(name: str, outcome: str, seconds: float, request_id: str, tenant: str) -> None:
    """The one log line and the metrics of a tool call."""
    metrics.TOOL_CALLS.labels(name, outcome).inc()
    metrics.TOOL_LATENCY.labels(name).observe(seconds)
    log.info(
        "tool call",
        tool=name,
        outcome=outcome,
        duration_ms=round(seconds * 1000, 2),
        request_id=request_id,
        tenant=tenant,
    )


def instrument(spec: ToolSpec, get_runtime: Callable[[], Runtime], calls: InFlight) -> ToolFn:
    """``spec``'s function wrapped in what every tool call goes through."""
    fn = spec.fn
    name = spec.name

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx: Context[Any, Any] | None = kwargs.get("ctx")
        started = time.perf_counter()
        outcome = "ok"
        request_id = ctx.request_id if ctx is not None else uuid.uuid4().hex
        tenant = "-"
        state = _tool_call.get()
        if state is not None:
            state.reached = True
        calls.count += 1
        try:
            principal = current_principal()
            tenant = principal.tenant
            principal.require(spec.scope)
            runtime = get_runtime()
            if runtime.draining:
                raise UnavailableError("the server is shutting down; retry (another replica will answer)")
            token = _call.set(Call(runtime, principal))
            try:
                return for_agents(await fn(*args, **kwargs))
            finally:
                _call.reset(token)
        except ToolError:
            outcome = "error"
            raise
        except RagError as exc:
            failure = describe(exc)
            outcome = failure.outcome
            raise ToolError(failure.message) from exc
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "crash"
            log.exception("tool crashed", tool=name, request_id=request_id, tenant=tenant)
            raise
        finally:
            calls.count -= 1
            log_call(name, outcome, time.perf_counter() - started, request_id, tenant)

    # Resolved here, in the tool module's namespace: the SDK reads the wrapper's signature for the schema.
    signature = inspect.signature(fn, eval_str=True)
    if isinstance(signature.return_annotation, type) and issubclass(signature.return_annotation, BaseModel):
        # The tool returns its model; the wrapper hands the SDK a result with the compact text, whose
        # structured content the SDK still validates against the model's schema.
        signature = signature.replace(return_annotation=Annotated[CallToolResult, signature.return_annotation])
    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper


def for_agents(result: Any) -> Any:
    """A tool's model as what a client receives: the compact text an agent's model reads (``as_text``),
    a link to each document it names (``links``), and the full model as structured content."""
    if not isinstance(result, BaseModel):
        return result
    as_text = getattr(result, "as_text", None)
    text = as_text() if callable(as_text) else result.model_dump_json()
    content: list[ContentBlock] = [TextContent(type="text", text=text)]
    links = getattr(result, "links", None)
    if callable(links):
        content += [ResourceLink(type="resource_link", uri=uri, name=name) for uri, name in links()]
    return CallToolResult(content=content, structured_content=result.model_dump(mode="json"))


def register(mcp: MCPServer[Any], get_runtime: Callable[[], Runtime], calls: InFlight, *, read_only: bool) -> set[str]:
    """Add every declared tool (only the read tools when ``read_only``); returns their names."""
    names: set[str] = set()
    for spec in TOOLS:
        if read_only and spec.scope == "write":
            continue
        mcp.tool(
            name=spec.name,
            title=spec.title,
            description=inspect.cleandoc(spec.fn.__doc__ or ""),
            annotations=spec.annotations,
        )(instrument(spec, get_runtime, calls))
        names.add(spec.name)
    return names
