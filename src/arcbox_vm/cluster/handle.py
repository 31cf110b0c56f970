"""`FleetSandbox`: a handle on one sandbox of the fleet, with the methods of the client's
`Sandbox` (run, run_stream, exec, start, attach, signal, execs, files, stop, remove,
info/inspect, wait_ready, logs, update_network). Every call goes to the node service of
the sandbox's node (fleet.py routes it). Handles pickle as (id, node, namespace): one
sent into a Ray task or actor works there, through that process's Ray connection."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from arcbox_vm.client.collect import OutputCollector
from arcbox_vm.client.options import Command, exec_spec
from arcbox_vm.client.types import FileStat, Output, OutputCallback, RunResult
from arcbox_vm.errors import GuestFileNotFound, InvalidArgument
from arcbox_vm.models import ExecInfo, SandboxInfo

# calls that change nothing: safe to repeat when Ray cancelled the first try
_READS = frozenset({"inspect", "wait_ready", "list_execs", "stat", "list_dir", "stats"})

if TYPE_CHECKING:
    from arcbox_vm.cluster.router import Router

__all__ = ["FleetExecSession", "FleetFiles", "FleetSandbox"]

CHUNK = 1 << 20
ONE_CALL_MAX = 8 << 20  # bytes written in one call up to this size; bigger ones are streamed


def _restore(sandbox_id: str, node: str, namespace: str) -> "FleetSandbox":
    from arcbox_vm.cluster.router import Router

    return FleetSandbox(Router.current(namespace), sandbox_id, node)


class FleetExecSession:
    """An interactive or attached command (see the client's ExecSession): iterate for
    output, then `wait()`; write / resize / close_stdin / kill."""

    def __init__(self, fleet: "Router", node: str, key: str) -> None:
        self._fleet, self._node, self._key = fleet, node, key
        self._reader: Iterator[Output] | None = None
        self.final: Output | None = None
        self._eof = False
        self._killed = False

    def _op(self, op: str, *args: Any) -> Any:
        return self._fleet._call(self._node, lambda a: a.exec_op.remote(self._key, op, *args))

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        if data:
            self._op("write", bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        self._op("resize", cols, rows)

    def close_stdin(self) -> None:
        self._op("close_stdin")

    def kill(self) -> None:
        if not self.finished and not self._killed:
            self._killed = True
            self._op("kill")

    @property
    def exec_id(self) -> str:
        return self._op("exec_id")

    @property
    def finished(self) -> bool:
        return self.final is not None or self._eof

    def __iter__(self) -> Iterator[Output]:
        if self._reader is None:
            self._reader = self._fleet._stream(self._node, lambda a: a.exec_read.remote(self._key))
        for out in self._reader:
            if out.stream in ("stdout", "stderr"):
                yield out
            else:
                self.final = out
        self._eof = True

    def wait(self, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> RunResult:
        collector = OutputCollector(on_stdout, on_stderr)
        for out in self:
            collector.feed(out)
        if self.final is not None:
            collector.feed(self.final)
        return collector.result()

    def __enter__(self) -> "FleetExecSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _chunks(data: Any) -> Iterator[bytes]:
    """bytes / str / a Path / a binary file / an iterable of bytes, as chunks."""
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i:i + CHUNK])
        return
    if isinstance(data, os.PathLike):
        with open(data, "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")
        return
    if isinstance(data, io.IOBase) or hasattr(data, "read"):
        yield from iter(lambda: data.read(CHUNK), b"")
        return
    if isinstance(data, Iterable):
        for chunk in data:
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise InvalidArgument(f"upload chunks must be bytes, got {type(chunk).__name__}")
            yield bytes(chunk)
        return
    raise InvalidArgument(f"cannot write {type(data).__name__}: give bytes, str, a Path, a binary file or "
                          "an iterable of bytes")


class FleetFiles:
    """Guest files of one sandbox of the fleet (see the client's Files)."""

    def __init__(self, sandbox: "FleetSandbox") -> None:
        self._sb = sandbox

    def write(self, path: str, data: Any, *, mode: int = 0o644, uid: int = -1, gid: int = -1,
              make_parents: bool = True) -> int:
        sb = self._sb
        opts = {"mode": mode, "uid": uid, "gid": gid, "make_parents": make_parents}
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) <= ONE_CALL_MAX:
            return sb._call(lambda a: a.upload.remote(sb.id, path, bytes(data), opts))
        key = sb._call(lambda a: a.upload_open.remote(sb.id, path, opts))
        try:
            for chunk in _chunks(data):
                sb._call(lambda a, c=chunk: a.upload_chunk.remote(key, c))
        except BaseException:
            sb._call(lambda a: a.upload_close.remote(key, True))
            raise
        return sb._call(lambda a: a.upload_close.remote(key))

    def read(self, path: str) -> bytes:
        return b"".join(self.read_stream(path))

    def read_stream(self, path: str) -> Iterator[bytes]:
        return self._sb._stream(lambda a: a.download.remote(self._sb.id, path))

    def stat(self, path: str) -> FileStat:
        return self._sb._unary("stat", path)

    def list(self, path: str) -> list[FileStat]:
        return self._sb._unary("list_dir", path)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except GuestFileNotFound:
            return False
        return True


class FleetSandbox:
    """A sandbox of the fleet; `with` removes it (force) on exit unless remove_on_exit=False."""

    def __init__(self, fleet: "Router", sandbox_id: str, node: str, *, remove_on_exit: bool = True) -> None:
        self.fleet = fleet
        self.id = sandbox_id
        self.node = node
        self.files = FleetFiles(self)
        self.remove_on_exit = remove_on_exit

    def __repr__(self) -> str:
        return f"FleetSandbox(id={self.id!r}, node={self.node!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self.id, self.node, self.fleet.namespace))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FleetSandbox) and (other.id, other.node) == (self.id, self.node)

    def __hash__(self) -> int:
        return hash((self.id, self.node))

    # -- routing --------------------------------------------------------------------------

    def _call(self, fn: Any, idempotent: bool = False) -> Any:
        return self.fleet._call(self.node, fn, idempotent=idempotent)

    def _unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._call(lambda a: a.call.remote(method, self.id, *args, **kwargs),
                          idempotent=method in _READS)

    def _stream(self, fn: Any) -> Iterator[Any]:
        return self.fleet._stream(self.node, fn)

    # -- lifecycle ------------------------------------------------------------------------

    def info(self) -> SandboxInfo:
        return self._unary("inspect")

    inspect = info

    def wait_ready(self, timeout: float | None = 120.0) -> SandboxInfo:
        return self._unary("wait_ready", timeout)

    def stop(self, timeout: float | None = None) -> None:
        self._unary("stop", timeout)

    def remove(self, force: bool = True) -> None:
        self._unary("remove", force)
        self.fleet._forget_sandbox(self.id, self.node)

    def update_network(self, *, egress: Literal["none", "nat"] | None = None, allow_out: Sequence[str] | None = None,
                       deny_out: Sequence[str] | None = None) -> SandboxInfo:
        return self._unary("update_network", egress=egress, allow_out=allow_out, deny_out=deny_out)

    def logs(self, follow: bool = False) -> Iterator[bytes]:
        return self._stream(lambda a: a.logs.remote(self.id, follow))

    def close(self) -> None:
        if self.remove_on_exit:
            from arcbox_vm.errors import ArcboxError

            try:
                self.remove(force=True)
            except ArcboxError:
                pass

    def __enter__(self) -> "FleetSandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands -------------------------------------------------------------------------

    def run(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
            tty: bool = False, tty_size: tuple[int, int] | None = None, timeout: float | None = None,
            on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> RunResult:
        spec = exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty, tty_size=tty_size,
                         timeout=timeout)
        if on_stdout is None and on_stderr is None:  # one call: the output comes back with the result
            return self._call(lambda a: a.run.remote(self.id, spec))
        collector = OutputCollector(on_stdout, on_stderr)
        for out in self._stream(lambda a: a.run_stream.remote(self.id, spec)):
            collector.feed(out)
        return collector.result()

    def run_stream(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "",
                   user: str = "", tty: bool = False, tty_size: tuple[int, int] | None = None,
                   timeout: float | None = None) -> Iterator[Output]:
        spec = exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty, tty_size=tty_size,
                         timeout=timeout)
        return self._stream(lambda a: a.run_stream.remote(self.id, spec))

    def exec(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
             tty: bool = False, tty_size: tuple[int, int] | None = None,
             timeout: float | None = None) -> FleetExecSession:
        spec = exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty, tty_size=tty_size,
                         timeout=timeout, stdin=True)
        return FleetExecSession(self.fleet, self.node, self._call(lambda a: a.exec_open.remote(self.id, spec)))

    def start(self, cmd: Command, *, env: Mapping[str, str] | None = None, working_dir: str = "", user: str = "",
              tty: bool = False, tty_size: tuple[int, int] | None = None, timeout: float | None = None,
              stdin: bool = False) -> str:
        spec = exec_spec(cmd, env=env, working_dir=working_dir, user=user, tty=tty, tty_size=tty_size,
                         timeout=timeout, stdin=stdin)
        return self._unary("_start", spec)

    def attach(self, exec_id: str) -> FleetExecSession:
        key = self._call(lambda a: a.exec_open.remote(self.id, None, str(exec_id)))
        return FleetExecSession(self.fleet, self.node, key)

    def signal(self, exec_id: str, signal: int = 9) -> None:
        self._unary("signal", exec_id, signal)

    def execs(self) -> list[ExecInfo]:
        return self._unary("list_execs")
