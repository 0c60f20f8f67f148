"""Domain errors. The MCP layer turns each into a ``ToolError`` with the same message,
so every message here is written for the agent (or person) who has to act on it."""

from __future__ import annotations

import re

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD, so it can be encoded as UTF-8 (JSON, stdout).

    They come from file names that are not valid UTF-8 (Python decodes them with surrogateescape)."""
    return _LONE_SURROGATE.sub("\ufffd", text)


class RagError(Exception):
    """Base class: an error whose message is safe and useful to show to the caller."""


class InvalidInputError(RagError):
    """The arguments are wrong (empty text, bad filter, unknown mode...)."""


class TooLargeError(InvalidInputError):
    """The input exceeds a configured size limit."""


class UnsupportedSourceError(InvalidInputError):
    """The file or URL is of a type that cannot be ingested."""


class NotFoundError(RagError):
    """A document or collection does not exist (for this tenant)."""


class AccessDeniedError(RagError):
    """The caller may not do this (scope, allowed roots, blocked address)."""


class ConflictError(RagError):
    """A concurrent change conflicted with this one (after retries); running it again will do."""


class UnavailableError(RagError):
    """A dependency (Postgres, the index, the model) does not answer right now."""


class ConfigurationError(RagError):
    """The configuration cannot work (reported at start-up)."""
