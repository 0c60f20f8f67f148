"""Where documents come from: files and directories on this machine, and URLs.

These turn a path or a URL into ``SourceDocument``s (or ``SourceFailure``s for what cannot be
read) for the service to ingest; they apply the allowed-roots and URL policies, and leave chunking,
embedding and storing to the service.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from .errors import InvalidInputError, RagError, printable
from .extract import SourceDocument, extract_bytes, read_file, walk
from .paths import resolve_allowed_path
from .urlfetch import UrlPolicy, fetch


@dataclass(frozen=True, slots=True)
class SourceFailure:
    """A source that could not be read, with the reason (reported, never fatal in a batch)."""

    source: str
    reason: str


Source = SourceDocument | SourceFailure


def collect_files(paths: Sequence[Path], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Path]:
    """The ingestible files under ``paths`` (directories recursively, filtered by the globs)."""
    return list(walk(paths, include, exclude))


def confined_files(
    path: str, roots: list[Path], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[Path, list[Path]]:
    """(the resolved target, its files) for a caller confined to the allowed ``roots``.

    Every file found is checked again, so nothing reached through a link inside a root escapes it."""
    target = resolve_allowed_path(path, roots)
    files = collect_files([target], include, exclude)
    if not files:
        raise InvalidInputError(f"{path}: no ingestible files found (check include/exclude)")
    for file in files:
        resolve_allowed_path(str(file), roots)
    return target, files


def read_sources(files: Sequence[Path], max_bytes: int) -> Iterator[Source]:
    """The documents in ``files``, one failure per file that cannot be read or extracted."""
    for file in files:
        try:
            yield from read_file(file, max_bytes)
        except RagError as exc:
            yield SourceFailure(printable(str(file)), printable(str(exc)))


async def fetch_document(
    url: str,
    policy: UrlPolicy,
    *,
    max_bytes: int,
    timeout: float,  # noqa: ASYNC109 (the HTTP client applies it per operation)
    title: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> SourceDocument:
    """Fetch ``url`` under ``policy`` and extract it; the URL is the document's identity."""
    fetched = await fetch(url, policy, max_bytes=max_bytes, timeout=timeout)
    doc = await anyio.to_thread.run_sync(
        lambda: extract_bytes(fetched.data, kind=fetched.kind, source_uri=url, max_bytes=max_bytes)
    )
    return replace(doc, title=title or doc.title, metadata={**doc.metadata, **(metadata or {})})
