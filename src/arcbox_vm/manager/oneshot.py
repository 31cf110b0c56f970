"""`arcbox-vm run`: boot a throwaway VM, run one command, stream it, remove the VM.

Like `docker run --rm`: whatever happens (command fails, user presses Ctrl-C, boot
fails), the VM and everything made for it are gone when this returns. The adapters come
from `composition.build_adapters(config, one_shot=True)`: the VMM dies with this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from arcbox_vm.agent import protocol
from arcbox_vm.agent.host import ExitStatus
from arcbox_vm.config import VmmConfig
from arcbox_vm.manager.boot import BootRequest, boot_vm
from arcbox_vm.manager.images import resolve_images
from arcbox_vm.models import ExecSpec, OutputChunk
from arcbox_vm.ports import Adapters


@dataclass
class OneShot:
    """What to boot and what to run in it. Empty strings / zeros take the config's defaults
    (kernel/rootfs "" = the built image)."""

    exec: ExecSpec
    kernel: str = ""
    rootfs: str = ""
    initrd: str = ""
    vcpus: int = 0
    memory_mib: int = 0
    boot_args: str = ""


async def run_once(config: VmmConfig, adapters: Adapters, job: OneShot, on_chunk: Callable[[OutputChunk], None],
                   stdin: AsyncIterator[bytes] | None = None,
                   progress: Callable[[str], None] | None = None) -> ExitStatus:
    """Boot, run `job.exec`, feed `stdin`, call `on_chunk` for output; always clean up."""
    say = progress or (lambda _msg: None)
    d = config.defaults
    driver = adapters.driver
    if not (job.kernel or d.kernel) or not (job.rootfs or d.rootfs):
        say("looking for the guest image (built on first use)")
    kernel, initrd, rootfs = await resolve_images(adapters.images, driver, job.kernel or d.kernel,
                                                  job.initrd or d.initrd, job.rootfs or d.rootfs)
    sandbox_id = "run-" + secrets.token_hex(4)
    req = BootRequest(
        sandbox_id=sandbox_id, workdir=config.data_dir / "runs" / sandbox_id, kernel=kernel, rootfs=rootfs,
        initrd=initrd, vcpus=job.vcpus or d.vcpus, memory_mib=job.memory_mib or d.memory_mib,
        boot_args=job.boot_args or d.boot_args, hello_timeout=config.agent.hello_timeout_s,
    )
    vm = await boot_vm(driver, req, progress, clone_disk=adapters.clone_disk)
    feeder: asyncio.Task[None] | None = None
    spec = job.exec
    try:
        say("running")
        cols, rows = spec.tty_size or (80, 24)
        session = await vm.agent.exec(protocol.exec_request(
            list(spec.cmd), env=spec.env, cwd=spec.working_dir, user=spec.user, tty=spec.tty, rows=rows, cols=cols,
            timeout=spec.timeout_seconds, stdin=stdin is not None,
        ))
        say("")
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


__all__ = ["OneShot", "run_once"]
