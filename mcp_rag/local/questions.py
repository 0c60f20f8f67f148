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

from ..errors import RagError, describe
from ..logging import get_logger
from ..settings import Settings
from .connect import NoHolder, connect
from .protocol import MAX_LINE

if TYPE_CHECKING:
    from .holder import Holder

log = get_logger(__name__)

QUESTIONS = frozenset({"ready", "metrics", "tool_scopes"})
QUESTION_TIMEOUT = 5.0
"""Seconds a probe or a scrape waits for the holder's answer."""


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


class HolderQuestions:
    """The questions an HTTP server relaying to the holder asks for its probes and its OAuth gate."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._scopes: dict[str, str] = {}

    async def readiness(self) -> list[str]:
        where = self.settings.data_dir
        try:
            with anyio.fail_after(QUESTION_TIMEOUT):
                answer = await ask(self.settings, "ready")
        except NoHolder:
            return [f"no process holds {where} at the moment (a hand-over is under way)"]
        except TimeoutError:
            return [f"the process holding {where} does not answer"]
        except RagError as exc:
            return [describe(exc).message]
        except (OSError, ValueError) as exc:
            return [f"the process holding {where} answered badly: {exc}"]
        return [str(r) for r in answer.get("reasons") or ()]

    async def tool_scopes(self) -> dict[str, str]:
        if not self._scopes:
            try:
                with anyio.fail_after(QUESTION_TIMEOUT):
                    answer = await ask(self.settings, "tool_scopes")
            except (NoHolder, TimeoutError, RagError, OSError, ValueError):
                return {}  # the holder checks every call's scope itself
            tools = answer.get("tools")
            if isinstance(tools, dict):
                self._scopes = {str(k): str(v) for k, v in tools.items()}
        return self._scopes
