"""Every VMM process, whether we started it or can only watch it: `TrackedProcess`.

* `TrackedProcess.spawn(argv, log_path)` starts our own child: stdin from /dev/null,
  stdout+stderr into a log file, in its own session (a terminal's Ctrl-C reaches us, not
  the VMM, so we can shut the guest down properly). `die_with_parent` also asks the kernel
  to SIGKILL it when we die, for one-shot runs that must never leave a VM behind.
  `confine` starts it unprivileged: in a new, empty network namespace, as another uid/gid
  with no supplementary groups (so no capabilities), with no-new-privs (a `Confinement`,
  carried out by a helper exec'd in its place — no Python runs in a forked copy of the
  daemon); `pass_fds` hands it open files.
* `TrackedProcess.watch(pid)` follows a process that is not our child: the Firecracker a
  jailer started with `--new-pid-ns`, or a VMM adopted after a daemon restart. It is
  identified by pid *and* start time (a recycled pid is never taken for ours) and its exit
  is observed through a pidfd; signals go through the pidfd as well. Its exit status is not
  ours to read: `exit_status` may say how to learn it (Firecracker logs it), else a kill
  of ours reads as SIGKILL and anything else as -1.

Either way there is one exit future (`exited`), `wait`, `kill`, the start time (recorded
to re-adopt the process) and the end of its log for error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import select
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from arcbox_vm.errors import VmmError
from arcbox_vm.vmm.procfs import is_same_process, process_start_time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
CONFINED_EXEC = Path(__file__).with_name("confined_exec.py")
UNKNOWN_STATUS = -1  # returncode of a watched process whose exit status nobody told us
_POLL_S = 0.05  # how often a pid is polled when no pidfd can be had
_libc: ctypes.CDLL | None = None


def _prctl() -> Callable[..., int]:
    """libc's prctl, looked up in the parent: nothing but the call itself may run in a child
    between fork and exec (the daemon has threads)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.prctl


def _die_with(parent: int, prctl: Callable[..., int]) -> None:  # runs in the child between fork and exec
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


@dataclass(frozen=True)
class Confinement:
    """How a child drops privileges before it becomes the VMM: a new, empty network
    namespace (while it is still root), then `groups`, `gid`, `uid` (all of real/effective/
    saved; a uid other than 0 leaves it no capabilities), then no-new-privs (nothing it
    execs can regain any). Done by `confined_exec.py`, exec'd in the VMM's place."""

    uid: int
    gid: int
    groups: tuple[int, ...] = field(default_factory=tuple)
    new_netns: bool = True

    def argv(self, program: Sequence[str], die_with: int | None = None) -> list[str]:
        """`program` run through the helper (which execs it in place: the pid stays)."""
        helper = [sys.executable, "-I", "-S", str(CONFINED_EXEC), "--uid", str(self.uid), "--gid", str(self.gid)]
        if self.groups:
            helper += ["--groups", ",".join(str(g) for g in self.groups)]
        if self.new_netns:
            helper.append("--new-netns")
        if die_with is not None:
            helper += ["--die-with", str(die_with)]
        return [*helper, "--", *program]


def open_log(path: Path) -> int:
    """Open a log file a VMM writes for reading: never through a symlink (a jailed VMM owns
    its jail and could point its log at a host file), never blocking on a FIFO, only a
    regular file. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def tail(path: Path | None, lines: int = 15, max_bytes: int = 16384) -> str:
    """The last `lines` lines of the last `max_bytes` of a (log) file, or "" if unreadable."""
    if path is None:
        return ""
    try:
        with open(open_log(path), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").strip()
    return "\n".join(text.splitlines()[-lines:])


def exit_status_text(code: int | None) -> str:
    """ "exited with code 1", "was killed by SIGKILL", "is still running"."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class TrackedProcess:
    """A VMM (or jailer) process: our child, or a pid we watch. Build it with `spawn` or `watch`."""

    def __init__(self, pid: int, *, name: str, log_path: Path | None,
                 child: asyncio.subprocess.Process | None = None, start_time: int | None = None,
                 exit_status: Callable[[], int | None] | None = None) -> None:
        self._pid = pid
        self.name = name
        self.log_path = log_path
        self._child = child
        self._start_time = start_time
        self._exit_status = exit_status
        self._returncode: int | None = None  # a watched process's, once it is gone
        self._status_known = child is not None
        self._killed = False
        self._pidfd: int | None = None
        self._task: asyncio.Task[None] | None = None  # reaps our child / polls a pid
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    # ------------------------------------------------------------------ construction

    @classmethod
    async def spawn(cls, argv: Sequence[str], log_path: Path, *, name: str, die_with_parent: bool = False,
                    truncate: bool = False, cwd: Path | None = None, confine: Confinement | None = None,
                    pass_fds: Sequence[int] = ()) -> TrackedProcess:
        """Start `argv` as our child with stdout+stderr appended to `log_path` (emptied first
        with `truncate`), confined if asked, with `pass_fds` open in it (same numbers).
        Raises VmmError when it cannot be started."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        preexec = None
        program = argv[0]
        if confine is not None:  # the helper drops privileges and sets die-with-parent after
            argv = confine.argv(argv, die_with=os.getpid() if die_with_parent else None)
        elif die_with_parent:
            preexec = functools.partial(_die_with, os.getpid(), _prctl())
        try:
            fd = os.open(log_path, flags, 0o640)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
                    start_new_session=True, cwd=str(cwd) if cwd else None, preexec_fn=preexec,
                    pass_fds=tuple(pass_fds),
                )
            finally:
                os.close(fd)
        except OSError as exc:
            raise VmmError(f"cannot start {name} ({program}): {exc.strerror or exc}") from exc
        tracked = cls(proc.pid, name=name, log_path=log_path, child=proc, start_time=process_start_time(proc.pid))
        tracked._task = asyncio.create_task(tracked._reap(proc), name=f"wait-{proc.pid}")
        return tracked

    @classmethod
    def watch(cls, pid: int | None, *, name: str, log_path: Path | None, start_time: int | None = None,
              exit_status: Callable[[], int | None] | None = None) -> TrackedProcess:
        """Follow `pid`, which is not our child. With `start_time` (a recorded process) it
        must still be that very process; without, it is whatever runs as `pid` now (a pid
        just handed over). A process that is gone (or `pid` None) comes back already exited."""
        if pid and start_time is None:
            start_time = process_start_time(pid)
        tracked = cls(pid or 0, name=name, log_path=log_path, start_time=start_time, exit_status=exit_status)
        tracked._start_watching()
        return tracked

    def _start_watching(self) -> None:
        if not is_same_process(self._pid, self._start_time):
            self._set_exited()
            return
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except ProcessLookupError:
            self._set_exited()
            return
        except OSError as exc:  # no pidfds here: poll the pid instead
            log.debug("pidfd_open(%d) failed (%s); polling it", self._pid, exc)
            self._task = asyncio.create_task(self._poll(), name=f"watch-{self._pid}")
            return
        if not is_same_process(self._pid, self._start_time):  # it ended between the check and the open
            self._set_exited()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._set_exited)

    # ------------------------------------------------------------------ exit

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if not self.exited.done():
            self.exited.set_result(rc)

    async def _poll(self) -> None:
        while is_same_process(self._pid, self._start_time):
            await asyncio.sleep(_POLL_S)
        self._set_exited()

    def _set_exited(self) -> None:
        """A watched process is gone: stop watching, settle its status, resolve `exited`."""
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._returncode is None:
            told = self._exit_status() if self._exit_status is not None and not self._killed else None
            if self._killed:
                self._returncode, self._status_known = -signal.SIGKILL, True
            elif told is not None:
                self._returncode, self._status_known = told, True
            else:
                self._returncode = UNKNOWN_STATUS
        if not self.exited.done():
            self.exited.set_result(self._returncode)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def is_child(self) -> bool:
        return self._child is not None

    @property
    def start_time(self) -> int | None:
        """Start time (clock ticks after boot), recorded to re-adopt the process."""
        return self._start_time

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (checked now, not only when the event
        loop has seen it), else None."""
        if self._child is not None:
            return self._child.returncode
        if self._returncode is None:
            if self._pidfd is not None:
                poller = select.poll()
                poller.register(self._pidfd, select.POLLIN)
                if poller.poll(0):
                    self._set_exited()
            elif not is_same_process(self._pid, self._start_time):
                self._set_exited()
        return self._returncode

    async def wait(self) -> int:
        """Wait until the process has ended; its exit status."""
        return await asyncio.shield(self.exited)

    # ------------------------------------------------------------------ signals

    def send_signal(self, sig: int) -> None:
        """Signal the process if it still runs (a watched one through its pidfd)."""
        if self.returncode is not None:
            return
        if sig == signal.SIGKILL:
            self._killed = True
        with contextlib.suppress(ProcessLookupError):
            if self._child is not None:
                self._child.send_signal(sig)
            elif self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif is_same_process(self._pid, self._start_time):
                os.kill(self._pid, sig)

    async def kill(self, timeout: float = 10.0) -> bool:
        """SIGKILL the process and wait until it is gone; False if it is still there after `timeout`."""
        self.send_signal(signal.SIGKILL)
        try:
            await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            log.warning("%s (pid %d) still runs %.0fs after SIGKILL", self.name, self._pid, timeout)
            return False
        return True

    # ------------------------------------------------------------------ for error messages

    def status_text(self) -> str:
        """ "exited with code 1", "was killed by SIGKILL", "exited" (status unknown), "is still running"."""
        rc = self.returncode
        if rc is not None and not self._status_known:
            return "exited"
        return exit_status_text(rc)

    def describe_exit(self) -> str:
        """ "QEMU (pid 123) exited with code 1"."""
        return f"{self.name} (pid {self._pid}) {self.status_text()}"

    def log_tail(self, lines: int = 15, max_bytes: int = 16384) -> str:
        """The end of the process's own output."""
        return tail(self.log_path, lines, max_bytes)
