"""QEMU driver: `-machine microvm`, KVM when it can run the guest, else TCG."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

from arcbox_vm.agent.protocol import CHANNEL_CMDLINE_KEY, SERIAL_PORT_NAME
from arcbox_vm.errors import BootFailed, VmmError
from arcbox_vm.network.netns import exec_prefix
from arcbox_vm.ports import AdoptSpec, AgentEndpoint, MachineSpec
from arcbox_vm.vmm.adopted import AdoptedProcess, process_start_time
from arcbox_vm.vmm.cgroup import SandboxCgroup, SandboxCgroups
from arcbox_vm.vmm.kvm import probe_kvm
from arcbox_vm.vmm.process import ChildProcess
from arcbox_vm.vmm.qemu.cmdline import qemu_argv
from arcbox_vm.config.qemu import QemuConfig

# How long QEMU must stay alive after exec before we call the launch good; a bad
# kernel path, a busy TAP or a bad option makes it exit well within this.
_STARTUP_GRACE_S = 0.3


class QemuProcess:
    """A running QEMU; implements `arcbox_vm.ports.VmmProcess`."""

    def __init__(self, child: ChildProcess, console_log: Path, accel: str,
                 cgroup: SandboxCgroup | None = None) -> None:
        self._child = child
        self._console_log = console_log
        self.accel = accel
        self.cgroup = cgroup
        self._start_time: int | None = None

    @property
    def pid(self) -> int:
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        return self._child.returncode

    @property
    def start_time(self) -> int | None:
        if self._start_time is None:
            self._start_time = process_start_time(self.pid)
        return self._start_time

    @property
    def console_log(self) -> Path:
        return self._console_log

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._child.exited

    def describe_exit(self) -> str:
        return self._child.describe_exit("QEMU")

    async def wait(self) -> int:
        return await self._child.wait()

    async def request_stop(self) -> None:
        """Does nothing: microvm has no keyboard controller for Ctrl-Alt-Del, and QEMU's own
        SIGTERM quits at once; the agent's SHUTDOWN is the graceful path."""

    async def kill(self) -> None:
        await self._child.kill()

    async def cleanup(self) -> None:
        """Remove the VM's cgroup (killing anything left in it); the workdir is its owner's."""
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

    async def adopt(self, spec: AdoptSpec) -> AdoptedProcess:
        """A QEMU an earlier daemon started: watched through a pidfd; its cgroup is ours to remove."""
        return AdoptedProcess(spec.pid, spec.start_time, spec.workdir / "console.log", "QEMU",
                              cgroup=self.cgroups.sandbox(spec.sandbox_id))

    async def launch(self, spec: MachineSpec, endpoint: AgentEndpoint) -> QemuProcess:
        for path, what in ((spec.kernel, "kernel"), (spec.rootfs, "rootfs")):
            if not Path(path).is_file():
                raise BootFailed(f"the {what} image {path} does not exist")
        if spec.initrd is not None and not Path(spec.initrd).is_file():
            raise BootFailed(f"the initrd {spec.initrd} does not exist")
        accel = self.accel()
        console_log = spec.workdir / "console.log"
        console_log.touch()
        argv = qemu_argv(spec, endpoint, accel, self.config, console_log)
        argv[0] = self.binary()
        argv = exec_prefix(spec.netns) + argv
        cgroup = self.cgroups.sandbox(spec.sandbox_id)
        child = await ChildProcess.start(argv, spec.workdir / "vmm.log", die_with_parent=self.die_with_parent)
        if cgroup is not None and not cgroup.place(child.pid):
            cgroup = None  # logged; the VM runs on in our cgroup
        proc = QemuProcess(child, console_log, accel, cgroup)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.exited), _STARTUP_GRACE_S)
            if child.returncode is not None:
                raise BootFailed(proc.describe_exit())
        except BaseException:  # failed or cancelled: leave no process and no cgroup behind
            await proc.kill()
            await proc.cleanup()
            raise
        return proc
