"""Fake snapshots for the local VMM test double (TEST ONLY).

`SnapshotLocalDriver` is a `LocalDriver` whose processes can be paused (SIGSTOP of the
agent and everything below it: they use no CPU, as a paused VM), resumed (SIGCONT) and
"saved": `save_state` writes a small state file and a memory file of `MEM_BYTES`, which
a restore checks and holds open for the life of the process (as a VMM maps it), so
tests can see which files a restored sandbox keeps alive. A restore starts a fresh agent:
processes and files of the saved one do not carry over — the real VM tests prove that;
these prove the manager's side (records, refcounts, the pool, durability, errors).

Knobs for failure tests: `fail_save` makes the next save raise, `fail_restore` the next
restore, `save_delay` holds a save (the VM paused) that many seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

from arcbox_vm.errors import BootFailed, VmmError
from arcbox_vm.ports import AdoptSpec, AgentEndpoint, MachineSpec, MemoryUse, VmSnapshot
from arcbox_vm.vmm.procfs import process_start_time

from .local_vmm import LocalDriver, LocalProcess, _spawn, descendants

MEM_BYTES = 1 << 20


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] in "TtZX"
    except (OSError, IndexError):
        return True


class LocalSnapshotProcess(LocalProcess):
    """A `LocalProcess` that is also a `SnapshotProcess`."""

    paused = False

    def _tree(self) -> list[int]:
        return [self.pid, *descendants(self.pid)] if self.returncode is None else []

    async def pause(self) -> None:
        tree = self._tree()
        for pid in tree:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        self.paused = True
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not all(_stopped(pid) for pid in tree):
            await asyncio.sleep(0.01)  # SIGSTOP takes effect asynchronously

    async def resume(self) -> None:
        for pid in self._tree():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        self.paused = False

    async def save_state(self, dest: Path) -> VmSnapshot:
        driver: SnapshotLocalDriver = self.driver  # type: ignore[attr-defined]
        if driver.fail_save:
            driver.fail_save = False
            raise VmmError("fake save failed (as asked)")
        if not self.paused:
            raise VmmError("the VM must be paused before its state is saved")
        if driver.save_delay:
            await asyncio.sleep(driver.save_delay)
        state, mem = dest / "state", dest / "mem"
        state.write_text(json.dumps({"fake": True, "pid": self.pid, "saved_at": time.time()}))
        mem.write_bytes(os.urandom(MEM_BYTES))
        driver.saves += 1
        return VmSnapshot(state=state, memory=mem, vmm="local", details={"fake": True})

    def hold(self, path: Path) -> None:
        """Keep `path` open until the process exits (as a VMM keeps its memory mapped)."""
        fd = os.open(path, os.O_RDONLY)
        self.exited.add_done_callback(lambda _: os.close(fd))


class SnapshotLocalDriver(LocalDriver):
    """A `LocalDriver` that is also a `SnapshotDriver` (see the module docstring)."""

    def __init__(self, *args, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kw)
        self.fail_save = False
        self.fail_restore = False
        self.save_delay = 0.0
        self.saves = 0
        self.restores: list[tuple[str, VmSnapshot, str]] = []

    def snapshot_support(self) -> str | None:
        return None

    def _wrap(self, proc: LocalProcess) -> LocalSnapshotProcess:
        proc.__class__ = LocalSnapshotProcess
        proc.driver = self  # type: ignore[attr-defined]
        return proc  # type: ignore[return-value]

    async def launch(self, spec: MachineSpec, endpoint: AgentEndpoint) -> LocalSnapshotProcess:
        return self._wrap(await super().launch(spec, endpoint))

    async def adopt(self, spec: AdoptSpec) -> LocalSnapshotProcess:
        return self._wrap(await super().adopt(spec))

    async def restore(self, spec: MachineSpec, endpoint: AgentEndpoint, snapshot: VmSnapshot,
                      memory: MemoryUse = "cow") -> LocalSnapshotProcess:
        if snapshot.vmm != self.name:
            raise BootFailed(f"this snapshot was made by {snapshot.vmm}, not the local driver")
        if self.fail_restore:
            self.fail_restore = False
            raise BootFailed("fake restore failed (as asked)")
        json.loads(snapshot.state.read_text())  # must be there and whole
        if snapshot.memory is not None and snapshot.memory.stat().st_size != MEM_BYTES:
            raise BootFailed(f"the memory file {snapshot.memory} is not whole")
        workdir = Path(spec.workdir)
        try:
            popen = _spawn(self.argv(workdir, endpoint), workdir, workdir / "console.log", self.pid_namespace)
        except OSError as exc:
            raise VmmError(f"cannot start the local guest agent: {exc}") from None
        proc = self._wrap(LocalProcess(popen.pid, process_start_time(popen.pid), workdir / "console.log", popen))
        if snapshot.memory is not None:
            proc.hold(snapshot.memory)
        self.processes[spec.sandbox_id] = proc
        self.restores.append((spec.sandbox_id, snapshot, memory))
        return proc
