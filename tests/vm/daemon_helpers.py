"""Run the real daemon (`arcbox-vm serve`) as a subprocess for tests, and talk gRPC to it."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from arcbox_vm.images import GuestImage
from arcbox_vm.manager.leftovers import processes_using

from .manager_helpers import netns_list

ARCBOX = str(Path(sys.executable).with_name("arcbox-vm"))


def write_config(path: Path, image: GuestImage, data_dir: Path, socket: Path, *, netns: str,
                 cidr: str = "10.241.0.0/24", on_shutdown: str = "leave") -> Path:
    gw = cidr.rsplit(".", 1)[0] + ".1"
    path.write_text(f"""
backend = "qemu"
[firecracker]
data_dir = "{data_dir}"
[grpc]
unix_socket = "{socket}"
[network]
cidr = "{cidr}"
gateway = "{gw}"
netns = "{netns}"
[defaults]
memory_mib = 256
kernel = "{image.kernel}"
initrd = "{image.initrd}"
rootfs = "{image.rootfs}"
[daemon]
on_shutdown = "{on_shutdown}"
""")
    return path


class Daemon:
    """One `arcbox-vm serve` process; restartable with the same config."""

    def __init__(self, config: Path, socket: Path, log: Path) -> None:
        self.config, self.socket, self.log = config, socket, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Daemon":
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([ARCBOX, "serve", "--config", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if self.socket.exists():
                try:
                    self.stub().List(pb.ListSandboxesRequest(), timeout=2)
                    return self
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"daemon did not come up: {self.log.read_text()[-3000:]}")

    def stub(self) -> pb_grpc.SandboxServiceStub:
        return pb_grpc.SandboxServiceStub(grpc.insecure_channel(f"unix:{self.socket}"))

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def wait_state(stub, sid: str, states: tuple[str, ...], timeout: float = 120) -> pb.SandboxInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = stub.Inspect(pb.InspectSandboxRequest(id=sid))
        if info.state in states:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"sandbox {sid} is {info.state}, expected {states}")
        time.sleep(0.2)


def run(stub, sid: str, argv: list[str], timeout: int = 60) -> tuple[bytes, bytes, int]:
    out, err, code = b"", b"", None
    for msg in stub.Run(pb.RunRequest(id=sid, cmd=argv, timeout_seconds=timeout), timeout=timeout + 30):
        if msg.stream == "stdout":
            out += msg.data
        elif msg.stream == "stderr":
            err += msg.data
        elif msg.stream == "exit":
            code = msg.exit_code
        elif msg.stream == "error":
            raise AssertionError(f"run ended with an error: {msg.data!r}")
    return out, err, code


def processes_mentioning(path: Path) -> list[int]:
    return processes_using(path)


def taps_in(netns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": ab" in line]


def leases(data_dir: Path) -> dict[str, str]:
    db = sqlite3.connect(data_dir / "state.db")
    try:
        return dict(db.execute("SELECT ip, sandbox_id FROM leases").fetchall())
    finally:
        db.close()


def memory_kib(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def module_daemon(tmp: Path, image: GuestImage, cidr: str) -> Iterator[Daemon]:
    """One `arcbox-vm serve` on a private data dir, socket and network namespace (with
    on_shutdown=remove); SIGTERM at the end must stop it cleanly and take the namespace
    with it."""
    netns = f"arcbox-t-{secrets.token_hex(3)}"
    cfg = write_config(tmp / "c.toml", image, tmp / "data", tmp / "d.sock", netns=netns, cidr=cidr,
                       on_shutdown="remove")
    d = Daemon(cfg, tmp / "d.sock", tmp / "daemon.log").start()
    yield d
    assert d.stop() == 0, d.log.read_text()[-3000:]
    assert netns not in netns_list()


def arcbox(daemon: Daemon, *args: str, input: bytes | None = None,  # noqa: A002
           timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `arcbox-vm` CLI against `daemon` (stdin: `input`, or nothing)."""
    env = dict(os.environ, ARCBOX_VM_SOCKET=str(daemon.socket))
    return subprocess.run([ARCBOX, *args], capture_output=True, input=input, env=env, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def ok(proc: subprocess.CompletedProcess) -> str:
    """The stdout of a CLI run that must have succeeded."""
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()
