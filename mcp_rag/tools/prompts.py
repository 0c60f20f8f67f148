"""The prompt: answer a question from the stored documents, citing them."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server import MCPServer
from pydantic import Field


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
        "2. Read the returned chunks; call `get_document` when you need more context around a chunk.\n"
        "3. Answer concisely. After every claim, cite its source as [title](source_uri), adding the heading path "
        "when there is one. Quote exact wording for key facts.\n"
        "4. If the documents do not contain the answer, say so plainly instead of guessing.\n\n"
        f"Question: {question}"
    )


def register(mcp: MCPServer[Any]) -> None:
    mcp.prompt(name="answer_with_citations", description="Answer a question from the stored documents, citing them.")(
        answer_with_citations
    )
