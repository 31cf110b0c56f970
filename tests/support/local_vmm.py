"""A VMM test double: the real guest agent as an ordinary host process ("local" driver).

TEST ONLY. `LocalDriver` implements the `VmmDriver` port without any VM: `launch` starts
``python -c <prelude> --connect unix:<endpoint>``, i.e. the real guest agent
(`arcbox_vm.agent.guest.main`), which dials the manager's agent listener exactly as it
does from inside a VM. The agent is not PID 1 there, so it skips its PID-1 duties (mounts,
network, reaping, reboot) and a SHUTDOWN makes it exit, which is what a VMM does when its
guest powers off. Kernel and rootfs are not booted; they only have to exist as files
(tests pass small dummy files), so no guest image is ever built.

Commands run as host processes, as the test's user, in the directories the test asks for:
tests must only run harmless commands in their own temporary directories.

To behave like a VM, everything a sandbox started dies with its "VMM": the agent puts its
children into a new PID namespace whose init (a forked copy of the prelude) dies with the
agent (PR_SET_PDEATHSIG), and the kernel kills every process of a namespace whose init
died — so `kill -9 <agent>` takes every command with it, as killing QEMU would. Without
the privilege to make a PID namespace (or with `LocalDriver(pid_namespace=False)`), the
agent becomes a child subreaper instead (orphans stay below it) and `kill()` stops and
kills the whole process tree; only an agent killed from outside then leaves its commands
behind.

Process tracking mirrors the production drivers: start time from /proc (pid + start time
identify a process), exit seen through a pidfd, also for processes adopted from an earlier
manager (`adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import arcbox_vm
from arcbox_vm.agent.protocol import CHANNEL_CMDLINE_KEY
from arcbox_vm.errors import BootFailed, VmmError
from arcbox_vm.ports import AdoptSpec, AgentEndpoint, MachineSpec
from arcbox_vm.vmm.procfs import is_same_process, process_start_time

# The src dir of the arcbox_vm package this test process imported: the agent runs that code.
SRC_DIR = Path(arcbox_vm.__file__).resolve().parents[1]

# Runs in the agent's process before the agent's main(); see the module docstring.
PRELUDE = r"""
import ctypes, os, select, signal, time
libc = ctypes.CDLL(None, use_errno=True)
# CLONE_NEWPID: the agent's children go into a new PID namespace
if os.environ.get("LOCAL_VM_PIDNS") == "1" and libc.unshare(0x20000000) == 0:
    alive_r, alive_w = os.pipe()  # EOF once the agent is gone (its end is close-on-exec)
    if os.fork() == 0:  # its PID 1: when it dies, the kernel kills everything in the namespace
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: and it dies with the agent
        os.close(alive_w)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(0)  # the agent died before the line above
        while True:  # reap orphans of the namespace
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.5)
            except OSError:
                pass
else:
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans stay below the agent
from arcbox_vm.agent.guest.main import main
main()
"""


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()  # state, ppid, pgrp, session, ...


PF_EXITING = 0x4  # in /proc/<pid>/stat's flags: the process is being torn down


def _live(fields: list[bytes] | None) -> bool:
    return fields is not None and fields[0] not in (b"Z", b"X") and not int(fields[6]) & PF_EXITING


def alive(pid: int) -> bool:
    """The process exists and is neither a zombie nor exiting.

    (The init of a PID namespace stays "exiting" until every member of the namespace has
    been reaped, which the host's init may take a while to do.)"""
    return _live(_stat_fields(pid))


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if _live(fields):
                assert fields is not None
                children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def _signal_tree(pid: int, sig: int) -> list[int]:
    """Send `sig` to `pid`'s descendants (stopping them first, so none forks meanwhile)."""
    seen: set[int] = set()
    while True:
        new = [p for p in descendants(pid) if p not in seen]
        if not new:
            break
        for p in new:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGSTOP)
        seen.update(new)
    for p in seen:
        with contextlib.suppress(OSError):
            os.kill(p, sig)
    return sorted(seen)


class LocalProcess:
    """The agent process as a `VmmProcess`: launched by us (`popen`) or adopted (pid + start time)."""

    def __init__(self, pid: int | None, start_time: int | None, console_log: Path,
                 popen: subprocess.Popen | None = None) -> None:
        self._pid = pid or 0
        self._start = start_time
        self._console_log = console_log
        self._popen = popen  # our own child: its exit status is ours to collect
        self._returncode: int | None = None
        self._pidfd: int | None = None
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        if not is_same_process(pid, start_time):
            self._on_exit()
            return
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except OSError:
            self._on_exit()
            return
        if not is_same_process(pid, start_time):  # it exited (and its pid was reused) meanwhile
            self._on_exit()
            return
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        rc = -1  # not our child: its status is not ours to read
        if self._popen is not None:
            polled = self._popen.poll()
            rc = polled if polled is not None else -1
        self._returncode = rc
        if not self.exited.done():
            self.exited.set_result(rc)

    # -- VmmProcess ----------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def start_time(self) -> int | None:
        return self._start

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def console_log(self) -> Path:
        return self._console_log

    def describe_exit(self) -> str:
        rc = self._returncode
        if rc is None or rc == -1:
            how = "exited"
        else:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        try:
            tail = self._console_log.read_bytes()[-2000:].decode(errors="replace").strip()
        except OSError:
            tail = ""
        return f"the local guest agent (pid {self._pid}) {how}" + (f": {tail}" if tail else "")

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    async def request_stop(self) -> None:
        """SIGTERM: the agent stops its commands and exits (a guest powering off)."""
        self._signal(signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL the agent and everything below it, and wait until it is gone."""
        if self._returncode is not None or self._pidfd is None:
            return
        self._signal(signal.SIGSTOP)
        _signal_tree(self._pid, signal.SIGKILL)
        self._signal(signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wait(), 10)

    async def cleanup(self) -> None:
        """Nothing else to remove (the sockets and the workdir are the manager's)."""
        await self.kill()

    def _signal(self, sig: int) -> None:
        if self._returncode is None and self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, sig)


def _spawn(argv: list[str], workdir: Path, console_log: Path, pid_namespace: bool) -> subprocess.Popen:
    """Start the agent in its own session, in the sandbox's workdir, with a minimal
    environment (the commands it runs get an environment of their own from the agent)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "PYTHONPATH": str(SRC_DIR),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LOCAL_VM_PIDNS": "1" if pid_namespace else "0",
    }
    with open(console_log, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=workdir, env=env,
                                start_new_session=True, close_fds=True)


class LocalDriver:
    """`VmmDriver` that runs the real guest agent as a host process (test double)."""

    name = "local"

    def __init__(self, python: str = sys.executable, *, pid_namespace: bool = True) -> None:
        self.python = python
        self.pid_namespace = pid_namespace  # False: the subreaper fallback (tests of the double itself)
        self.processes: dict[str, LocalProcess] = {}  # sandbox id -> newest launched/adopted process

    def agent_endpoint(self, workdir: Path) -> AgentEndpoint:
        path = Path(workdir) / "agent.sock"
        return AgentEndpoint(path, f"{CHANNEL_CMDLINE_KEY}=unix:{path}")

    def kernel_for(self, bzimage: Path, vmlinux: Path) -> Path:
        return bzimage

    def argv(self, workdir: Path, endpoint: AgentEndpoint) -> list[str]:
        # The workdir is on the command line, as a VMM's is: start-up clean-up finds
        # processes of a sandbox directory no record owns by it (manager/leftovers.py).
        code = f"# arcbox-vm local VM in {workdir}\n{PRELUDE}"
        return [self.python, "-s", "-B", "-c", code, "--connect", f"unix:{endpoint.listen_path}"]

    async def launch(self, spec: MachineSpec, endpoint: AgentEndpoint) -> LocalProcess:
        for path, what in ((spec.kernel, "kernel"), (spec.rootfs, "rootfs")):
            if not Path(path).is_file():
                raise BootFailed(f"the {what} image {path} does not exist")
        if spec.initrd is not None and not Path(spec.initrd).is_file():
            raise BootFailed(f"the initrd {spec.initrd} does not exist")
        workdir = Path(spec.workdir)
        console_log = workdir / "console.log"
        try:
            popen = _spawn(self.argv(workdir, endpoint), workdir, console_log, self.pid_namespace)
        except OSError as exc:
            raise VmmError(f"cannot start the local guest agent: {exc}") from None
        proc = LocalProcess(popen.pid, process_start_time(popen.pid), console_log, popen)
        self.processes[spec.sandbox_id] = proc
        return proc

    async def adopt(self, spec: AdoptSpec) -> LocalProcess:
        proc = LocalProcess(spec.pid, spec.start_time, Path(spec.workdir) / "console.log")
        self.processes[spec.sandbox_id] = proc
        return proc


class NoImageBuild:
    """An `ImageStore` for managers over the local driver: sandboxes there name their
    (dummy) kernel and rootfs, so asking for the built guest image is a bug — it fails
    the boot and is counted (`calls`), never builds anything."""

    def __init__(self) -> None:
        self.calls = 0

    async def default_image(self) -> NoReturn:
        self.calls += 1
        raise AssertionError("the manager asked for the built guest image although kernel and rootfs were given")
