"""Which server-side paths a caller may ingest: only those under the configured allowed roots."""

from __future__ import annotations

from pathlib import Path

from .errors import AccessDeniedError, InvalidInputError, NotFoundError


def resolve_allowed_path(path: str, roots: list[Path]) -> Path:
    """The real path of ``path`` if it lies under an allowed root (after resolving symlinks and ``..``)."""
    if not roots:
        raise AccessDeniedError("ingest_file is disabled: the server has no allowed roots (MCP_RAG_ALLOWED_ROOTS)")
    if "\x00" in path:
        raise InvalidInputError("the path contains a NUL character")
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFoundError(f"{path}: no such file or directory") from None
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise AccessDeniedError(
            f"{path}: outside the allowed roots ({', '.join(str(r) for r in roots)}); "
            "symlinks and '..' are resolved first"
        )
    return resolved
