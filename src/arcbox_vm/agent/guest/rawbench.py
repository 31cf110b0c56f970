"""Bare-channel benchmark mode (kernel argument ``arcbox.rawbench=1``).

The benchmark compares the framed protocol with the raw channel, so this mode does no
framing at all: after PID-1 setup the agent writes one byte ``R`` on the channel, then
serves line requests with blocking I/O:

- ``E<n>\\n``: read the next n bytes and write them back (round-trip timing);
- ``S<n>\\n``: write n zero bytes as fast as possible (throughput).

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
    from typing import Any

CHUNK = 64 * 1024
_ZEROS = bytes(CHUNK)
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
        if len(line) < 2 or line[:1] not in (b"E", b"S") or not line[1:].isdigit():
            continue
        n = int(line[1:])
        if line[:1] == b"E":
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
