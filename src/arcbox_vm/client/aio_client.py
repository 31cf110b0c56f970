"""`AsyncClient`: every RPC of sandbox.v1, typed, with errors mapped to exceptions.

This is the one place that speaks protobuf; `AsyncSandbox` (a sandbox-bound view) and
the sync API (`arcbox_vm.client.sync`) are thin layers over it. Import it from
`arcbox_vm.client` or `arcbox_vm.client.aio`.

Commands: each public method takes the exec options as keywords and turns them into one
`ExecSpec` (options.py); the `_run` / `_run_stream` / `_exec` / `_start` forms take that
spec and are what AsyncSandbox and the sync API call.

    async with AsyncClient() as client:                       # target: see connection.py
        created = await client.create(memory_mib=512)
        await client.wait_ready(created.id)
        result = await client.run(created.id, ["uname", "-r"])
"""

from __future__ import annotations

import asyncio
import inspect as _inspect
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import grpc

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from arcbox_vm.client.aio_snapshots import SnapshotCalls
from arcbox_vm.client.aio_templates import TemplateCalls
from arcbox_vm.client.aio_exec import AsyncExecSession
from arcbox_vm.client.collect import OutputCollector
from arcbox_vm.client.connection import Target, resolve_target
from arcbox_vm.client.convert import (
    created_from_pb,
    event_from_pb,
    exec_info_from_pb,
    exec_request_to_pb,
    file_stat_from_pb,
    info_from_pb,
    network_spec_to_pb,
    network_update_to_pb,
    output_from_pb,
    ports_to_pb,
    stats_from_pb,
    str_map,
    summary_from_pb,
    timeout_to_pb,
)
from arcbox_vm.client.errors import RpcKind, from_rpc_error
from arcbox_vm.client.options import Command, exec_spec
from arcbox_vm.client.ready import ReadyWaiter
from arcbox_vm.client.sources import WriteSource, check_source, iter_chunks, source_size
from arcbox_vm.client.types import Created, FileStat, Output, OutputCallback, RunResult
from arcbox_vm.errors import ArcboxError
from arcbox_vm.models import (ExecInfo, ExecSpec, PortMapping, SandboxEvent, SandboxInfo, SandboxState, SandboxStats,
                              SandboxSummary)

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient(SnapshotCalls, TemplateCalls):
    """A connection to the arcbox-vm daemon. Cheap to create; the channel opens on first
    use, inside the event loop that uses it (grpc.aio channels are bound to one loop)."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, host: str | None = None, *,
                 token: str | None = None, tls_ca: str | os.PathLike[str] | None = None, insecure: bool = False,
                 config: str | os.PathLike[str] | None = None, target: Target | None = None) -> None:
        self.target = target or resolve_target(socket, host, token=token, tls_ca=tls_ca, insecure=insecure,
                                               config=config)
        self._channel: grpc.aio.Channel | None = None
        self._stub_: pb_grpc.SandboxServiceStub | None = None

    # -- plumbing -------------------------------------------------------------------

    def _open_channel(self) -> grpc.aio.Channel:
        if self._channel is None or self._stub_ is None:
            self._channel = self.target.aio_channel()
            self._stub_ = pb_grpc.SandboxServiceStub(self._channel)
        return self._channel

    @property
    def _stub(self) -> pb_grpc.SandboxServiceStub:
        self._open_channel()
        assert self._stub_ is not None
        return self._stub_

    async def close(self) -> None:
        """Close the channel (ongoing calls are cancelled)."""
        channel, self._channel, self._stub_ = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _error(self, exc: grpc.RpcError, kind: RpcKind, sandbox_id: str, path: str = "") -> Exception:
        return from_rpc_error(exc, kind=kind, sandbox_id=sandbox_id, path=path, target=str(self.target))

    async def _unary(self, method: Any, request: Any, *, sandbox_id: str = "", kind: RpcKind = "sandbox",
                     path: str = "", timeout: float | None = None) -> Any:
        try:
            return await method(request, metadata=self.target.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, kind, sandbox_id, path) from None

    async def _stream(self, call: Any, *, sandbox_id: str = "", kind: RpcKind = "sandbox",
                      path: str = "") -> AsyncIterator[Any]:
        """Iterate a server stream; errors mapped; the call is cancelled if the caller stops early."""
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, kind, sandbox_id, path) from None
        finally:
            call.cancel()

    # -- lifecycle ------------------------------------------------------------------

    async def create(self, *, id: str | None = None, labels: Mapping[str, str] | None = None, vcpus: int = 0,
                     memory_mib: int = 0, kernel: str = "", rootfs: str = "", initrd: str = "",
                     boot_args: str = "", network: Literal["tap", "none"] | None = None, ttl_seconds: int = 0,
                     env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
                     egress: Literal["none", "nat"] | None = None, allow_out: Sequence[str] = (),
                     deny_out: Sequence[str] = (), ports: Sequence[PortMapping | str] | None = None,
                     template: str = "") -> Created:
        """Register a sandbox and start booting it; returns at once (state "starting").
        Zero / empty values take the daemon's defaults. Use `wait_ready` to wait for boot.
        egress "none" reaches only `allow_out` (IPv4 CIDRs), "nat" anything through NAT
        (None = the daemon's default); `deny_out` wins over both.
        `ports`: guest TCP ports to forward from the host, as PortMapping or Docker's `-p`
        strings ("8080:80", "127.0.0.1::80"); `inspect(...).ports` shows the host ports chosen.
        `template`: a template's name (`build_template`): the sandbox is a restore of it, its
        service already running (leave vcpus, memory, kernel, rootfs and ports unset)."""
        request = pb.CreateSandboxRequest(
            id=id or "", labels=str_map(labels), kernel=os.fspath(kernel), rootfs=os.fspath(rootfs),
            initrd=os.fspath(initrd), boot_args=boot_args,
            limits=pb.ResourceLimits(vcpus=vcpus, memory_mib=memory_mib), env=str_map(env),
            working_dir=working_dir, user=user, ttl_seconds=ttl_seconds,
            network=network_spec_to_pb(network, egress, allow_out, deny_out), ports=ports_to_pb(ports),
            template=template,
        )
        return created_from_pb(await self._unary(self._stub.Create, request, sandbox_id=id or ""))

    async def update_network(self, sandbox_id: str, *, egress: Literal["none", "nat"] | None = None,
                             allow_out: Sequence[str] | None = None,
                             deny_out: Sequence[str] | None = None) -> SandboxInfo:
        """Change the sandbox's egress policy at once; None keeps that part, a list (even
        empty) replaces it. Returns the sandbox with its new policy (`info.network`)."""
        request = network_update_to_pb(sandbox_id, egress, allow_out, deny_out)
        return info_from_pb(await self._unary(self._stub.UpdateNetwork, request, sandbox_id=sandbox_id))

    def ready_waiter(self, sandbox_id: str) -> ReadyWaiter:
        """A waiter to `subscribe()` before Create and `wait()` after (see ready.py)."""
        return ReadyWaiter(self, sandbox_id)

    async def wait_ready(self, sandbox_id: str, timeout: float | None = 120.0) -> SandboxInfo:
        """Wait until the sandbox is ready; BootFailed if it fails, ReadyTimeout after `timeout` s."""
        return await ReadyWaiter(self, sandbox_id).wait(timeout)

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        return info_from_pb(await self._unary(self._stub.Inspect, pb.InspectSandboxRequest(id=sandbox_id),
                                              sandbox_id=sandbox_id))

    async def list(self, state: SandboxState | str | None = None,
                   labels: Mapping[str, str] | None = None) -> list[SandboxSummary]:
        """Sandboxes in `state` (any if None) carrying every label pair in `labels`."""
        request = pb.ListSandboxesRequest(state=str(state or ""), labels=str_map(labels))
        response = await self._unary(self._stub.List, request)
        return [summary_from_pb(s) for s in response.sandboxes]

    async def stop(self, sandbox_id: str, timeout: float | None = None) -> None:
        """Halt the guest (up to `timeout` s, the daemon's default 30 if None), then kill the VM."""
        request = pb.StopSandboxRequest(id=sandbox_id, timeout_seconds=timeout_to_pb(timeout))
        await self._unary(self._stub.Stop, request, sandbox_id=sandbox_id)

    async def remove(self, sandbox_id: str, force: bool = False) -> None:
        """Remove the sandbox; one running a command needs force=True."""
        await self._unary(self._stub.Remove, pb.RemoveSandboxRequest(id=sandbox_id, force=force),
                          sandbox_id=sandbox_id)

    def events(self, id: str | None = None, action: str | None = None,
               since: int | None = None) -> AsyncIterator[SandboxEvent]:
        """Lifecycle events, forever (filtered by sandbox id and/or action): the request is
        sent at this call, not at the first `anext`, and the daemon subscribes when it
        receives it — or, with `since`, every retained event after that event id first
        (0 = the whole log). To act only once the subscription is live (so that an event
        you cause next cannot be missed), use `await subscribe(...)`. Must be called inside
        the event loop that iterates it."""
        return _mapped(self._stream(self._events_call(id, action, since), sandbox_id=id or ""), event_from_pb)

    async def subscribe(self, id: str | None = None, action: str | None = None,
                        since: int | None = None) -> AsyncIterator[SandboxEvent]:
        """Like `events`, but returns only once the daemon says the subscription is live:
        every event after this returns is delivered."""
        call = self._events_call(id, action, since)
        await call.initial_metadata()  # the daemon sends it once subscribed (arcbox-events-subscribed)
        return _mapped(self._stream(call, sandbox_id=id or ""), event_from_pb)

    def _events_call(self, id: str | None, action: str | None, since: int | None):  # noqa: ANN202
        request = pb.SandboxEventsRequest(id=id or "", action=action or "")
        if since is not None:
            request.since = since
        return self._stub.Events(request, metadata=self.target.metadata)

    async def stats(self, ids: list[str] | None = None) -> list[SandboxStats]:
        """Resource use of the sandboxes `ids` (SandboxNotFound for an unknown one), or of
        every sandbox whose VM runs: CPU seconds, memory, I/O bytes, processes, read now.
        CPU % = the difference of cpu_seconds between two calls / the time between them."""
        ids = list(ids or ())
        response = await self._unary(self._stub.Stats, pb.StatsRequest(ids=ids),
                                     sandbox_id=ids[0] if len(ids) == 1 else "")
        return [stats_from_pb(m) for m in response.sandboxes]

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The daemon's gRPC health status ("SERVING", "NOT_SERVING", ...) for `service`
        ("" = the daemon as a whole); DaemonUnavailable when it cannot be reached."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # only the health command needs it

        stub = health_pb2_grpc.HealthStub(self._open_channel())
        response = await self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def logs(self, sandbox_id: str, follow: bool = False) -> AsyncIterator[bytes]:
        """The VM's serial console so far; with follow, then new output until the sandbox is gone."""
        call = self._stub.Logs(pb.LogsRequest(id=sandbox_id, follow=follow), metadata=self.target.metadata)
        return _mapped(self._stream(call, sandbox_id=sandbox_id), lambda m: m.data)

    # -- commands -------------------------------------------------------------------

    def run_stream(self, sandbox_id: str, cmd: Command, *, env: Mapping[str, str] | None = None,
                   working_dir: str = "", user: str = "", tty: bool = False,
                   tty_size: tuple[int, int] | None = None,
                   timeout: float | None = None) -> AsyncIterator[Output]:
        """Start `cmd` without stdin now; yields its output as it comes, ending with "exit" or
        "error". timeout (s): the whole process group is killed then (the end says timed_out)."""
        return self._run_stream(sandbox_id, exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty,
                                                      tty_size=tty_size, timeout=timeout))

    def _run_stream(self, sandbox_id: str, spec: ExecSpec) -> AsyncIterator[Output]:
        call = self._stub.Run(exec_request_to_pb(pb.RunRequest, sandbox_id, spec), metadata=self.target.metadata)
        return _mapped(self._stream(call, sandbox_id=sandbox_id, kind="exec"), output_from_pb)

    async def run(self, sandbox_id: str, cmd: Command, *, env: Mapping[str, str] | None = None,
                  working_dir: str = "", user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
                  timeout: float | None = None, on_stdout: OutputCallback | None = None,
                  on_stderr: OutputCallback | None = None) -> RunResult:
        """Run `cmd` to the end. A non-zero exit is a result, not an exception; CommandError
        if it ended without an exit status. Callbacks (sync or async) get output as it comes."""
        spec = exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty, tty_size=tty_size,
                         timeout=timeout)
        return await self._run(sandbox_id, spec, on_stdout, on_stderr)

    async def _run(self, sandbox_id: str, spec: ExecSpec, on_stdout: OutputCallback | None = None,
                   on_stderr: OutputCallback | None = None) -> RunResult:
        collector = OutputCollector(on_stdout, on_stderr)
        async for out in self._run_stream(sandbox_id, spec):
            pending = collector.feed(out)
            if _inspect.isawaitable(pending):
                await pending
        return collector.result()

    async def exec(self, sandbox_id: str, cmd: Command, *, env: Mapping[str, str] | None = None,
                   working_dir: str = "", user: str = "", tty: bool = False,
                   tty_size: tuple[int, int] | None = None, timeout: float | None = None) -> AsyncExecSession:
        """Start an interactive command: write stdin, resize, close stdin, read output, wait.
        Errors the daemon reports at start (unknown sandbox, command not found) are raised
        by the first read or `wait()`."""
        return await self._exec(sandbox_id, exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty,
                                                      tty_size=tty_size, timeout=timeout, stdin=True))

    async def _exec(self, sandbox_id: str, spec: ExecSpec) -> AsyncExecSession:
        return await self._open_exec(sandbox_id, pb.ExecInput(init=exec_request_to_pb(pb.ExecRequest, sandbox_id,
                                                                                       spec)))

    async def _open_exec(self, sandbox_id: str, first: pb.ExecInput) -> AsyncExecSession:
        """An Exec stream whose first message is `first` (init or attach)."""
        call = self._stub.Exec(metadata=self.target.metadata)
        session = AsyncExecSession(call, lambda exc: self._error(exc, "exec", sandbox_id))
        await session._send(first)
        return session

    async def list_execs(self, sandbox_id: str) -> list[ExecInfo]:
        """Every command run in the sandbox, oldest first, with its exec id and status."""
        resp = await self._unary(self._stub.ListExecs, pb.ListExecsRequest(id=sandbox_id), sandbox_id=sandbox_id)
        return [exec_info_from_pb(m, sandbox_id) for m in resp.execs]

    async def start(self, sandbox_id: str, cmd: Command, *, env: Mapping[str, str] | None = None,
                    working_dir: str = "", user: str = "", tty: bool = False,
                    tty_size: tuple[int, int] | None = None, timeout: float | None = None,
                    stdin: bool = False) -> str:
        """Start `cmd` in the background; returns its exec id at once. The daemon reads its
        output (keeping the newest 1 MiB while nobody is attached); `attach` streams it,
        `signal` stops it, `list_execs` shows its status and exit code."""
        return await self._start(sandbox_id, exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty,
                                                       tty_size=tty_size, timeout=timeout, stdin=stdin))

    async def _start(self, sandbox_id: str, spec: ExecSpec) -> str:
        resp = await self._unary(self._stub.Start, exec_request_to_pb(pb.StartRequest, sandbox_id, spec),
                                 sandbox_id=sandbox_id, kind="exec")
        return resp.exec_id

    async def signal(self, sandbox_id: str, exec_id: str, signal: int = 9) -> None:
        """Send `signal` (default SIGKILL) to a running command's process group."""
        await self._unary(self._stub.Signal, pb.SignalRequest(id=sandbox_id, exec_id=str(exec_id), signal=int(signal)),
                          sandbox_id=sandbox_id)

    async def attach(self, sandbox_id: str, exec_id: str) -> AsyncExecSession:
        """Attach to a background command (`start`) or one that kept running while the
        daemon was away ("detached" in `list_execs`): the output kept meanwhile, the rest
        and its exit; stdin/resize work if it has them. Ending the session (`kill()`,
        leaving `async with`) only detaches: the command runs on; stop it with `signal`."""
        return await self._open_exec(sandbox_id,
                                     pb.ExecInput(attach=pb.AttachRequest(id=sandbox_id, exec_id=str(exec_id))))

    # -- files ----------------------------------------------------------------------

    async def upload(self, sandbox_id: str, path: str, source: WriteSource, *, mode: int = 0o644, uid: int = -1,
                     gid: int = -1, make_parents: bool = False, size: int | None = None) -> int:
        """Write `source` (see sources.py) to the guest `path`, atomically; returns the size.
        Streams 1 MiB chunks, so any file size works in constant memory."""
        check_source(source)
        expected = source_size(source) if size is None else size
        header = pb.UploadHeader(id=sandbox_id, path=path, mode=mode, uid=uid, gid=gid, make_parents=make_parents,
                                 size=expected or 0)
        # grpc.aio answers an exception inside the request iterator by cancelling the call
        # (the caller would see a bare CancelledError): keep it and raise it instead.
        source_failed: list[BaseException] = []

        async def requests() -> AsyncIterator[pb.UploadRequest]:
            yield pb.UploadRequest(header=header)
            try:
                async for chunk in iter_chunks(source):
                    yield pb.UploadRequest(data=chunk)
            except Exception as exc:
                source_failed.append(exc)
                raise
            yield pb.UploadRequest(done=True)  # commit: only a complete upload is written

        try:
            response = await self._unary(self._stub.UploadFile, requests(), sandbox_id=sandbox_id, kind="file",
                                         path=path)
        except (asyncio.CancelledError, ArcboxError):
            if source_failed:
                raise source_failed[0] from None
            raise
        return int(response.size)

    def download(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        """The guest file's contents in chunks, as they arrive."""
        call = self._stub.DownloadFile(pb.DownloadRequest(id=sandbox_id, path=path), metadata=self.target.metadata)
        return _mapped(self._stream(call, sandbox_id=sandbox_id, kind="file", path=path), lambda m: m.data,
                       skip_empty=True)

    async def stat(self, sandbox_id: str, path: str) -> FileStat:
        m = await self._unary(self._stub.StatPath, pb.StatRequest(id=sandbox_id, path=path), sandbox_id=sandbox_id,
                              kind="file", path=path)
        return file_stat_from_pb(m)

    async def list_dir(self, sandbox_id: str, path: str) -> list[FileStat]:
        m = await self._unary(self._stub.ListDir, pb.ListDirRequest(id=sandbox_id, path=path),
                              sandbox_id=sandbox_id, kind="file", path=path)
        return [file_stat_from_pb(e) for e in m.entries]


async def _mapped(messages: AsyncIterator[Any], convert: Callable[[Any], T], *,
                  skip_empty: bool = False) -> AsyncIterator[T]:
    """`convert` each message; closing this closes (and so cancels) the underlying stream."""
    try:
        async for message in messages:
            value = convert(message)
            if not (skip_empty and not value):
                yield value
    finally:
        await messages.aclose()  # type: ignore[attr-defined]
