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

from arcbox_vm.composition import build_adapters
from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import ArcboxError, ExecError
from arcbox_vm.manager.oneshot import OneShot, run_once
from arcbox_vm.models import ExecSpec, OutputChunk

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
    vmm: Optional[str] = typer.Option(None, "--vmm", help="auto, qemu or firecracker (default: the config's backend)."),
    memory: Optional[int] = typer.Option(None, "--memory", "-m", min=64, help="Guest memory in MiB (default: the config's)."),
    vcpus: Optional[int] = typer.Option(None, "--vcpus", min=1, max=32, help="Number of vCPUs (default: the config's)."),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE (repeatable); KEY alone copies it from here."),
    workdir: str = typer.Option("", "--workdir", "-w", help="Working directory in the guest."),
    user: str = typer.Option("", "--user", "-u", help="User in the guest: name, uid or uid:gid."),
    timeout: float = typer.Option(0.0, "--timeout", min=0, help="Kill the command (and its children) after S seconds."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Forward this process's stdin."),
    kernel: Optional[Path] = typer.Option(None, "--kernel", help="Kernel to boot instead of the built image's."),
    initrd: Optional[Path] = typer.Option(None, "--initrd", help="Initramfs (with --kernel)."),
    rootfs: Optional[Path] = typer.Option(None, "--rootfs", help="ext4 root filesystem with the agent."),
    boot_args: str = typer.Option("", "--boot-args", help="Kernel command line base (default: the config's)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where images and sandboxes live (default: the config's)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="TOML config, as for `serve` (default: $ARCBOX_VM_CONFIG, else "
                                               "/etc/arcbox-vm/config.toml if present)."),
) -> None:
    """Boot a microVM, run CMD in it, stream its output, remove the VM, exit with CMD's code."""
    err = Console(stderr=True)
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
        cfg = VmmConfig.discover(config)
        overrides: dict[str, object] = {}
        if vmm is not None:
            overrides["backend"] = vmm
        if data_dir is not None:
            overrides["data_dir"] = data_dir
        if overrides:
            cfg = VmmConfig.from_dict({**cfg.model_dump(exclude_unset=True), **overrides})
        try:
            spec = ExecSpec(cmd=cmd, env=_parse_env(env), working_dir=workdir, user=user,  # type: ignore[arg-type]
                            timeout_seconds=timeout)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        job = OneShot(exec=spec, kernel=str(kernel or ""), rootfs=str(rootfs or ""), initrd=str(initrd or ""),
                      vcpus=vcpus or 0, memory_mib=memory or 0, boot_args=boot_args)
        adapters = build_adapters(cfg, one_shot=True)
        result = await run_once(cfg, adapters, job, on_chunk, _stdin_chunks() if interactive else None, progress)
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
