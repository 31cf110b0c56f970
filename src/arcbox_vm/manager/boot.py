"""Boot one VM until its agent says HELLO, and tear it down again.

A boot is a `BootPlan`: an ordered, editable list of named steps (firecracker-go-sdk's
handler lists are the model), each with its own undo, so a failure at any point leaves
nothing behind (no process, socket, disk copy or directory). The cold boot is

    workdir → sockdir → memdir → disk → agent-listener → launch → wait-hello

and callers may insert, replace or drop steps by name before `run()` (the manager's
`boot_plan_hooks` do, per sandbox); a restore from a snapshot is another plan
(`restore_plan.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arcbox_vm.agent.host import AgentConnection, AgentListener
from arcbox_vm.config.sections import DEFAULT_BOOT_ARGS
from arcbox_vm.errors import BootFailed
from arcbox_vm.manager.console import tail_text
from arcbox_vm.manager.steps import Step, StepRunner
from arcbox_vm.paths import memory_dir, socket_dir
from arcbox_vm.ports import DiskCloner, MachineSpec, VmmDriver, VmmProcess

__all__ = ["DEFAULT_BOOT_ARGS", "BootPlan", "BootRequest", "BootedVm", "boot_vm"]


@dataclass
class BootRequest:
    """What to boot. `kernel`/`initrd`/`rootfs` are the base images (never written)."""

    sandbox_id: str
    workdir: Path
    kernel: Path
    rootfs: Path
    vcpus: int
    memory_mib: int
    initrd: Path | None = None
    boot_args: str = DEFAULT_BOOT_ARGS
    extra_boot_args: tuple[str, ...] = ()
    tap_name: str | None = None
    guest_mac: str | None = None
    netns: str = ""
    hello_timeout: float = 120.0


@dataclass
class BootedVm:
    """A running VM with a live agent connection. Call `destroy()` (or `detach()`) once."""

    sandbox_id: str
    workdir: Path
    process: VmmProcess
    agent: AgentConnection
    listener: AgentListener
    timings: dict[str, float] = field(default_factory=dict)
    _destroyed: bool = False

    async def shutdown(self, timeout: float = 10.0) -> bool:
        """Graceful stop: the agent halts the guest, then wait for the VMM to exit.

        Falls back to the VMM's own stop request (Ctrl-Alt-Del under Firecracker) if the
        agent does not answer. Returns True if the VMM exited by itself within `timeout`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.process.returncode is not None:
            return True
        acked = await self.agent.shutdown(timeout=min(5.0, timeout))
        if not acked:
            with contextlib.suppress(Exception):
                await self.process.request_stop()
        try:
            await asyncio.wait_for(self.process.wait(), max(0.1, deadline - loop.time()))
            return True
        except asyncio.TimeoutError:
            return False

    async def detach(self) -> None:
        """Let go of the VM without stopping it (it keeps running for a later adopter):
        close our end of the agent channel and the listener; the guest agent keeps its
        commands running and dials again when a new listener appears at the same path."""
        if self._destroyed:
            return
        self._destroyed = True
        await self.agent.close()
        await self.listener.close(unlink=False)

    async def destroy(self, graceful_timeout: float = 0.0) -> None:
        """Stop the VM (gracefully first if a timeout is given) and remove everything.

        The VMM's `cleanup()` runs after it is gone: it removes the driver's files and the
        sandbox's cgroup, killing whatever the VM left in it."""
        if self._destroyed:
            return
        self._destroyed = True
        if graceful_timeout > 0:
            with contextlib.suppress(Exception):
                await self.shutdown(graceful_timeout)
        await self.process.kill()
        await self.agent.close()
        await self.process.cleanup()
        await self.listener.close()
        remove_dirs(self.workdir)


def remove_dirs(workdir: Path) -> None:
    """Remove a VM's directories: its workdir, socket and memory directories."""
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(socket_dir(workdir), ignore_errors=True)
    shutil.rmtree(memory_dir(workdir), ignore_errors=True)


class BootPlan:
    """The steps that boot one VM; edit `steps` (insert_after/replace/remove) before `run()`.

    Steps share what they make through `state` ("process", "agent"); `timings` gets the
    seconds from the start to "launched" and "hello"."""

    def __init__(self, driver: VmmDriver, req: BootRequest, *, clone_disk: DiskCloner,
                 progress: Callable[[str], None] | None = None) -> None:
        self.driver = driver
        self.req = req
        self.clone_disk = clone_disk
        self.say = progress or (lambda _msg: None)
        self.sockdir = socket_dir(req.workdir)
        self.memdir = memory_dir(req.workdir)
        self.endpoint = driver.agent_endpoint(self.sockdir)
        self.listener = AgentListener(self.endpoint.listen_path)
        self.disk = req.workdir / "rootfs.ext4"
        self.state: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.step = ""  # the step running now, or the one that failed
        self.hello_again = False  # ask the agent for HELLO (a restored VM does not know its stream is new)
        self._t0 = 0.0
        self.steps = StepRunner([
            Step("workdir", self._make_workdir, self._remove_workdir),
            Step("sockdir", self._make_sockdir, self._remove_sockdir),
            Step("memdir", self._make_memdir, self._remove_memdir),
            Step("disk", self._copy_disk),
            Step("agent-listener", self.listener.start, self.listener.close),
            Step("launch", self._launch, self._kill_vmm),
            Step("wait-hello", self._wait_hello),
        ])

    def machine_spec(self) -> MachineSpec:
        req = self.req
        return MachineSpec(
            sandbox_id=req.sandbox_id, workdir=req.workdir, kernel=req.kernel, rootfs=self.disk,
            boot_args=req.boot_args, vcpus=req.vcpus, memory_mib=req.memory_mib, initrd=req.initrd,
            tap_name=req.tap_name, guest_mac=req.guest_mac, netns=req.netns, sockdir=self.sockdir,
            memdir=self.memdir,
            extra_boot_args=tuple(req.extra_boot_args) + (f"arcbox.hostname={req.sandbox_id[:63]}",),
        )

    async def run(self) -> BootedVm:
        """Run the steps; returns when the agent's HELLO has arrived (undoes all on failure)."""
        self._t0 = time.perf_counter()
        await self.steps.run(on_step=lambda name: setattr(self, "step", name))
        return BootedVm(self.req.sandbox_id, self.req.workdir, self.state["process"], self.state["agent"],
                        self.listener, self.timings)

    async def _make_workdir(self) -> None:
        # private: the VM's disk copy is in it (a confined VMM gets its files as descriptors)
        self.req.workdir.mkdir(parents=True, exist_ok=False, mode=0o700)

    async def _remove_workdir(self) -> None:
        shutil.rmtree(self.req.workdir, ignore_errors=True)

    async def _make_sockdir(self) -> None:
        self.sockdir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def _remove_sockdir(self) -> None:
        shutil.rmtree(self.sockdir, ignore_errors=True)

    async def _make_memdir(self) -> None:
        self.memdir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def _remove_memdir(self) -> None:
        shutil.rmtree(self.memdir, ignore_errors=True)

    async def _copy_disk(self) -> None:
        self.say("preparing disk")
        await self.clone_disk(self.req.rootfs, self.disk)

    async def _launch(self) -> None:
        self.say(f"starting {self.driver.name}")
        self.state["process"] = await self.driver.launch(self.machine_spec(), self.endpoint)
        self.timings["launched"] = time.perf_counter() - self._t0

    async def _kill_vmm(self) -> None:  # cleanup() also kills and removes the sandbox's cgroup
        proc = self.state.pop("process", None)
        if proc is not None:
            await proc.kill()
            await proc.cleanup()

    async def _wait_hello(self) -> None:
        self.say("booting; waiting for the guest agent")
        proc: VmmProcess = self.state["process"]
        try:
            self.state["agent"] = await self.listener.accept(
                self.req.hello_timeout, vmm_exit=proc.exited, describe_exit=proc.describe_exit,
                hello_again=self.hello_again)
        except BootFailed as exc:
            # the workdir (and the console log in it) is removed by the undo: keep its end
            tail = tail_text(proc.console_log)
            raise BootFailed(f"{exc}" + (f"\n--- last console lines ---\n{tail}" if tail else "")) from None
        self.timings["hello"] = time.perf_counter() - self._t0


async def boot_vm(driver: VmmDriver, req: BootRequest, progress: Callable[[str], None] | None = None, *,
                  clone_disk: DiskCloner) -> BootedVm:
    """Boot with the cold plan as it is; returns when the agent's HELLO has arrived."""
    return await BootPlan(driver, req, clone_disk=clone_disk, progress=progress).run()
