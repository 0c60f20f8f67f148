"""Reaching the holder of a data directory: connect to its socket and exchange hellos."""

from __future__ import annotations

import errno
import json
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from .. import __version__
from ..errors import ConfigurationError, ConflictError
from ..settings import Settings
from .address import address
from .protocol import HELLO, MAX_LINE, client_hello, version_refusal

HELLO_TIMEOUT = 120.0
"""Seconds to wait for the holder's hello: a holder that just took the lock answers once its
runtime is open (model loaded, index caught up from the change log)."""


class NoHolder(Exception):
    """No process answers on the socket (none holds the data directory, or it died)."""


class HolderGone(Exception):
    """The holder closed the connection before the answer was complete."""

    def __init__(self, output_seen: bool = False) -> None:
        super().__init__("the holder went away")
        self.output_seen = output_seen


async def connect(
    settings: Settings, kind: str, **extra: Any
) -> tuple[anyio.abc.SocketStream, BufferedByteReceiveStream, dict[str, Any]]:
    """A connection to the holder that accepted our hello, its reader, and the holder's hello."""
    where = address(settings.data_dir)
    try:
        stream = await anyio.connect_unix(where.socket)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoHolder from None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOTDIR):
            raise NoHolder from None  # (no socket, or no data directory: taking it says what is wrong)
        raise ConfigurationError(f"cannot connect to the local socket {where.socket}: {exc.strerror}") from None
    receive = BufferedByteReceiveStream(stream)
    try:
        await stream.send(client_hello(settings, kind, **extra))
        with anyio.fail_after(HELLO_TIMEOUT):
            line = await receive.receive_until(b"\n", MAX_LINE)
        reply = json.loads(line)[HELLO]
    except (
        TimeoutError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        anyio.EndOfStream,
        anyio.IncompleteRead,
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
    ):
        await stream.aclose()
        raise NoHolder from None
    if reply.get("refused"):
        await stream.aclose()
        if reply.get("version") != __version__:
            raise ConflictError(version_refusal(str(reply.get("version")), reply.get("pid"), where.data_dir))
        raise ConfigurationError(str(reply["refused"]))
    return stream, receive, reply
