"""Pause, resume, save and load a QEMU VM through its monitor (QMP).

Saving is QEMU's migration of a *stopped* VM into a file we opened and handed it over the
monitor (`getfd`, then `migrate "fd:<name>"`): QEMU opens nothing and starts no program
(a confined QEMU may do neither). When the guest's RAM is a shared file
(`memory-backend-file,share=on`, see cmdline.py), the migration capability
`x-ignore-shared` leaves the RAM out of the stream (the state is then some 60 KB) and the
memory file is copied next to it instead: the VM is paused only for that copy. A VM whose
RAM is private (one restored copy-on-write from a snapshot) streams its RAM into the
state file.

Loading starts QEMU with `-incoming defer` and the same devices, sets the same
capability, hands it the state file and runs `migrate-incoming "fd:<name>"` and `cont`: a
VM saved while stopped restores stopped.

The monitor of a VM started before it had one (an older daemon's) cannot be reached:
those operations fail with a VmmError saying so.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from arcbox_vm.errors import VmmError
from arcbox_vm.ports import VmSnapshot
from arcbox_vm.vmm.qemu.cmdline import MemoryFile
from arcbox_vm.vmm.qemu.qmp import Qmp

STATE_FILE = "state"  # in a snapshot directory: QEMU's migration stream
MEMORY_FILE = "mem"  # in a snapshot directory: the guest RAM (when it is kept apart)
SAVE_TIMEOUT_S = 600.0  # streaming a big guest's RAM under emulation takes a while
MONITOR_WAIT_S = 15.0
MIGRATION_FD = "migration"  # the name the state file's descriptor is handed to QEMU under


async def pause(qmp_path: Path) -> None:
    async with Qmp.connect(qmp_path) as qmp:
        await qmp.execute("stop")


async def resume(qmp_path: Path) -> None:
    """`cont` unless it runs already (after a save the VM is "postmigrate": cont
    re-activates its disk and runs it)."""
    async with Qmp.connect(qmp_path) as qmp:
        if await qmp.status() != "running":
            await qmp.execute("cont")


async def status(qmp_path: Path) -> str:
    async with Qmp.connect(qmp_path) as qmp:
        return await qmp.status()


async def _capabilities(qmp: Qmp, ignore_shared: bool) -> None:
    await qmp.execute("migrate-set-capabilities",
                      capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared}])


async def save_state(qmp_path: Path, memory: MemoryFile | None, dest: Path) -> VmSnapshot:
    """Write the stopped VM's state (and memory) into `dest`; the VM stays stopped."""
    state = dest / STATE_FILE
    ignore_shared = memory is not None and memory.shared
    async with Qmp.connect(qmp_path) as qmp:
        run_state = await qmp.status()
        if run_state == "running":
            raise VmmError("the VM must be paused before its state is saved")
        await _capabilities(qmp, ignore_shared)
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await qmp.pass_fd(MIGRATION_FD, fd)
        finally:
            os.close(fd)  # QEMU has its own copy, and closes it when the stream is written
        await qmp.execute("migrate", uri=f"fd:{MIGRATION_FD}")
        await qmp.wait_migration(SAVE_TIMEOUT_S)
    mem = None
    if ignore_shared:
        assert memory is not None
        mem = dest / MEMORY_FILE
        await copy_sparse(memory.path, mem)
    return VmSnapshot(state=state, memory=mem, vmm="qemu", details={"ignore_shared": ignore_shared})


async def load_state(qmp_path: Path, snapshot: VmSnapshot) -> None:
    """Feed the saved state to a QEMU started with `-incoming defer` and run it."""
    async with Qmp.connect(qmp_path) as qmp:
        await _capabilities(qmp, bool(snapshot.details.get("ignore_shared")))
        fd = os.open(snapshot.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await qmp.pass_fd(MIGRATION_FD, fd)
        finally:
            os.close(fd)
        await qmp.execute("migrate-incoming", uri=f"fd:{MIGRATION_FD}")
        await qmp.wait_migration(SAVE_TIMEOUT_S, poll=0.01)
        await qmp.execute("cont")


async def wait_monitor(qmp_path: Path, exited: asyncio.Future[int], describe_exit, timeout: float = MONITOR_WAIT_S) -> None:  # noqa: ANN001
    """Wait until QEMU's monitor socket accepts connections; BootFailed-like VmmError if
    QEMU exits first or it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if exited.done():
            raise VmmError(describe_exit())
        try:
            reader, writer = await asyncio.open_unix_connection(str(qmp_path))
        except OSError:
            if loop.time() > deadline:
                raise VmmError(f"QEMU's monitor {qmp_path} did not come up within {timeout:.0f} s") from None
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return


async def copy_sparse(src: Path, dst: Path) -> None:
    """Copy a (mostly sparse) memory image, holes kept holes."""
    tmp = dst.with_name(dst.name + ".part")
    proc = await asyncio.create_subprocess_exec(
        "cp", "--sparse=always", "--", str(src), str(tmp),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise VmmError(f"copying the guest memory {src} failed: {err.decode(errors='replace').strip()}")
    tmp.rename(dst)
