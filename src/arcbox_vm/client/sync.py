"""The blocking API: `Client`, `Sandbox`, `Files`, `ExecSession`.

Thin wrappers that run the async client on a private loop thread (loop.py): the RPCs,
streams, error mapping and ready-waiting exist once, in the async client. Streams come
back as ordinary iterators, and output callbacks run in the caller's thread. Command
options become one ExecSpec at the method the caller called (options.py).

    from arcbox_vm.client import Sandbox
    with Sandbox.create(memory_mib=512) as sb:
        print(sb.run(["uname", "-r"]).stdout)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, Unpack

from arcbox_vm.client.aio_client import AsyncClient
from arcbox_vm.client.aio_exec import AsyncExecSession
from arcbox_vm.client.aio_sandbox import AsyncSandbox
from arcbox_vm.client.collect import OutputCollector
from arcbox_vm.client.connection import Target
from arcbox_vm.client.loop import LoopThread
from arcbox_vm.client.options import Command, ConnectArgs, exec_spec
from arcbox_vm.client.sources import WriteSource
from arcbox_vm.client.sync_snapshots import SyncSnapshotCalls
from arcbox_vm.client.sync_templates import SyncTemplateCalls
from arcbox_vm.client.types import Created, FileStat, Output, OutputCallback, RunResult
from arcbox_vm.errors import GuestFileNotFound
from arcbox_vm.models import (ExecInfo, ExecSpec, PortMapping, SandboxEvent, SandboxInfo, SandboxState, SandboxStats,
                              SandboxSummary)

__all__ = ["Client", "ExecSession", "Files", "Sandbox"]


class Client(SyncSnapshotCalls, SyncTemplateCalls):
    """Blocking counterpart of AsyncClient (same methods, same arguments)."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, host: str | None = None, *,
                 token: str | None = None, tls_ca: str | os.PathLike[str] | None = None, insecure: bool = False,
                 config: str | os.PathLike[str] | None = None, target: Target | None = None,
                 _aio: AsyncClient | None = None) -> None:
        self._loop = LoopThread.shared()
        self.aio = _aio or AsyncClient(socket, host, token=token, tls_ca=tls_ca, insecure=insecure, config=config,
                                       target=target)

    @property
    def target(self) -> Target:
        return self.aio.target

    def close(self) -> None:
        self._loop.run(self.aio.close())

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle ------------------------------------------------------------------

    def create(self, *, id: str | None = None, labels: Mapping[str, str] | None = None, vcpus: int = 0,
               memory_mib: int = 0, kernel: str = "", rootfs: str = "", initrd: str = "", boot_args: str = "",
               network: Literal["tap", "none"] | None = None, ttl_seconds: int = 0,
               env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
               egress: Literal["none", "nat"] | None = None, allow_out: Sequence[str] = (),
               deny_out: Sequence[str] = (), ports: Sequence[PortMapping | str] | None = None,
               template: str = "") -> Created:
        return self._loop.run(self.aio.create(
            id=id, labels=labels, vcpus=vcpus, memory_mib=memory_mib, kernel=kernel, rootfs=rootfs, initrd=initrd,
            boot_args=boot_args, network=network, ttl_seconds=ttl_seconds, env=env, working_dir=working_dir,
            user=user, egress=egress, allow_out=allow_out, deny_out=deny_out, ports=ports, template=template))

    def update_network(self, sandbox_id: str, *, egress: Literal["none", "nat"] | None = None,
                       allow_out: Sequence[str] | None = None, deny_out: Sequence[str] | None = None) -> SandboxInfo:
        """See AsyncClient.update_network."""
        return self._loop.run(self.aio.update_network(sandbox_id, egress=egress, allow_out=allow_out,
                                                      deny_out=deny_out))

    def wait_ready(self, sandbox_id: str, timeout: float | None = 120.0) -> SandboxInfo:
        return self._loop.run(self.aio.wait_ready(sandbox_id, timeout))

    def inspect(self, sandbox_id: str) -> SandboxInfo:
        return self._loop.run(self.aio.inspect(sandbox_id))

    def list(self, state: SandboxState | str | None = None,
             labels: Mapping[str, str] | None = None) -> list[SandboxSummary]:
        return self._loop.run(self.aio.list(state, labels))

    def stop(self, sandbox_id: str, timeout: float | None = None) -> None:
        self._loop.run(self.aio.stop(sandbox_id, timeout))

    def remove(self, sandbox_id: str, force: bool = False) -> None:
        self._loop.run(self.aio.remove(sandbox_id, force))

    def events(self, id: str | None = None, action: str | None = None,
               since: int | None = None) -> Iterator[SandboxEvent]:
        return self._loop.stream(lambda: self.aio.events(id=id, action=action, since=since))

    def logs(self, sandbox_id: str, follow: bool = False) -> Iterator[bytes]:
        return self._loop.stream(lambda: self.aio.logs(sandbox_id, follow))

    def stats(self, ids: list[str] | None = None) -> list[SandboxStats]:
        return self._loop.run(self.aio.stats(ids))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        return self._loop.run(self.aio.health(service, timeout))

    # -- commands -------------------------------------------------------------------

    def run_stream(self, sandbox_id: str, cmd: Command, *, env: Mapping[str, str] | None = None,
                   working_dir: str = "", user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
                   timeout: float | None = None) -> Iterator[Output]:
        return self._run_stream(sandbox_id, exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty,
                                                      tty_size=tty_size, timeout=timeout))

    def _run_stream(self, sandbox_id: str, spec: ExecSpec) -> Iterator[Output]:
        return self._loop.stream(lambda: self.aio._run_stream(sandbox_id, spec))

    def run(self, sandbox_id: str, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
            user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None, timeout: float | None = None,
            on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> RunResult:
        """See AsyncClient.run; callbacks run in this thread."""
        spec = exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty, tty_size=tty_size,
                         timeout=timeout)
        return self._run(sandbox_id, spec, on_stdout, on_stderr)

    def _run(self, sandbox_id: str, spec: ExecSpec, on_stdout: OutputCallback | None = None,
             on_stderr: OutputCallback | None = None) -> RunResult:
        collector = OutputCollector(on_stdout, on_stderr)
        for out in self._run_stream(sandbox_id, spec):
            collector.feed(out)
        return collector.result()

    def exec(self, sandbox_id: str, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
             user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
             timeout: float | None = None) -> "ExecSession":
        return self._exec(sandbox_id, exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty,
                                                tty_size=tty_size, timeout=timeout, stdin=True))

    def _exec(self, sandbox_id: str, spec: ExecSpec) -> "ExecSession":
        return ExecSession(self._loop, self._loop.run(self.aio._exec(sandbox_id, spec)))

    def list_execs(self, sandbox_id: str) -> list[ExecInfo]:
        return self._loop.run(self.aio.list_execs(sandbox_id))

    def start(self, sandbox_id: str, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
              user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
              timeout: float | None = None, stdin: bool = False) -> str:
        """See AsyncClient.start."""
        return self._start(sandbox_id, exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty,
                                                 tty_size=tty_size, timeout=timeout, stdin=stdin))

    def _start(self, sandbox_id: str, spec: ExecSpec) -> str:
        return self._loop.run(self.aio._start(sandbox_id, spec))

    def signal(self, sandbox_id: str, exec_id: str, signal: int = 9) -> None:
        self._loop.run(self.aio.signal(sandbox_id, exec_id, signal))

    def attach(self, sandbox_id: str, exec_id: str) -> "ExecSession":
        """See AsyncClient.attach."""
        return ExecSession(self._loop, self._loop.run(self.aio.attach(sandbox_id, exec_id)))

    # -- files ----------------------------------------------------------------------

    def upload(self, sandbox_id: str, path: str, source: WriteSource, *, mode: int = 0o644, uid: int = -1,
               gid: int = -1, make_parents: bool = False, size: int | None = None) -> int:
        return self._loop.run(self.aio.upload(sandbox_id, path, source, mode=mode, uid=uid, gid=gid,
                                              make_parents=make_parents, size=size))

    def download(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        return self._loop.stream(lambda: self.aio.download(sandbox_id, path))

    def stat(self, sandbox_id: str, path: str) -> FileStat:
        return self._loop.run(self.aio.stat(sandbox_id, path))

    def list_dir(self, sandbox_id: str, path: str) -> list[FileStat]:
        return self._loop.run(self.aio.list_dir(sandbox_id, path))


class ExecSession:
    """Blocking counterpart of AsyncExecSession: iterate for output, then `wait()`."""

    def __init__(self, loop: LoopThread, session: AsyncExecSession) -> None:
        self._loop = loop
        self.aio = session

    def write(self, data: bytes | str) -> None:
        self._loop.run(self.aio.write(data))

    def resize(self, cols: int, rows: int) -> None:
        self._loop.run(self.aio.resize(cols, rows))

    def close_stdin(self) -> None:
        self._loop.run(self.aio.close_stdin())

    def kill(self) -> None:
        self._loop.run(self.aio.kill())

    @property
    def exec_id(self) -> str:
        """See AsyncExecSession.exec_id."""
        return self._loop.run(self.aio.exec_id())

    @property
    def finished(self) -> bool:
        return self.aio.finished

    def __iter__(self) -> Iterator[Output]:
        return self._loop.iterate(self.aio)

    def wait(self, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> RunResult:
        """Read to the end (callbacks in this thread); see AsyncExecSession.wait."""
        collector = OutputCollector(on_stdout, on_stderr)
        for out in self:
            collector.feed(out)
        if self.aio.final is not None:
            collector.feed(self.aio.final)
        return collector.result()

    def __enter__(self) -> "ExecSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class Files:
    """Blocking counterpart of AsyncFiles."""

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._id = sandbox_id

    def write(self, path: str, data: WriteSource, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
              make_parents: bool = True) -> int:
        return self._client.upload(self._id, path, data, mode=mode, uid=uid, gid=gid, make_parents=make_parents)

    def read(self, path: str) -> bytes:
        return b"".join(self._client.download(self._id, path))

    def read_stream(self, path: str) -> Iterator[bytes]:
        return self._client.download(self._id, path)

    def stat(self, path: str) -> FileStat:
        return self._client.stat(self._id, path)

    def list(self, path: str) -> list[FileStat]:
        return self._client.list_dir(self._id, path)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except GuestFileNotFound:
            return False
        return True


class Sandbox:
    """Blocking counterpart of AsyncSandbox; `with` removes the sandbox (force) on exit."""

    def __init__(self, handle: AsyncSandbox) -> None:
        self.aio = handle
        self.client = Client(_aio=handle.client)
        self.id = handle.id
        self.files = Files(self.client, handle.id)
        self._loop = self.client._loop

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, target={str(self.client.target)!r})"

    @classmethod
    def create(cls, *, id: str | None = None, labels: Mapping[str, str] | None = None, vcpus: int = 0,
               memory_mib: int = 0, kernel: str = "", rootfs: str = "", initrd: str = "", boot_args: str = "",
               network: Literal["tap", "none"] | None = None, ttl_seconds: int = 0,
               env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
               egress: Literal["none", "nat"] | None = None, allow_out: Sequence[str] = (),
               deny_out: Sequence[str] = (), ports: Sequence[PortMapping | str] | None = None, wait: bool = True,
               timeout: float | None = 120.0, client: Client | None = None, remove_on_exit: bool = True,
               **connect: Unpack[ConnectArgs]) -> "Sandbox":
        """See AsyncSandbox.create."""
        handle = LoopThread.shared().run(AsyncSandbox.create(
            id=id, labels=labels, vcpus=vcpus, memory_mib=memory_mib, kernel=kernel, rootfs=rootfs, initrd=initrd,
            boot_args=boot_args, network=network, ttl_seconds=ttl_seconds, env=env, working_dir=working_dir,
            user=user, egress=egress, allow_out=allow_out, deny_out=deny_out, ports=ports, wait=wait,
            timeout=timeout, client=client.aio if client else None, remove_on_exit=remove_on_exit, **connect))
        return cls(handle)

    @classmethod
    def connect(cls, sandbox_id: str, *, client: Client | None = None, remove_on_exit: bool = True,
                **connect: Unpack[ConnectArgs]) -> "Sandbox":
        """See AsyncSandbox.connect."""
        handle = LoopThread.shared().run(AsyncSandbox.connect(
            sandbox_id, client=client.aio if client else None, remove_on_exit=remove_on_exit, **connect))
        return cls(handle)

    @property
    def remove_on_exit(self) -> bool:
        return self.aio.remove_on_exit

    @remove_on_exit.setter
    def remove_on_exit(self, value: bool) -> None:
        self.aio.remove_on_exit = value

    def info(self) -> SandboxInfo:
        return self.client.inspect(self.id)

    def wait_ready(self, timeout: float | None = 120.0) -> SandboxInfo:
        return self.client.wait_ready(self.id, timeout)

    def stop(self, timeout: float | None = None) -> None:
        self.client.stop(self.id, timeout)

    def update_network(self, *, egress: Literal["none", "nat"] | None = None, allow_out: Sequence[str] | None = None,
                       deny_out: Sequence[str] | None = None) -> SandboxInfo:
        """See AsyncClient.update_network."""
        return self.client.update_network(self.id, egress=egress, allow_out=allow_out, deny_out=deny_out)

    def remove(self, force: bool = True) -> None:
        self.client.remove(self.id, force)

    def logs(self, follow: bool = False) -> Iterator[bytes]:
        return self.client.logs(self.id, follow)

    def events(self, action: str | None = None, since: int | None = None) -> Iterator[SandboxEvent]:
        return self.client.events(id=self.id, action=action, since=since)

    def close(self) -> None:
        """Remove the sandbox (if remove_on_exit) and close the client if this handle opened it."""
        self._loop.run(self.aio.close())

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
            tty: bool = False, tty_size: tuple[int, int] | None = None, timeout: float | None = None,
            on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> RunResult:
        spec = exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty, tty_size=tty_size,
                         timeout=timeout)
        return self.client._run(self.id, spec, on_stdout, on_stderr)

    def run_stream(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
                   user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
                   timeout: float | None = None) -> Iterator[Output]:
        return self.client._run_stream(self.id, exec_spec(cmd, env=env, working_dir=working_dir, user=user,
                                                          tty=tty, tty_size=tty_size, timeout=timeout))

    def exec(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
             tty: bool = False, tty_size: tuple[int, int] | None = None,
             timeout: float | None = None) -> ExecSession:
        return self.client._exec(self.id, exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty,
                                                    tty_size=tty_size, timeout=timeout, stdin=True))

    def start(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
              tty: bool = False, tty_size: tuple[int, int] | None = None, timeout: float | None = None,
              stdin: bool = False) -> str:
        """See AsyncSandbox.start."""
        return self.client._start(self.id, exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty,
                                                     tty_size=tty_size, timeout=timeout, stdin=stdin))

    def attach(self, exec_id: str) -> ExecSession:
        return self.client.attach(self.id, exec_id)

    def signal(self, exec_id: str, signal: int = 9) -> None:
        self.client.signal(self.id, exec_id, signal)

    def execs(self) -> list[ExecInfo]:
        return self.client.list_execs(self.id)
