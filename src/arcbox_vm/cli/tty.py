"""The local terminal for `exec -it`: raw mode, its size, SIGWINCH, stdin as an async stream.

Raw mode is restored in a `finally` (and the tty attributes are re-applied with TCSADRAIN
so pending output is not lost) — whatever ends the session: the command exiting, an
error, or a signal that unwinds the stack. In raw mode Ctrl-C, Ctrl-D and Ctrl-Z are
plain bytes for the guest's terminal, as with `docker exec -it`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import stat
import termios
import tty
from collections.abc import AsyncIterator, Callable, Iterator

__all__ = ["is_tty", "on_resize", "raw_mode", "stdin_chunks", "terminal_size"]

READ_SIZE = 65536


def is_tty(fd: int) -> bool:
    return os.isatty(fd)


def terminal_size(fd: int = 1) -> tuple[int, int] | None:
    """(columns, rows) of the terminal on fd (stdout, else stdin); None if neither is one."""
    for candidate in (fd, 0, 2):
        try:
            size = os.get_terminal_size(candidate)
        except OSError:
            continue
        if size.columns and size.lines:
            return size.columns, size.lines
    return None


@contextlib.contextmanager
def raw_mode(fd: int = 0) -> Iterator[None]:
    """Put the terminal on fd in raw mode for the block (no-op when fd is not a terminal)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def on_resize(callback: Callable[[], None]) -> Iterator[None]:
    """Call `callback` in the running loop on every SIGWINCH, for the block."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGWINCH, callback)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


async def stdin_chunks(fd: int = 0) -> AsyncIterator[bytes]:
    """This process's stdin as chunks, until EOF.

    Terminals, pipes and sockets are read when readable (add_reader), so nothing blocks
    and nothing is left hanging in a thread at exit; regular files and /dev/null cannot
    be polled, but never block either, so they are read directly."""
    loop = asyncio.get_running_loop()
    mode = os.fstat(fd).st_mode
    readable = asyncio.Event()
    pollable = not (stat.S_ISREG(mode) or stat.S_ISBLK(mode))
    if pollable:
        try:
            loop.add_reader(fd, readable.set)
        except PermissionError:  # epoll refuses e.g. /dev/null, which never blocks either
            pollable = False
    if not pollable:
        while data := os.read(fd, READ_SIZE):
            yield data
            await asyncio.sleep(0)
        return
    try:
        while True:
            await readable.wait()
            readable.clear()
            # The reader callback is level-triggered and may run once more after we read,
            # leaving the event set with nothing to read: check before a blocking read.
            if not select.select([fd], [], [], 0)[0]:
                continue
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:  # e.g. EIO when the terminal went away
                return
            if not data:
                return
            yield data
    finally:
        loop.remove_reader(fd)
