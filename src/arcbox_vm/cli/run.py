"""`arcbox-vm run [OPTIONS] -- CMD [ARGS...]`: one command in a throwaway microVM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import AsyncIterator, Optional

import typer
from rich.console import Console

from arcbox_vm.errors import ArcboxError, ExecError
from arcbox_vm.images import build_image, find_image
from arcbox_vm.manager.boot import DEFAULT_BOOT_ARGS
from arcbox_vm.manager.oneshot import OneShot, run_once
from arcbox_vm.models import OutputChunk
from arcbox_vm.paths import data_dir as default_data_dir
from arcbox_vm.vmm.select import select_driver

# Exit codes for failures that are not the command's own, following docker/timeout(1).
EXIT_ARCBOX_ERROR = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_TIMED_OUT = 124


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not key:
            raise typer.BadParameter(f"-e {item!r}: expected KEY=VALUE")
        env[key] = value if sep else os.environ.get(key, "")
    return env


async def _stdin_chunks() -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    while True:
        data = await loop.run_in_executor(None, os.read, fd, 65536)
        if not data:
            return
        yield data


def run_command(
    cmd: list[str] = typer.Argument(..., metavar="-- CMD [ARGS...]", help="Command to run in the VM."),
    vmm: str = typer.Option("auto", "--vmm", help="auto, qemu or firecracker."),
    memory: int = typer.Option(256, "--memory", "-m", min=64, help="Guest memory in MiB."),
    vcpus: int = typer.Option(1, "--vcpus", min=1, max=32, help="Number of vCPUs."),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE (repeatable); KEY alone copies it from here."),
    workdir: str = typer.Option("", "--workdir", "-w", help="Working directory in the guest."),
    user: str = typer.Option("", "--user", "-u", help="User in the guest: name, uid or uid:gid."),
    timeout: float = typer.Option(0.0, "--timeout", min=0, help="Kill the command (and its children) after S seconds."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Forward this process's stdin."),
    kernel: Optional[Path] = typer.Option(None, "--kernel", help="Kernel to boot instead of the built image's."),
    initrd: Optional[Path] = typer.Option(None, "--initrd", help="Initramfs (with --kernel)."),
    rootfs: Optional[Path] = typer.Option(None, "--rootfs", help="ext4 root filesystem with the agent."),
    boot_args: str = typer.Option(DEFAULT_BOOT_ARGS, "--boot-args", help="Kernel command line base."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where images and sandboxes live."),
) -> None:
    """Boot a microVM, run CMD in it, stream its output, remove the VM, exit with CMD's code."""
    err = Console(stderr=True)
    ddir = data_dir or default_data_dir()
    status = err.status("starting", spinner="dots") if err.is_terminal else None

    def progress(msg: str) -> None:
        if status is None:
            return
        if msg:
            status.update(f"[bold]arcbox-vm[/]: {msg}")
            status.start()
        else:
            status.stop()

    def on_chunk(chunk: OutputChunk) -> None:
        if chunk.data:
            os.write(1 if chunk.stream == "stdout" else 2, chunk.data)

    async def main() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        driver = select_driver(vmm, die_with_parent=True)  # type: ignore[arg-type]
        k, i, r = kernel, initrd, rootfs
        if k is None or r is None:
            progress("looking for the guest image")
            image = await asyncio.to_thread(find_image, ddir)
            if image is None:
                progress("building the guest image (first run only)")
                image = await asyncio.to_thread(build_image, ddir, progress)
            k = k or driver.kernel_for(image.kernel, image.vmlinux)
            r = r or image.rootfs
            if i is None and kernel is None:
                i = image.initrd
        job = OneShot(argv=cmd, kernel=k, rootfs=r, initrd=i, data_dir=ddir, env=_parse_env(env),
                      cwd=workdir, user=user, timeout=timeout, vcpus=vcpus, memory_mib=memory,
                      boot_args=boot_args)
        result = await run_once(driver, job, on_chunk, _stdin_chunks() if interactive else None, progress)
        if result.timed_out:
            err.print(f"arcbox-vm: the command timed out after {timeout:g} s and was killed", highlight=False)
            return EXIT_TIMED_OUT
        return result.exit_code

    try:
        code = asyncio.run(main())
    except ExecError as exc:
        if status:
            status.stop()
        err.print(f"arcbox-vm: {exc}", highlight=False, markup=False)
        code = {"not_found": EXIT_NOT_FOUND, "permission": EXIT_CANNOT_EXECUTE}.get(exc.code, EXIT_ARCBOX_ERROR)
    except ArcboxError as exc:
        if status:
            status.stop()
        err.print(f"arcbox-vm: {exc}", highlight=False, markup=False)
        code = EXIT_ARCBOX_ERROR
    except (KeyboardInterrupt, asyncio.CancelledError):
        if status:
            status.stop()
        err.print("arcbox-vm: interrupted; the VM was removed", highlight=False)
        code = 130
    finally:
        if status:
            status.stop()
    raise typer.Exit(code)
