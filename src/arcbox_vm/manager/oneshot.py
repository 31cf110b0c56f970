"""`arcbox-vm run`: boot a throwaway VM, run one command, stream it, remove the VM.

Like `docker run --rm`: whatever happens (command fails, user presses Ctrl-C, boot
fails), the VM and everything made for it are gone when this returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from arcbox_vm.agent import protocol
from arcbox_vm.agent.host import ExitStatus
from arcbox_vm.manager.boot import DEFAULT_BOOT_ARGS, BootRequest, boot_vm
from arcbox_vm.models import OutputChunk
from arcbox_vm.ports import VmmDriver


@dataclass
class OneShot:
    """What to boot and what to run in it."""

    argv: list[str]
    kernel: Path
    rootfs: Path
    initrd: Path | None
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    user: str = ""
    timeout: float = 0.0
    vcpus: int = 1
    memory_mib: int = 256
    boot_args: str = DEFAULT_BOOT_ARGS
    tty: bool = False


async def run_once(driver: VmmDriver, job: OneShot, on_chunk: Callable[[OutputChunk], None],
                   stdin: AsyncIterator[bytes] | None = None,
                   progress: Callable[[str], None] | None = None) -> ExitStatus:
    """Boot, run `job.argv`, feed `stdin`, call `on_chunk` for output; always clean up."""
    sandbox_id = "run-" + secrets.token_hex(4)
    req = BootRequest(
        sandbox_id=sandbox_id, workdir=job.data_dir / "runs" / sandbox_id,
        kernel=job.kernel, rootfs=job.rootfs, initrd=job.initrd, vcpus=job.vcpus,
        memory_mib=job.memory_mib, boot_args=job.boot_args,
    )
    vm = await boot_vm(driver, req, progress)
    feeder: asyncio.Task[None] | None = None
    try:
        if progress:
            progress("running")
        session = await vm.agent.exec(protocol.exec_request(
            job.argv, env=job.env, cwd=job.cwd, user=job.user, tty=job.tty,
            timeout=job.timeout, stdin=stdin is not None,
        ))
        if progress:
            progress("")
        if stdin is not None:
            async def feed() -> None:
                async for data in stdin:
                    await session.write_stdin(data)
                await session.close_stdin()
            feeder = asyncio.create_task(feed())
        async for chunk in session:
            on_chunk(chunk)
        assert session.exit_status is not None
        return session.exit_status
    finally:
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
        await asyncio.shield(vm.destroy())
