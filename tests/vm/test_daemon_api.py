"""The daemon's gRPC surface against bad and unauthorised callers: every RPC answers with
the right status code (never INTERNAL for a user's mistake), and the daemon keeps serving.

TCP runs on the loopback address only, with a throwaway self-signed certificate.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time

import grpc
import pytest

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.sandbox.v1 import sandbox_pb2_grpc as pb_grpc

from .daemon_helpers import Daemon, run, wait_state, write_config

pytestmark = pytest.mark.vm

TOKEN = "t0k-" + secrets.token_hex(8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, guest_image):
    tmp = tmp_path_factory.mktemp("api")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")], check=True, capture_output=True)
    port = free_port()
    cfg = write_config(tmp / "c.toml", guest_image, tmp / "data", tmp / "d.sock",
                       netns=f"arcbox-t-{secrets.token_hex(3)}", on_shutdown="remove")
    text = cfg.read_text().replace('[grpc]\n', f'[grpc]\ntcp_addr = "127.0.0.1:{port}"\ntls_cert = "{tmp}/cert.pem"\n'
                                               f'tls_key = "{tmp}/key.pem"\ntoken = "{TOKEN}"\nmax_message_mib = 4\n')
    cfg.write_text(text)
    d = Daemon(cfg, tmp / "d.sock", tmp / "daemon.log").start()
    d.port, d.cert = port, (tmp / "cert.pem").read_bytes()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def sid(daemon):
    stub = daemon.stub()
    sid = stub.Create(pb.CreateSandboxRequest(network=pb.NetworkSpec(mode="none"))).id
    wait_state(stub, sid, ("ready",))
    return sid


def tcp_stub(daemon, token: str | None) -> pb_grpc.SandboxServiceStub:
    creds = grpc.ssl_channel_credentials(root_certificates=daemon.cert)
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return pb_grpc.SandboxServiceStub(grpc.secure_channel(f"localhost:{daemon.port}", creds))


def code_of(fn) -> grpc.StatusCode:
    try:
        r = fn()
        if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)):
            list(r)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_tcp_requires_the_right_bearer_token(daemon):
    listing = lambda stub: stub.List(pb.ListSandboxesRequest(), timeout=10)  # noqa: E731
    assert code_of(lambda: listing(tcp_stub(daemon, None))) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: listing(tcp_stub(daemon, "wrong-" + TOKEN))) == grpc.StatusCode.UNAUTHENTICATED
    stream = tcp_stub(daemon, None).Events(pb.SandboxEventsRequest(), timeout=10)
    assert code_of(lambda: stream) == grpc.StatusCode.UNAUTHENTICATED, "streams are guarded too"
    assert code_of(lambda: listing(tcp_stub(daemon, TOKEN))) == grpc.StatusCode.OK
    plain = pb_grpc.SandboxServiceStub(grpc.insecure_channel(f"127.0.0.1:{daemon.port}"))
    assert code_of(lambda: plain.List(pb.ListSandboxesRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE, \
        "plaintext is refused on the TLS port"


def test_tcp_with_token_runs_commands(daemon, sid):
    out, _, code = run(tcp_stub(daemon, TOKEN), sid, ["echo", "over tls"])
    assert (out, code) == (b"over tls\n", 0)


def test_unknown_ids_and_states(daemon, sid):
    stub = daemon.stub()
    for call in (lambda: stub.Inspect(pb.InspectSandboxRequest(id="nope")),
                 lambda: stub.Stop(pb.StopSandboxRequest(id="nope")),
                 lambda: stub.Remove(pb.RemoveSandboxRequest(id="nope")),
                 lambda: stub.Run(pb.RunRequest(id="nope", cmd=["true"])),
                 lambda: stub.StatPath(pb.StatRequest(id="nope", path="/")),
                 lambda: stub.DownloadFile(pb.DownloadRequest(id="nope", path="/etc/hostname")),
                 lambda: stub.Logs(pb.LogsRequest(id="nope"))):
        assert code_of(call) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.Inspect(pb.InspectSandboxRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.List(pb.ListSandboxesRequest(state="sleepy"))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.Create(pb.CreateSandboxRequest(id=sid))) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: stub.Create(pb.CreateSandboxRequest(id="../etc"))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.Create(pb.CreateSandboxRequest(cmd=["x"]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.Create(pb.CreateSandboxRequest(network=pb.NetworkSpec(mode="bridge")))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.Run(pb.RunRequest(id=sid, cmd=[]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.Run(pb.RunRequest(id=sid, cmd=["no-such-cmd"]))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.Run(pb.RunRequest(id=sid, cmd=["true"], tty=True,
                                                  tty_size=pb.TerminalSize(width=70000, height=5)))) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_requests(daemon, sid):
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    raw_run = channel.unary_stream("/sandbox.v1.SandboxService/Run", request_serializer=lambda b: b,
                                   response_deserializer=pb.RunOutput.FromString)
    bad_utf8 = pb.RunRequest(id=sid, cmd=["echo", "x"]).SerializeToString().replace(b"\x12\x01x", b"\x12\x01\xff")
    assert code_of(lambda: raw_run(bad_utf8)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: raw_run(b"\xff\xff\xff garbage")) == grpc.StatusCode.INVALID_ARGUMENT
    stub = daemon.stub()
    huge = pb.RunRequest(id=sid, cmd=["echo", "x" * (5 << 20)])  # over max_message_mib = 4
    assert code_of(lambda: stub.Run(huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    exec_without_init = stub.Exec(iter([pb.ExecInput(stdin=b"hi")]))
    assert code_of(lambda: exec_without_init) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.UploadFile(iter([pb.UploadRequest(data=b"x")]))) == grpc.StatusCode.INVALID_ARGUMENT
    # a stream that ends without `done` (the client broke off) writes nothing at all
    unfinished = iter([pb.UploadRequest(header=pb.UploadHeader(id=sid, path="/root/partial.bin")),
                       pb.UploadRequest(data=b"half")])
    assert code_of(lambda: stub.UploadFile(unfinished)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.StatPath(pb.StatRequest(id=sid, path="/root/partial.bin"))) == \
        grpc.StatusCode.NOT_FOUND


def test_file_paths_are_confined_to_what_the_guest_allows(daemon, sid):
    stub = daemon.stub()

    def upload(path: str, uid: int = -1, gid: int = -1, parents: bool = False):
        return lambda: stub.UploadFile(iter([pb.UploadRequest(header=pb.UploadHeader(
            id=sid, path=path, uid=uid, gid=gid, make_parents=parents)), pb.UploadRequest(data=b"x"),
            pb.UploadRequest(done=True)]))

    # as the unprivileged guest user, ".." and absolute tricks get what that user may do
    assert code_of(upload("/home/sandbox/../../root/evil", uid=1000, gid=1000)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(upload("/etc/evil", uid=1000, gid=1000)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(upload("relative/path")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(upload("/no/such/dir/file")) == grpc.StatusCode.NOT_FOUND
    assert code_of(upload("/home/sandbox/ok.txt", uid=1000, gid=1000)) == grpc.StatusCode.OK
    out, _, _ = run(stub, sid, ["stat", "-c", "%u:%g %a", "/home/sandbox/ok.txt"])
    assert out == b"1000:1000 644\n"
    assert code_of(lambda: stub.DownloadFile(pb.DownloadRequest(id=sid, path="/root"))) != grpc.StatusCode.OK
    assert code_of(lambda: stub.DownloadFile(pb.DownloadRequest(id=sid, path="/no/such"))) == grpc.StatusCode.NOT_FOUND


def test_clients_name_images_and_never_boot_host_files(daemon, sid, tmp_path):
    """A client's kernel/initrd/rootfs is a name in the daemon's images directory; a host
    path, '..' or a symlink out of it is refused before any sandbox is made."""
    stub = daemon.stub()
    images = daemon.config.parent / "data" / "named-images"
    images.mkdir(parents=True, exist_ok=True)
    (images / "escape").symlink_to("/etc/shadow")
    before = {s.id for s in stub.List(pb.ListSandboxesRequest()).sandboxes}
    for field in ("kernel", "initrd", "rootfs"):
        for value in ("/etc/shadow", "/proc/kcore", "../../../../etc/shadow", "escape", "missing", "a/../b"):
            req = pb.CreateSandboxRequest(network=pb.NetworkSpec(mode="none"), **{field: value})
            assert code_of(lambda: stub.Create(req)) == grpc.StatusCode.INVALID_ARGUMENT, (field, value)
    assert {s.id for s in stub.List(pb.ListSandboxesRequest()).sandboxes} == before, "no record was made"
    assert not [p for p in (daemon.config.parent / "data" / "sandboxes").iterdir() if p.name not in before]


def test_daemon_still_serves_after_all_that(daemon, sid):
    t = time.monotonic()
    out, _, code = run(daemon.stub(), sid, ["echo", "alive"])
    assert (out, code) == (b"alive\n", 0) and time.monotonic() - t < 30
    assert daemon.proc.poll() is None
