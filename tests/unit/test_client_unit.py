"""The client and the daemon CLI without a daemon: target resolution, status → exception
mapping, argument parsing, output folding, upload chunking — and the client's streams
end to end against a small in-process fake of sandbox.v1 (real gRPC over a Unix socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from arcbox_vm.cli.parsing import RemotePath, parse_cp_operands, parse_env, parse_labels, parse_remote
from arcbox_vm.client import AsyncClient, AsyncSandbox, Client, Sandbox
from arcbox_vm.client.collect import OutputCollector
from arcbox_vm.client.connection import Target, resolve_target
from arcbox_vm.client.convert import exec_request_to_pb, info_from_pb, timeout_to_pb
from arcbox_vm.client.errors import (
    AuthError,
    CommandError,
    DaemonUnavailable,
    DeadlineExceeded,
    PermissionDenied,
    ReadyTimeout,
    Unimplemented,
    map_status,
)
from arcbox_vm.client.options import exec_spec
from arcbox_vm.client.sources import CHUNK_SIZE, iter_chunks, source_size
from arcbox_vm.client.types import Output
from arcbox_vm.errors import (
    AgentDisconnected,
    AgentError,
    ArcboxError,
    BootFailed,
    ConfigError,
    ExecError,
    GuestFileNotFound,
    GuestPermissionDenied,
    InvalidArgument,
    InvalidState,
    ResourceExhausted,
    SandboxAlreadyExists,
    SandboxNotFound,
)
from arcbox_vm.models import ExecSpec

CLI = str(Path(sys.executable).with_name("arcbox-vm"))
S = grpc.StatusCode

# -- target resolution -------------------------------------------------------------------


def test_explicit_socket_wins_over_environment_and_config(tmp_path):
    env = {"ARCBOX_VM_SOCKET": "/env.sock", "ARCBOX_VM_HOST": "h:1", "ARCBOX_VM_CONFIG": "/nope.toml"}
    t = resolve_target(socket="/arg.sock", environ=env)
    assert (t.address, t.transport, t.tls, t.metadata) == ("unix:/arg.sock", "unix", False, ())


def test_explicit_host_wins_over_the_environment_socket():
    t = resolve_target(host="10.0.0.5:7070", token="tok", environ={"ARCBOX_VM_SOCKET": "/env.sock"})
    assert (t.address, t.transport, t.tls) == ("10.0.0.5:7070", "tcp", True)
    assert t.metadata == (("authorization", "Bearer tok"),)


def test_environment_socket_then_host_then_config(tmp_path):
    assert resolve_target(environ={"ARCBOX_VM_SOCKET": "/e.sock"}).address == "unix:/e.sock"
    t = resolve_target(environ={"ARCBOX_VM_HOST": "[::1]:7000", "ARCBOX_VM_TOKEN": "t", "ARCBOX_VM_TLS_CA": "/ca"})
    assert (t.address, t.tls, t.tls_ca, t.token) == ("[::1]:7000", True, "/ca", "t")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[grpc]\nunix_socket = "/from/config.sock"\n')
    assert resolve_target(environ={"ARCBOX_VM_CONFIG": str(cfg)}).address == "unix:/from/config.sock"
    assert resolve_target(config=cfg, environ={}).address == "unix:/from/config.sock"
    assert resolve_target(environ={}).address == "unix:/run/arcbox-vm/arcbox-vm.sock"


def test_empty_values_count_as_unset():
    t = resolve_target(socket="", host="", environ={"ARCBOX_VM_SOCKET": "", "ARCBOX_VM_HOST": "h:9"})
    assert t.address == "h:9"


def test_ambiguous_or_malformed_targets_are_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="not both"):
        resolve_target(socket="/a", host="h:1", environ={})
    with pytest.raises(InvalidArgument, match="ARCBOX_VM_SOCKET and ARCBOX_VM_HOST"):
        resolve_target(environ={"ARCBOX_VM_SOCKET": "/a", "ARCBOX_VM_HOST": "h:1"})
    for bad in ("host-without-port", "h:0", "h:99999", "::1:80", ":80"):
        with pytest.raises(InvalidArgument, match="HOST:PORT"):
            resolve_target(host=bad, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_target(config=tmp_path / "missing.toml", environ={})


def test_insecure_and_token_rules(monkeypatch, tmp_path):
    t = resolve_target(host="h:1", insecure=True, tls_ca="/ca", environ={"ARCBOX_VM_TOKEN": "x"})
    assert (t.tls, t.tls_ca, t.metadata) == (False, None, (("authorization", "Bearer x"),))
    assert resolve_target(host="h:1", environ={"ARCBOX_VM_INSECURE": "1"}).tls is False
    # no credentials on the Unix socket, whatever is set
    assert resolve_target(socket="/s", token="x", environ={}).metadata == ()
    monkeypatch.chdir(tmp_path)
    assert resolve_target(socket="rel.sock", environ={}).address == f"unix:{tmp_path}/rel.sock"


def test_keepalive_only_over_tcp_and_message_limits_everywhere():
    unix = dict(resolve_target(socket="/s", environ={}).options)
    tcp = dict(resolve_target(host="h:1", environ={}).options)
    assert unix["grpc.max_receive_message_length"] == tcp["grpc.max_send_message_length"] == 16 << 20
    assert "grpc.keepalive_time_ms" not in unix and tcp["grpc.keepalive_time_ms"] >= 10_000


def test_unreadable_ca_file_is_a_clear_error(tmp_path):
    with pytest.raises(ArcboxError, match="TLS CA certificate"):
        Target("h:1", "tcp", tls=True, tls_ca=str(tmp_path / "none.pem")).credentials()


# -- status → exception ------------------------------------------------------------------


@pytest.mark.parametrize("code,cls", [
    (S.NOT_FOUND, SandboxNotFound), (S.ALREADY_EXISTS, SandboxAlreadyExists), (S.FAILED_PRECONDITION, InvalidState),
    (S.INVALID_ARGUMENT, InvalidArgument), (S.RESOURCE_EXHAUSTED, ResourceExhausted),
    (S.PERMISSION_DENIED, PermissionDenied), (S.UNAUTHENTICATED, AuthError), (S.DEADLINE_EXCEEDED, DeadlineExceeded),
    (S.UNAVAILABLE, DaemonUnavailable), (S.UNIMPLEMENTED, Unimplemented), (S.INTERNAL, ArcboxError),
])
def test_status_codes_map_to_library_exceptions(code, cls):
    exc = map_status(code, "the server's words", sandbox_id="sb1", target="unix:/x.sock")
    assert type(exc) is cls
    assert "the server's words" in str(exc)


def test_server_message_is_kept_verbatim_and_ids_attached():
    exc = map_status(S.NOT_FOUND, "no sandbox with id 'x'; list them", sandbox_id="x")
    assert str(exc) == "no sandbox with id 'x'; list them" and exc.sandbox_id == "x"
    exc = map_status(S.FAILED_PRECONDITION, "sandbox 'x' is stopped; start another", sandbox_id="x")
    assert isinstance(exc, InvalidState) and str(exc) == "sandbox 'x' is stopped; start another"


def test_file_and_exec_rpcs_tell_the_path_or_command_from_the_sandbox():
    f = map_status(S.NOT_FOUND, "/tmp/x: no such file", kind="file", path="/tmp/x")
    assert isinstance(f, GuestFileNotFound) and f.path == "/tmp/x"
    assert isinstance(map_status(S.PERMISSION_DENIED, "/root: denied", kind="file"), GuestPermissionDenied)
    assert isinstance(map_status(S.NOT_FOUND, "no sandbox with id 'a'", kind="file"), SandboxNotFound)
    e = map_status(S.NOT_FOUND, "foo: command not found", kind="exec")
    assert isinstance(e, ExecError) and e.code == "not_found"
    assert map_status(S.PERMISSION_DENIED, "cannot execute", kind="exec").code == "permission"


def test_the_daemons_error_metadata_rebuilds_the_exact_class():
    exc = map_status(S.FAILED_PRECONDITION, "boot failed: ...", error_class="BootFailed", sandbox_id="b")
    assert type(exc) is BootFailed
    exc = map_status(S.NOT_FOUND, "/x: gone", error_class="GuestFileNotFound", path="/x")
    assert type(exc) is GuestFileNotFound and exc.path == "/x"
    # the agent's channel broke: UNAVAILABLE from the daemon, not "cannot reach the daemon"
    exc = map_status(S.UNAVAILABLE, "the guest agent's channel closed", error_class="AgentDisconnected")
    assert type(exc) is AgentDisconnected and exc.code == "disconnected"
    exc = map_status(S.UNAVAILABLE, "agent hiccup", error_class="SomethingElse")
    assert type(exc) is AgentError
    exc = map_status(S.NOT_FOUND, "nosuch: command not found", error_class="ExecError", exec_code="not_found")
    assert type(exc) is ExecError and exc.code == "not_found"
    # only arcbox_vm.errors classes are ever instantiated from metadata
    assert type(map_status(S.INVALID_ARGUMENT, "bad", error_class="ValidationError")) is InvalidArgument
    assert type(map_status(S.INTERNAL, "x", error_class="os")) is ArcboxError


def test_daemon_unavailable_names_the_target():
    exc = map_status(S.UNAVAILABLE, "connect failed", target="unix:/run/x.sock")
    assert "unix:/run/x.sock" in str(exc) and "arcbox-vm serve" in str(exc)


# -- parsing -----------------------------------------------------------------------------


def test_remote_operands():
    assert parse_remote("sb-1:/tmp/a b") == RemotePath("sb-1", "/tmp/a b")
    assert parse_remote("0f3a:/") == RemotePath("0f3a", "/")
    for local in ("file.txt", "./sb:/x", "/abs/x:/y", "-", "~/a:b", "a_b:/x", ""):
        assert parse_remote(local) is None, local
    with pytest.raises(InvalidArgument, match="absolute"):
        parse_remote("sb:relative")
    assert parse_cp_operands("a.txt", "sb:/tmp/") == ("a.txt", RemotePath("sb", "/tmp/"))
    assert parse_cp_operands("sb:/x", "-") == (RemotePath("sb", "/x"), "-")
    for src, dst in (("a", "b"), ("s1:/a", "s2:/b")):
        with pytest.raises(InvalidArgument, match="exactly one"):
            parse_cp_operands(src, dst)


def test_env_and_labels():
    assert parse_env(["A=1", "B=", "C=x=y", "HOME"], {"HOME": "/h"}) == {"A": "1", "B": "", "C": "x=y", "HOME": "/h"}
    assert parse_env(["UNSET"], {}) == {"UNSET": ""}
    with pytest.raises(InvalidArgument):
        parse_env(["=v"])
    assert parse_labels(["job=x", "empty=", "k=a=b"]) == {"job": "x", "empty": "", "k": "a=b"}
    for bad in ("novalue", "=v"):
        with pytest.raises(InvalidArgument, match="KEY=VALUE"):
            parse_labels([bad])


# -- conversions, output folding, upload chunks ---------------------------------------------


def test_exec_options_become_one_exec_spec_and_one_request_conversion():
    spec = exec_spec("echo hi", env={"A": "1"}, working_dir="/w", user="u", tty=True, tty_size=(120, 40),
                     timeout=1.5, stdin=True)
    assert spec == ExecSpec(cmd=("sh", "-c", "echo hi"), env={"A": "1"}, working_dir="/w", user="u", tty=True,
                            tty_size=(120, 40), timeout_seconds=1.5, stdin=True)
    for message in (pb.RunRequest, pb.ExecRequest, pb.StartRequest):
        req = exec_request_to_pb(message, "sb", spec)
        assert (req.id, list(req.cmd), dict(req.env), req.working_dir, req.user, req.tty) == (
            "sb", ["sh", "-c", "echo hi"], {"A": "1"}, "/w", "u", True)
        assert (req.tty_size.width, req.tty_size.height, req.timeout_seconds) == (120, 40, 2)  # (cols, rows)
    assert exec_request_to_pb(pb.StartRequest, "sb", spec).stdin
    assert not exec_request_to_pb(pb.StartRequest, "sb", spec.replace(stdin=False)).stdin
    plain = exec_request_to_pb(pb.RunRequest, "sb", exec_spec(["true"], timeout=-1))
    assert (plain.HasField("tty_size"), plain.timeout_seconds, dict(plain.env)) == (False, 0, {})
    # a 0 (or less) in tty_size is the daemon's default for that dimension, as it always was
    assert exec_spec(["sh"], tty_size=(0, 50)).tty_size == (80, 50)
    assert exec_spec(["sh"], tty_size=(100, -1)).tty_size == (100, 24)
    for bad in ({"cmd": []}, {"cmd": [1]}, {"env": {"A": 1}}, {"tty_size": (70000, 10)}, {"tty_size": (1,)},
                {"timeout": 10**6}, {"timeout": float("nan")}):
        with pytest.raises(InvalidArgument):
            exec_spec(**{"cmd": ["true"], **bad})  # type: ignore[arg-type]


async def test_bad_exec_options_fail_before_any_request(fake):
    async with AsyncClient(socket=fake.socket) as client:
        with pytest.raises(InvalidArgument, match="cmd"):
            client.run_stream("nobody", [])
        with pytest.raises(InvalidArgument, match="tty_size"):
            await client.exec("nobody", ["sh"], tty=True, tty_size=(0x10000, 24))
        with pytest.raises(InvalidArgument, match="timeout"):
            await client.start("nobody", ["sleep", "1"], timeout=86401)
    with Client(socket=fake.socket) as sync_client, pytest.raises(InvalidArgument, match="strings"):
        sync_client.run("nobody", ["true"], env={"A": 1})  # type: ignore[dict-item]


def test_timeouts_round_up_and_unset_fields_become_none():
    assert [timeout_to_pb(x) for x in (None, 0, -1, 0.2, 1, 1.5)] == [0, 0, 0, 1, 1, 2]
    info = info_from_pb(pb.SandboxInfo(id="a", state="ready", created_at=5))
    assert (info.ready_at, info.last_exit_code, info.error, info.network) == (None, None, None, None)
    assert str(info.state) == "ready"
    assert info_from_pb(pb.SandboxInfo(id="a", state="brand-new")).state == "brand-new"


def test_collector_keeps_streams_apart_and_raises_on_error_ends():
    seen = []
    c = OutputCollector(on_stdout=seen.append)
    for out in (Output("stdout", b"a"), Output("stderr", b"e"), Output("stdout", b"b"), Output("exit", exit_code=3)):
        c.feed(out)
    r = c.result()
    assert (r.stdout, r.stderr, r.exit_code, r.ok, seen) == (b"ab", b"e", 3, False, [b"a", b"b"])
    c = OutputCollector()
    c.feed(Output("stdout", b"partial"))
    c.feed(Output("error", b"the VM stopped"))
    with pytest.raises(CommandError, match="the VM stopped") as info:
        c.result()
    assert info.value.stdout == b"partial"
    with pytest.raises(CommandError, match="without an exit status"):
        OutputCollector().result()


async def _collect(source) -> list[bytes]:  # noqa: ANN001
    return [chunk async for chunk in iter_chunks(source)]


async def test_upload_sources_stream_in_bounded_chunks(tmp_path):
    big = os.urandom(CHUNK_SIZE * 2 + 5)
    path = tmp_path / "f.bin"
    path.write_bytes(big)

    async def agen() -> AsyncIterator[bytes]:
        yield big

    for source in (big, bytearray(big), memoryview(big), path, io.BytesIO(big), iter([big[:10], big[10:]]), agen()):
        chunks = await _collect(source)
        assert b"".join(chunks) == big and max(map(len, chunks)) <= CHUNK_SIZE, type(source)
    assert await _collect("héllo") == ["héllo".encode()]
    assert source_size(big) == len(big) and source_size(path) == len(big) and source_size("é") == 2
    with open(path, "rb") as f:
        f.read(5)
        assert source_size(f) == len(big) - 5
    assert source_size(iter([b"x"])) is None
    with pytest.raises(InvalidArgument):
        await _collect(123)
    with pytest.raises(InvalidArgument, match="must yield bytes"):
        await _collect(["text"])


# -- the client against a fake daemon ----------------------------------------------------------


def _abort_meta(context: grpc.aio.ServicerContext, cls: str, exec_code: str = "") -> None:
    meta = [("arcbox-error", cls)] + ([("arcbox-exec-error", exec_code)] if exec_code else [])
    context.set_trailing_metadata(tuple(meta))


class FakeDaemon(pb_grpc.SandboxServiceServicer):
    """Just enough sandbox.v1: sandboxes become ready after `boot_s`, a kernel named "bad"
    fails; Run interprets argv words out:X / err:X / sleep:S / exit:N / error:R; Exec echoes
    stdin (and reports resizes) until EOF; files live in a dict."""

    def __init__(self) -> None:
        self.boxes: dict[str, pb.SandboxInfo] = {}
        self.files: dict[tuple[str, str], bytes] = {}
        self.upload_chunks: list[int] = []
        self.subscribers: list[asyncio.Queue] = []
        self.boot_s = 0.3
        self.emit_events = True
        self.n = 0

    def _emit(self, sid: str, action: str, **attrs: str) -> None:
        if self.emit_events:
            for q in self.subscribers:
                q.put_nowait(pb.SandboxEvent(sandbox_id=sid, action=action, timestamp=time.time_ns(), attributes=attrs))

    async def _get(self, sid: str, context) -> pb.SandboxInfo:  # noqa: ANN001
        if sid not in self.boxes:
            _abort_meta(context, "SandboxNotFound")
            await context.abort(S.NOT_FOUND, f"no sandbox with id {sid!r}")
        return self.boxes[sid]

    async def Create(self, request, context):  # noqa: ANN001, N802
        self.n += 1
        sid = request.id or f"fake-{self.n}"
        if sid in self.boxes:
            _abort_meta(context, "SandboxAlreadyExists")
            await context.abort(S.ALREADY_EXISTS, f"a sandbox with id {sid!r} already exists")
        self.boxes[sid] = pb.SandboxInfo(id=sid, state="starting", labels=request.labels, created_at=int(time.time()))
        self._emit(sid, "created")

        async def boot() -> None:
            await asyncio.sleep(self.boot_s)
            if request.kernel == "bad":
                self.boxes[sid].state, self.boxes[sid].error = "failed", "kernel too old"
                self._emit(sid, "failed", error="kernel too old")
            elif request.kernel != "never":
                self.boxes[sid].state = "ready"
                self._emit(sid, "ready")

        asyncio.get_running_loop().create_task(boot())
        return pb.CreateSandboxResponse(id=sid, ip_address="10.0.0.2", state="starting")

    async def Inspect(self, request, context):  # noqa: ANN001, N802
        return await self._get(request.id, context)

    async def List(self, request, context):  # noqa: ANN001, N802
        return pb.ListSandboxesResponse(sandboxes=[
            pb.SandboxSummary(id=b.id, state=b.state, labels=b.labels) for b in self.boxes.values()
            if all(b.labels.get(k) == v for k, v in request.labels.items())])

    async def Remove(self, request, context):  # noqa: ANN001, N802
        await self._get(request.id, context)
        del self.boxes[request.id]
        self._emit(request.id, "removed")
        return pb.Empty()

    async def Stop(self, request, context):  # noqa: ANN001, N802
        (await self._get(request.id, context)).state = "stopped"
        return pb.Empty()

    async def Events(self, request, context):  # noqa: ANN001, N802
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.append(q)
        try:
            while True:
                ev = await q.get()
                if (not request.id or ev.sandbox_id == request.id) and (not request.action or
                                                                        ev.action == request.action):
                    yield ev
        finally:
            self.subscribers.remove(q)

    async def Run(self, request, context):  # noqa: ANN001, N802
        await self._get(request.id, context)
        for word in request.cmd:
            verb, _, arg = word.partition(":")
            if verb in ("out", "err"):
                yield pb.RunOutput(stream="stdout" if verb == "out" else "stderr", data=arg.encode())
            elif verb == "sleep":
                await asyncio.sleep(float(arg))
            elif verb == "exit":
                yield pb.RunOutput(stream="exit", exit_code=int(arg), done=True,
                                   timed_out=request.timeout_seconds == 1)
                return
            elif verb == "error":
                yield pb.RunOutput(stream="error", data=arg.encode(), done=True)
                return
            elif verb == "missing":
                _abort_meta(context, "ExecError", "not_found")
                await context.abort(S.NOT_FOUND, f"{arg}: command not found")

    async def Exec(self, request_iterator, context):  # noqa: ANN001, N802
        first = await anext(aiter(request_iterator))
        await self._get(first.init.id, context)
        async for msg in request_iterator:
            kind = msg.WhichOneof("input")
            if kind == "stdin":
                yield pb.ExecOutput(stream="stdout", data=msg.stdin.upper())
            elif kind == "resize":
                yield pb.ExecOutput(stream="stderr", data=f"{msg.resize.width}x{msg.resize.height}".encode())
            elif kind == "eof":
                break
        yield pb.ExecOutput(stream="exit", exit_code=0, done=True)

    async def UploadFile(self, request_iterator, context):  # noqa: ANN001, N802
        header = None
        data = bytearray()
        done = False
        async for msg in request_iterator:
            if header is None:
                header = msg.header
                await self._get(header.id, context)
            elif msg.WhichOneof("part") == "done":
                done = True
            else:
                self.upload_chunks.append(len(msg.data))
                data += msg.data
        if not done:  # like the real daemon: no commit, no file
            await context.abort(S.INVALID_ARGUMENT, "upload ended without done")
        if header.size and header.size != len(data):
            await context.abort(S.INVALID_ARGUMENT, "size mismatch")
        self.files[(header.id, header.path)] = bytes(data)
        return pb.UploadResponse(path=header.path, size=len(data))

    async def _file(self, request, context) -> bytes:  # noqa: ANN001
        await self._get(request.id, context)
        if (request.id, request.path) not in self.files:
            _abort_meta(context, "GuestFileNotFound")
            await context.abort(S.NOT_FOUND, f"{request.path}: no such file or directory")
        return self.files[(request.id, request.path)]

    async def DownloadFile(self, request, context):  # noqa: ANN001, N802
        data = await self._file(request, context)
        for off in range(0, max(len(data), 1), CHUNK_SIZE):
            yield pb.DownloadChunk(data=data[off:off + CHUNK_SIZE], total_size=len(data) if off == 0 else 0)

    async def StatPath(self, request, context):  # noqa: ANN001, N802
        if request.path == "/dir":
            return pb.FileStat(path="/dir", name="dir", type="dir", mode=0o755)
        data = await self._file(request, context)
        return pb.FileStat(path=request.path, name=os.path.basename(request.path), type="file", size=len(data),
                           mode=0o640)

    async def Logs(self, request, context):  # noqa: ANN001, N802
        await self._get(request.id, context)
        yield pb.LogChunk(data=b"console line 1\n")
        yield pb.LogChunk(data=b"console line 2\n")


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """The fake daemon on its own loop thread (the sync client blocks the caller's thread)."""
    sock = tmp_path_factory.mktemp("fake") / "d.sock"
    servicer = FakeDaemon()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_SandboxServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        holder["server"] = server
        started.set()
        await server.wait_for_termination()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    servicer.socket = str(sock)
    yield servicer
    # a CLI subprocess killed mid-stream can leave a call for grpc to reap: do not let a slow
    # reap fail the module (the thread is a daemon thread and dies with the test process)
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(holder["server"].stop(0), loop).result(30)
    thread.join(10)


def test_sync_sandbox_lifecycle_run_and_files(fake):
    with Sandbox.create(labels={"job": "unit"}, socket=fake.socket) as sb:
        assert sb.info().state == "ready"
        got: list[bytes] = []
        r = sb.run(["out:a", "err:e", "out:b", "exit:3"], on_stdout=got.append)
        assert (r.stdout, r.stderr, r.exit_code, got) == (b"ab", b"e", 3, [b"a", b"b"])
        assert sb.run(["exit:0"], timeout=1).timed_out
        with pytest.raises(CommandError, match="vm died"):
            sb.run(["out:x", "error:vm died"])
        with pytest.raises(ExecError) as info:
            sb.run(["missing:foo"])
        assert info.value.code == "not_found"

        payload = os.urandom(3 * CHUNK_SIZE + 1)
        assert sb.files.write("/tmp/p.bin", payload) == len(payload)
        assert max(fake.upload_chunks) <= CHUNK_SIZE
        assert sb.files.read("/tmp/p.bin") == payload
        assert [len(c) for c in sb.files.read_stream("/tmp/p.bin")][0] == CHUNK_SIZE
        sb.files.write("/tmp/g.txt", (x for x in [b"ab", b"cd"]))
        assert sb.files.read("/tmp/g.txt") == b"abcd"
        st = sb.files.stat("/tmp/g.txt")
        assert (st.size, st.type, st.mode) == (4, "file", 0o640)
        assert sb.files.exists("/tmp/g.txt") and not sb.files.exists("/nope")
        with pytest.raises(GuestFileNotFound) as err:
            sb.files.read("/nope")
        assert err.value.path == "/nope"

        def failing():  # noqa: ANN202
            yield b"ok"
            raise OSError(5, "disk on fire")

        # a broken source surfaces as itself, not as the cancelled RPC it causes
        for bad, exc in ((123, InvalidArgument), (["text"], InvalidArgument), (failing(), OSError)):
            with pytest.raises(exc):
                sb.files.write("/tmp/bad", bad)
        with open(__file__) as text_mode, pytest.raises(InvalidArgument, match="text mode"):
            sb.files.write("/tmp/bad", text_mode)
        assert (sb.id, "/tmp/bad") not in fake.files
        with Client(socket=fake.socket) as client:
            assert [s.id for s in client.list(labels={"job": "unit"})] == [sb.id]
        sid = sb.id
    assert sid not in fake.boxes  # removed on leaving the block


def test_sync_exec_session_streams_both_ways(fake):
    with Sandbox.create(socket=fake.socket) as sb:
        with sb.exec(["cat"], tty=True) as session:
            session.write(b"hello")
            first = next(iter(session))
            assert (first.stream, first.data) == ("stdout", b"HELLO")
            session.resize(120, 40)
            session.write("more")
            session.close_stdin()
            r = session.wait()
        assert (r.stdout, r.stderr, r.exit_code) == (b"MORE", b"120x40", 0)
        with pytest.raises(AgentError, match="ended"):
            session.write(b"late")


def test_ready_wait_survives_missing_events_and_reports_failures(fake):
    fake.emit_events = False  # only polling can notice readiness now
    try:
        t0 = time.monotonic()
        with Sandbox.create(socket=fake.socket, id="polled") as sb:
            assert sb.info().state == "ready"
        assert time.monotonic() - t0 < 5
    finally:
        fake.emit_events = True
    with pytest.raises(BootFailed, match="kernel too old"):
        Sandbox.create(socket=fake.socket, kernel="bad", id="bad-one")
    assert "bad-one" not in fake.boxes  # a sandbox that never got ready is removed
    with pytest.raises(ReadyTimeout):
        Sandbox.create(socket=fake.socket, kernel="never", timeout=0.5)
    with pytest.raises(SandboxNotFound):
        Sandbox.connect("nobody", socket=fake.socket)


def test_events_and_logs_stream(fake):
    client = Client(socket=fake.socket)
    events = client.events(id="ev1")  # subscribes now, not at the first next()
    time.sleep(0.3)  # ... but the fake registers the subscriber only when the call reaches it
    created = client.create(id="ev1")
    actions = [next(events).action, next(events).action]
    assert actions == ["created", "ready"] and created.id == "ev1"
    events.close()
    assert b"".join(client.logs("ev1")) == b"console line 1\nconsole line 2\n"
    client.remove("ev1", force=True)
    with pytest.raises(SandboxNotFound) as info:
        client.inspect("ev1")
    assert info.value.sandbox_id == "ev1" and "no sandbox with id 'ev1'" in str(info.value)
    client.close()


async def test_async_sandbox(fake):
    async with await AsyncSandbox.create(socket=fake.socket) as sb:
        seen: list[bytes] = []

        async def on_out(data: bytes) -> None:
            seen.append(data)

        r = await sb.run(["out:x", "exit:0"], on_stdout=on_out)
        assert (r.stdout, seen) == (b"x", [b"x"])
        session = await sb.exec(["sh"])
        await session.write(b"abc")
        await session.close_stdin()
        assert (await session.wait()).stdout == b"ABC"
        await sb.files.write("/a", b"1")
        assert await sb.files.read("/a") == b"1"
    async with AsyncClient(socket=fake.socket) as client:
        with pytest.raises(SandboxAlreadyExists):
            await client.create(id="dup")
            await client.create(id="dup")
        await client.remove("dup")


def test_unreachable_daemon_is_one_clear_error(tmp_path):
    with Client(socket=tmp_path / "none.sock") as client:
        with pytest.raises(DaemonUnavailable, match="cannot reach the arcbox-vm daemon at unix:"):
            client.list()


# -- the CLI against the fake daemon --------------------------------------------------------


def cli(fake, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:  # noqa: A002, ANN001
    env = dict(os.environ, ARCBOX_VM_SOCKET=fake.socket)
    return subprocess.run([CLI, *args], capture_output=True, input=input, env=env, timeout=60)


def test_cli_create_ls_inspect_rm(fake):
    p = cli(fake, "create", "--id", "c1", "--label", "job=cli")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines()[-1] == "c1"
    assert json.loads(cli(fake, "ls", "--json", "--label", "job=cli").stdout)[0]["id"] == "c1"
    assert cli(fake, "ls", "-q", "--label", "job=cli").stdout == b"c1\n"
    assert json.loads(cli(fake, "inspect", "c1").stdout)["state"] == "ready"
    assert cli(fake, "logs", "c1").stdout == b"console line 1\nconsole line 2\n"
    p = cli(fake, "rm", "-f", "c1", "ghost")
    assert p.returncode == 1 and p.stdout == b"c1\n"
    assert p.stderr.decode().count("\n") == 1 and p.stderr.startswith(b"arcbox-vm: rm ghost: no sandbox")


def test_cli_exec_exit_codes_and_streams(fake):
    assert cli(fake, "create", "--id", "x1").returncode == 0
    p = cli(fake, "exec", "x1", "--", "out:o", "err:e", "exit:7")
    assert (p.returncode, p.stdout, p.stderr) == (7, b"o", b"e")
    p = cli(fake, "exec", "--timeout", "1", "x1", "exit:137")
    assert p.returncode == 124 and b"timed out" in p.stderr
    p = cli(fake, "exec", "x1", "--", "missing:zzz")
    assert p.returncode == 127 and p.stderr == b"arcbox-vm: zzz: command not found\n"
    p = cli(fake, "exec", "-i", "x1", "--", "cat", input=b"piped")
    assert (p.returncode, p.stdout) == (0, b"PIPED")
    p = cli(fake, "exec", "nope", "--", "exit:0")
    assert p.returncode == 1 and p.stderr.startswith(b"arcbox-vm: no sandbox")
    cli(fake, "rm", "-f", "x1")


def test_cli_cp_both_ways(fake, tmp_path):
    assert cli(fake, "create", "--id", "cp1").returncode == 0
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(CHUNK_SIZE + 10))
    assert cli(fake, "cp", str(src), "cp1:/dir").returncode == 0  # into a directory: keeps the name
    assert fake.files[("cp1", "/dir/in.bin")] == src.read_bytes()
    out = tmp_path / "out.bin"
    p = cli(fake, "cp", "cp1:/dir/in.bin", str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == src.read_bytes() and (out.stat().st_mode & 0o777) == 0o640
    assert cli(fake, "cp", "-", "cp1:/s.txt", input=b"from stdin").returncode == 0
    assert cli(fake, "cp", "cp1:/s.txt", "-").stdout == b"from stdin"
    p = cli(fake, "cp", "cp1:/missing", str(tmp_path))
    assert p.returncode == 1 and p.stderr.startswith(b"arcbox-vm: /missing: no such file")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]
    assert cli(fake, "cp", "a", "b").returncode == 1
    cli(fake, "rm", "-f", "cp1")


def test_cli_events_stop_after_the_idle_period(fake):
    t0 = time.monotonic()
    p = cli(fake, "events", "--idle", "0.5", "--json")
    assert p.returncode == 0 and p.stdout == b"" and time.monotonic() - t0 < 10


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    p = subprocess.run([CLI, "ls", "--socket", str(tmp_path / "none.sock")], capture_output=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith(b"arcbox-vm: cannot reach") and p.stderr.count(b"\n") == 1
    p = subprocess.run([CLI, "ls", "--socket", "/a", "--host", "h:1"], capture_output=True, timeout=60)
    assert p.returncode == 1 and b"not both" in p.stderr and b"Traceback" not in p.stderr
