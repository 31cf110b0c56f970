"""`AsyncSandbox` and `AsyncFiles`: one sandbox's view of `AsyncClient` (E2B-like).

    async with await AsyncSandbox.create(memory_mib=512) as sb:   # waits until ready
        r = await sb.run(["python3", "-c", "print(1)"])
        await sb.files.write("/tmp/a.txt", b"data")
    # leaving the block removes the sandbox (force) and closes the client it opened

Every method delegates to the client with the id filled in; nothing here talks gRPC.
Command options become one ExecSpec here (options.py) and go to the client's spec-taking
forms. This module imports the client (aio_client.py), never the other way round.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Literal, Unpack

from arcbox_vm.client.aio_client import AsyncClient
from arcbox_vm.client.aio_exec import AsyncExecSession
from arcbox_vm.client.options import Command, ConnectArgs, exec_spec
from arcbox_vm.client.sources import WriteSource
from arcbox_vm.client.types import FileStat, Output, OutputCallback, RunResult
from arcbox_vm.errors import ArcboxError, GuestFileNotFound
from arcbox_vm.models import ExecInfo, PortMapping, SandboxEvent, SandboxInfo

__all__ = ["AsyncFiles", "AsyncSandbox"]


def _client(client: AsyncClient | None, connect: ConnectArgs) -> tuple[AsyncClient, bool]:
    """The given client (not ours to close) or a new one from `connect` (ours)."""
    if client is not None:
        return client, False
    return AsyncClient(**connect), True


class AsyncFiles:
    """Guest files of one sandbox. Paths are absolute guest paths."""

    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        self._client = client
        self._id = sandbox_id

    async def write(self, path: str, data: WriteSource, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
                    make_parents: bool = True) -> int:
        """Write bytes / str / a Path / a binary file / an (async) iterable of bytes to
        `path` atomically (streamed in 1 MiB chunks); returns the number of bytes written."""
        return await self._client.upload(self._id, path, data, mode=mode, uid=uid, gid=gid,
                                         make_parents=make_parents)

    async def read(self, path: str) -> bytes:
        """The whole file in memory; use `read_stream` for big files."""
        return b"".join([chunk async for chunk in self._client.download(self._id, path)])

    def read_stream(self, path: str) -> AsyncIterator[bytes]:
        """The file's contents in chunks, as they arrive."""
        return self._client.download(self._id, path)

    async def stat(self, path: str) -> FileStat:
        return await self._client.stat(self._id, path)

    async def list(self, path: str) -> list[FileStat]:
        """The directory's entries."""
        return await self._client.list_dir(self._id, path)

    async def exists(self, path: str) -> bool:
        try:
            await self._client.stat(self._id, path)
        except GuestFileNotFound:
            return False
        return True


class AsyncSandbox:
    """A handle on one sandbox. `create()` / `connect()` make one; `async with` removes it."""

    def __init__(self, client: AsyncClient, sandbox_id: str, *, owns_client: bool = False,
                 remove_on_exit: bool = True) -> None:
        self.client = client
        self.id = sandbox_id
        self.files = AsyncFiles(client, sandbox_id)
        self.remove_on_exit = remove_on_exit
        self._owns_client = owns_client

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, target={str(self.client.target)!r})"

    @classmethod
    async def create(cls, *, id: str | None = None, labels: Mapping[str, str] | None = None, vcpus: int = 0,
                     memory_mib: int = 0, kernel: str = "", rootfs: str = "", initrd: str = "", boot_args: str = "",
                     network: Literal["tap", "none"] | None = None, ttl_seconds: int = 0,
                     env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
                     egress: Literal["none", "nat"] | None = None, allow_out: Sequence[str] = (),
                     deny_out: Sequence[str] = (), ports: Sequence[PortMapping | str] | None = None,
                     wait: bool = True, timeout: float | None = 120.0,
                     client: AsyncClient | None = None, remove_on_exit: bool = True,
                     **connect: Unpack[ConnectArgs]) -> "AsyncSandbox":
        """Create a sandbox and (wait=True) wait until it is ready, at most `timeout` s.

        If it fails to become ready it is removed and BootFailed / ReadyTimeout raised, so
        nothing leaks. Without `client`, a client is opened from `connect` (socket=,
        host=, token=, ...) and closed with the sandbox."""
        cli, owned = _client(client, connect)
        try:
            waiter = cli.ready_waiter(id) if (wait and id) else None
            if waiter is not None:
                waiter.subscribe()  # before Create: the "ready" event cannot be missed
            try:
                created = await cli.create(id=id, labels=labels, vcpus=vcpus, memory_mib=memory_mib, kernel=kernel,
                                           rootfs=rootfs, initrd=initrd, boot_args=boot_args, network=network,
                                           ttl_seconds=ttl_seconds, env=env, working_dir=working_dir, user=user,
                                           egress=egress, allow_out=allow_out, deny_out=deny_out, ports=ports)
            except BaseException:
                if waiter is not None:
                    waiter.close()
                raise
            sandbox = cls(cli, created.id, owns_client=owned, remove_on_exit=remove_on_exit)
            if wait:
                try:
                    await (waiter or cli.ready_waiter(created.id)).wait(timeout)
                except BaseException:
                    await sandbox._remove_quietly()
                    raise
            return sandbox
        except BaseException:
            if owned:
                await cli.close()
            raise

    @classmethod
    async def connect(cls, sandbox_id: str, *, client: AsyncClient | None = None, remove_on_exit: bool = True,
                      **connect: Unpack[ConnectArgs]) -> "AsyncSandbox":
        """A handle on an existing sandbox (checked with Inspect: SandboxNotFound if unknown)."""
        cli, owned = _client(client, connect)
        try:
            await cli.inspect(sandbox_id)
        except BaseException:
            if owned:
                await cli.close()
            raise
        return cls(cli, sandbox_id, owns_client=owned, remove_on_exit=remove_on_exit)

    # -- lifecycle ------------------------------------------------------------------

    async def info(self) -> SandboxInfo:
        return await self.client.inspect(self.id)

    async def wait_ready(self, timeout: float | None = 120.0) -> SandboxInfo:
        return await self.client.wait_ready(self.id, timeout)

    async def stop(self, timeout: float | None = None) -> None:
        await self.client.stop(self.id, timeout)

    async def update_network(self, *, egress: Literal["none", "nat"] | None = None,
                             allow_out: Sequence[str] | None = None,
                             deny_out: Sequence[str] | None = None) -> SandboxInfo:
        """See AsyncClient.update_network."""
        return await self.client.update_network(self.id, egress=egress, allow_out=allow_out, deny_out=deny_out)

    async def remove(self, force: bool = True) -> None:
        await self.client.remove(self.id, force=force)

    def logs(self, follow: bool = False) -> AsyncIterator[bytes]:
        return self.client.logs(self.id, follow)

    def events(self, action: str | None = None, since: int | None = None) -> AsyncIterator[SandboxEvent]:
        return self.client.events(id=self.id, action=action, since=since)

    async def _remove_quietly(self) -> None:
        # Best effort: already gone is fine, and the caller is handling a failure or leaving.
        with contextlib.suppress(ArcboxError):
            await self.client.remove(self.id, force=True)

    async def close(self) -> None:
        """Remove the sandbox (if remove_on_exit) and close the client if this handle opened it."""
        try:
            if self.remove_on_exit:
                await self._remove_quietly()
        finally:
            if self._owns_client:
                await self.client.close()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- commands -------------------------------------------------------------------

    async def run(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
                  user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
                  timeout: float | None = None, on_stdout: OutputCallback | None = None,
                  on_stderr: OutputCallback | None = None) -> RunResult:
        """Run to the end → RunResult (see AsyncClient.run)."""
        spec = exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty, tty_size=tty_size,
                         timeout=timeout)
        return await self.client._run(self.id, spec, on_stdout, on_stderr)

    def run_stream(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
                   user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
                   timeout: float | None = None) -> AsyncIterator[Output]:
        return self.client._run_stream(self.id, exec_spec(cmd, env=env, working_dir=working_dir, user=user,
                                                          tty=tty, tty_size=tty_size, timeout=timeout))

    async def exec(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
                   user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
                   timeout: float | None = None) -> AsyncExecSession:
        """Interactive command (see AsyncExecSession)."""
        return await self.client._exec(self.id, exec_spec(cmd, env=env, working_dir=working_dir, user=user,
                                                          tty=tty, tty_size=tty_size, timeout=timeout, stdin=True))

    async def start(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
                    user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
                    timeout: float | None = None, stdin: bool = False) -> str:
        """Background command: returns its exec id at once (see AsyncClient.start)."""
        return await self.client._start(self.id, exec_spec(cmd, env=env, working_dir=working_dir, user=user,
                                                           tty=tty, tty_size=tty_size, timeout=timeout,
                                                           stdin=stdin))

    async def attach(self, exec_id: str) -> AsyncExecSession:
        """Attach to a background or detached command; leaving detaches (see AsyncClient.attach)."""
        return await self.client.attach(self.id, exec_id)

    async def signal(self, exec_id: str, signal: int = 9) -> None:
        await self.client.signal(self.id, exec_id, signal)

    async def execs(self) -> list[ExecInfo]:
        """Every command run in this sandbox, with exec id, status and exit code."""
        return await self.client.list_execs(self.id)

