"""The one error tree and its one translation: what each kind of error reads as on every surface."""

from __future__ import annotations

import pytest

from mcp_rag.errors import (
    AccessDeniedError,
    ConfigurationError,
    ConflictError,
    IndexError_,
    IndexUnavailableError,
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
    RagError,
    TooLargeError,
    UnavailableError,
    UnsupportedSourceError,
    describe,
)


def test_every_expected_error_shares_one_root() -> None:
    for cls in (
        InvalidInputError,
        TooLargeError,
        UnsupportedSourceError,
        NotFoundError,
        AccessDeniedError,
        UnavailableError,
        ConfigurationError,
        IndexError_,
        IndexUnavailableError,
        ModelMismatchError,
    ):
        assert issubclass(cls, RagError), cls
    assert not issubclass(IndexError_, IndexError)  # the builtin is something else
    assert issubclass(IndexUnavailableError, UnavailableError)
    assert issubclass(ModelMismatchError, ConfigurationError)


@pytest.mark.parametrize(
    ("error", "kind", "http_status", "exit_status", "outcome"),
    [
        (InvalidInputError("bad filter"), "invalid_input", 400, 1, "error"),
        (TooLargeError("too big"), "invalid_input", 400, 1, "error"),
        (NotFoundError("no such document"), "not_found", 404, 1, "error"),
        (AccessDeniedError("lacks the 'write' scope"), "forbidden", 403, 1, "denied"),
        (UnavailableError("the database is unavailable"), "unavailable", 503, 4, "error"),
        (ConflictError("port 8000 is in use"), "conflict", 409, 3, "error"),
        (ConfigurationError("invalid configuration"), "configuration", 500, 2, "error"),
        (RagError("something the caller did"), "invalid_input", 400, 1, "error"),
    ],
)
def test_each_class_has_one_reading(
    error: RagError, kind: str, http_status: int, exit_status: int, outcome: str
) -> None:
    failure = describe(error)
    assert (failure.kind, failure.http_status, failure.exit_status, failure.outcome) == (
        kind,
        http_status,
        exit_status,
        outcome,
    )
    assert failure.message == str(error)


@pytest.mark.parametrize(
    "error",
    [
        IndexUnavailableError("cannot reach Qdrant at 10.0.0.9:6333"),
        ModelMismatchError("built with model a, configured with b"),
    ],
)
def test_index_failures_say_the_index_is_unavailable_and_to_retry(error: IndexError_) -> None:
    failure = describe(error)
    assert failure.kind == "unavailable"
    assert failure.http_status == 503
    assert failure.outcome == "unavailable"
    assert failure.message == f"the search index is unavailable ({error}); retry shortly"


def test_messages_are_printable_even_with_undecodable_file_names() -> None:
    name = b"/docs/caf\xe9.txt".decode("utf-8", "surrogateescape")
    failure = describe(InvalidInputError(f"{name}: cannot read"))
    assert failure.message == "/docs/caf\ufffd.txt: cannot read"
    failure.message.encode("utf-8")  # would raise with a lone surrogate
