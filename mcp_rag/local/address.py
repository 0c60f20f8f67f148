"""Where the processes of one data directory meet: the holder's lock file and its Unix socket.

The socket lives in the data directory (``holder.sock``, mode 0600). A Unix socket path is limited
to about 100 bytes (108 on Linux, 104 on macOS, including the final NUL): for a longer data directory
the socket moves to a private folder of this user under the temporary directory, named by a hash of
the data directory, so every process of the same data directory still computes the same path.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigurationError

LOCK_NAME = "holder.lock"
SOCKET_NAME = "holder.sock"
MAX_SOCKET_PATH = 100
"""Bytes: below the smallest ``sun_path`` of the systems we run on (104 on macOS, 108 on Linux)."""


@dataclass(frozen=True, slots=True)
class Address:
    data_dir: Path
    lock: Path
    socket: Path


def address(data_dir: Path) -> Address:
    data_dir = Path(os.path.abspath(data_dir.expanduser()))
    if data_dir.exists():
        data_dir = data_dir.resolve()  # one name per directory, whatever symlinks lead to it
    socket = data_dir / SOCKET_NAME
    if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        socket = _short_socket_path(data_dir)
    return Address(data_dir, data_dir / LOCK_NAME, socket)


def _short_socket_path(data_dir: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:24]
    for base in (Path(tempfile.gettempdir()), Path("/tmp")):  # noqa: S108 - a private 0700 folder of this user, checked below
        folder = base / f"mcp-rag-{os.getuid()}"
        path = folder / f"{digest}.sock"
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
            _private_folder(folder)
            return path
    raise ConfigurationError(  # pragma: no cover - only with an absurd temporary directory
        f"no short enough path for the socket of {data_dir}; set TMPDIR to a short folder"
    )


def _private_folder(folder: Path) -> None:
    """Create ``folder`` for this user only, or check that an existing one is ours and private."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        raise ConfigurationError(f"cannot create the socket folder {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigurationError(
            f"the socket folder {folder} is not a private folder of this user; remove it and start again"
        )
