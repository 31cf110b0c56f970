"""Bare-channel benchmark mode (kernel argument ``arcbox.rawbench=1``).

The benchmark compares the framed protocol with the raw channel, so this mode does no
framing at all: after PID-1 setup the agent writes one byte ``R`` on the channel, then
serves line requests with blocking I/O:

- ``E<n>\\n``: read the next n bytes and write them back (round-trip timing);
- ``S<n>\\n``: write n zero bytes as fast as possible (throughput, guest to host);
- ``U<n>\\n``: read and discard the next n bytes, then write ``K`` (throughput, host to
  guest). Read the fastest way a Python program can (``read_into``), so the figure is the
  honest limit for the agent's uploads.

On EOF (host gone) it reopens the channel and says ``R`` again. SIGTERM/SIGINT shut
the VM down as in normal mode (PID 1) or exit (otherwise).
"""

from __future__ import annotations

import os
import signal
import time

from .log import log
from .transport import Transport

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Any, List

CHUNK = 64 * 1024
_ZEROS = bytes(CHUNK)
PAGE = 4096
_UPBUF = bytearray(1 << 20)
_VIEWS = [memoryview(_UPBUF)[i : i + PAGE] for i in range(0, len(_UPBUF), PAGE)]
MAX_LINE = 64


class _Stop(BaseException):
    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stop()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def read_into(fd: int, views: List[memoryview], want: int) -> int:
    """One readv into page-sized slices of one buffer; bytes read (0 = EOF).

    A virtio-serial port hands out one 4 KiB receive buffer per read(2), and readv on a
    character device is a loop of reads, one per iovec, that stops at the first short one:
    page-sized iovecs take up to ``len(views)`` buffers per syscall instead of one.
    """
    if want < len(views) * PAGE:
        k, rest = divmod(want, PAGE)
        iov = views[:k] + ([views[k][:rest]] if rest else [])
    else:
        iov = views
    return os.readv(fd, iov)


def serve(fd: int) -> None:
    """Serve one connection until EOF (raises EOFError)."""
    _write_all(fd, b"R")
    pending = bytearray()
    while True:
        while b"\n" not in pending:
            if len(pending) > MAX_LINE:
                pending.clear()  # garbage; resynchronise on the next newline
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError
            pending += chunk
        line, _, rest = bytes(pending).partition(b"\n")
        pending = bytearray(rest)
        if len(line) < 2 or line[:1] not in (b"E", b"S", b"U") or not line[1:].isdigit():
            continue
        n = int(line[1:])
        if line[:1] == b"U":
            take = min(n, len(pending))
            del pending[:take]
            n -= take
            while n > 0:
                got = read_into(fd, _VIEWS, n)
                if not got:
                    raise EOFError
                n -= got
            _write_all(fd, b"K")
        elif line[:1] == b"E":
            take = min(n, len(pending))
            data = bytes(pending[:take])
            del pending[:take]
            if take < n:
                data += _read_exact(fd, n - take)
            _write_all(fd, data)
        else:
            while n > 0:
                k = min(n, CHUNK)
                _write_all(fd, _ZEROS[:k] if k < CHUNK else _ZEROS)
                n -= k


def run(transport: Transport, pid1: bool) -> None:
    """Serve forever (PID 1) or until SIGTERM/SIGINT."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    log("rawbench mode on %s" % transport.name)
    delay = 0.1
    try:
        while True:
            try:
                conn = transport.open()
            except OSError:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.1
            try:
                os.set_blocking(conn.fd, True)
                serve(conn.fd)
            except (EOFError, OSError):
                pass
            finally:
                conn.close()
            time.sleep(delay)
    except _Stop:
        log("rawbench: stopping")
        if pid1:
            from . import power

            power.shutdown("reboot")
