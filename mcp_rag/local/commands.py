"""``mcp-rag`` commands on a shared data directory.

A command that needs the index (ingest, search, stats, delete, sync, reindex, eval) first looks for
the holder of the data directory: if one answers, the command line goes to it and runs there (its
output streams back; relative paths are read from this process's working directory); if none holds
the directory, this process holds it for the command's duration and serves the others meanwhile.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc

from ..errors import ConflictError, RagError, UnavailableError, describe
from ..logging import get_logger
from ..settings import Settings
from . import shared
from .address import address
from .connect import HELLO_TIMEOUT, HolderGone, NoHolder, connect
from .election import HoldLock, try_hold
from .protocol import MAX_LINE

log = get_logger(__name__)

FORWARDED = frozenset({"ingest", "search", "stats", "delete", "sync", "reindex", "eval"})
RETRY_STATUS = 75
"""Exit status (EX_TEMPFAIL) when the holder stopped in the middle of a command: run it again."""

Body = Callable[[Any], Awaitable[None]]

_held: HoldLock | None = None
"""Set when this command process won the data directory: ``run_body`` then holds it."""

_capture: ContextVar[Callable[[Body, bool, bool], None] | None] = ContextVar("mcp_rag_capture", default=None)


def forward(settings: Settings, args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """Run the command through the holder of the data directory; ``None`` when this process is to run it."""
    global _held
    if args.command not in FORWARDED or not shared(settings):
        return None
    where = address(settings.data_dir)
    follow = args.command == "sync" and bool(getattr(args, "follow", False))
    started = time.monotonic()
    while True:
        try:
            return anyio.run(_forward_once, settings, list(argv), follow)
        except NoHolder:
            lock = try_hold(where)
            if lock is not None:
                _held = lock
                return None
            if time.monotonic() - started > HELLO_TIMEOUT:
                raise UnavailableError(
                    f"another process holds {where.data_dir} but does not answer on {where.socket}; "
                    "stop it (or wait for it to finish starting) and try again"
                ) from None
            time.sleep(0.05)
        except HolderGone as gone:
            if gone.output_seen:
                print(
                    f"mcp-rag: the process holding {where.data_dir} stopped during this command; run it again "
                    "(ingesting again is safe: unchanged documents are skipped)",
                    file=sys.stderr,
                )
                return RETRY_STATUS
            log.warning("the holder stopped before answering; trying again", data_dir=str(where.data_dir))


async def _forward_once(settings: Settings, argv: list[str], follow: bool) -> int:
    hello = {"argv": argv, "cwd": os.getcwd(), "tty": [sys.stdout.isatty(), sys.stderr.isatty()]}
    stream, receive, info = await connect(settings, "cli", **hello)
    async with stream:
        if follow:
            raise ConflictError(
                f"{settings.data_dir} is held by another mcp-rag process (pid {info.get('pid')}), which keeps "
                "the index caught up already; `mcp-rag sync --follow` is for a data directory no server holds"
            )
        seen = False
        while True:
            try:
                message = json.loads(await receive.receive_until(b"\n", MAX_LINE))
            except (
                OSError,
                ValueError,
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
            ):
                raise HolderGone(seen) from None
            if "out" in message:
                sys.stdout.write(message["out"])
                sys.stdout.flush()
                seen = True
            elif "err" in message:
                sys.stderr.write(message["err"])
                sys.stderr.flush()
            elif "exit" in message:
                return int(message["exit"])


# -- running a command's body --------------------------------------------------------------------


def run_body(settings: Settings, body: Body, *, follow: bool, catch_up: bool) -> None:
    """Run a command's ``body(runtime)``: in the holder serving it, as the holder, or (Qdrant server) alone."""
    capture = _capture.get()
    if capture is not None:  # in the holder: it awaits the body itself
        capture(body, follow, catch_up)
        return
    lock = _held
    if lock is not None:
        from .holder import hold

        async def held() -> None:
            async with hold(settings, lock, follow_changes=follow, catch_up=catch_up) as holder:
                await body(holder.runtime)

        anyio.run(held)
        return
    from ..runtime import open_runtime

    async def alone() -> None:
        async with open_runtime(settings, follow_changes=follow, catch_up=catch_up) as runtime:
            await body(runtime)

    anyio.run(alone)


# -- the holder's side ---------------------------------------------------------------------------


class _Console(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` of the holder while it runs commands for others: what a command
    prints goes to the connection of the command printing it (a context variable), the rest as before."""

    def __init__(self, name: str, original: TextIO) -> None:
        self._name = name
        self.original = original

    def _target(self) -> _Outbox | None:
        return _outbox.get()

    def write(self, text: str) -> int:
        box = self._target()
        if box is None:
            return self.original.write(text)
        box.put(self._name, text)
        return len(text)

    def flush(self) -> None:
        if self._target() is None:
            self.original.flush()

    def isatty(self) -> bool:
        box = self._target()
        if box is None:
            return self.original.isatty()
        return box.tty[0 if self._name == "out" else 1]

    def fileno(self) -> int:
        if self._target() is not None:
            raise io.UnsupportedOperation("fileno")
        return self.original.fileno()


class _Outbox:
    def __init__(self, tty: Sequence[bool]) -> None:
        self.tty = (bool(tty[0]), bool(tty[1])) if len(tty) == 2 else (False, False)
        self._items: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def put(self, name: str, text: str) -> None:
        with self._lock:
            self._items.append((name, text))

    def take(self) -> list[tuple[str, str]]:
        with self._lock:
            items, self._items = self._items, []
        return items


_outbox: ContextVar[_Outbox | None] = ContextVar("mcp_rag_outbox", default=None)
_consoles_installed = False


def _install_consoles() -> None:
    global _consoles_installed
    if not _consoles_installed:
        sys.stdout = _Console("out", sys.stdout)
        sys.stderr = _Console("err", sys.stderr)
        _consoles_installed = True


async def serve_command(holder: Any, hello: dict[str, Any], stream: anyio.abc.SocketStream) -> None:
    """Run the command line of ``hello`` against the holder's runtime, streaming its output back."""
    from ..cli import build_parser

    _install_consoles()
    box = _Outbox(hello.get("tty") or ())
    token = _outbox.set(box)
    done = anyio.Event()

    async def pump() -> None:
        while True:
            for name, text in box.take():
                await stream.send(json.dumps({name: text}).encode() + b"\n")
            if done.is_set():
                return
            with anyio.move_on_after(0.05):
                await done.wait()

    status = 0
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            try:
                status = await _run_command(holder, build_parser(), hello)
            finally:
                done.set()
    finally:
        _outbox.reset(token)
    await stream.send(json.dumps({"exit": status}).encode() + b"\n")


async def _run_command(holder: Any, parser: argparse.ArgumentParser, hello: dict[str, Any]) -> int:
    captured: list[tuple[Body, bool, bool]] = []
    try:
        args = parser.parse_args([str(a) for a in hello.get("argv") or ()])
        _absolute_paths(args, Path(str(hello.get("cwd") or "/")))
        token = _capture.set(lambda body, follow, catch_up: captured.append((body, follow, catch_up)))
        try:
            # The command's synchronous part (argument checks, walking folders) off the event loop.
            await anyio.to_thread.run_sync(args.func, holder.settings, args)
        finally:
            _capture.reset(token)
        for body, _follow, _catch_up in captured:
            await body(holder.runtime)
    except RagError as exc:
        failure = describe(exc)
        print(f"mcp-rag: {failure.message}", file=sys.stderr)
        return failure.exit_status
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _absolute_paths(args: argparse.Namespace, cwd: Path) -> None:
    """Paths on the command line are the client's: make them absolute against its working directory."""
    for key, value in vars(args).items():
        if isinstance(value, Path) and not value.is_absolute():
            setattr(args, key, cwd / value)
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(args, key, [v if v.is_absolute() else cwd / v for v in value])
