"""Which server-side paths ``ingest_file`` may read: the allowed roots of the calling tenant.

The answer for a path outside the roots is the same whether or not it exists, and never names
the roots: otherwise the tool is an oracle for which files exist anywhere on the server and
for where its data lives.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AccessDeniedError, InvalidInputError, NotFoundError
from .settings import Settings

OUTSIDE = "outside the allowed roots of this server (symlinks and '..' are resolved first)"


def roots_for(settings: Settings, tenant: str) -> list[Path]:
    """The tenant's own roots (``MCP_RAG_TENANT_ROOTS``) if it has any, else the shared ``MCP_RAG_ALLOWED_ROOTS``."""
    own = settings.tenant_roots.get(tenant)
    return list(own) if own is not None else list(settings.allowed_roots)


def resolve_allowed_path(path: str, roots: list[Path]) -> Path:
    """The real path of ``path`` if it lies under one of ``roots`` (after resolving symlinks and ``..``).

    A relative path is taken relative to the first root."""
    if not roots:
        raise AccessDeniedError(
            "ingest_file is disabled: the server has no allowed roots for this tenant "
            "(MCP_RAG_ALLOWED_ROOTS, MCP_RAG_TENANT_ROOTS)"
        )
    if "\x00" in path:
        raise InvalidInputError("the path contains a NUL character")
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    # First where the path leads without requiring it to exist (symlinks that exist are followed,
    # the rest is taken as written): outside the roots, existing or not, gets one answer.
    try:
        leads_to = candidate.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop: judge the path as written
        leads_to = Path(os.path.normpath(candidate))
    if not _inside(leads_to, roots):
        raise AccessDeniedError(f"{path}: {OUTSIDE}")
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFoundError(f"{path}: no such file or directory (or a symlink loop)") from None
    if not _inside(resolved, roots):  # changed between the two resolutions
        raise AccessDeniedError(f"{path}: {OUTSIDE}")
    return resolved


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)
