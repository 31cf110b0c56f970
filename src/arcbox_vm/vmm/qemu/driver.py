"""QEMU driver: `-machine microvm`, KVM when it can run the guest, else TCG."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

from arcbox_vm.agent.protocol import CHANNEL_CMDLINE_KEY, SERIAL_PORT_NAME
from arcbox_vm.config.qemu import QemuConfig
from arcbox_vm.errors import BootFailed, VmmError
from arcbox_vm.network.netns import exec_prefix
from arcbox_vm.ports import AdoptSpec, AgentEndpoint, MachineSpec
from arcbox_vm.vmm.cgroup import SandboxCgroup, SandboxCgroups
from arcbox_vm.vmm.kvm import probe_kvm
from arcbox_vm.vmm.process import TrackedProcess
from arcbox_vm.vmm.qemu.cmdline import qemu_argv

# How long QEMU must stay alive after exec before we call the launch good; a bad
# kernel path, a busy TAP or a bad option makes it exit well within this.
_STARTUP_GRACE_S = 0.3
CONSOLE_LOG = "console.log"  # the guest's serial console, in the workdir
VMM_LOG = "vmm.log"  # QEMU's own stdout/stderr, in the workdir


class QemuProcess:
    """A QEMU VM, launched or adopted; implements `arcbox_vm.ports.VmmProcess`.

    QEMU makes nothing of its own outside the workdir (which is the manager's): cleaning up
    removes the sandbox's cgroup, killing whatever is left in it."""

    def __init__(self, process: TrackedProcess, console_log: Path, accel: str | None,
                 cgroup: SandboxCgroup | None = None) -> None:
        self._process = process
        self._console_log = console_log
        self.accel = accel  # None: adopted, started by an earlier daemon
        self.cgroup = cgroup

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def start_time(self) -> int | None:
        return self._process.start_time

    @property
    def console_log(self) -> Path:
        return self._console_log

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._process.exited

    def describe_exit(self) -> str:
        """ "QEMU (pid N) exited with code 1: <the end of QEMU's own output>"."""
        tail = self._process.log_tail(lines=40, max_bytes=2000)
        return self._process.describe_exit() + (f": {tail}" if tail else " (it printed nothing)")

    async def wait(self) -> int:
        return await self._process.wait()

    async def request_stop(self) -> None:
        """Does nothing: `-machine microvm` has no keyboard controller, so there is no
        Ctrl-Alt-Del to send, and QEMU's own SIGTERM quits at once without telling the guest.
        The agent's SHUTDOWN is the graceful path; after it, the manager kills."""

    async def kill(self) -> None:
        await self._process.kill()

    async def cleanup(self) -> None:
        """Remove the VM's cgroup (killing anything left in it); kills QEMU first if it
        still runs. The workdir (console and QEMU logs, agent socket) is its owner's."""
        if self.returncode is None:
            await self.kill()
        if self.cgroup is not None:
            await self.cgroup.remove()


class QemuDriver:
    """Starts sandboxes as QEMU microVMs; implements `arcbox_vm.ports.VmmDriver`."""

    name = "qemu"

    def __init__(self, config: QemuConfig | None = None, *, die_with_parent: bool = False,
                 cgroups: SandboxCgroups | None = None) -> None:
        self.config = config or QemuConfig()
        self.die_with_parent = die_with_parent
        self.cgroups = cgroups or SandboxCgroups.off()  # where each VMM is moved right after spawn
        self._accel: str | None = None

    def accel(self) -> str:
        """The accelerator this driver uses (probed once for "auto")."""
        if self._accel is None:
            if self.config.accel == "auto":
                self._accel = "kvm" if probe_kvm().usable else "tcg"
            else:
                self._accel = self.config.accel
        return self._accel

    def agent_endpoint(self, workdir: Path) -> AgentEndpoint:
        return AgentEndpoint(workdir / "agent.sock", f"{CHANNEL_CMDLINE_KEY}=serial:{SERIAL_PORT_NAME}")

    def kernel_for(self, bzimage: Path, vmlinux: Path) -> Path:
        return bzimage

    def binary(self) -> str:
        path = shutil.which(self.config.binary)
        if path is None:
            raise VmmError(f"QEMU binary '{self.config.binary}' not found; install it with: "
                           "apt-get install -y qemu-system-x86")
        return path

    async def adopt(self, spec: AdoptSpec) -> QemuProcess:
        """A QEMU an earlier daemon started (pid + start time), watched through a pidfd;
        already exited if it is gone. Its cgroup is ours to remove."""
        process = TrackedProcess.watch(spec.pid, name="QEMU", log_path=spec.workdir / VMM_LOG,
                                       start_time=spec.start_time)
        return QemuProcess(process, spec.workdir / CONSOLE_LOG, None, self.cgroups.sandbox(spec.sandbox_id))

    async def launch(self, spec: MachineSpec, endpoint: AgentEndpoint) -> QemuProcess:
        for path, what in ((spec.kernel, "kernel"), (spec.rootfs, "rootfs")):
            if not Path(path).is_file():
                raise BootFailed(f"the {what} image {path} does not exist")
        if spec.initrd is not None and not Path(spec.initrd).is_file():
            raise BootFailed(f"the initrd {spec.initrd} does not exist")
        accel = self.accel()
        console_log = spec.workdir / CONSOLE_LOG
        console_log.touch()
        argv = qemu_argv(spec, endpoint, accel, self.config, console_log)
        argv[0] = self.binary()
        argv = exec_prefix(spec.netns) + argv
        cgroup = self.cgroups.sandbox(spec.sandbox_id)
        child = await TrackedProcess.spawn(argv, spec.workdir / VMM_LOG, name="QEMU",
                                           die_with_parent=self.die_with_parent)
        if cgroup is not None and not cgroup.place(child.pid):
            cgroup = None  # logged; the VM runs on in our cgroup
        proc = QemuProcess(child, console_log, accel, cgroup)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(child.wait(), _STARTUP_GRACE_S)
            if child.returncode is not None:
                raise BootFailed(proc.describe_exit())
        except BaseException:  # failed or cancelled: leave no process and no cgroup behind
            await proc.kill()
            await proc.cleanup()
            raise
        return proc
