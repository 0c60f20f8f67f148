"""Which process holds a data directory: the one with the exclusive ``flock`` on its lock file.

The kernel drops the lock when the holder exits in any way (also ``kill -9``), so the next process to
try gets it at once; the file keeps the holder's pid and version for the messages of the others.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass

from .. import __version__
from ..errors import ConfigurationError
from .address import Address

_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@dataclass(slots=True)
class HoldLock:
    """This process holds the data directory until ``release`` (or its exit)."""

    address: Address
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def try_hold(address: Address) -> HoldLock | None:
    """Take the data directory if no other process holds it; ``None`` when one does."""
    try:
        address.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(address.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise read_only_error(address, exc) from None
        raise ConfigurationError(
            f"MCP_RAG_DATA_DIR={address.data_dir} cannot be created or written ({exc.strerror}): "
            "set MCP_RAG_DATA_DIR to a folder this user can write"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "version": __version__}).encode() + b"\n", 0)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NOT_WRITABLE or exc.errno == errno.ENOSPC:
            raise read_only_error(address, exc) from None
        raise
    return HoldLock(address, fd)


def read_only_error(address: Address, exc: OSError) -> ConfigurationError:
    return ConfigurationError(
        f"the data directory {address.data_dir} is not writable ({exc.strerror}); make it writable for this "
        "user or set MCP_RAG_DATA_DIR to a writable folder"
    )


def holder_info(address: Address) -> dict[str, object]:
    """What the holder wrote into the lock file (pid, version); empty when unreadable."""
    try:
        data = json.loads(address.lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
