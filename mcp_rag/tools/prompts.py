"""The prompt: answer a question from the stored documents, citing them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from mcp.server import MCPServer
from mcp_types import Completion, CompletionArgument, CompletionContext, PromptReference
from pydantic import Field

from ..runtime import Runtime
from .base import current_principal


def answer_with_citations(
    question: Annotated[str, Field(description="The question to answer.")],
    collection: Annotated[str | None, Field(description="Restrict the search to this collection.")] = None,
) -> str:
    where = f" in the collection {collection!r}" if collection else ""
    return (
        f"Answer the question below using only the documents stored in the mcp-rag server{where}.\n\n"
        f"1. Call the `search` tool{' with collection=' + repr(collection) if collection else ''} with the "
        'question (try `mode="lexical"` too for names, codes or rare terms; rephrase and search again if the '
        "first results miss).\n"
        "2. Read the returned passages; call `get_chunks` for the text around a passage, `get_document` for "
        "a whole document.\n"
        "3. Answer concisely. After every claim, cite its source as [title](source_uri), adding the heading path "
        "when there is one. Quote exact wording for key facts.\n"
        "4. If the documents do not contain the answer, say so plainly instead of guessing.\n\n"
        f"Question: {question}"
    )


MAX_COMPLETIONS = 100


def register(mcp: MCPServer[Any], get_runtime: Callable[[], Runtime]) -> None:
    mcp.prompt(
        name="answer_with_citations",
        title="Answer with citations",
        description="Answer a question from the stored documents, citing them.",
    )(answer_with_citations)

    @mcp.completion()  # type: ignore[untyped-decorator, no-untyped-call]  # the SDK leaves it untyped
    async def complete(ref: Any, argument: CompletionArgument, context: CompletionContext | None) -> Completion | None:
        """The caller's collection names for the prompt's ``collection`` argument."""
        if not (isinstance(ref, PromptReference) and ref.name == "answer_with_citations"):
            return None
        if argument.name != "collection":
            return None
        principal = current_principal()
        principal.require("read")
        collections = await get_runtime().service.list_collections(principal.tenant)
        names = [c.name for c in collections if c.name.startswith(argument.value)]
        return Completion(values=names[:MAX_COMPLETIONS], total=len(names), has_more=len(names) > MAX_COMPLETIONS)
