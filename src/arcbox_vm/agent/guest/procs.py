"""Process helpers: wait statuses, reaping, and killing everything a session started.

One rule keeps PID-1 reaping and exec sessions from racing: only the event loop calls
``waitpid``, and always as ``waitpid(-1, WNOHANG)`` (``reap``); statuses are handed to the
session that owns the pid, the rest (orphans re-parented to PID 1) are discarded.
``subprocess.Popen.wait/poll`` are never used.
"""

from __future__ import annotations

import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs boot time in the guest; annotations are strings
    from typing import Iterator, List, Optional, Tuple


def decode_status(status: int) -> Tuple[int, Optional[int]]:
    """A waitpid status to (exit_code, signal): 128+n and n when killed by signal n."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return 255, None  # stopped/continued are never requested; be defensive


def reap() -> Iterator[Tuple[int, int]]:
    """Yield (pid, status) for every child that has exited, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def session_members(sid: int, proc: str = "/proc") -> List[int]:
    """Pids whose session id is ``sid`` (scan of /proc/*/stat).

    killpg alone misses members that moved to another process group (job control in an
    interactive shell); they still share the session created for the command.
    """
    out: List[int] = []
    try:
        names = os.listdir(proc)
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("%s/%s/stat" % (proc, name), "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ..."; comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        try:
            if int(fields[3]) == sid:
                out.append(int(name))
        except (IndexError, ValueError):
            continue
    return out


def kill_session(sid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to process group ``sid`` and to every other member of session ``sid``.

    Each exec child is a session leader (setsid), so its pid is both its session id and
    its process group id. Never touches the agent's own session or PID 1.
    """
    if sid <= 1 or sid == os.getpid():
        return
    try:
        if os.getsid(0) == sid:
            return
    except OSError:
        pass
    try:
        os.killpg(sid, sig)
    except OSError:
        pass  # group already gone (or leader exited and group empty)
    for pid in session_members(sid):
        if pid <= 1 or pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
        except OSError:
            pass
