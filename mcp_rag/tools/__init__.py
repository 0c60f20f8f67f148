"""The MCP surface: tools (one module per group, each a decorated function), resources and the prompt.

Adding a tool: write an ``@tool(scope, annotations, title)`` function in the module of its group (or a new
module imported below) and its test; ``register`` picks it up.
"""

from . import documents, ingest, search  # noqa: F401  (importing a module declares its tools)
from .base import TOOLS, CallerMiddleware, current, register, tool

__all__ = ["TOOLS", "CallerMiddleware", "current", "register", "tool"]
