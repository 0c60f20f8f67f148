"""The one error tree, and the one translation of it for every surface.

Every error the system expects derives from ``RagError``; its message is written for the agent
(or person) who has to act on it. ``describe`` turns any of them into what a surface shows:
the MCP tools and resources, the mobile API and the CLI each map the same ``Failure`` (its
message, HTTP status or exit status) instead of deciding on their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

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


class UnavailableError(RagError):
    """A dependency (Postgres, the index, the model) does not answer right now."""


class ConfigurationError(RagError):
    """The configuration cannot work (reported at start-up)."""


class ConflictError(RagError):
    """Something else holds what this call needs (a port, the data directory's index), or a concurrent
    change won over this one after retries: running it again (once the other is done) will do."""


class EmbeddingUnavailableError(UnavailableError):
    """The embedding provider did not give usable vectors: it is down, timed out, kept failing, or
    answered something that is not an embeddings response (wrong dimension, an HTML error page)."""


class IndexError_(RagError):  # the underscore: the builtin IndexError is something else
    """The vector index failed."""


class IndexUnavailableError(IndexError_, UnavailableError):
    """The index engine cannot be reached or used right now."""


class IndexInUseError(IndexUnavailableError, ConflictError):
    """Another process holds the embedded index directory."""


class IndexDivergedError(IndexError_):
    """The index was built from another history of the change log than the database now holds
    (a failover that lost writes, a point-in-time restore, another database): it must be rebuilt."""


class CursorConflictError(IndexError_):
    """The stored cursor is not the one the writer expected: another sync pass advanced it meanwhile."""


class ModelMismatchError(IndexError_, ConfigurationError):
    """The index was built with another embedding model than the one configured."""


Kind = Literal["invalid_input", "not_found", "forbidden", "unavailable", "configuration", "conflict"]


@dataclass(frozen=True, slots=True)
class Failure:
    """How one error reads on every surface."""

    kind: Kind
    message: str
    http_status: int
    exit_status: int
    """1: the request failed; 2: configuration; 3: conflict; 4: a dependency is unavailable."""
    outcome: str
    """The ``outcome`` label of the tool-call log line and metric."""


# Most specific first: the first class an error is an instance of decides.
_TABLE: tuple[tuple[type[RagError], Kind, int, int, str], ...] = (
    (IndexError_, "unavailable", 503, 4, "unavailable"),
    (NotFoundError, "not_found", 404, 1, "error"),
    (AccessDeniedError, "forbidden", 403, 1, "denied"),
    (ConflictError, "conflict", 409, 3, "error"),
    (UnavailableError, "unavailable", 503, 4, "error"),
    (ConfigurationError, "configuration", 500, 2, "error"),
    (RagError, "invalid_input", 400, 1, "error"),
)


def describe(exc: RagError) -> Failure:
    """The one translation of a domain error for the MCP tools, resources, mobile API and CLI."""
    message = printable(str(exc))
    for cls, kind, http_status, exit_status, outcome in _TABLE:
        if isinstance(exc, cls):
            if cls is IndexError_:
                message = f"the search index is unavailable ({message}); retry shortly"
            return Failure(kind, message, http_status, exit_status, outcome)
    raise AssertionError("unreachable: RagError is the last row")  # pragma: no cover
