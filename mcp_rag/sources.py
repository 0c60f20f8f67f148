"""Where documents come from: files and directories on this machine, and URLs.

These turn a path or a URL into ``SourceDocument``s (or ``SourceFailure``s for what cannot be
read) for the service to ingest; they apply the allowed-roots and URL policies, and leave chunking,
embedding and storing to the service.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

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


@dataclass(frozen=True, slots=True)
class SourceUnchanged:
    """A file whose size and modification time are what they were when it was last ingested: not read."""

    source_uri: str


Source = SourceDocument | SourceFailure | SourceUnchanged

RACY_MTIME_NS = 2_000_000_000
"""A file modified this recently may change again within the file system's timestamp resolution without
its stat changing: its stat is not remembered, so the next ingest reads and hashes it."""


def collect_files(paths: Sequence[Path], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Path]:
    """The ingestible files under ``paths`` (directories recursively, filtered by the globs)."""
    return list(walk(paths, include, exclude))


def confined_files(
    path: str,
    roots: list[Path],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    *,
    allow_empty: bool = False,
) -> tuple[Path, list[Path]]:
    """(the resolved target, its files) for a caller confined to the allowed ``roots``.

    Every file found is checked again, so nothing reached through a link inside a root escapes it.
    An empty directory is an error unless ``allow_empty`` (a pruning ingest empties the store's copy)."""
    target = resolve_allowed_path(path, roots)
    files = collect_files([target], include, exclude)
    if not files and not (allow_empty and target.is_dir()):
        raise InvalidInputError(f"{path}: no ingestible files found (check include/exclude)")
    for file in files:
        resolve_allowed_path(str(file), roots)
    return target, files


def file_uri(path: Path) -> str:
    """The source URI of a file's document (what ``read_file`` gives it)."""
    return path.resolve().as_uri()


def directory_prefix(directory: Path) -> str:
    """The source prefix every document read from under ``directory`` has."""
    return directory.resolve().as_uri().rstrip("/") + "/"


def file_of(source_uri: str) -> Path | None:
    """The file a document was read from (a corpus record's file for ``file:///c.jsonl#id``), or None
    when the source is not a local file."""
    parts = urlsplit(source_uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return None
    return Path(url2pathname(parts.path))


def stat_of(path: Path) -> tuple[int, int] | None:
    """(size, mtime in ns) of a regular file; None if it is not one (or cannot be stat'ed)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None


def read_changed(files: Sequence[Path], known: Mapping[str, tuple[int, int]], max_bytes: int) -> Iterator[Source]:
    """The documents in ``files``, one failure per file that cannot be read or extracted; a file whose
    (size, mtime) is in ``known`` under its URI is not read: it yields ``SourceUnchanged``. Documents read carry their file's stat, taken before the read (a
    change during the read shows as a different stat next time), except for files modified so
    recently that a further change could keep the same stat."""
    for file in files:
        uri = file_uri(file)
        stat = stat_of(file)
        if stat is not None and known.get(uri) == stat:
            yield SourceUnchanged(uri)
            continue
        if stat is not None and time.time_ns() - stat[1] < RACY_MTIME_NS:
            stat = None
        try:
            docs = read_file(file, max_bytes)
        except RagError as exc:
            yield SourceFailure(printable(str(file)), printable(str(exc)))
            continue
        for doc in docs:
            yield replace(doc, file_stat=stat) if stat is not None and doc.source_uri == uri else doc


def gone_documents(documents: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Those of (id, source_uri) whose file no longer exists as a regular file."""
    gone = []
    for doc_id, uri in documents:
        path = file_of(uri)
        try:
            if path is not None and not path.is_file():
                gone.append((doc_id, uri))
        except OSError:  # cannot tell (e.g. no permission on a parent): the document stays
            continue
    return gone


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
