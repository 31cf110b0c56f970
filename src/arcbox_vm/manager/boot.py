"""Boot one VM until its agent says HELLO, and tear it down again.

This is the start-up sequence every sandbox goes through: workdir → disk copy → agent
listener → VMM launch → HELLO. Each step has its own undo, so a failure at any point
leaves nothing behind (no process, socket, disk copy or directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arcbox_vm.agent.host import AgentConnection, AgentListener
from arcbox_vm.errors import BootFailed
from arcbox_vm.manager.steps import Step, StepRunner
from arcbox_vm.paths import socket_dir
from arcbox_vm.ports import MachineSpec, VmmDriver
from arcbox_vm.storage.disks import clone_disk

log = logging.getLogger(__name__)

DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off init=/sbin/vm-agent"


@dataclass
class BootRequest:
    """What to boot. `kernel`/`initrd`/`rootfs` are the base images (never written)."""

    sandbox_id: str
    workdir: Path
    kernel: Path
    rootfs: Path
    initrd: Path | None = None
    vcpus: int = 1
    memory_mib: int = 256
    boot_args: str = DEFAULT_BOOT_ARGS
    extra_boot_args: tuple[str, ...] = ()
    tap_name: str | None = None
    guest_mac: str | None = None
    netns: str = ""
    hello_timeout: float = 120.0


@dataclass
class BootedVm:
    """A running VM with a live agent connection. Call `destroy()` exactly once."""

    request: BootRequest
    process: Any  # arcbox_vm.ports.VmmProcess
    agent: AgentConnection
    listener: AgentListener
    timings: dict[str, float] = field(default_factory=dict)
    _destroyed: bool = False

    @property
    def workdir(self) -> Path:
        return self.request.workdir

    async def shutdown(self, timeout: float = 10.0) -> bool:
        """Graceful stop: the agent halts the guest, then wait for the VMM to exit.

        Falls back to the VMM's own stop request (Ctrl-Alt-Del) if the agent does not
        answer. Returns True if the VMM exited by itself within `timeout`.
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
        await self.agent.close()
        await self.process.kill()
        await self.process.cleanup()
        await self.listener.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(socket_dir(self.workdir), ignore_errors=True)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


async def boot_vm(driver: VmmDriver, req: BootRequest,
                  progress: Callable[[str], None] | None = None) -> BootedVm:
    """Run the start-up steps; returns when the agent's HELLO has arrived."""
    say = progress or (lambda _msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sockdir = socket_dir(req.workdir)
    endpoint = driver.agent_endpoint(sockdir)
    listener = AgentListener(endpoint.listen_path)
    disk = req.workdir / "rootfs.ext4"
    state: dict[str, Any] = {}

    async def make_workdir() -> None:
        req.workdir.mkdir(parents=True, exist_ok=False)

    async def remove_workdir() -> None:
        shutil.rmtree(req.workdir, ignore_errors=True)

    async def make_sockdir() -> None:
        sockdir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def remove_sockdir() -> None:
        shutil.rmtree(sockdir, ignore_errors=True)

    async def copy_disk() -> None:
        say("preparing disk")
        await clone_disk(req.rootfs, disk)

    async def listen() -> None:
        await listener.start()

    async def launch() -> None:
        say(f"starting {driver.name}")
        spec = MachineSpec(
            sandbox_id=req.sandbox_id, workdir=req.workdir, kernel=req.kernel, rootfs=disk,
            boot_args=req.boot_args, vcpus=req.vcpus, memory_mib=req.memory_mib, initrd=req.initrd,
            tap_name=req.tap_name, guest_mac=req.guest_mac, netns=req.netns, sockdir=sockdir,
            extra_boot_args=tuple(req.extra_boot_args) + (f"arcbox.hostname={req.sandbox_id[:63]}",),
        )
        state["process"] = await driver.launch(spec, endpoint)
        timings["launched"] = time.perf_counter() - t0

    async def kill_vmm() -> None:  # cleanup() also kills and removes the sandbox's cgroup
        proc = state.pop("process", None)
        if proc is not None:
            await proc.kill()
            await proc.cleanup()

    async def wait_hello() -> None:
        say("booting; waiting for the guest agent")
        proc = state["process"]
        exited = getattr(proc, "exited", None)
        if exited is None:
            exited = asyncio.ensure_future(proc.wait())
            state["exit_waiter"] = exited
        try:
            state["agent"] = await listener.accept(
                req.hello_timeout, vmm_exit=exited,
                describe_exit=getattr(proc, "describe_exit", lambda: f"{driver.name} exited during boot"),
            )
        except BootFailed as exc:
            # the workdir (and the console log in it) is removed by the undo: keep its end
            tail = _tail(proc.console_log)
            raise BootFailed(f"{exc}" + (f"\n--- last console lines ---\n{tail}" if tail else "")) from None
        timings["hello"] = time.perf_counter() - t0

    runner = StepRunner([
        Step("workdir", make_workdir, remove_workdir),
        Step("sockdir", make_sockdir, remove_sockdir),
        Step("disk", copy_disk),
        Step("agent-listener", listen, listener.close),
        Step("launch", launch, kill_vmm),
        Step("wait-hello", wait_hello),
    ])
    await runner.run()
    return BootedVm(req, state["process"], state["agent"], listener, timings)
