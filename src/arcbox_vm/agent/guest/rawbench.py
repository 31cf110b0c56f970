"""Bare-channel benchmark mode (kernel argument ``arcbox.rawbench=1``).

The benchmark compares the framed protocol with the raw channel, so this mode does no
framing at all: after PID-1 setup the agent writes one byte ``R`` on the channel, then
serves line requests with blocking I/O:

- ``E<n>\\n``: read the next n bytes and write them back (round-trip timing);
- ``S<n>\\n``: write n zero bytes as fast as possible (throughput, guest to host);
- ``U<n>\\n``: read and discard the next n bytes, then write ``K`` (throughput, host to
  guest). Read the fastest way a Python program can (``read_into``), so the figure is the
  honest limit for the agent's uploads.

Three more measure what native code in the guest gets, the limits of any relay however
it is written (a command's output reaches the channel through a pipe, an upload ends in a
file):

- ``C<n>\\n``: ``head -c n /dev/zero`` into a pipe and ``dd bs=1M`` from that pipe with
  its stdout on the channel: a C program relaying a pipe to the channel;
- ``P<n>\\n``: the same ``head``, the agent moving its pipe into the channel with
  ``os.splice`` (no copy through user space): the kernel's limit for a pipe relay;
- ``W<n>\\n`` (n a multiple of 1 MiB): write ``G``, then ``dd`` reads the next n bytes
  from the channel into a file with ``conv=fsync``, the file is removed and the agent
  writes ``K`` (``F`` if dd failed): a native upload to the guest's disk. The host sends
  the bytes only after ``G``, so none of them end up in the line reader's buffer.

On EOF (host gone) it reopens the channel and says ``R`` again. SIGTERM/SIGINT shut
the VM down as in normal mode (PID 1) or exit (otherwise).
"""

from __future__ import annotations

import fcntl
import os
import select
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
MIB = 1 << 20
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # for head and dd
UPLOAD_PATH = "/root/up.bin"  # W's file (on the root disk)
F_SETPIPE_SZ = 1031
REQUESTS = (b"E", b"S", b"U", b"C", b"P", b"W")


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
        if len(line) < 2 or line[:1] not in REQUESTS or not line[1:].isdigit():
            continue
        n = int(line[1:])
        if line[:1] in (b"C", b"P"):
            relay(fd, n, splice=line[:1] == b"P")
        elif line[:1] == b"W":
            if n % MIB:
                log("rawbench: W%d is not a multiple of 1 MiB; ignored" % n)
            elif pending:
                log("rawbench: upload bytes came before G; W ignored")
                pending.clear()
            else:
                native_upload(fd, n)
        elif line[:1] == b"U":
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


def _spawn(argv: List[str], actions: List[Any]) -> int:
    # SIGPIPE back to default: the agent ignores it, the tools should die of it
    return os.posix_spawnp(argv[0], argv, ENV, file_actions=actions, setsigdef=(signal.SIGPIPE,))


def _wait(pids: List[int]) -> bool:
    """Reap ``pids`` in order, emptying the list; True if all exited with status 0."""
    ok = True
    while pids:
        pid = pids[0]
        _, status = os.waitpid(pid, 0)
        pids.pop(0)
        if status != 0:
            log("rawbench: child %d ended with wait status %#x" % (pid, status))
            ok = False
    return ok


def _kill(pids: List[int]) -> None:
    """SIGKILL and reap what is left of ``pids`` (error paths)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
    del pids[:]


def relay(fd: int, n: int, splice: bool) -> None:
    """``C``/``P``: n bytes of ``head -c n /dev/zero`` through a pipe onto ``fd``.

    ``dd bs=1M`` relays the pipe to ``fd``, or (``splice``) the agent moves it with
    ``os.splice`` after ``poll`` reports it readable: virtio-serial's splice returns 0 on an
    empty pipe rather than waiting, so 0 is not EOF; a poll that reports no data means the
    writer is gone.
    """
    r, w = os.pipe()
    pids = []  # type: List[int]
    try:
        try:
            fcntl.fcntl(r, F_SETPIPE_SZ, MIB)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: keep the default size
        pids.append(_spawn(["head", "-c", str(n), "/dev/zero"], [(os.POSIX_SPAWN_DUP2, w, 1)]))
        os.close(w)
        w = -1
        if not splice:
            pids.insert(0, _spawn(["dd", "bs=1M", "status=none"],
                                  [(os.POSIX_SPAWN_DUP2, r, 0), (os.POSIX_SPAWN_DUP2, fd, 1)]))
            os.close(r)
            r = -1
        else:
            poller = select.poll()
            poller.register(r, select.POLLIN)
            left = n
            while left:
                if not poller.poll()[0][1] & select.POLLIN:
                    log("rawbench: the pipe ended after %d of %d bytes" % (n - left, n))
                    break
                left -= os.splice(r, fd, min(left, MIB))
        _wait(pids)
    except OSError as exc:
        log("rawbench: relay of %d bytes failed: %s" % (n, exc))
        raise
    finally:
        _kill(pids)
        for end in (r, w):
            if end >= 0:
                os.close(end)


def native_upload(fd: int, n: int) -> None:
    """``W``: ``G``, dd reads n bytes (whole MiB) from ``fd`` into UPLOAD_PATH and fsyncs, ``K``/``F``."""
    _write_all(fd, b"G")
    pids = []  # type: List[int]
    ok = False
    try:
        pids.append(_spawn(["dd", "of=" + UPLOAD_PATH, "bs=1M", "count=%d" % (n // MIB),
                            "iflag=fullblock", "conv=fsync", "status=none"],
                           [(os.POSIX_SPAWN_DUP2, fd, 0)]))
        ok = _wait(pids)
    except OSError as exc:
        log("rawbench: upload of %d bytes failed: %s" % (n, exc))
        raise
    finally:
        _kill(pids)
        try:
            os.unlink(UPLOAD_PATH)
        except OSError:
            pass
    _write_all(fd, b"K" if ok else b"F")


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
