"""The MCP server: the tools, resources and prompt of ``tools/`` on one ``MCPServer``.

Each is a thin call into the service. Domain errors become ``ToolError``s (resource errors) with the
message of ``errors.describe``, the only kind of error text a client sees. Every tool call is logged as
one structured line and counted in the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.server import MCPServer
from mcp_types import Tool as MCPTool

from . import __version__, tools
from .runtime import Runtime
from .tools import prompts, resources
from .tools.base import CallerMiddleware
from .tools.schema import compact_schema
from .types import InFlight

INSTRUCTIONS = """\
This server holds a searchable library of documents (retrieval-augmented generation).
Use `search` first whenever a question may be answered by the stored documents, and cite the
source_uri / title of the chunks you use. Use `list_collections` and `list_documents` to see what
is stored, `get_chunks` to read around a passage, `get_document` (or `fetch`) to read one in full,
and the ingest_* tools to add documents
(re-ingesting the same source replaces it; identical content is reported unchanged)."""


class RagServer(MCPServer[Any]):
    """``MCPServer`` whose ``tools/list`` leaves out what every schema repeats (``compact_schema``)."""

    async def list_tools(self) -> list[MCPTool]:
        return [
            tool.model_copy(
                update={
                    "input_schema": compact_schema(tool.input_schema),
                    "output_schema": compact_schema(tool.output_schema) if tool.output_schema else None,
                }
            )
            for tool in await super().list_tools()
        ]


def build_server(
    get_runtime: Callable[[], Runtime],
    *,
    read_only: bool = False,
    default_tenant: str = "default",
    lifespan: Any = None,
    in_flight: InFlight | None = None,
) -> MCPServer[Any]:
    """The MCP server. ``get_runtime`` returns the process-wide runtime (started elsewhere);
    ``in_flight`` counts the tool calls running."""
    registered: set[str] = set()
    mcp: MCPServer[Any] = RagServer(
        name="mcp-rag",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        middleware=[CallerMiddleware(default_tenant, registered)],
    )
    registered |= tools.register(mcp, get_runtime, in_flight or InFlight(), read_only=read_only)
    resources.register(mcp, get_runtime)
    prompts.register(mcp, get_runtime)
    return mcp
