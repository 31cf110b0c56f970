"""One-line event log for the agent.

As PID 1 the agent writes to /dev/console, which the VMM sends to a log file on the host:
it is the only place to look when a guest never says HELLO. Otherwise (tests, manual
runs) lines go to stderr. Lines are written with a single ``os.write`` so they are not
interleaved with other writers, and logging never raises: a full or broken console must
not take PID 1 down. Callers log notable events only, never one line per data frame.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Optional

_PREFIX = "arcbox-agent"
_fd = 2


def init(console: bool) -> None:
    """Choose the destination: /dev/console if ``console`` and it opens, else stderr."""
    global _fd
    if console:
        try:
            fd = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            if _fd > 2:
                _close_quietly(_fd)
            _fd = fd
            return
    _fd = 2


def log(msg: str) -> None:
    """Write one line: ``arcbox-agent[pid] t=<monotonic>: msg`` (t is the uptime in a guest)."""
    if _deferred:
        flush_later()  # keep the lines in order
    line = "%s[%d] t=%.3f: %s\n" % (_PREFIX, os.getpid(), time.monotonic(), msg)
    try:
        os.write(_fd, line.encode("utf-8", "replace"))
    except OSError:
        pass


_deferred: list = []
_deferred_since = 0.0  # monotonic time of the oldest held-back line
DEFER_MAX = 64  # lines held back at most (then they are written at once)
DEFER_AGE = 1.0  # seconds a line is held back at most


def log_later(msg: str) -> None:
    """Like ``log`` (timestamped now), written by ``flush_later`` when the agent has time.

    A line to a serial console costs ~0.5 ms under emulation: an EXEC's "started" line
    written while its command runs takes that from the command on a one-vCPU guest, and
    its "exited" line would delay the EXIT frame. The loop writes held-back lines once
    no command is running, and at the latest after ``DEFER_AGE`` (see ``later_due``).
    """
    global _deferred_since
    now = time.monotonic()
    if not _deferred:
        _deferred_since = now
    _deferred.append("%s[%d] t=%.3f: %s\n" % (_PREFIX, os.getpid(), now, msg))
    if len(_deferred) >= DEFER_MAX:
        flush_later()


def later_due() -> Optional[float]:
    """When the held-back lines must be written at the latest (None: there are none)."""
    return _deferred_since + DEFER_AGE if _deferred else None


def flush_later() -> None:
    """Write the lines ``log_later`` held back (one write)."""
    if _deferred:
        data = "".join(_deferred).encode("utf-8", "replace")
        del _deferred[:]
        try:
            os.write(_fd, data)
        except OSError:
            pass


def log_exc(msg: str) -> None:
    """Log ``msg`` plus the current exception's traceback (imported lazily: it is slow)."""
    try:
        import traceback

        detail = traceback.format_exc().rstrip().replace("\n", "\n    ")
    except Exception:  # pragma: no cover - traceback itself failing
        detail = repr(sys.exc_info()[1])
    log("%s\n    %s" % (msg, detail))


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
