"""The restore plan: a VM continued from a snapshot instead of booted.

A `BootPlan` with other steps (same names where they do the same job, so boot-plan
hooks that name them work on both):

    workdir → sockdir → memdir → disk → snapshot-files → agent-listener → launch
            → wait-hello → reinit

- `disk` copies the checkpoint's disk (a restore must see the disk its memory expects);
- `snapshot-files` hard-links the files the VMM will open into `<workdir>/snapshot/`
  (state, memory, kernel, initrd): every file the VMM uses is in the sandbox's own
  directories, and the links keep a deleted checkpoint's memory alive while this VM
  maps it. With `memory_use="own"` (resuming a VM suspended to disk) the memory is
  copied into the VM's memory directory instead: it becomes the VM's own RAM again;
- `launch` is the driver's `restore`: the VMM runs the saved VM;
- `wait-hello` asks for HELLO (HELLO_AGAIN): the restored agent still holds the stream
  it had when the snapshot was taken;
- `reinit` gives the guest the host's wall clock, fresh entropy (its CRNG reseeded),
  its hostname, and its new address and MAC — before the sandbox is READY.

Resuming a sandbox suspended to disk drops `workdir` and `disk` (both are there already).
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arcbox_vm.agent.host import AgentConnection
from arcbox_vm.agent.host.reinit import reinit
from arcbox_vm.errors import AgentError, BootFailed
from arcbox_vm.manager.boot import BootPlan, BootRequest
from arcbox_vm.manager.steps import Step
from arcbox_vm.ports import DiskCloner, MemoryUse, SnapshotDriver, VmmDriver, VmSnapshot

SNAPSHOT_DIR = "snapshot"  # in the workdir: links to the files the VMM opens
MEMORY_FILE = "mem"  # in the memory directory, with memory_use="own"
ENTROPY_BYTES = 64


@dataclass
class RestoreRequest(BootRequest):
    """What to restore: the snapshot's files where they are now, how to use its memory,
    and the identity REINIT gives the guest (hostname, ip, mac; the clock and entropy are
    added when it is sent)."""

    snapshot: VmSnapshot | None = None
    memory_use: MemoryUse = "cow"
    link_files: bool = True  # False: use the snapshot's files where they are (the sandbox's own)
    reinit: dict[str, Any] = field(default_factory=dict)
    boot_files: dict[str, Path] = field(default_factory=dict)  # linked into snapshot/ too (kernel, initrd)


def link_or_copy(src: os.PathLike, dst: os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: a copy (its memory is then not shared)
        shutil.copy2(src, dst)


class RestorePlan(BootPlan):
    def __init__(self, driver: VmmDriver, req: RestoreRequest, *, clone_disk: DiskCloner,
                 progress: Callable[[str], None] | None = None) -> None:
        if req.snapshot is None:
            raise ValueError("a RestoreRequest needs its snapshot")
        super().__init__(driver, req, clone_disk=clone_disk, progress=progress)
        self.req: RestoreRequest = req
        self.hello_again = True
        self.snapdir = req.workdir / SNAPSHOT_DIR
        self.placed: VmSnapshot = req.snapshot
        self.steps.insert_after("disk", Step("snapshot-files", self._place_files, self._remove_files))
        self.steps.replace("launch", Step("launch", self._restore, self._kill_vmm))
        self.steps.replace("wait-hello", Step("wait-hello", self._wait_hello, self._close_agent))
        self.steps.insert_after("wait-hello", Step("reinit", self._reinit))

    async def _place_files(self) -> None:
        snap = self.req.snapshot
        assert snap is not None
        state, memory = snap.state, snap.memory
        if self.req.link_files:
            self.snapdir.mkdir(exist_ok=True)
            state = self.snapdir / snap.state.name
            link_or_copy(snap.state, state)
            if memory is not None and self.req.memory_use == "cow":
                memory = self.snapdir / snap.memory.name  # type: ignore[union-attr]
                link_or_copy(snap.memory, memory)  # type: ignore[arg-type]
            for name, src in self.req.boot_files.items():
                link_or_copy(src, self.snapdir / name)
        if snap.memory is not None and self.req.memory_use == "own":
            self.say("loading the memory")
            memory = self.memdir / MEMORY_FILE
            shutil.copyfile(snap.memory, memory)
        self.placed = VmSnapshot(state=state, memory=memory, vmm=snap.vmm, details=dict(snap.details))

    async def _remove_files(self) -> None:
        if self.req.link_files:
            shutil.rmtree(self.snapdir, ignore_errors=True)
        if self.req.memory_use == "own":
            (self.memdir / MEMORY_FILE).unlink(missing_ok=True)

    async def _restore(self) -> None:
        self.say(f"restoring with {self.driver.name}")
        if not isinstance(self.driver, SnapshotDriver):
            raise BootFailed(f"the {self.driver.name} driver cannot restore snapshots")
        self.state["process"] = await self.driver.restore(self.machine_spec(), self.endpoint, self.placed,
                                                          self.req.memory_use)
        self.timings["launched"] = time.perf_counter() - self._t0

    async def _close_agent(self) -> None:
        agent: AgentConnection | None = self.state.pop("agent", None)
        if agent is not None:
            await agent.close()

    async def _reinit(self) -> None:
        agent: AgentConnection = self.state["agent"]
        body = {"time": time.time(), "entropy": base64.b64encode(os.urandom(ENTROPY_BYTES)).decode(),
                **self.req.reinit}
        try:
            errors = await reinit(agent, body)
        except AgentError as exc:
            raise BootFailed(f"the restored guest could not be re-initialised: {exc}") from None
        if errors:
            raise BootFailed("the restored guest could not take its new identity: " + "; ".join(errors))
        self.timings["ready"] = time.perf_counter() - self._t0
