"""QEMU driver: `-machine microvm`, KVM when it can run the guest, else TCG.

Confinement (`[qemu] sandbox`, on by default; see `confine.py`): each QEMU is started
already unprivileged — its own uid and gid from `[qemu] uid_range`, no supplementary
groups, no capabilities, no-new-privs, a network namespace of its own with nothing in it —
and runs under its seccomp filter. (QEMU's own `-runas` cannot be combined with
`elevateprivileges=deny`: the filter is in place before QEMU drops to the user, and the
drop itself is then a forbidden system call.) Whatever it needs is handed over open
(`handover.py`); snapshots stream through descriptors too (`snapshot.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from arcbox_vm.agent.protocol import CHANNEL_CMDLINE_KEY, SERIAL_PORT_NAME
from arcbox_vm.config.qemu import QemuConfig
from arcbox_vm.errors import BootFailed, VmmError
from arcbox_vm.network.netns import exec_prefix
from arcbox_vm.ports import AdoptSpec, AgentEndpoint, MachineSpec, MemoryUse, VmSnapshot
from arcbox_vm.vmm.cgroup import SandboxCgroup, SandboxCgroups
from arcbox_vm.vmm.kvm import probe_kvm
from arcbox_vm.vmm.process import TrackedProcess
from arcbox_vm.vmm.qemu import confine
from arcbox_vm.vmm.qemu import snapshot as snap
from arcbox_vm.vmm.qemu.cmdline import MemoryFile, fd_of, memory_from_argv, qemu_argv
from arcbox_vm.vmm.qemu.handover import open_for
from arcbox_vm.vmm.qemu.qmp import QMP_SOCKET
from arcbox_vm.vmm.qemu.sealed_memory import Lease, SealedMemories
from arcbox_vm.vmm.users import VmmUsers

# How long QEMU must stay alive after exec before we call the launch good; a bad
# kernel path, a busy TAP or a bad option makes it exit well within this.
_STARTUP_GRACE_S = 0.3
CONSOLE_LOG = "console.log"  # the guest's serial console, in the workdir
VMM_LOG = "vmm.log"  # QEMU's own stdout/stderr, in the workdir
MEMORY_FILE = "mem"  # the guest's RAM, in the VM's memory directory (MachineSpec.memdir)


class QemuProcess:
    """A QEMU VM, launched or adopted; implements `arcbox_vm.ports.VmmProcess`.

    QEMU makes nothing of its own outside the workdir (which is the manager's): cleaning up
    removes the sandbox's cgroup, killing whatever is left in it, and gives its uid back."""

    def __init__(self, process: TrackedProcess, console_log: Path, accel: str | None,
                 cgroup: SandboxCgroup | None = None, *, qmp: Path | None = None,
                 memory: MemoryFile | None = None, users: VmmUsers | None = None,
                 sockdir: Path | None = None, lease: Lease | None = None) -> None:
        self._users = users
        self._lease = lease  # the sealed snapshot memory it maps, held until it is gone
        self._sockdir = sockdir
        self._process = process
        self._console_log = console_log
        self.accel = accel  # None: adopted, started by an earlier daemon
        self.cgroup = cgroup
        self.qmp = qmp  # the monitor socket (None: started without one)
        self.memory = memory  # where the guest RAM is (None: anonymous)
        self._monitor_lock = asyncio.Lock()  # QEMU serves one monitor client at a time

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

    # -- snapshots (arcbox_vm.ports.SnapshotProcess) ----------------------------------

    def _monitor(self) -> Path:
        if self.qmp is None or self.returncode is not None:
            raise VmmError("this QEMU has no monitor to pause or save it (it was started by an older "
                           "arcbox-vm, or it exited)")
        return self.qmp

    async def pause(self) -> None:
        async with self._monitor_lock:
            await snap.pause(self._monitor())

    async def resume(self) -> None:
        async with self._monitor_lock:
            await snap.resume(self._monitor())

    async def run_state(self) -> str:
        async with self._monitor_lock:
            return await snap.status(self._monitor())

    async def save_state(self, dest: Path) -> VmSnapshot:
        async with self._monitor_lock:
            return await snap.save_state(self._monitor(), self.memory, dest)

    async def cleanup(self) -> None:
        """Remove the VM's cgroup (killing anything left in it) and give its uid back;
        kills QEMU first if it still runs. The workdir (console and QEMU logs) and the socket
        directory are their owner's; the latter is closed to the uid before it is reused."""
        if self.returncode is None:
            await self.kill()
        if self._lease is not None:
            self._lease.release()
        if self.cgroup is not None:
            await self.cgroup.remove()
        if self._users is not None and self._sockdir is not None:
            confine.take_back(self._sockdir)
            await asyncio.to_thread(self._users.release, self._sockdir)


class QemuDriver:
    """Starts sandboxes as QEMU microVMs; implements `arcbox_vm.ports.VmmDriver`."""

    name = "qemu"

    def __init__(self, config: QemuConfig | None = None, *, die_with_parent: bool = False,
                 cgroups: SandboxCgroups | None = None, users: VmmUsers | None = None) -> None:
        self.config = config or QemuConfig()
        self.die_with_parent = die_with_parent
        self.cgroups = cgroups or SandboxCgroups.off()  # where each VMM is moved right after spawn
        # also with sandbox off: VMs a confined earlier daemon started give their uids back
        self.users = users or VmmUsers(*self.config.uids)
        self.sealed = SealedMemories()  # snapshot memories clones map copy-on-write
        self._accel: str | None = None
        self._sandbox_ok: str | None = None  # the binary whose -sandbox was checked

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

    async def check_sandbox(self, binary: str) -> None:
        """Raise VmmError (saying how to fix it) when QEMU cannot be confined here."""
        confine.check_privileges()
        if self._sandbox_ok != binary:
            await confine.check_seccomp(binary)
            self._sandbox_ok = binary

    async def adopt(self, spec: AdoptSpec) -> QemuProcess:
        """A QEMU an earlier daemon started (pid + start time), watched through a pidfd;
        already exited if it is gone. Its cgroup and its uid are ours to give back."""
        process = TrackedProcess.watch(spec.pid, name="QEMU", log_path=spec.workdir / VMM_LOG,
                                       start_time=spec.start_time)
        qmp = spec.sockdir / QMP_SOCKET
        memory = memory_from_argv(_cmdline(spec.pid)) if process.returncode is None else None
        if memory is not None and fd_of(memory.path) is not None:  # the file QEMU was handed
            real = _fd_target(spec.pid, fd_of(memory.path))
            memory = memory._replace(path=real) if real is not None else None
        return QemuProcess(process, spec.workdir / CONSOLE_LOG, None, self.cgroups.sandbox(spec.sandbox_id),
                           qmp=qmp if qmp.exists() else None, memory=memory, users=self.users,
                           sockdir=spec.sockdir)

    def snapshot_support(self) -> str | None:
        return None

    def _own_memory(self, spec: MachineSpec) -> MemoryFile | None:
        """Guest RAM as a shared file in the VM's memory directory, when it has one."""
        return MemoryFile(spec.memdir / MEMORY_FILE, shared=True) if spec.memdir is not None else None

    @staticmethod
    def _check_files(spec: MachineSpec) -> None:
        for path, what in ((spec.kernel, "kernel"), (spec.rootfs, "rootfs")):
            if not Path(path).is_file():
                raise BootFailed(f"the {what} image {path} does not exist")
        if spec.initrd is not None and not Path(spec.initrd).is_file():
            raise BootFailed(f"the initrd {spec.initrd} does not exist")

    async def _start(self, spec: MachineSpec, endpoint: AgentEndpoint, memory: MemoryFile | None,
                     incoming: bool, lease: Lease | None = None) -> QemuProcess:
        accel = self.accel()
        binary = self.binary()
        sandboxed = self.config.sandbox
        if sandboxed:
            await self.check_sandbox(binary)
        console_log = spec.workdir / CONSOLE_LOG
        sockdir = spec.socket_dir
        cfg = self.config
        if accel == "tcg" and not cfg.tsc_khz:
            cfg = cfg.model_copy(update={"tsc_khz": host_tsc_khz()})
        cgroup = self.cgroups.sandbox(spec.sandbox_id, vcpus=spec.vcpus, memory_mib=spec.memory_mib)
        handover = None
        claimed = False
        try:
            confinement = None
            if sandboxed:
                uid = await asyncio.to_thread(self.users.claim, sockdir)
                claimed = True
                confinement = confine.confinement(uid, accel)
                confine.check_access(uid, spec, endpoint)
                confine.give_socket(sockdir, endpoint.listen_path, uid)
            handover = await open_for(spec, console_log, memory, sockdir / QMP_SOCKET,
                                      confinement.uid if confinement is not None else None)
            assert handover.files is not None
            argv = qemu_argv(spec, endpoint, accel, cfg, console_log, handover.files, memory=memory,
                             incoming=incoming)
            argv[0] = binary
            if not sandboxed:
                argv = exec_prefix(spec.netns) + argv
            child = await TrackedProcess.spawn(argv, spec.workdir / VMM_LOG, name="QEMU",
                                               die_with_parent=self.die_with_parent, confine=confinement,
                                               pass_fds=handover.files.all())
        except BaseException:
            if handover is not None:
                handover.discard()
            if claimed:
                confine.take_back(sockdir)
                await asyncio.to_thread(self.users.release, sockdir)
            raise
        handover.close()
        if cgroup is not None and not cgroup.place(child.pid):
            cgroup = None  # logged; the VM runs on in our cgroup
        return QemuProcess(child, console_log, accel, cgroup, qmp=sockdir / QMP_SOCKET, memory=memory,
                           users=self.users, sockdir=sockdir, lease=lease)

    async def launch(self, spec: MachineSpec, endpoint: AgentEndpoint) -> QemuProcess:
        self._check_files(spec)
        proc = await self._start(spec, endpoint, self._own_memory(spec), incoming=False)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), _STARTUP_GRACE_S)
            if proc.returncode is not None:
                raise BootFailed(proc.describe_exit())
        except BaseException:  # failed or cancelled: leave no process and no cgroup behind
            await proc.kill()
            await proc.cleanup()
            raise
        return proc

    async def restore(self, spec: MachineSpec, endpoint: AgentEndpoint, snapshot: VmSnapshot,
                      memory: MemoryUse = "cow") -> QemuProcess:
        """QEMU with the same devices, `-incoming defer`, fed the saved state, running.

        The snapshot's memory is mapped copy-on-write ("cow": through its sealed memfd,
        shared by every clone of it, see sealed_memory.py) or as the VM's own shared memory
        ("own"); a snapshot whose RAM is in its stream gets fresh memory."""
        if snapshot.vmm != self.name:
            raise BootFailed(f"this snapshot was made by {snapshot.vmm}, not QEMU")
        self._check_files(spec)
        lease = None
        if snapshot.memory is not None and memory == "cow":
            try:
                lease = await self.sealed.acquire(snapshot.memory)
            except OSError as exc:
                raise BootFailed(f"the snapshot memory {snapshot.memory} cannot be read: {exc}") from None
            ram: MemoryFile | None = MemoryFile(snapshot.memory, shared=False, fd=lease.fd)
        elif snapshot.memory is not None:
            ram = MemoryFile(snapshot.memory, shared=True)
        else:
            ram = self._own_memory(spec)
        try:
            proc = await self._start(spec, endpoint, ram, incoming=True, lease=lease)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        try:
            assert proc.qmp is not None
            await snap.wait_monitor(proc.qmp, proc.exited, proc.describe_exit)
            async with proc._monitor_lock:
                await snap.load_state(proc.qmp, snapshot)
        except BaseException as exc:
            await proc.kill()
            await proc.cleanup()
            if isinstance(exc, VmmError):
                raise BootFailed(f"restoring the VM failed: {exc}; {proc.describe_exit()}") from None
            raise
        return proc


def host_tsc_khz(default: int = 2_000_000) -> int:
    """The host's TSC rate in kHz: a TCG guest's TSC counts at it (QEMU reads the host's),
    so the guest must be told exactly this or its clock drifts (sysfs where the kernel
    exports it, else the CPU's nominal rate from /proc/cpuinfo)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    return default


def _fd_target(pid: int, fd: int | None) -> Path | None:
    """The file behind descriptor `fd` of process `pid` (None if it cannot be read)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except OSError:
        return None


def _cmdline(pid: int | None) -> list[str]:
    if not pid:
        return []
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return []
