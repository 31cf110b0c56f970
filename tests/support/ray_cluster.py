"""A Ray cluster on this machine for tests: a head and nodes on loopback addresses
(127.0.0.x), each a `ray start --block` in a session of its own, with private ports and a
private temp dir. Nothing leaves the machine: usage stats off, no dashboard, and every
address is a loopback one. Stopping a node is SIGTERM to its `ray start` (which ends its
node cleanly; draining is off, so at once); `close()` stops everything and kills what is
left of every session it started.

Also `Proc`: any other process a test starts in a session of its own (daemons), and
`leftovers()`: live processes of those sessions, or naming the test's directory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import arcbox_vm

SRC_DIR = Path(arcbox_vm.__file__).resolve().parents[1]
REPO_DIR = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
ARCBOX_DEFAULT = str(Path(sys.executable).with_name("arcbox-vm"))


def process_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCBOX_VM_", "RAY_"))}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(REPO_DIR)]),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.update(extra)
    return env


def free_port(ip: str = "0.0.0.0") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class Proc:
    """A process in a session of its own, its output in a log file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.argv, self.log, self.env = argv, log, env
        self.popen: subprocess.Popen | None = None
        self.sessions: set[int] = set()

    def start(self) -> "Proc":
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env,
                                          start_new_session=True)
        self.sessions.add(self.popen.pid)
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; then SIGKILL its whole session."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        self.kill_session()
        return rc

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def kill_session(self) -> None:
        for pid in session_members(self.sessions):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _stat(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def session_members(sessions: set[int]) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields and fields[0] not in ("Z", "X") and int(fields[3]) in sessions:
                out.append(int(name))
    return out


def naming(path: Path) -> list[int]:
    """Live processes whose command line mentions `path`."""
    needle = str(path).encode()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            fields = _stat(int(name))
            if needle in cmdline and fields and fields[0] not in ("Z", "X"):
                out.append(int(name))
    return out


class RayCluster:
    """`ray start --head` at `head_ip` plus nodes, each restartable by name."""

    def __init__(self, root: Path, head_ip: str) -> None:
        self.root = root
        self.head_ip = head_ip
        self.port = free_port()
        self.client_port = free_port()
        self.temp = root / "ray"
        self.env = process_env()
        self.procs: dict[str, Proc] = {}
        self.ips: dict[str, str] = {}

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def _common(self, ip: str) -> list[str]:
        return [f"--node-ip-address={ip}", f"--temp-dir={self.temp}", "--block", "--disable-usage-stats"]

    def start_head(self) -> None:
        argv = [RAY, "start", "--head", f"--port={self.port}", f"--ray-client-server-port={self.client_port}",
                "--include-dashboard=false", "--num-cpus=0", *self._common(self.head_ip)]
        self.procs["head"] = Proc(argv, self.root / "ray-head.log", self.env).start()
        self.ips["head"] = self.head_ip
        self._wait_started(self.procs["head"])

    def start_node(self, name: str, ip: str, num_cpus: int = 1) -> None:
        """Start a node and wait until it runs (one at a time: nodes starting together
        in one temp dir trip over each other)."""
        argv = [RAY, "start", f"--address={self.address}", f"--num-cpus={num_cpus}", *self._common(ip)]
        log = self.root / f"ray-{name}.log"
        if log.exists():
            log.rename(log.with_suffix(f".{time.time():.0f}.log"))
        self.procs[name] = Proc(argv, log, self.env).start()
        self.ips[name] = ip
        self._wait_started(self.procs[name])

    def stop_node(self, name: str) -> int | None:
        return self.procs[name].stop()

    def _wait_started(self, proc: Proc, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.running:
                raise AssertionError(f"ray start exited: {proc.tail()}")
            if "Ray runtime started" in proc.tail(100_000):
                return
            time.sleep(0.2)
        raise AssertionError(f"ray start did not finish starting: {proc.tail()}")

    def wait_alive(self, names: list[str], timeout: float = 60) -> None:
        """Until Ray lists a live node at each named node's address (needs ray.init)."""
        import ray

        want = {self.ips[n] for n in names}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
            if want <= alive:
                return
            time.sleep(0.3)
        raise AssertionError(f"Ray nodes not alive after {timeout} s: {want - alive}")

    def sessions(self) -> set[int]:
        return {s for p in self.procs.values() for s in p.sessions}

    def close(self) -> None:
        for name in [n for n in self.procs if n != "head"] + ["head"]:
            if name in self.procs:
                self.procs[name].stop(timeout=20)
