"""Short questions to the holder of a data directory, each answered with one JSON line.

An HTTP server that does not hold its data directory asks them for its probes and routes: ``ready``
(``{"reasons": [...]}``, empty when the holder's runtime is ready), ``metrics`` (``{"text": ...}``, the
holder's Prometheus exposition, where the tool calls are counted) and ``tool_scopes``
(``{"tools": {name: "read"|"write"}}``, for the OAuth gate's insufficient-scope challenges).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio

from ..logging import get_logger
from ..settings import Settings
from .connect import connect
from .protocol import MAX_LINE

if TYPE_CHECKING:
    from .holder import Holder

log = get_logger(__name__)

QUESTIONS = frozenset({"ready", "metrics", "tool_scopes"})


async def ask(settings: Settings, kind: str) -> dict[str, Any]:
    """The holder's answer; raises ``connect.NoHolder`` (nobody answers) or the ``RagError`` of a
    holder that refuses this process. The caller bounds the wait (``anyio.fail_after``)."""
    stream, receive, _info = await connect(settings, kind)
    async with stream:
        answer = json.loads(await receive.receive_until(b"\n", MAX_LINE))
    if not isinstance(answer, dict):
        raise ValueError("the holder's answer is not an object")
    return answer


async def answer(holder: Holder, kind: str) -> dict[str, Any]:
    """The holder's side of ``ask``."""
    runtime = holder.runtime
    if kind == "ready":
        if runtime.draining:
            return {"reasons": ["the process holding the data directory is shutting down"]}
        return {"reasons": await runtime.readiness()}
    if kind == "metrics":
        from prometheus_client import generate_latest

        from .. import metrics

        with anyio.move_on_after(holder.settings.db_timeout + 1):
            try:
                await runtime.refresh_lag_metrics()
            except Exception as exc:
                log.debug("could not refresh the lag gauges for metrics", error=str(exc))
        return {"text": generate_latest(metrics.REGISTRY).decode()}
    if kind == "tool_scopes":
        from ..tools.base import TOOLS

        return {"tools": {spec.name: spec.scope for spec in TOOLS}}
    raise ValueError(f"unknown question {kind!r}")
