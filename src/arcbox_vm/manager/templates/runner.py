"""The build sandbox: a real sandbox a template's steps run in.

One sandbox runs consecutive RUN/COPY steps (a boot per build, not per step); after each
step its disk is kept as a layer: `sync` in the guest, the VMM paused, the disk copied,
the VMM resumed (the same consistency a checkpoint has; the next boot replays the
journal). The finishing sandbox is booted afresh from the final layer — so a template is
the same whether its layers came from the cache or not — and gets START, READY and the
checkpoint. Build sandboxes are ordinary sandboxes (listed while the build runs, with the
label `arcbox.template-build`), always removed at the end, failed or not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import time
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import Any, Protocol

from arcbox_vm.errors import ArcboxError, BootFailed
from arcbox_vm.manager import checkpoints as ckpts
from arcbox_vm.manager.context import ManagerContext
from arcbox_vm.manager.templates import layers, unpack
from arcbox_vm.manager.templates.records import BUILD_LABEL
from arcbox_vm.models import ExecSpec, SandboxNetworkSpec, SandboxSpec
from arcbox_vm.templates.models import BuildProgress

RUN_TIMEOUT_S = 3600.0  # one RUN step at most
READY_POLL_S = 0.5
OUTPUT_TAIL = 8192  # bytes of a failing command's output kept for the error
BOOT_TIMEOUT_S = 300.0


class SandboxOps(Protocol):
    """The `SandboxManager` calls a build uses (the facade: validation and records included)."""

    async def create_sandbox(self, spec: SandboxSpec | None = None) -> tuple[str, str]: ...
    async def wait_ready(self, sandbox_id: str, timeout: float = 120) -> Any: ...
    async def run_in_sandbox(self, sandbox_id: str, cmd: Any) -> Any: ...
    async def start_exec(self, sandbox_id: str, cmd: Any) -> str: ...
    def list_execs(self, sandbox_id: str) -> list[Any]: ...
    async def attach_exec(self, sandbox_id: str, exec_id: str) -> Any: ...
    async def write_file(self, sandbox_id: str, path: str, data: AsyncIterable[bytes], **kw: Any) -> int: ...
    async def stat_path(self, sandbox_id: str, path: str) -> Any: ...
    async def remove_sandbox(self, sandbox_id: str, force: bool = False) -> None: ...


class StepFailed(Exception):
    """A step's command failed: why, its exit code (None if it was not a command) and output."""

    def __init__(self, reason: str, exit_code: int | None = None, output: str = "") -> None:
        super().__init__(reason)
        self.exit_code = exit_code
        self.output = output


Progress = Callable[[BuildProgress], None]


class BuildSandbox:
    """One sandbox of a build, booted from a layer (or the base disk)."""

    def __init__(self, ctx: ManagerContext, ops: SandboxOps, template: str, *, memory_mib: int, vcpus: int,
                 network_mode: str, egress: str, progress: Progress) -> None:
        self.ctx, self.ops, self.template = ctx, ops, template
        self.memory_mib, self.vcpus = memory_mib, vcpus
        self.network_mode, self.egress = network_mode, egress
        self.progress = progress
        self.id = ""
        self._step = (0, 0)

    def at(self, step: int, total: int) -> None:
        self._step = (step, total)

    async def boot(self, disk: Path, env: dict[str, str] | None = None, working_dir: str = "",
                   user: str = "") -> None:
        net = SandboxNetworkSpec(mode=self.network_mode, egress=self.egress) if self.network_mode == "tap" \
            else SandboxNetworkSpec(mode="none")
        sid = f"tb-{secrets.token_hex(6)}"
        spec = SandboxSpec(id=sid, labels={BUILD_LABEL: self.template}, rootfs=str(disk), memory_mib=self.memory_mib,
                           vcpus=self.vcpus, network=net, env=dict(env or {}), working_dir=working_dir, user=user)
        self.id, _ = await self.ops.create_sandbox(spec)
        try:
            await self.ops.wait_ready(self.id, BOOT_TIMEOUT_S)
        except (BootFailed, asyncio.TimeoutError) as exc:
            raise StepFailed(f"the build sandbox did not boot: {exc or 'timed out'}") from None

    async def remove(self) -> None:
        sid, self.id = self.id, ""
        if sid:
            with contextlib.suppress(ArcboxError):
                await self.ops.remove_sandbox(sid, force=True)

    async def _collect(self, stream: Any, echo: bool = True) -> tuple[int | None, str]:
        tail: collections.deque[bytes] = collections.deque()
        size = 0
        code: int | None = None
        step, total = self._step
        async for chunk in stream:
            if chunk.stream in ("stdout", "stderr"):
                if echo:
                    self.progress(BuildProgress("output", step, total, data=chunk.data, stream=chunk.stream))
                tail.append(chunk.data)
                size += len(chunk.data)
                while size - len(tail[0]) >= OUTPUT_TAIL and len(tail) > 1:
                    size -= len(tail.popleft())
            elif chunk.stream == "exit":
                code = chunk.exit_code
            else:
                raise StepFailed(f"the command could not finish: {chunk.data.decode(errors='replace')}", None,
                                 b"".join(tail)[-OUTPUT_TAIL:].decode(errors="replace"))
        return code, b"".join(tail)[-OUTPUT_TAIL:].decode(errors="replace")

    async def run(self, argv: tuple[str, ...], *, env: dict[str, str], working_dir: str, user: str,
                  echo: bool = True, timeout: float = RUN_TIMEOUT_S) -> None:
        """Run a command to its end; StepFailed with its exit code and output unless it exits 0."""
        if working_dir not in ("", "/"):
            await self._root(["mkdir", "-p", "--", working_dir])
        spec = ExecSpec(cmd=tuple(argv), env=env, working_dir=working_dir or "/", user=user, timeout_seconds=timeout)
        try:
            stream = await self.ops.run_in_sandbox(self.id, spec)
        except ArcboxError as exc:
            raise StepFailed(f"the command could not start: {exc}") from None
        code, output = await self._collect(stream, echo)
        if code != 0:
            raise StepFailed("the command failed" if code != 124 else "the command timed out", code, output)

    async def _root(self, argv: list[str]) -> None:
        spec = ExecSpec(cmd=tuple(argv), user="root", working_dir="/", timeout_seconds=600)
        code, output = await self._collect(await self.ops.run_in_sandbox(self.id, spec), echo=False)
        if code != 0:
            raise StepFailed(f"{' '.join(argv[:2])} failed: {output.strip()[-500:]}", code, output)

    async def copy(self, archive: bytes, tops: list[str], chown: str) -> None:
        """Unpack a COPY's tar of guest paths at / (existing directories keep their owner and
        mode); with --chown, the copied paths change owner. With the image's tar, else its
        python3 or the agent's runtime (unpack.py): an image without tar can be COPYed into."""
        tmp = f"/tmp/.arcbox-copy-{secrets.token_hex(4)}.tar"

        async def data() -> AsyncIterable[bytes]:
            for i in range(0, len(archive), 1 << 20):
                yield archive[i:i + (1 << 20)]

        try:
            await self.ops.write_file(self.id, tmp, data(), mode=0o600, size=len(archive), make_parents=True)
        except ArcboxError as exc:
            raise StepFailed(f"copying into the build sandbox failed: {exc}") from None
        try:
            argv, did_all = await unpack.extract_argv(self._exists, tmp, chown, tops)
        except LookupError as exc:
            raise StepFailed(str(exc)) from None
        await self._root(argv)
        if not did_all:
            await self._root(["rm", "-f", "--", tmp])
            if chown:
                await self._root(["chown", "-R", "--", chown, *tops])

    async def _exists(self, path: str) -> bool:
        try:
            await self.ops.stat_path(self.id, path)
        except ArcboxError:
            return False
        return True

    async def save_layer(self, key: str, parent: str, text: str) -> Path:
        """The sandbox's disk as layer `key`: synced in the guest, copied while the VM is paused."""
        await self._root(["sync"])
        sb = self.ctx.get(self.id)
        proc = ckpts.snapshot_process(self.ctx, sb, restorable=False)
        async with sb.lock:
            await proc.pause()
            try:
                return await layers.add(self.ctx, key, parent, text, sb.workdir / "rootfs.ext4")
            finally:
                await proc.resume()

    async def start(self, argv: tuple[str, ...], *, env: dict[str, str], working_dir: str, user: str) -> str:
        if working_dir not in ("", "/"):
            await self._root(["mkdir", "-p", "--", working_dir])
        spec = ExecSpec(cmd=tuple(argv), env=env, working_dir=working_dir or "/", user=user)
        try:
            return await self.ops.start_exec(self.id, spec)
        except ArcboxError as exc:
            raise StepFailed(f"START could not start: {exc}") from None

    async def wait_ready(self, argv: tuple[str, ...], *, env: dict[str, str], working_dir: str, user: str,
                         timeout: float, start_exec: str) -> int:
        """Poll READY until it exits 0 (returns the attempts); StepFailed when START ends
        first (its exit code and output) or `timeout` passes (READY's last output)."""
        deadline = time.monotonic() + timeout
        attempts = 0
        last: tuple[int | None, str] = (None, "")
        while True:
            if start_exec:
                await self._start_still_running(start_exec)
            attempts += 1
            spec = ExecSpec(cmd=tuple(argv), env=env, working_dir=working_dir or "/", user=user,
                            timeout_seconds=max(1.0, min(30.0, deadline - time.monotonic())))
            try:
                last = await self._collect(await self.ops.run_in_sandbox(self.id, spec), echo=False)
            except ArcboxError as exc:
                raise StepFailed(f"READY could not run: {exc}") from None
            if last[0] == 0:
                return attempts
            if time.monotonic() >= deadline:
                raise StepFailed(f"READY did not succeed within {timeout:g} s ({attempts} attempts; the last "
                                 f"exited {last[0]})", last[0], last[1])
            await asyncio.sleep(READY_POLL_S)

    async def _start_still_running(self, exec_id: str) -> None:
        info = next((e for e in self.ops.list_execs(self.id) if e.exec_id == exec_id), None)
        if info is None or info.status in ("running", "detached"):  # detached = held, nobody attached
            return
        output = ""
        with contextlib.suppress(ArcboxError):
            att = await self.ops.attach_exec(self.id, exec_id)
            out, err, _ = await att.collect()
            output = (out + err)[-OUTPUT_TAIL:].decode(errors="replace")
        raise StepFailed("START exited before READY succeeded", info.exit_code, output)

    async def checkpoint(self, name: str, owner: str) -> ckpts.Checkpoint:
        return await ckpts.create(self.ctx, self.ctx.get(self.id), name, hidden=True, owner=owner)
